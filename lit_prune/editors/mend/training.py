"""Training MEND's hypernetwork as an ordinary Lightning run.

    python -m lit_prune.mend_training --config configs/mend_train_smollm2.yaml

(``lit_prune.mend_training`` is the command's entry point; the code lives here.)

A ``LightningCLI`` without subcommands (``run=False``): it validates once before training (the untrained,
identity-initialised transform = a plain gradient step, the baseline on the curves), fits, and exports the best
hypernetwork (by ``val/edit_success``) to ``model.export_path`` for :class:`lit_prune.editors.mend.MEND`.

One training step (Mitchell et al. 2022, Alg. 1): for a batch of edit examples, the per-token gradient factors of the
fine-tuning loss of ``target_new`` are taken on the frozen base model, the hypernetwork maps them to updates ``ΔW``,
and the post-edit model ``W + ΔW`` (applied functionally, the base weights are never written) is scored:

    L = c_edit · NLL(target_new | edit prompt and paraphrase; W + ΔW) + c_loc · KL(p_W ‖ p_{W+ΔW}) on a locality text

Only the hypernetwork (and the edit learning rates) receive gradients; checkpoints hold only them plus what they
were trained for.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ...data.formats import read_records, records_to_requests
from ...errors import fail
from ...requests import EditRequest, EditRequestError
from ...text import answer_nll, prompt_answer_batch, token_accuracy
from ..base import Updates
from .editor import STATE_PREFIX, load_hypernetwork, model_info, save_hypernetwork
from .factors import (
    default_mend_parameters,
    factor_dims,
    factors_and_logits,
    gradient_factors,
    orientation,
)
from .hypernet import MENDHypernetwork


# -- data ----------------------------------------------------------------------------------------------------------
@dataclass
class MENDExample:
    """An edit request paired with a locality text ``loc_prompt + " " + loc_answer`` (about something else)."""

    request: EditRequest
    loc_prompt: str
    loc_answer: str


def pair_locality(requests: list[EditRequest]) -> list[MENDExample]:
    """Pair each request with its first neighbourhood prompt (same relation, another subject) and that prompt's
    answer (``neighborhood_answers[0]``, else the request's ``target_true``); a request without either is paired
    with the next request's edit prompt and true object."""
    out = []
    for i, r in enumerate(requests):
        if r.neighborhood_prompts and (r.neighborhood_answers or r.target_true):
            ans = r.neighborhood_answers[0] if r.neighborhood_answers else r.target_true
            out.append(MENDExample(r, r.neighborhood_prompts[0], ans))
        else:
            o = requests[(i + 1) % len(requests)]
            out.append(MENDExample(r, o.full_prompt, o.target_true or o.target_new))
    return out


class _Examples(Dataset):
    def __init__(self, examples: list[MENDExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> MENDExample:
        return self.examples[i]


def _as_list(batch: list[MENDExample]) -> list[MENDExample]:
    return batch


class MENDDataModule(L.LightningDataModule):
    """Edit examples for MEND training: a held-out validation split and a training split of one edit file.

    Args:
        path: a ``.json``/``.jsonl`` edit file in any supported format (CounterFact ROME or EasyEdit, ZsRE, own).
        format: the file's format, ``None`` = detected.
        n_val: held-out records for validation (taken first after the seeded shuffle).
        n_train: training records (the next ones); ``None`` = all the rest.
        batch_size: edit examples per training step, edited together (1 = the paper's one-fact-at-a-time).
        seed: the shuffle of the records (training batches are reshuffled every epoch by the trainer's seed).
    """

    def __init__(
        self,
        path: str,
        format: str | None = None,
        n_val: int = 50,
        n_train: int | None = None,
        batch_size: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1 or n_val < 1 or (n_train is not None and n_train < 1):
            raise ValueError(f"MENDDataModule: batch_size, n_val and n_train must be >= 1, got {batch_size}, {n_val}, {n_train}")
        records = read_records(path)
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        need = n_val + (n_train or 1)
        if len(records) < need:
            raise EditRequestError(f"MENDDataModule: '{path}' has {len(records)} records, need at least {need}")
        val_idx = order[:n_val]
        train_idx = order[n_val:] if n_train is None else order[n_val : n_val + n_train]
        convert = lambda idx: records_to_requests([records[i] for i in idx], format, source=str(path), indices=idx)  # noqa: E731
        self.val_examples = pair_locality(convert(val_idx))
        self.train_examples = pair_locality(convert(train_idx))
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Examples(self.train_examples), batch_size=self.batch_size, shuffle=True, collate_fn=_as_list)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Examples(self.val_examples), batch_size=1, shuffle=False, collate_fn=_as_list)


# -- losses --------------------------------------------------------------------------------------------------------
def kl_pre_post(pre_logits: Tensor, post_logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over the masked positions of ``KL(p_pre ‖ p_post)`` of the next-token distributions. (B, L, V), (B, L)."""
    pre = torch.log_softmax(pre_logits.float(), -1)
    post = torch.log_softmax(post_logits.float(), -1)
    kl = (pre.exp() * (pre - post)).sum(-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1)


class MENDTrainingModule(L.LightningModule):
    """Trains MEND's gradient transform on a frozen base model (automatic optimisation).

    Args:
        model: a name for :func:`lit_prune.load_model` (local folder, ``smollm2-135m``, or a hub id like ``gpt2-xl``).
        params: edited weights; ``None`` = the MLP input/output projections of the last ``n_edit_blocks`` blocks.
        n_edit_blocks: see ``params``.
        rank: hidden width of the transform's residual blocks; ``n_blocks``: blocks per shared MLP.
        edit_lr: initial edit learning rate ``η`` (the untrained transform is the gradient step ``-η ∇_W L``).
        lr: Adam learning rate of the transform; ``lr_lr``: of the log edit learning rates.
        c_edit, c_loc: loss weights (MEND: 0.1 and 1).
        n_paraphrases: paraphrase prompts per edit example added to the edit loss.
        loc_positions: where the locality KL is averaged: ``"all"`` positions of the locality text (MEND's code) or
            only those predicting its ``answer`` tokens (CounterFact neighbourhoods: the edit leaks into exactly
            those; averaged over all positions the signal is diluted by the unaffected prompt positions).
        dtype: the base model's dtype; the transform and factors are float32.
        export_path: where the best hypernetwork is written at the end of ``fit``; ``"auto"`` =
            ``<log_dir>/mend_hypernet.pt``; ``None`` = no export (the ``.ckpt`` files also load in the MEND editor).
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        params: list[str] | None = None,
        n_edit_blocks: int = 3,
        rank: int = 128,
        n_blocks: int = 1,
        edit_lr: float = 1e-3,
        lr: float = 1e-4,
        lr_lr: float = 1e-2,
        c_edit: float = 0.1,
        c_loc: float = 1.0,
        n_paraphrases: int = 1,
        loc_positions: str = "answer",
        dtype: str = "float32",
        export_path: str | None = "auto",
    ) -> None:
        super().__init__()
        if c_edit < 0 or c_loc < 0 or lr <= 0 or lr_lr < 0 or n_paraphrases < 0:
            raise ValueError("MENDTrainingModule: c_edit, c_loc, lr_lr, n_paraphrases must be >= 0 and lr > 0")
        if loc_positions not in ("all", "answer"):
            raise ValueError(f"MENDTrainingModule: loc_positions must be 'all' or 'answer', got {loc_positions!r}")
        self.save_hyperparameters()
        self.model_name, self.params_arg, self.n_edit_blocks = model, params, n_edit_blocks
        self.tokenizer: Any = None
        self.hypernet: MENDHypernetwork | None = None
        self.strict_loading = False  # checkpoints hold only the hypernetwork

    # -- model and hypernetwork, built on first use ----------------------------------------------------------------
    def configure_model(self) -> None:
        if self.hypernet is not None:
            return
        from ...models import load_model

        self.set_model(*load_model(self.model_name, dtype=self.hparams.dtype))

    def set_model(self, model: nn.Module, tokenizer: Any, name: str | None = None) -> None:
        """Use an already loaded base model (tests, notebooks) and build the hypernetwork for it."""
        model.eval().requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        params = list(self.params_arg) if self.params_arg else default_mend_parameters(model, self.n_edit_blocks)
        hp = self.hparams
        self.hypernet = MENDHypernetwork(
            params,
            {p: factor_dims(model, p) for p in params},
            {p: orientation(model, p) for p in params},
            rank=hp.rank,
            n_blocks=hp.n_blocks,
            edit_lr=hp.edit_lr,
            model_info=model_info(model, name or self.model_name),
        ).to(next(model.parameters()).device)

    def train(self, mode: bool = True) -> "MENDTrainingModule":
        super().train(mode)
        if "model" in self._modules:
            self._modules["model"].eval()  # the base model never uses dropout
        return self

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.configure_model()
        net = [p for n, p in self.hypernet.named_parameters() if n != "log_lr"]
        return torch.optim.Adam([{"params": net, "lr": self.hparams.lr},
                                 {"params": [self.hypernet.log_lr], "lr": self.hparams.lr_lr}])

    # -- the edit, applied functionally -----------------------------------------------------------------------------
    def edit_updates(self, requests: list[EditRequest]) -> Updates:
        """The hypernetwork's updates for ``requests`` on the frozen base weights (differentiable in the hypernet)."""
        factors = gradient_factors(self.model, self.tokenizer, requests, self.hypernet.params)
        return self.hypernet(factors)

    def edited_logits(self, updates: Updates, ids: Tensor, mask: Tensor) -> Tensor:
        """Logits of the base model with ``W + ΔW`` for each updated weight (``torch.func.functional_call``)."""
        weights = dict(self.model.named_parameters())
        new = {p: weights[p] + u.dense().to(weights[p].dtype) for p, u in updates.items()}
        return torch.func.functional_call(self.model, new, (), {"input_ids": ids, "attention_mask": mask}).logits

    def _rows(self, batch: list[MENDExample]) -> tuple[list[str], list[str], int]:
        """Prompts and answers: the B edit prompts, then their paraphrases (all with ``target_new``), then the B
        locality texts; returns them and the number of edit rows."""
        prompts = [ex.request.full_prompt for ex in batch]
        prompts += [p for ex in batch for p in ex.request.paraphrase_prompts[: self.hparams.n_paraphrases]]
        answers = [ex.request.target_new for ex in batch] + [
            ex.request.target_new for ex in batch for _ in ex.request.paraphrase_prompts[: self.hparams.n_paraphrases]]
        n_edit = len(prompts)
        prompts += [ex.loc_prompt for ex in batch]
        answers += [ex.loc_answer for ex in batch]
        return prompts, answers, n_edit

    def losses(self, batch: list[MENDExample]) -> dict[str, Tensor]:
        """``edit_nll`` (post-edit, edit prompts and paraphrases), ``loc_kl`` and ``loss`` for one batch.

        Two forward passes: the base model on edit prompts + locality texts (the gradient factors, and the
        pre-edit locality logits from the same pass), then the edited model on every row.
        """
        b = len(batch)
        prompts, answers, n_edit = self._rows(batch)
        ids, mask, labels = prompt_answer_batch(self.tokenizer, prompts, answers, device=self.device)
        inner = torch.cat([torch.arange(b), torch.arange(n_edit, n_edit + b)]).to(ids.device)
        inner_labels = labels[inner].clone()
        inner_labels[b:] = -100  # locality rows: logits only, no fine-tuning loss
        factors, pre = factors_and_logits(self.model, ids[inner], mask[inner], inner_labels, self.hypernet.params)
        updates = self.hypernet(factors)
        pre_loc = pre[b:]
        post = self.edited_logits(updates, ids, mask)
        edit_nll = answer_nll(post[:n_edit], labels[:n_edit]).mean()
        loc_kl = kl_pre_post(pre_loc, post[n_edit:], self.loc_mask(mask[n_edit:], labels[n_edit:]))
        loss = self.hparams.c_edit * edit_nll + self.hparams.c_loc * loc_kl
        return {"loss": loss, "edit_nll": edit_nll.detach(), "loc_kl": loc_kl.detach()}

    def loc_mask(self, mask: Tensor, labels: Tensor) -> Tensor:
        """(B, L) positions whose next-token distributions enter the locality KL (see ``loc_positions``)."""
        if self.hparams.loc_positions == "all":
            return mask
        return torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1)) & mask.bool()  # position t predicts token t+1

    def training_step(self, batch: list[MENDExample], batch_idx: int) -> Tensor:
        out = self.losses(batch)
        n = len(batch)
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=n)
        self.log("train/edit_nll", out["edit_nll"], prog_bar=True, batch_size=n)
        self.log("train/loc_kl", out["loc_kl"], prog_bar=True, batch_size=n)
        for p, v in self.hypernet.edit_lrs().items():
            self.log(f"edit_lr/{p}", v, batch_size=n)
        return out["loss"]

    # -- validation: one held-out edit at a time ----------------------------------------------------------------
    @torch.no_grad()
    def validation_step(self, batch: list[MENDExample], batch_idx: int) -> None:
        for ex in batch:
            with torch.inference_mode(False):  # in case the trainer runs validation in inference mode
                updates = self.edit_updates([ex.request])
            for metric, v in self.score_edit(ex, updates).items():
                self.log(f"val/{metric}", v, batch_size=1)

    @torch.no_grad()
    def score_edit(self, ex: MENDExample, updates: Updates) -> dict[str, float]:
        """Pre/post-edit scores of one example.

        ``edit_success`` = P(new) > P(true) on the edit prompt (teacher-forced token accuracy of the new object = 1
        when there is no true object); ``paraphrase_success`` the same on the first paraphrase; ``edit_acc`` the
        token accuracy of the new object (MEND's edit success); ``locality_drawdown`` = (pre − post) of "the locality
        prompt prefers its own answer over the new object"; ``loc_kl`` = KL(pre ‖ post) on the locality text (at
        ``loc_positions``);
        ``loc_token_change`` = share of the locality answer's argmax predictions changed by the edit.
        """
        r = ex.request
        para = r.paraphrase_prompts[:1]
        prompts = [r.full_prompt] + para + [ex.loc_prompt]
        rows_p, rows_a = [], []
        for p in prompts:
            rows_p += [p, p]
            rows_a += [r.target_new, r.target_true or r.target_new]
        rows_p.append(ex.loc_prompt)
        rows_a.append(ex.loc_answer)
        ids, mask, labels = prompt_answer_batch(self.tokenizer, rows_p, rows_a, device=self.device)
        pre = self.model(input_ids=ids, attention_mask=mask).logits
        post = self.edited_logits(updates, ids, mask)
        nll_pre, nll_post = answer_nll(pre, labels), answer_nll(post, labels)
        acc_post = token_accuracy(post, labels)

        def prefers_new(nll: Tensor, i: int) -> float:  # row pair (2i: new, 2i+1: true)
            if r.target_true is None:
                return float(acc_post[2 * i] == 1)
            return float(nll[2 * i] < nll[2 * i + 1])

        out = {"edit_success": prefers_new(nll_post, 0), "edit_acc": float(acc_post[0]),
               "edit_success_pre": prefers_new(nll_pre, 0) if r.target_true else 0.0}
        if para:
            out["paraphrase_success"] = prefers_new(nll_post, 1)
        k = len(prompts) - 1  # locality pair
        loc_pre = float(nll_pre[-1] < nll_pre[2 * k])  # its own answer beats the new object
        loc_post = float(nll_post[-1] < nll_post[2 * k])
        out["locality_drawdown"] = loc_pre - loc_post
        lm = labels[-1:] != -100
        out["loc_kl"] = float(kl_pre_post(pre[-1:], post[-1:], self.loc_mask(mask[-1:], labels[-1:])))
        changed = (pre[-1:, :-1].argmax(-1) != post[-1:, :-1].argmax(-1)) & lm[:, 1:]
        out["loc_token_change"] = float(changed.sum() / lm[:, 1:].sum().clamp(min=1))
        return out

    # -- checkpoints and export ------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(STATE_PREFIX)}
        checkpoint["mend_config"] = self.hypernet.config()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()

    def on_train_end(self) -> None:
        path = self.hparams.export_path
        if path is None or not self.trainer.is_global_zero:
            return
        if path == "auto":
            path = Path(self.trainer.log_dir or ".") / "mend_hypernet.pt"
        ckpt = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        hypernet = load_hypernetwork(ckpt) if ckpt and Path(ckpt).is_file() else self.hypernet
        out = save_hypernetwork(hypernet, path)
        rank_zero_info(f"MEND hypernetwork ({'best: ' + ckpt if hypernet is not self.hypernet else 'last'}) -> {out}")


class MENDTrainingCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", type=str, default=None, help="Lightning checkpoint to resume from")
        parser.add_argument("--validate_first", type=bool, default=True,
                            help="validate the untrained (gradient-step) transform before training")


def main(args: list[str] | None = None) -> None:
    try:
        cli = MENDTrainingCLI(
            MENDTrainingModule,
            MENDDataModule,
            run=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"default_env": False},
            args=args,
        )
    except Exception as e:  # noqa: BLE001 - a configuration error ends as one line (errors.fail)
        fail(e)
    ckpt = cli.config.get("ckpt_path")
    try:
        if cli.config.get("validate_first") and ckpt is None:
            cli.trainer.validate(cli.model, datamodule=cli.datamodule)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    except Exception as e:  # noqa: BLE001 - so does a failing run (LIT_PRUNE_DEBUG=1: the traceback)
        fail(e)


if __name__ == "__main__":
    main()
