"""The edited matrix in the "math" orientation W: k ↦ W k (v_dim × k_dim), whatever its stored layout.

``nn.Linear`` stores W as (out, in) = (v_dim, k_dim); GPT-2's ``Conv1D`` stores Wᵀ as (in, out) = (k_dim, v_dim) and
computes ``k @ W_stored + b``. Editors build ΔW = V Kᵀ from factors V (v_dim × r) and K (k_dim × r) and
:meth:`EditedMatrix.update` turns them into a :class:`LowRankUpdate` in the stored orientation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import EditError, LowRankUpdate


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


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
        if isinstance(self.module, nn.Linear):
            self.stored_out_in = True
        elif _is_conv1d(self.module):
            self.stored_out_in = False
        else:
            raise EditError(
                f"module '{name}' is a {type(self.module).__name__}; only nn.Linear and GPT-2 Conv1D are supported"
            )
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
        return LowRankUpdate(V, K) if self.stored_out_in else LowRankUpdate(K, V)

    @torch.no_grad()
    def add_(self, up: LowRankUpdate, sign: float = 1.0) -> None:
        """Add a stored-orientation update to the weight in place (used while computing sequential edits)."""
        w = self.module.weight
        w.add_(up.dense(torch.float32).to(device=w.device, dtype=w.dtype), alpha=sign)
