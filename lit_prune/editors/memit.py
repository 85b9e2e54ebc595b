"""MEMIT (Meng et al., 2023): a batch of edits spread over several MLP output matrices.

With edited layers l_0 < … < l_{L-1} and the batch's requests as columns::

    z_j  = h_j + δ_j   residual stream after the LAST edited layer at request j's subject last token, δ_j optimised
                       as in ROME (compute_v.py, ``where="layer"``), on the unedited model
    for i, l in enumerate(layers):                      (each layer sees the updates of the layers before it)
        K   = [k*_j]        (k_dim, n) keys at layer l, averaged over context templates     (compute_ks.py)
        R   = z − h_cur     (hidden, n) what is still missing at the last edited layer, bare prompts
        Δ_l = (R / (L − i)) Kᵀ (λ C_l + K Kᵀ)⁻¹       λ = mom2_update_weight, solved in float64

(λC + KKᵀ)⁻¹K comes from the cached Cholesky factor of C and the Woodbury identity,
(λC + KKᵀ)⁻¹K = X (I + KᵀX)⁻¹ with X = (λC)⁻¹K, so only an n × n system is solved per batch. Δ_l is returned as
factors V = R/(L − i) and K' = (λC + KKᵀ)⁻¹K (rank ≤ n) in the stored orientation. Weights are restored on return.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..requests import EditRequest
from .base import Updates
from .compute_ks import compute_ks, reprs_at_subject
from .compute_v import DeltaForward, DeltaHParams, optimize_delta
from .locate import LocateEditor, concat_updates, restored_weights
from .rome import _check_positive
from .tokens import pad_id, prompt_set


def memit_key_solve(solve_C: Any, K: Tensor, lam: float) -> Tensor:
    """(λC + KKᵀ)⁻¹ K in float64 for K (k_dim, n), given ``solve_C``: rhs ↦ C⁻¹ rhs (Woodbury identity)."""
    K = K.double()
    X = solve_C(K) / lam  # (λC)⁻¹ K
    n = K.shape[1]
    S = torch.eye(n, dtype=torch.float64, device=X.device) + K.to(X.device).T @ X  # symmetric positive definite
    return torch.linalg.solve(S, X.T).T


class MEMIT(LocateEditor):
    """Mass-Editing Memory in a Transformer. ``MEMIT.for_model(model, tok)`` then ``editor.apply(model, tok, reqs)``.

    Arguments as :class:`ROME` (None = the model's preset), plus ``mom2_update_weight`` (λ). ``layers`` lists the
    edited layers; δ is optimised on the residual stream after the last of them and clamped to
    ``clamp_norm_factor`` × its norm.
    """

    method = "memit"

    def __init__(
        self,
        layers: list[int] | None = None,
        v_num_grad_steps: int | None = None,
        v_lr: float | None = None,
        v_loss_layer: int | None = None,
        v_weight_decay: float | None = None,
        clamp_norm_factor: float | None = None,
        kl_factor: float | None = None,
        early_stop_loss: float | None = None,
        mom2_update_weight: float | None = None,
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
    ) -> None:
        _check_positive(type(self).__name__, v_num_grad_steps=v_num_grad_steps, v_lr=v_lr,
                        clamp_norm_factor=clamp_norm_factor, mom2_n_samples=mom2_n_samples,
                        mom2_max_length=mom2_max_length, mom2_update_weight=mom2_update_weight)
        for k, v in dict(v_weight_decay=v_weight_decay, kl_factor=kl_factor, early_stop_loss=early_stop_loss).items():
            if v is not None and v < 0:
                raise ValueError(f"{type(self).__name__}: {k} must be >= 0, got {v!r}")
        super().__init__(
            dict(layers=layers, v_num_grad_steps=v_num_grad_steps, v_lr=v_lr, v_loss_layer=v_loss_layer,
                 v_weight_decay=v_weight_decay, clamp_norm_factor=clamp_norm_factor, kl_factor=kl_factor,
                 early_stop_loss=early_stop_loss, mom2_update_weight=mom2_update_weight,
                 mom2_n_samples=mom2_n_samples, mom2_max_length=mom2_max_length,
                 context_template_lengths=context_template_lengths),
            rewrite_module_tmp, mlp_module_tmp, layer_module_tmp, layers_module, ln_f_module, lm_head_module,
            context_templates, mom2_dataset, stats_dir, fast, progress,
        )
        self.last_keys: dict[str, Tensor] = {}
        """Edited module -> the keys K (k_dim, n), float64, of the latest :meth:`compute`'s batch."""
        self.last_info: list[dict[str, Any]] = []
        """One record per request of the latest :meth:`compute` (z optimisation: losses, steps, seconds; ``h``: the
        residual stream after the last edited layer at the subject's last token of the bare prompt before the edit,
        ``z`` = h + δ its target, both (hidden,) float32)."""

    def prepare(self, model: nn.Module, tokenizer: Any) -> None:
        super().prepare(model, tokenizer)
        self.load_stats(model, tokenizer)

    def compute_zs(self, model: nn.Module, tok: Any, requests: list[EditRequest], templates: list[str]) -> Tensor:
        """(hidden, n) float64 target residuals z at the last edited layer (records in ``last_info``)."""
        hp, arch = self.hparams(model), self.arch(model)
        z_layer = max(hp["layers"])
        zs = []
        self.last_info = []
        for i, r in enumerate(requests):
            t0 = time.perf_counter()
            ps = prompt_set(tok, r, templates, where=self.where(i, r))
            fast = self.use_fast(model, tok, ps, z_layer, "layer", hp["v_loss_layer"])
            forward = DeltaForward(model, arch, ps, z_layer, "layer", hp["v_loss_layer"], fast, pad_id(tok))
            res = optimize_delta(forward, DeltaHParams(
                hp["v_num_grad_steps"], hp["v_lr"], hp["v_weight_decay"], hp["clamp_norm_factor"], hp["kl_factor"],
                hp["early_stop_loss"]))
            zs.append(res.target.double())
            self.last_info.append({"request": i, "losses": res.losses, "steps": len(res.losses), "fast": fast,
                                   "h": res.v_init, "z": res.target, "seconds": time.perf_counter() - t0})
        return torch.stack(zs, 1)

    def compute(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest | Mapping[str, Any]]) -> Updates:
        """Updates of every edited layer for the batch ``requests``, computed on the current weights (left as they
        were). Raises EditRequestError/EditError naming the request before anything is computed."""
        reqs = self.check_requests(requests)
        hp, arch, mats = self.hparams(model), self.arch(model), self.matrices(model)
        templates = self.context_templates(model, tokenizer)
        for i, r in enumerate(reqs):  # tokenisation errors (empty target) before any work
            prompt_set(tokenizer, r, templates[:1], where=self.where(i, r))
        self.load_stats(model, tokenizer)
        layers = sorted(mats)
        z_module = arch.layer_module_tmp.format(layers[-1])
        zs = self.compute_zs(model, tokenizer, reqs, templates)
        lam = float(hp["mom2_update_weight"])
        parts: dict[str, list] = {m.param_name: [] for m in mats.values()}
        with restored_weights(list(mats.values())):
            for i, layer in enumerate(layers):
                mat = mats[layer]
                K = compute_ks(model, tokenizer, reqs, templates, mat.name).T.double()  # (k_dim, n)
                cur = reprs_at_subject(model, tokenizer, reqs, ["{}"], z_module, "out")[:, 0].T.double()  # (hidden, n)
                R = zs.to(cur.device) - cur
                resid = R / (len(layers) - i)
                adj = self.key_solve(model, tokenizer, mat.name, K, lam)  # (k_dim, n)
                up = self.finite_update(
                    mat.update(V=resid.to(adj.device), K=adj),
                    f"MEMIT update of '{mat.param_name}' for requests {[self.where(j, r) for j, r in enumerate(reqs)]}",
                )
                parts[mat.param_name].append(up)
                self.last_keys[mat.name] = K
                if i < len(layers) - 1:
                    mat.add_(up)
        return concat_updates(parts)

    def key_solve(self, model: nn.Module, tok: Any, module: str, K: Tensor, lam: float) -> Tensor:
        """K' (k_dim, n), float64, with Δ = R K'ᵀ: MEMIT's (λC + KKᵀ)⁻¹ K (subclasses change the update here)."""
        return memit_key_solve(lambda x: self.solve_C(model, tok, module, x), K, lam)
