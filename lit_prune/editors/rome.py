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
Decision: ROME's batch path stays sequential, also its δ optimisation: request j's v* is optimised on the weights
that already hold requests 0..j-1, so the optimisations depend on each other and batching them (as MEMIT's z,
which all run on the unedited weights) would change the method. For the same reason ROME does not declare
``shares_targets``: with several processes every rank computes the same update (evaluation is still sharded).
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
from .locate import ClosedFormEditor, concat_updates, restored_weights
from ..text import pad_id
from .tokens import PromptSet, prompt_set
from .weights import EditedMatrix


class ROME(ClosedFormEditor):
    """Rank-One Model Editing. ``ROME.for_model(model, tok)`` then ``editor.apply(model, tok, requests)``.

    ``layers`` (one layer, or several edited in turn) and ``mom2_adjustment`` (u = C⁻¹k*; False: u = k*) take the
    edited model's preset when None; the shared arguments (δ optimisation, statistics, context templates, module
    templates, ``fast``, ``stats_dir``) are :class:`~lit_prune.editors.locate.ClosedFormEditor`'s.

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
        mom2_adjustment: bool | None = None,
        key_mode: Literal["averaged", "original"] = "averaged",
        **kwargs: Any,
    ) -> None:
        super().__init__(layers=layers, mom2_adjustment=mom2_adjustment, key_mode=key_mode, **kwargs)
        self.last_info: list[dict[str, Any]] = []
        """One record per (request, layer) of the latest :meth:`compute`: loss curve, steps, seconds, fast path, the keys
        ``k_star`` (k̄) and ``k0`` (k₀), ``rho`` = uᵀk₀ / uᵀk̄, ``v_star`` (v*), ``key_mode`` and ``prompts`` (the
        :class:`~lit_prune.editors.tokens.PromptSet` whose tokens v* was optimised on)."""

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
                    "k_star": k_star, "k0": k0, "rho": rho, "v_star": res.target, "prompts": prompts}
