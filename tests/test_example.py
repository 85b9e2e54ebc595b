"""examples/continual_finetuning.py: a plain fine-tuning LightningModule; PruneCallback restrains its trained weights."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from conftest import CORPUS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from continual_finetuning import run  # noqa: E402

TRAINABLE = r"mlp\.(up|down)_proj\.weight"


def test_prune_callback_restrains_fine_tuned_matrices(tiny_llama_dir):
    """The same 16 AdamW steps on the tiny Llama's six MLP matrices, without and with the callback."""
    kw = dict(texts=CORPUS * 6, held_out=CORPUS[:3], steps=16, eval_every=8, lr=0.1, batch_size=2, max_length=32)
    plain = run(tiny_llama_dir, TRAINABLE, prune=False, **kw)
    pruned = run(tiny_llama_dir, TRAINABLE, prune=True, **kw)
    assert [r["step"] for r in plain] == [r["step"] for r in pruned] == [0, 8, 16]
    assert plain[0] == pruned[0] and len(plain[0]["kappa"]) == 6  # same start, all six matrices trained
    tau, free, held = plain[0]["tau"], plain[-1], pruned[-1]
    for name, t in tau.items():
        # without the callback the update grows far past τ = σ_max(W₀) and keeps growing ...
        assert free["dsigma"][name] > 20 * t and free["dsigma"][name] > plain[1]["dsigma"][name]
        # ... with it, σ_max(ΔW) stays within PRUNE's bound F(σ) = τ + ln(σ/τ) of the unrestrained value
        assert held["dsigma"][name] < t + math.log(free["dsigma"][name] / t) < free["dsigma"][name] / 2
        assert held["kappa"][name] < free["kappa"][name]
    assert all(math.isfinite(r["perplexity"]) for r in plain + pruned)
