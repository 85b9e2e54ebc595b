"""The edited matrix in the "math" orientation W: k ↦ W k (v_dim × k_dim), whatever its stored layout.

``nn.Linear`` stores W as (out, in) = (v_dim, k_dim); GPT-2's ``Conv1D`` stores Wᵀ as (in, out) = (k_dim, v_dim) and
computes ``k @ W_stored + b``. Editors build ΔW = V Kᵀ from factors V (v_dim × r) and K (k_dim × r) and
:meth:`EditedMatrix.update` turns them into a :class:`LowRankUpdate` in the stored orientation.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .base import EditError, LowRankUpdate

Orientation = Literal["linear", "conv1d"]
ORIENTATIONS: tuple[Orientation, ...] = ("linear", "conv1d")


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return type(module).__name__ == "Conv1D"
    return isinstance(module, Conv1D) or type(module).__name__ == "Conv1D"


def orientation(module: nn.Module) -> Orientation | None:
    """How ``module`` stores its weight, the one place every editor reads it from: ``"linear"`` (``nn.Linear``:
    stored (out, in), ``y = W x``), ``"conv1d"`` (GPT-2's ``Conv1D``: stored (in, out), ``y = x W``), None (neither)."""
    if isinstance(module, nn.Linear):
        return "linear"
    return "conv1d" if _is_conv1d(module) else None


def stored_update(orient: Orientation, out_factor: Tensor, in_factor: Tensor) -> LowRankUpdate:
    """ΔW = out_factor in_factorᵀ of a map in -> out (out_factor: (out, r), in_factor: (in, r)) as a
    :class:`LowRankUpdate` of the weight as ``orient`` stores it."""
    return LowRankUpdate(out_factor, in_factor) if orient == "linear" else LowRankUpdate(in_factor, out_factor)


class EditedMatrix:
    """Module ``name`` of ``model`` (an MLP output projection) seen as W: k (k_dim) -> v (v_dim)."""

    def __init__(self, model: nn.Module, name: str) -> None:
        try:
            self.module = model.get_submodule(name)
        except AttributeError:
            raise EditError(f"module '{name}' not found in {type(model).__name__}") from None
        weight = getattr(self.module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise EditError(f"module '{name}' has no 2-D weight to edit")
        self.name, self.param_name = name, f"{name}.weight"
        self.orientation = orientation(self.module)
        if self.orientation is None:
            raise EditError(
                f"module '{name}' is a {type(self.module).__name__}; only nn.Linear and GPT-2 Conv1D are supported"
            )
        self.stored_out_in = self.orientation == "linear"
        rows, cols = weight.shape
        self.v_dim, self.k_dim = (rows, cols) if self.stored_out_in else (cols, rows)

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    def W(self) -> Tensor:
        """(v_dim, k_dim) float32 copy of the matrix in the math orientation."""
        w = self.module.weight.detach().float()
        return w if self.stored_out_in else w.T

    def value(self, k: Tensor) -> Tensor:
        """Module output for keys ``k`` (..., k_dim) in float32: W k (+ bias)."""
        k = k.float()
        w = self.module.weight.detach().float()
        v = k @ w.T if self.stored_out_in else k @ w
        bias = getattr(self.module, "bias", None)
        return v + bias.detach().float() if bias is not None else v

    def update(self, V: Tensor, K: Tensor) -> LowRankUpdate:
        """ΔW = V Kᵀ (math orientation; V: (v_dim, r), K: (k_dim, r)) as a LowRankUpdate of the STORED weight."""
        V = V.reshape(self.v_dim, -1).float()
        K = K.reshape(self.k_dim, -1).float()
        return stored_update(self.orientation, V, K)

    @torch.no_grad()
    def add_(self, up: LowRankUpdate, sign: float = 1.0) -> None:
        """Add a stored-orientation update to the weight in place (used while computing sequential edits)."""
        w = self.module.weight
        w.add_(up.dense(torch.float32).to(device=w.device, dtype=w.dtype), alpha=sign)
