"""AlphaEdit (Fang et al., ICLR 2025): MEMIT whose update is projected onto the null space of the preserved keys.

For each edited layer, with C₀ = E[k kᵀ] the second moment of the layer's keys on general text (the statistics
MEMIT uses), P the projector onto the eigenvectors of C₀ whose eigenvalue is below ``nullspace_threshold`` (2e-2 in
the reference), K (k_dim, n) this batch's keys, K_p (k_dim, N) the keys of all earlier batches edited by this
editor, R (hidden, n) the residual as in MEMIT (R = (z − h_cur) / (L − i)) and λ₂ = ``L2``:

    Δ = R (M⁻¹ P K)ᵀ,      M = P (K Kᵀ + K_p K_pᵀ) + λ₂ I                  (the reference's closed form, Δᵀ = M⁻¹ P K Rᵀ)

so M Δᵀ = P K Rᵀ (the P-projected normal equations), and the columns of M⁻¹ P K lie in range(P): Δ k₀ = 0 for every
key k₀ in the preserved space (P k₀ = 0). M is never formed: with G = [K, K_p] and P = U₀U₀ᵀ,
M⁻¹ x = (x − PG (λ₂ I + Gᵀ P G)⁻¹ Gᵀ x) / λ₂ (Woodbury), an (n + N)-sized solve, in float64.

The keys of each computed batch are remembered (the reference's ``cache_c``): :meth:`AlphaEdit.compute` records
them, ``forget(k)`` drops the last k batches (``SequentialEditingModule.undo`` calls it), and ``state_dict`` /
``load_state_dict`` carry them through checkpoints. Everything else (δ/z optimisation, keys, the layer schedule,
presets) is MEMIT's.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..requests import EditRequest
from ..stats import model_key
from .base import Updates
from .hparams import AlphaEditHParams
from .memit import MEMIT


def null_space_basis(C: Tensor, threshold: float) -> Tensor:
    """U₀ (k_dim, d₀), float64: orthonormal eigenvectors of the symmetric ``C`` (k_dim, k_dim) with eigenvalue below
    ``threshold``; P = U₀ U₀ᵀ projects onto the directions the preserved keys (almost) never use."""
    evals, evecs = torch.linalg.eigh(C.double())
    return evecs[:, evals < threshold].contiguous()


def alphaedit_key_solve(U0: Tensor, K: Tensor, K_prev: Tensor | None, l2: float) -> Tensor:
    """M⁻¹ P K (k_dim, n), float64, M = P (K Kᵀ + K_p K_pᵀ) + λ₂ I, P = U₀U₀ᵀ, via Woodbury (no k_dim × k_dim system).

    ``K`` (k_dim, n): this batch's keys; ``K_prev`` (k_dim, N) or None: earlier batches' keys; ``l2`` = λ₂ > 0.
    """
    U0, K = U0.double(), K.double().to(U0.device)
    G = K if K_prev is None or K_prev.shape[1] == 0 else torch.cat([K, K_prev.double().to(U0.device)], 1)
    PG = U0 @ (U0.T @ G)  # (k_dim, n + N)
    PK = PG[:, : K.shape[1]]
    S = l2 * torch.eye(G.shape[1], dtype=torch.float64, device=U0.device) + G.T @ PG
    return (PK - PG @ torch.linalg.solve(S, G.T @ PK)) / l2


class AlphaEdit(MEMIT):
    """MEMIT with the null-space projection of AlphaEdit. ``AlphaEdit.for_model(model, tok)`` then ``apply``.

    Arguments as :class:`MEMIT` (layers, δ optimisation, statistics; ``mom2_update_weight`` is not used), plus
    ``nullspace_threshold`` (eigenvalue cut-off of C₀ defining P; reference 2e-2) and ``L2`` (λ₂; reference 10).
    Batch-sequential: every :meth:`compute` adds its batch's keys to those the next batches must preserve.
    """

    hparams_class = AlphaEditHParams

    def __init__(self, *args: Any, nullspace_threshold: float = 2e-2, L2: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, nullspace_threshold=nullspace_threshold, L2=L2, **kwargs)
        self._basis: dict[tuple, Tensor] = {}
        self.edited_keys: list[dict[str, Tensor]] = []
        """One entry per computed batch: edited module -> its keys K (k_dim, n), float32, CPU."""

    def projector_basis(self, model: nn.Module, tok: Any, module: str) -> Tensor:
        """U₀ of ``module`` (cached on this instance, per model)."""
        key = (model_key(model), module)
        if key not in self._basis:
            self._basis[key] = null_space_basis(self.second_moment(model, tok, module),
                                                float(self.hparams(model).nullspace_threshold))
        return self._basis[key]

    def previous_keys(self, module: str) -> Tensor | None:
        """K_p (k_dim, N) of ``module``: the keys of every batch computed (and not forgotten) so far."""
        ks = [rec[module] for rec in self.edited_keys if module in rec]
        return torch.cat(ks, 1) if ks else None

    def key_solve(self, model: nn.Module, tok: Any, module: str, K: Tensor, lam: float) -> Tensor:
        return alphaedit_key_solve(self.projector_basis(model, tok, module), K, self.previous_keys(module),
                                   float(self.hparams(model).L2))

    def compute_from_targets(self, model: nn.Module, tokenizer: Any,
                             requests: Sequence[EditRequest | Mapping[str, Any]], targets: Tensor,
                             _checked: Any = None) -> Updates:
        """MEMIT's update from the targets with AlphaEdit's key solve; records the batch's keys (see :meth:`forget`).
        :meth:`compute` (MEMIT's) goes through here."""
        self.last_keys = {}
        updates = super().compute_from_targets(model, tokenizer, requests, targets, _checked)
        self.edited_keys.append({m: K.float().cpu() for m, K in self.last_keys.items()})
        return updates

    # -- state carried from edit to edit -----------------------------------------------------------------------------
    def forget(self, n_batches: int) -> None:
        """Drop the keys of the last ``n_batches`` computed batches (their edits were undone or discarded)."""
        if n_batches > 0:
            del self.edited_keys[-n_batches:]

    def state_dict(self) -> dict[str, Any]:
        return {"edited_keys": [dict(rec) for rec in self.edited_keys]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.edited_keys = [dict(rec) for rec in state.get("edited_keys", [])]
