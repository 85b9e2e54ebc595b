"""PRUNE in a project that already exists: continual fine-tuning of a causal LM, plus two lines.

``ContinualFineTuning`` is the kind of LightningModule users already have: a Hugging Face causal LM fine-tuned on a
stream of texts with automatic optimisation (a loss returned from ``training_step``, an AdamW optimizer), only some
weights trainable. Adding PRUNE to it takes two lines and no change to the module::

    from lit_prune.callbacks import PruneCallback
    trainer = L.Trainer(callbacks=[PruneCallback(params=module.trainable)])   # the trained MLP matrices

After every optimizer step the callback restrains the accumulated update ΔW = W − W₀ of each matched matrix: its
singular values σ ≥ τ = σ_max(W₀) become τ + log_α(σ/τ) (online mode, the default), so the trained matrices stay
well conditioned however long the stream runs. ΔW is read from the weights (a module trained with gradients logs no
low-rank updates), one SVD per matrix and step.

Run as a script, it fine-tunes the embedded SmolLM2-135M (offline) on bundled Wikipedia summaries twice, without and
with the callback, and writes the condition number κ of the trained matrices, σ_max(ΔW) and the held-out perplexity
at a few steps to ``examples/results.md``::

    OMP_NUM_THREADS=1 python examples/continual_finetuning.py            # ~5 min on one CPU core
    python examples/continual_finetuning.py --steps 20 --out /tmp/r.md   # shorter
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

import lit_prune
from lit_prune.callbacks import PruneCallback
from lit_prune.metrics.downstream import text_nll
from lit_prune.restraint import condition_number, sigma_max

HERE = Path(__file__).resolve().parent


class ContinualFineTuning(L.LightningModule):
    """Next-token fine-tuning of the parameters of ``model`` whose names match ``trainable`` (``re.search``).

    Args:
        model: a name for :func:`lit_prune.load_model` (a local HF folder, ``smollm2-135m``, or a hub id).
        trainable: regex over ``model.named_parameters()`` names; everything else is frozen.
        lr: AdamW learning rate (no weight decay).
    """

    def __init__(self, model: str = "smollm2-135m",
                 trainable: str = r"layers\.(26|27|28|29)\.mlp\.down_proj\.weight", lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_name, self.trainable, self.lr = model, trainable, lr
        self.model: torch.nn.Module | None = None
        self.tokenizer: Any = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model, tok = lit_prune.load_model(self.model_name)
        pattern = re.compile(self.trainable)
        for name, p in model.named_parameters():
            p.requires_grad_(bool(pattern.search(name)))
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"ContinualFineTuning: trainable={self.trainable!r} matches no parameter")
        self.model, self.tokenizer = model, tok

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.0)


def text_loader(tokenizer: Any, texts: Sequence[str], batch_size: int = 4, max_length: int = 64) -> DataLoader:
    """Batches of ``texts`` in order (a stream), tokenized and right-padded; padding is not a target."""

    def collate(chunk: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}

    return DataLoader(list(texts), batch_size=batch_size, shuffle=False, collate_fn=collate)


class Probe(L.Callback):
    """At step 0 and every ``every_n_steps`` steps: κ(W) and σ_max(W − W₀) of the trained matrices, and the
    perplexity of ``texts`` (held out). Listed after a PruneCallback, it sees the restrained weights."""

    reads_evaluated_weights = True  # lit_prune.protocols.WeightReader: PruneCallback goes first

    def __init__(self, texts: Sequence[str], every_n_steps: int, max_length: int = 64) -> None:
        self.texts, self.every_n_steps, self.max_length = list(texts), every_n_steps, max_length
        self.W0: dict[str, torch.Tensor] = {}
        self.rows: list[dict[str, Any]] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: ContinualFineTuning) -> None:
        self.W0 = {n: p.detach().clone() for n, p in pl_module.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, pl_module: ContinualFineTuning) -> dict[str, Any]:
        params = dict(pl_module.model.named_parameters())
        nll, n = text_nll(pl_module.model, pl_module.tokenizer, self.texts, batch_size=8, max_length=self.max_length)
        row = {"step": trainer.global_step, "perplexity": math.exp(nll / n),
               "kappa": {k: condition_number(params[k]) for k in self.W0},
               "dsigma": {k: sigma_max(params[k] - W0) for k, W0 in self.W0.items()},
               "tau": {k: sigma_max(W0) for k, W0 in self.W0.items()}}
        self.rows.append(row)
        return row

    def on_train_start(self, trainer: L.Trainer, pl_module: ContinualFineTuning) -> None:
        self.measure(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: ContinualFineTuning, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.measure(trainer, pl_module)


def run(model: str, trainable: str, texts: Sequence[str], held_out: Sequence[str], prune: bool, steps: int,
        eval_every: int, lr: float, batch_size: int = 4, max_length: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """Fine-tune for ``steps`` optimizer steps, with or without PruneCallback; returns the probe's rows."""
    L.seed_everything(seed, verbose=False)
    module = ContinualFineTuning(model, trainable, lr)
    module.configure_model()  # the tokenizer is needed for the data loader
    probe = Probe(held_out, eval_every, max_length)
    callbacks: list[L.Callback] = [probe]
    if prune:
        callbacks.insert(0, PruneCallback(params=module.trainable))  # <- PRUNE: before the weight readers
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, text_loader(module.tokenizer, texts, batch_size, max_length))
    return probe.rows


def report(rows: dict[str, list[dict[str, Any]]], args: argparse.Namespace, seconds: float) -> str:
    """The results as markdown: one row per measured step, both runs side by side."""
    names = list(rows["without"][0]["kappa"])
    tau = rows["without"][0]["tau"]
    lines = [
        "# Continual fine-tuning with and without PruneCallback",
        "",
        f"Generated by `examples/continual_finetuning.py` ({platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {seconds:.0f} s for both runs).",
        "",
        f"Model `{args.model}`; trainable (AdamW, lr {args.lr:g}, high on purpose so that ΔW passes τ within the "
        f"run; no weight decay): the {len(names)} matrices matching "
        f"`{args.trainable}`; {args.steps} steps of {args.batch_size} texts × ≤ {args.max_length} tokens from the "
        f"bundled Wikipedia summaries ({args.offset}–{args.offset + args.steps * args.batch_size - 1}); held-out "
        f"perplexity on the last {args.n_held_out} summaries. With PRUNE: `PruneCallback(params=module.trainable)` "
        "(online, α = e, every step). κ and σ_max(ΔW) are the largest over the trained matrices; "
        f"τ = σ_max(W₀) is {min(tau.values()):.2f}–{max(tau.values()):.2f}.",
        "",
        "| step | κ(W) without | κ(W) with PRUNE | σ_max(ΔW) without | σ_max(ΔW) with PRUNE "
        "| perplexity without | perplexity with PRUNE |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a, b in zip(rows["without"], rows["with"]):
        lines.append(f"| {a['step']} | {max(a['kappa'].values()):.1f} | {max(b['kappa'].values()):.1f} "
                     f"| {max(a['dsigma'].values()):.2f} | {max(b['dsigma'].values()):.2f} "
                     f"| {a['perplexity']:.2f} | {b['perplexity']:.2f} |")
    lines += ["", "Per matrix at the last step (κ without → with PRUNE):", ""]
    last_a, last_b = rows["without"][-1], rows["with"][-1]
    lines += [f"- `{n}`: τ {tau[n]:.2f}; κ {last_a['kappa'][n]:.1f} → {last_b['kappa'][n]:.1f}; "
              f"σ_max(ΔW) {last_a['dsigma'][n]:.2f} → {last_b['dsigma'][n]:.2f}" for n in names]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--trainable", default=r"layers\.(26|27|28|29)\.mlp\.down_proj\.weight")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2, help="high on purpose: ΔW passes τ within the run")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--offset", type=int, default=5000, help="first training text (statistics use the first 3,000)")
    p.add_argument("--n-held-out", type=int, default=16)
    p.add_argument("--out", default=str(HERE / "results.md"))
    args = p.parse_args(argv)
    texts = lit_prune.load_texts("wiki-offline")
    train = texts[args.offset: args.offset + args.steps * args.batch_size]
    held_out = texts[-args.n_held_out:]
    t0 = time.perf_counter()
    rows = {}
    for key, prune in (("without", False), ("with", True)):
        rows[key] = run(args.model, args.trainable, train, held_out, prune, args.steps, args.eval_every, args.lr,
                        args.batch_size, args.max_length)
        print(f"{key} PRUNE: " + ", ".join(f"step {r['step']}: ppl {r['perplexity']:.2f}, "
                                           f"max κ {max(r['kappa'].values()):.1f}" for r in rows[key]), flush=True)
    text = report(rows, args, time.perf_counter() - t0)
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
