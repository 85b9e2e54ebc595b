"""ROME (Meng et al., 2022): a rank-one update of one MLP output matrix per edit, with two key choices.

For a request and edited layer l, with W: k -> v the MLP output projection and C = E[k kᵀ] its key statistics::

    k̄   = mean over context templates of k at the subject's last token          (compute_ks.py: compute_ks)
    k₀  = k at the subject's last token of the bare prompt (no context template)  (compute_ks.py: compute_k0)
    u   = C⁻¹ k̄                                                               (compute_u.py, mom2_adjustment)
    v*  = v + δ, δ optimised so that the model predicts target_new             (compute_v.py)

and then, by ``key_mode`` (stored orientation: weights.py):

- ``"averaged"`` (default; r-ROME, Gupta et al. 2024): ΔW = (v* − W k̄) uᵀ / (uᵀ k̄), the SAME averaged key in
  u, in the residual and in the denominator, so that (W + ΔW) k̄ = v*.
- ``"original"`` (kmeng01/rome, EasyEdit and the PRUNE repository; the paper's editor): u = C⁻¹k̄ as above but
  ΔW = (v* − W k₀) uᵀ / (uᵀ k₀), so (W + ΔW) k₀ = v* and ΔW k̄ = (v* − W k₀)/ρ with ρ = uᵀk₀ / uᵀk̄. Where k₀ is
  far from k̄ (a subject at the first position of a prompt without BOS: on SmolLM2 case_id 173 gives ρ ≈ 0.015)
  the edit overshoots by 1/ρ; that is what makes sequential original ROME collapse, what PRUNE was built to
  restrain, and what reproducing the paper needs. The averaged choice removes the overshoot and is the default.

Several requests in one call are edited one after another, each computed with the previous ones applied; the
returned update is their sum (factors concatenated, rank = number of requests). The caller's weights are unchanged.
:attr:`ROME.last_info` records k̄, k₀, v* and ρ of every (request, layer).
"""

from __future__ import annotations

import time
from typing import Any, Literal, Mapping, Sequence

from torch import nn

from ..requests import EditRequest
from .base import EditError, Updates
from .compute_ks import compute_k0, compute_ks
from .compute_u import compute_u
from .compute_v import optimize_delta
from .delta_forward import DeltaForward
from .hparams import ROMEHParams
from .locate import LocateEditor, concat_updates, constructor_arguments, restored_weights
from .tokens import PromptSet, pad_id, prompt_set
from .weights import EditedMatrix


class ROME(LocateEditor):
    """Rank-One Model Editing. ``ROME.for_model(model, tok)`` then ``editor.apply(model, tok, requests)``.

    Every hyper-parameter left as None takes the preset of the edited model (:mod:`lit_prune.editors.presets`):
    ``layers`` (one layer, or several edited in turn), ``v_num_grad_steps``, ``v_lr``, ``v_loss_layer`` (the layer
    whose output is read by the loss; default the last), ``v_weight_decay``, ``clamp_norm_factor``, ``kl_factor``,
    ``early_stop_loss``, ``mom2_adjustment`` (u = C⁻¹k*; False: u = k*), ``mom2_n_samples`` / ``mom2_max_length``
    (texts and tokens per text for C, from ``mom2_dataset``). Context templates: the fixed
    :data:`~lit_prune.editors.tokens.CONTEXT_TEMPLATES` unless ``context_templates`` (strings ending in ``"{}"``) or
    ``context_template_lengths`` (ROME-style: greedy generations of that many new tokens from 5 seeds per length)
    are given. Module templates default to the architecture's. ``fast=False`` runs the plain full forward at every
    optimisation step (same result, slower). ``stats_dir`` defaults to ``cache_dir()/stats``.

    ``key_mode``: ``"averaged"`` (default, r-ROME: k̄ in u, residual and denominator) or ``"original"`` (the paper's
    ROME: u = C⁻¹k̄, the bare prompt's key k₀ in the residual and the denominator); see the module docstring. It is
    not a per-model preset: every model gets ``"averaged"`` unless it is passed (the paper configs
    ``configs/gpt2xl_*`` and ``configs/llama3_8b_*`` pass ``"original"``). It appears in :meth:`hparams`.
    """

    method = "rome"
    hparams_class = ROMEHParams

    def __init__(
        self,
        layers: int | list[int] | None = None,
        v_num_grad_steps: int | None = None,
        v_lr: float | None = None,
        v_loss_layer: int | None = None,
        v_weight_decay: float | None = None,
        clamp_norm_factor: float | None = None,
        kl_factor: float | None = None,
        early_stop_loss: float | None = None,
        mom2_adjustment: bool | None = None,
        mom2_dataset: str = "wiki-offline",
        mom2_n_samples: int | None = None,
        mom2_max_length: int | None = None,
        context_template_lengths: list[int] | None = None,
        context_templates: list[str] | None = None,
        rewrite_module_tmp: str | None = None,
        mlp_module_tmp: str | None = None,
        layer_module_tmp: str | None = None,
        layers_module: str | None = None,
        ln_f_module: str | None = None,
        lm_head_module: str | None = None,
        stats_dir: str | None = None,
        fast: bool = True,
        progress: bool = True,
        key_mode: Literal["averaged", "original"] = "averaged",
    ) -> None:
        super().__init__(**constructor_arguments(locals()))
        self.last_info: list[dict[str, Any]] = []
        """One record per (request, layer) of the latest :meth:`compute`: loss curve, steps, seconds, fast path, the keys
        ``k_star`` (k̄) and ``k0`` (k₀), ``rho`` = uᵀk₀ / uᵀk̄, ``v_star`` (v*) and ``key_mode``."""

    def prepare(self, model: nn.Module, tokenizer: Any) -> None:
        super().prepare(model, tokenizer)
        if self.hparams(model).mom2_adjustment:
            self.load_stats(model, tokenizer)

    def compute(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest | Mapping[str, Any]]) -> Updates:
        """Updates for ``requests`` (sequential rank-one edits), computed on the current weights, which are left as
        they were. Raises EditRequestError/EditError naming the request before anything is computed."""
        reqs = self.check_requests(requests)
        hp, mats = self.hparams(model), self.matrices(model)
        templates = self.context_templates(model, tokenizer)
        sets = [prompt_set(tokenizer, r, templates, where=self.where(i, r)) for i, r in enumerate(reqs)]
        if hp.mom2_adjustment:
            self.load_stats(model, tokenizer)
        parts: dict[str, list] = {m.param_name: [] for m in mats.values()}
        plan = [(i, layer) for i in range(len(reqs)) for layer in sorted(mats)]
        self.last_info = []
        with restored_weights(list(mats.values())):
            for j, (i, layer) in enumerate(plan):
                t0 = time.perf_counter()
                up, info = self.edit_one(model, tokenizer, reqs[i], sets[i], mats[layer], layer, hp, templates)
                what = f"ROME update of '{mats[layer].param_name}' for {self.where(i, reqs[i])}"
                parts[mats[layer].param_name].append(self.finite_update(up, what))
                self.last_info.append({**info, "request": i, "layer": layer, "seconds": time.perf_counter() - t0})
                if j < len(plan) - 1:
                    mats[layer].add_(up)
        return concat_updates(parts)

    def edit_one(
        self, model: nn.Module, tok: Any, req: EditRequest, prompts: PromptSet, mat: EditedMatrix, layer: int,
        hp: ROMEHParams, templates: list[str],
    ):
        """The rank-one update of one request at one layer, and a record of the δ optimisation and the keys."""
        k_star = compute_ks(model, tok, [req], templates, mat.name)[0]
        k0 = compute_k0(model, tok, req, mat.name)
        solve = (lambda x: self.solve_C(model, tok, mat.name, x)) if hp.mom2_adjustment else None
        u = compute_u(k_star, solve)  # u = C⁻¹k̄ in both key modes
        fast = self.use_fast(model, tok, prompts, layer, "mlp", hp.v_loss_layer)
        forward = DeltaForward(model, self.arch(model), prompts, layer, "mlp", hp.v_loss_layer, fast, pad_id(tok))
        res = optimize_delta(forward, hp.delta())
        original = hp.key_mode == "original"
        k = (k0 if original else k_star).double().to(u.device)  # the key of the residual and the denominator
        name = "k₀" if original else "k̄"
        denom = u @ k
        if not bool(denom.isfinite()) or float(denom.abs()) == 0.0:
            raise EditError(f"ROME ({hp.key_mode} keys): uᵀ{name} = {float(denom)} for subject {req.subject!r} at "
                            f"'{mat.name}'; the statistics C are singular or non-finite (increase mom2_n_samples)")
        residual = res.target.double().to(u.device) - mat.value(k).double().to(u.device)  # v* − W k
        up = mat.update(V=residual, K=u / denom)
        rho = float((u @ k0.double().to(u.device)) / (u @ k_star.double().to(u.device)))
        return up, {"losses": res.losses, "steps": len(res.losses), "fast": fast, "key_mode": hp.key_mode,
                    "k_star": k_star, "k0": k0, "rho": rho, "v_star": res.target}
