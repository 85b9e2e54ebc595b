"""ROME's left vector: u = C⁻¹ k* (``mom2_adjustment``), with k* the subject key averaged over context templates."""

from __future__ import annotations

from typing import Callable

from torch import Tensor


def compute_u(k_star: Tensor, solve_C: Callable[[Tensor], Tensor] | None) -> Tensor:
    """u (k_dim,) float64 = C⁻¹ k* when ``solve_C`` (rhs ↦ C⁻¹ rhs) is given, else k* itself.

    ROME normalises u to unit length; the update divides by uᵀk*, so the scale of u (and of C) cancels and is left
    as it is here.
    """
    k = k_star.double()
    return solve_C(k[:, None])[:, 0] if solve_C is not None else k
