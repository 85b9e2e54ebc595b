"""FT-L: constrained fine-tuning of MLP output matrices, the naive baseline of the editing papers (ROME's FT-L).

A few Adam steps (lr ``lr``, no weight decay) on the teacher-forced NLL of ``" " + target_new`` after each request's
prompt (averaged over the target tokens, then over the batch), with the change of every entry clamped to
``[−norm_constraint, +norm_constraint]`` after each step (an L∞ bound around the pre-edit weights; None = no bound).
ROME's FT-L scores only the first target token at the last prompt position; here every target token is scored.

The change ΔW is held as a separate float32 tensor added to the module's output through a hook (the weights are
never written during the optimisation, and 16-bit models keep a float32 update). ΔW is dense and in general full
rank, so it is returned EXACTLY as ``LowRankUpdate(A, B)`` with an identity on the smaller side
(rank = min(rows, cols)): ``A = I, B = ΔWᵀ`` when rows ≤ cols, else ``A = ΔW, B = I``.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..requests import EditRequest
from .base import LowRankUpdate, Updates
from .hparams import FTHParams
from .locate import LocateEditor
from ..text import answer_ids, pad_batch, pad_id, prompt_ids
from .tokens import fill


def dense_as_low_rank(delta: Tensor) -> LowRankUpdate:
    """An exact factorisation A Bᵀ = delta with an identity factor on the smaller side."""
    rows, cols = delta.shape
    if rows <= cols:
        return LowRankUpdate(torch.eye(rows, dtype=torch.float32, device=delta.device), delta.T.float().contiguous())
    return LowRankUpdate(delta.float(), torch.eye(cols, dtype=torch.float32, device=delta.device))


class FT(LocateEditor):
    """Constrained fine-tuning (FT-L) of the MLP output matrix of ``layers`` (None = the model's preset).

    ``num_steps`` Adam steps at ``lr``; ``norm_constraint``: L∞ bound of the change of each entry (ROME's FT-L
    uses 5e-4); ``early_stop_loss``: stop once the NLL is below it.
    """

    method = "ft"
    hparams_class = FTHParams

    def __init__(
        self,
        layers: int | list[int] | None = None,
        num_steps: int | None = None,
        lr: float | None = None,
        norm_constraint: float | None = None,
        early_stop_loss: float | None = None,
        rewrite_module_tmp: str | None = None,
        layers_module: str | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__(layers=layers, num_steps=num_steps, lr=lr, norm_constraint=norm_constraint,
                         early_stop_loss=early_stop_loss, rewrite_module_tmp=rewrite_module_tmp,
                         layers_module=layers_module, progress=progress)
        self.last_info: dict[str, Any] = {}

    def prepare(self, model: nn.Module, tokenizer: Any) -> None:
        self.matrices(model)

    def compute(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest | Mapping[str, Any]]) -> Updates:
        reqs = self.check_requests(requests)
        hp, mats = self.hparams(model), self.matrices(model)
        device = next(model.parameters()).device
        seqs, rows, cols, tgts, owner = [], [], [], [], []
        for i, r in enumerate(reqs):
            text, _ = fill(r.prompt, r.subject)
            ids = prompt_ids(tokenizer, text)
            t = answer_ids(tokenizer, r.target_new) if r.target_new.strip() else []
            if not t:
                from ..requests import EditRequestError

                raise EditRequestError(f"{self.where(i, r)}: field 'target_new' {r.target_new!r} has no tokens")
            seqs.append(ids + t[:-1])
            for j, tok_id in enumerate(t):
                rows.append(i), cols.append(len(ids) - 1 + j), tgts.append(tok_id), owner.append(i)
        x, mask, _, _ = pad_batch(seqs, pad_id(tokenizer), "right", device)
        rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
        tgt_t, own_t = torch.tensor(tgts, device=device), torch.tensor(owner, device=device)
        n_tok = torch.bincount(own_t, minlength=len(reqs)).float()

        deltas = {layer: torch.zeros_like(m.weight, dtype=torch.float32, requires_grad=True) for layer, m in mats.items()}
        handles = []
        for layer, m in mats.items():
            d = deltas[layer]

            def hook(module: nn.Module, args: tuple, out: Tensor, d: Tensor = d, m=m) -> Tensor:
                k = args[0].float()
                extra = k @ d.T if m.stored_out_in else k @ d
                return out + extra.to(out.dtype)

            handles.append(m.module.register_forward_hook(hook))
        opt = torch.optim.Adam(list(deltas.values()), lr=hp.lr)
        eps = hp.norm_constraint
        losses: list[float] = []
        t0 = time.perf_counter()
        try:
            with torch.enable_grad():
                for _ in range(hp.num_steps):
                    opt.zero_grad()
                    logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits
                    logp = F.log_softmax(logits[rows_t, cols_t].float(), -1).gather(1, tgt_t[:, None])[:, 0]
                    per_req = torch.zeros(len(reqs), device=device).index_add(0, own_t, -logp) / n_tok
                    loss = per_req.mean()
                    losses.append(loss.item())
                    if loss.item() < hp.early_stop_loss:
                        break
                    loss.backward()
                    opt.step()
                    if eps is not None:
                        with torch.no_grad():
                            for d in deltas.values():
                                d.clamp_(-eps, eps)
        finally:
            for h in handles:
                h.remove()
        self.last_info = {"losses": losses, "steps": len(losses), "seconds": time.perf_counter() - t0}
        out: Updates = {}
        for layer, m in mats.items():
            up = dense_as_low_rank(deltas[layer].detach())
            out[m.param_name] = self.finite_update(up, f"FT update of '{m.param_name}'")
        return out
