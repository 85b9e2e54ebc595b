"""MEND's gradient transform (Mitchell et al. 2022, §3.1-3.2): rank-one gradient factors -> low-rank weight updates.

For an edited weight ℓ and each token t with layer input ``x_t`` and output gradient ``δ_t``:

    z_t        = [(x_t - μ_x) / σ_x ; (δ_t - μ_δ) / σ_δ]            per-feature running moments of layer ℓ
    z_t        ← s_ℓ ⊙ z_t + b_ℓ ;  z_t ← z_t + U relu(V z_t + c) + e     per block (per-layer scale/shift s_ℓ, b_ℓ)
    [x̃_t ; δ̃_t] = [μ_x + σ_x ⊙ z_t[:in] ; μ_δ + σ_δ ⊙ z_t[in:]]
    ΔW_ℓ       = -η_ℓ Σ_t δ̃_t x̃_tᵀ          (nn.Linear, stored out×in; GPT-2 Conv1D stores the transpose)

The MLP (``U``, ``V``, ``c``, ``e``) is shared by all edited weights of the same shape, each with its own scale/shift
and its own learned edit learning rate ``η_ℓ = exp(log_lr_ℓ)``. ``U = 0`` at initialisation, so an untrained
transform maps every factor to itself and the update is the plain gradient step ``-η ∇_W L``.

Deviations from the reference gradient transform (eric-mitchell/mend ``algs/mend.py`` ``GradientTransform`` and
``nn.py`` ``IDMLP``/``LRLinear`` with ``config/alg/mend.yaml``: ``combine: True``, ``n_hidden: 1``, ``init: id``,
``rank: 1920``, ``shared: True``, ``norm: True``). The paper's formulation (Mitchell et al. 2022, §3.1-3.2) is the
same MLP g applied to the normalised factors; these are choices of this implementation, not of the paper:

1. **Output space.** The reference feeds ``[(x − μ_x)/σ_x ; (δ − μ_δ)/σ_δ]`` through the MLP and builds the update
   from the MLP's output as it is, i.e. still in the normalised space: ``ΔW ∝ Σ_t δ̃_t x̃_tᵀ`` with ``x̃_t`` a
   standardised vector. Here the output is mapped back through the (affine) inverse of the normalisation,
   ``x̃ = μ_x + σ_x ⊙ g_x``, ``δ̃ = μ_δ + σ_δ ⊙ g_δ``. So an untrained transform is the exact gradient step (in the
   reference it is the outer product of the standardised factors, which is not the gradient), and the scale of
   the update follows the scale of the model's activations instead of being set by ``η`` alone.
2. **Block structure.** The reference ``IDMLP`` is ``n_hidden + 1`` = 2 layers ``LRLinear`` in sequence, each
   ``z ← z + relu(s_m ⊙ (U V z + b) + t_m)``: a full-width linear map factorised at rank r (U: dim×r, V: r×dim),
   the per-mode (per edited weight) scale ``s_m`` and shift ``t_m`` applied to its OUTPUT before the
   nonlinearity, and a ReLU (clamp) on the full-width output in BOTH layers (``LRLinear.forward`` ignores its
   ``relu`` flag); ``U = 0``, ``V ~ N(0, 1)`` at initialisation. Here each of ``n_blocks`` (default 1) blocks is
   ``z ← s_m ⊙ z + b_m ; z ← z + U relu(V z + c) + e``: the per-mode scale/shift on the block's INPUT, the ReLU
   on the rank-r bottleneck (a residual low-rank MLP) and a linear full-width output with bias ``e``;
   ``U = 0``, ``V ~ N(0, 1/dim)``. Both start as the identity; they are different function classes, and a
   hypernetwork trained with one cannot be loaded into the other.

Smaller differences: the edit learning rate is learned in log space, ``η_ℓ = exp(log_lr_ℓ) > 0``, and the update
is ``−η Σ δ̃ x̃ᵀ`` (a descent step at initialisation; the reference learns a raw ``edit_lr``, initialised at 1e-4,
and adds ``+edit_lr · Σ x̃ δ̃ᵀ``, so its sign is left to training); the running moments are kept per edited
weight (the reference shares them across the weights of one shape) with std clamped at 1e-8 (reference:
``σ + 1e-7``), and are frozen outside training mode in both. Factor rows with a zero input or zero gradient are
dropped before the transform, as in the reference (``factors.py``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..base import EditError, Updates
from ..weights import ORIENTATIONS, stored_update
from .factors import Factors


class RunningMoments(nn.Module):
    """Per-feature running mean and standard deviation of factor rows (Chan et al. parallel update).

    Before any update (``count < 2``) the mean is 0 and the std 1, i.e. normalisation is the identity.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))

    @torch.no_grad()
    def update(self, rows: Tensor) -> None:
        """Fold (T, dim) rows into the moments."""
        n = rows.shape[0]
        if n == 0:
            return
        rows = rows.float()
        b_mean = rows.mean(0)
        b_m2 = ((rows - b_mean) ** 2).sum(0)
        count = int(self.count)
        total = count + n
        delta = b_mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += b_m2 + delta**2 * (count * n / total)
        self.count.fill_(total)

    def stats(self, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
        """``(mean, std)`` as (dim,) tensors; std is clamped below at ``eps``."""
        count = int(self.count)
        if count < 2:
            return torch.zeros_like(self.mean), torch.ones_like(self.mean)
        std = (self.m2 / (count - 1)).sqrt().clamp(min=eps)
        return self.mean, std


class ResidualLowRankBlock(nn.Module):
    """``z ← s_m ⊙ z + b_m;  z + U relu(V z + c) + e`` with per-mode (edited layer) scale ``s_m`` and shift ``b_m``.

    ``U`` (dim × rank) starts at zero, ``s`` at one and ``b`` at zero: the block starts as the identity.
    """

    def __init__(self, dim: int, rank: int, n_modes: int) -> None:
        super().__init__()
        self.V = nn.Parameter(torch.randn(rank, dim) / math.sqrt(dim))
        self.c = nn.Parameter(torch.zeros(rank))
        self.U = nn.Parameter(torch.zeros(dim, rank))
        self.e = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, z: Tensor, mode: int) -> Tensor:
        z = z * self.mode_scale[mode] + self.mode_shift[mode]
        return z + torch.relu(z @ self.V.T + self.c) @ self.U.T + self.e


class GradientTransform(nn.Module):
    """The MLP shared by the edited weights of one shape: ``n_blocks`` residual low-rank blocks on ``[x; δ]``."""

    def __init__(self, x_dim: int, delta_dim: int, rank: int, n_blocks: int, n_modes: int) -> None:
        super().__init__()
        self.x_dim, self.delta_dim = x_dim, delta_dim
        self.blocks = nn.ModuleList(ResidualLowRankBlock(x_dim + delta_dim, rank, n_modes) for _ in range(n_blocks))

    def forward(self, zx: Tensor, zd: Tensor, mode: int) -> tuple[Tensor, Tensor]:
        z = torch.cat([zx, zd], -1)
        for block in self.blocks:
            z = block(z, mode)
        return z[:, : self.x_dim], z[:, self.x_dim :]


def _key(param: str) -> str:
    return param.replace(".", "__")


class MENDHypernetwork(nn.Module):
    """All of MEND's trainable state for one model and one set of edited weights.

    Args:
        params: edited parameter names (as in ``model.named_parameters()``).
        dims: per parameter ``(in_features, out_features)`` of the map it stores.
        orientations: per parameter ``"linear"`` (stored out×in) or ``"conv1d"`` (stored in×out).
        rank: hidden width of each residual block (MEND: 1920 for GPT-2 XL).
        n_blocks: residual blocks per shared MLP.
        edit_lr: initial edit learning rate ``η`` of every layer.
        model_info: what the hypernetwork was trained for (model name, architecture signature); saved with it.

    ``forward(factors)`` returns the updates as :class:`LowRankUpdate` (A: rows×T, B: cols×T in the stored
    orientation, T = factor rows of that weight), differentiable with respect to the hypernetwork's parameters.
    """

    def __init__(
        self,
        params: list[str],
        dims: Mapping[str, tuple[int, int]],
        orientations: Mapping[str, str],
        rank: int = 128,
        n_blocks: int = 1,
        edit_lr: float = 1e-3,
        model_info: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not params:
            raise EditError("MENDHypernetwork: no edited parameters")
        if rank < 1 or n_blocks < 1 or not edit_lr > 0:
            raise ValueError(f"MENDHypernetwork: rank and n_blocks must be >= 1 and edit_lr > 0, got {rank}, {n_blocks}, {edit_lr}")
        for p in params:
            if orientations[p] not in ORIENTATIONS:
                raise EditError(f"MENDHypernetwork: unknown orientation {orientations[p]!r} of '{p}'")
        self.params = list(params)
        self.dims = {p: (int(dims[p][0]), int(dims[p][1])) for p in params}
        self.orientations = {p: orientations[p] for p in params}
        self.rank, self.n_blocks, self.edit_lr_init = rank, n_blocks, edit_lr
        self.model_info = dict(model_info or {})
        shapes = sorted({self.dims[p] for p in params})
        self.shape_key = {p: f"x{self.dims[p][0]}_d{self.dims[p][1]}" for p in params}
        self.mode = {p: [q for q in params if self.dims[q] == self.dims[p]].index(p) for p in params}
        self.nets = nn.ModuleDict(
            {
                f"x{dx}_d{dd}": GradientTransform(dx, dd, rank, n_blocks, sum(self.dims[p] == (dx, dd) for p in params))
                for dx, dd in shapes
            }
        )
        self.x_moments = nn.ModuleDict({_key(p): RunningMoments(self.dims[p][0]) for p in params})
        self.d_moments = nn.ModuleDict({_key(p): RunningMoments(self.dims[p][1]) for p in params})
        self.log_lr = nn.Parameter(torch.full((len(params),), math.log(edit_lr)))

    # -- what it was built for -------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this hypernetwork (saved next to its state dict)."""
        return {
            "params": list(self.params),
            "dims": {p: list(d) for p, d in self.dims.items()},
            "orientations": dict(self.orientations),
            "rank": self.rank,
            "n_blocks": self.n_blocks,
            "edit_lr": self.edit_lr_init,
            "model_info": dict(self.model_info),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "MENDHypernetwork":
        return cls(
            list(config["params"]),
            {p: tuple(d) for p, d in config["dims"].items()},
            dict(config["orientations"]),
            rank=int(config["rank"]),
            n_blocks=int(config["n_blocks"]),
            edit_lr=float(config["edit_lr"]),
            model_info=config.get("model_info"),
        )

    def edit_lrs(self) -> dict[str, float]:
        """Current edit learning rate ``η_ℓ`` per edited parameter."""
        return {p: float(v) for p, v in zip(self.params, self.log_lr.detach().exp())}

    # -- the transform ---------------------------------------------------------------------------------------------
    def transform(self, param: str, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """Transformed factors ``(x̃, δ̃)`` of ``param``, same shapes as ``(x, δ)``: (T, in) and (T, out).

        In training mode the running moments of ``param`` are updated with these rows first.
        """
        if param not in self.dims:
            raise EditError(f"MEND hypernetwork has no transform for '{param}'; it was trained for {self.params}")
        dx, dd = self.dims[param]
        if x.shape[-1] != dx or delta.shape[-1] != dd or x.shape[0] != delta.shape[0]:
            raise EditError(
                f"MEND: factors of '{param}' have shapes {tuple(x.shape)} and {tuple(delta.shape)}; the hypernetwork "
                f"expects (T, {dx}) and (T, {dd})"
            )
        mx, md = self.x_moments[_key(param)], self.d_moments[_key(param)]
        if self.training:
            mx.update(x)
            md.update(delta)
        (mu_x, sd_x), (mu_d, sd_d) = mx.stats(), md.stats()
        ox, od = self.nets[self.shape_key[param]]((x - mu_x) / sd_x, (delta - mu_d) / sd_d, self.mode[param])
        return mu_x + sd_x * ox, mu_d + sd_d * od

    def forward(self, factors: Factors) -> Updates:
        """Low-rank updates ``ΔW_ℓ = -η_ℓ Σ_t δ̃_t x̃_tᵀ`` in the stored orientation, one per parameter in ``factors``."""
        out: Updates = {}
        for param, (x, delta) in factors.items():
            xt, dt = self.transform(param, x.float(), delta.float())
            lr = self.log_lr[self.params.index(param)].exp()
            # ΔW = (-η δ̃)ᵀ x̃ of the map in -> out: stored as is by nn.Linear (out×in), transposed by Conv1D
            out[param] = stored_update(self.orientations[param], -lr * dt.T, xt.T)
        return out
