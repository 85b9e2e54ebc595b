"""How to edit: hyper-parameter presets per model and method.

Module templates and the architecture table live in :mod:`lit_prune.editors.architectures` (re-exported here).

Hyper-parameter presets (``HPARAMS``) hold the papers' values for gpt2-xl, llama-2-7b and llama-3-8b and values chosen
for the embedded SmolLM2-135M from ``benchmarks/layer_sweep.py`` (results in ``benchmarks/results/layer_sweep.md``)
and ``benchmarks/bench_editors.py`` (``results/editors.md``). Models without a preset get :func:`generic_hparams`.

**ROME's key choice** (``key_mode``) is not a per-model preset: :class:`~lit_prune.editors.ROME` uses
``"averaged"`` (r-ROME: the template-averaged key k̄ in u, residual and denominator) for every model, the embedded
one included, because it writes v* at the key it was solved for (no 1/ρ overshoot); ``"original"`` (the bare
prompt's key k₀ in residual and denominator, the paper's editor) overshoots by 1/ρ, ρ = uᵀk₀/uᵀk̄, on prompts
whose subject comes first (``benchmarks/results/single_edit.md``). The paper configs (``configs/gpt2xl_*``,
``configs/llama3_8b_*``) pass ``key_mode: original``.

**MEMIT's λ** (``mom2_update_weight``) must be set for the model's key dimension d_k (the MLP width), not taken
from another model. C is a MEAN second moment, so λ trades against d_k, not against the number of statistics
texts: for one request at one layer, Δ k̄ = R · s/(1+s) with s = k̄ᵀC⁻¹k̄ / λ, and a typical key of the
statistics' text has E[kᵀC⁻¹k] = d_k, so s ≈ d_k/λ (the edited subjects' keys are outliers: 2-2.5 × d_k on
SmolLM2). Each layer writes about s/(1+s) of its share R/(L − i); what is left is passed to the next layer. The
papers' values sit at d_k/λ = 0.32 (GPT-2 XL, 6400/20000), 0.73 (Llama-2-7B, 11008/15000), 0.96 (Llama-3-8B,
14336/15000) and are kept for those models. The SmolLM2 preset had borrowed 15000 (d_k/λ = 0.10), which writes
28 % of the target on single edits; ``benchmarks/bench_memit_lambda.py`` (``results/memit_lambda.md``) swept
λ = 15000 … 500 on 20 CounterFact edits and the preset takes λ = 1500 (d_k/λ ≈ 1). For another model start at
λ ≈ d_k and measure with that script; :func:`generic_hparams` scales λ that way.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Mapping

from torch import nn

from .architectures import ARCHITECTURES, ArchTemplates, arch_templates
from .base import EditError, default_num_layers
from .hparams import HPARAMS_CLASSES, HParams

__all__ = ["ARCHITECTURES", "ArchTemplates", "HPARAMS", "arch_templates", "generic_hparams", "mlp_dim", "preset_name",
           "resolve_hparams"]


# ---------------------------------------------------------------------------------------------------------------------
# Hyper-parameter presets. Keys per method are fields of its class in hparams.py (HPARAMS_CLASSES); the
# fields not given here take that class's defaults.
_SMOLLM2_135M = {
    # Layer choices from benchmarks/layer_sweep.py (results/layer_sweep.md); statistics sample size from
    # benchmarks/bench_editors.py (results/editors.md).
    "rome": dict(layers=[4], v_num_grad_steps=20, v_lr=0.5, v_weight_decay=0.5, clamp_norm_factor=4.0,
                 kl_factor=0.0625, mom2_n_samples=3000),
    # MEMIT's λ from benchmarks/bench_memit_lambda.py (results/memit_lambda.md): 1500 ≈ d_k = 1536 writes 75 % of
    # the target per single edit (15000, borrowed from Llama-2-7B, wrote 28 %: efficacy 55 → 95, generalization
    # 50 → 85, locality and held-out perplexity unchanged); below it the write grows little while σ_max(ΔW) grows.
    # ROME uses key_mode="averaged" (the ROME default, not a preset): see the module docstring.
    "memit": dict(layers=[2, 3, 4, 5, 6], v_num_grad_steps=20, v_lr=0.5, v_weight_decay=0.5, clamp_norm_factor=0.75,
                  kl_factor=0.0625, mom2_update_weight=1500.0, mom2_n_samples=3000),
    "ft": dict(layers=[4], num_steps=25, lr=5e-4, norm_constraint=5e-4),
}
HPARAMS: dict[str, dict[str, dict[str, Any]]] = {
    "smollm2-135m": _SMOLLM2_135M,
    # ROME / MEMIT papers (kmeng01/rome, kmeng01/memit hparams) and the PRUNE paper (spec §3); MEMIT's λ is the
    # papers' (d_k/λ 0.32, 0.73, 0.96). The paper's ROME keys come from the configs (key_mode: original).
    "gpt2-xl": {
        "rome": dict(layers=[17], v_loss_layer=47, v_num_grad_steps=20, v_lr=0.5, v_weight_decay=0.5,
                     clamp_norm_factor=4.0, kl_factor=0.0625, mom2_n_samples=100000,
                     context_template_lengths=[5, 10]),
        "memit": dict(layers=[13, 14, 15, 16, 17], v_loss_layer=47, v_num_grad_steps=20, v_lr=0.5,
                      v_weight_decay=0.5, clamp_norm_factor=0.75, kl_factor=0.0625, mom2_update_weight=20000.0,
                      mom2_n_samples=100000, context_template_lengths=[10]),
        "ft": dict(layers=[0], num_steps=25, lr=5e-4, norm_constraint=5e-4),
    },
    "llama-2-7b": {
        "rome": dict(layers=[5], v_loss_layer=31, v_num_grad_steps=25, v_lr=0.5, v_weight_decay=1e-3,
                     clamp_norm_factor=4.0, kl_factor=0.0625, mom2_n_samples=100000),
        "memit": dict(layers=[4, 5, 6, 7, 8], v_loss_layer=31, v_num_grad_steps=25, v_lr=0.5, v_weight_decay=1e-3,
                      clamp_norm_factor=4.0, kl_factor=0.0625, mom2_update_weight=15000.0, mom2_n_samples=100000),
        "ft": dict(layers=[21], num_steps=25, lr=5e-4, norm_constraint=5e-4),
    },
    "llama-3-8b": {
        "rome": dict(layers=[4], v_loss_layer=31, v_num_grad_steps=25, v_lr=0.5, v_weight_decay=1e-3,
                     clamp_norm_factor=4.0, kl_factor=0.0625, mom2_n_samples=100000),
        "memit": dict(layers=[4, 5, 6, 7, 8], v_loss_layer=31, v_num_grad_steps=25, v_lr=0.5, v_weight_decay=1e-3,
                      clamp_norm_factor=4.0, kl_factor=0.0625, mom2_update_weight=15000.0, mom2_n_samples=100000),
        "ft": dict(layers=[21], num_steps=25, lr=5e-4, norm_constraint=5e-4),
    },
}

def preset_name(model: nn.Module) -> str | None:
    """The ``HPARAMS`` key for ``model``: from its name or path first, then from its config's shape; None if none."""
    cfg = getattr(model, "config", None)
    name = str(getattr(cfg, "name_or_path", "") or getattr(cfg, "_name_or_path", "") or "").lower()
    tail = name.rstrip("/").rsplit("/", 1)[-1]
    for key, pats in (
        ("smollm2-135m", ("smollm2-135m",)),
        ("gpt2-xl", ("gpt2-xl",)),
        ("llama-2-7b", ("llama-2-7b",)),
        ("llama-3-8b", ("llama-3-8b", "llama-3.1-8b")),
    ):
        if any(p in tail for p in pats):
            return key
    if cfg is None:
        return None
    mt, n = getattr(cfg, "model_type", None), _num_layers(model)
    hidden = getattr(cfg, "hidden_size", getattr(cfg, "n_embd", None))
    vocab = getattr(cfg, "vocab_size", None)
    if mt == "llama" and hidden == 576 and n == 30:
        return "smollm2-135m"
    if mt == "gpt2" and hidden == 1600 and n == 48:
        return "gpt2-xl"
    if mt == "llama" and hidden == 4096 and n == 32:
        return {32000: "llama-2-7b", 128256: "llama-3-8b"}.get(vocab)
    return None


def _num_layers(model: nn.Module) -> int:
    try:
        return default_num_layers(model)
    except EditError:
        return 0


_SMOLLM2_MLP_DIM = 1536


def mlp_dim(model: nn.Module) -> int | None:
    """The key dimension d_k of the edited MLP output projection from the model's config (None if it does not say)."""
    cfg = getattr(model, "config", None)
    for key in ("intermediate_size", "n_inner", "ffn_dim"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    hidden = getattr(cfg, "n_embd", None)
    return 4 * int(hidden) if getattr(cfg, "model_type", None) in ("gpt2", "gptj") and hidden else None


def generic_hparams(model: nn.Module, method: str) -> dict[str, Any]:
    """Hyper-parameters for a model without a preset: the embedded model's values with layers scaled by depth and
    MEMIT's λ scaled by the key dimension (the same d_k/λ as the embedded preset; see the module docstring)."""
    n = default_num_layers(model)
    base = {k: (list(v) if isinstance(v, list) else v) for k, v in _SMOLLM2_135M[method].items()}
    rome_layer = min(n - 1, max(0, round(base["layers"][0] * n / 30)))
    if method == "memit":
        base["layers"] = sorted({min(n - 1, max(0, rome_layer - 2 + i)) for i in range(5)})
        d_k = mlp_dim(model)
        if d_k:
            base["mom2_update_weight"] = base["mom2_update_weight"] * d_k / _SMOLLM2_MLP_DIM
    else:
        base["layers"] = [rome_layer]
    return base


def resolve_hparams(
    model: nn.Module, method: str, given: Mapping[str, Any], hparams_class: type[HParams] | None = None
) -> HParams:
    """``hparams_class`` (default: the method's, :data:`~lit_prune.editors.hparams.HPARAMS_CLASSES`) filled with its
    defaults <- the model's ``method`` preset (or :func:`generic_hparams`) <- the non-None entries of ``given``;
    validated, the layers checked against ``model``."""
    cls = hparams_class or HPARAMS_CLASSES[method]
    name = preset_name(model)
    if name is not None:
        preset = HPARAMS[name][method]
    else:
        preset = generic_hparams(model, method)
        if any(given.get(k) is None for k in preset):
            warnings.warn(
                f"{method.upper()}: no hyper-parameter preset for this model "
                f"({getattr(model.config, 'model_type', '?')}, {_num_layers(model)} layers); using {preset} "
                "(scaled from the SmolLM2-135M preset). Pass layers=... etc. to choose.",
                stacklevel=3,
            )
    out = copy.deepcopy(dict(preset))
    out.update({k: copy.deepcopy(v) for k, v in given.items() if v is not None})
    if isinstance(out.get("layers"), int):
        out["layers"] = [out["layers"]]
    hp = cls(**out)
    hp.check_layers(method.upper(), _num_layers(model))
    return hp
