"""PRUNE's restraint of the accumulated edit update (spec §2), as plain tensor code (no Lightning).

For an edited matrix with original weight W₀ and accumulated update ΔW = W − W₀ = U Σ Vᵀ:

    τ = σ_max(W₀)                                        (computed once per matrix)
    F(σ̂) = log_α(σ̂) − log_α(τ) + τ   if σ̂ ≥ τ          (``kind="log"``, α > 1; reference code uses ≥)
    F(σ̂) = (σ̂ + τ) / 2               if σ̂ ≥ τ          (``kind="linear"``, the ablation)
    F(σ̂) = σ̂                         otherwise
    ΔŴ = U_r F(Σ_r) V_rᵀ,  r = numerical rank of ΔW (numpy's tolerance σ̂₁ · max(m, n) · eps)
    restrained weight = W₀ + ΔŴ

Orientation does not matter (singular values are invariant under transposition): ``nn.Linear`` weights (out×in)
and GPT-2 ``Conv1D`` weights (in×out) are handled alike. All linear algebra runs in float32, or float64 when the
input is float64, whatever the model's dtype.

RECT (Gu et al., 2024), the other restraint of the accumulated update kept here (:func:`rect_mask`): keep the
⌈k·mn⌉ entries of ΔW with the largest relative change |ΔW_ij| / |W₀_ij| (k = 0.4 as in the public ports), zero the
rest: ΔW' = ΔW ⊙ M.

Two ways to get the SVD of ΔW (:func:`delta_svd` picks automatically):
- dense: a thin SVD of the m×n matrix, O(mn·min(m, n));
- low-rank: when ΔW = A Bᵀ is known as factors with r columns (summed rank-one ROME edits, MEMIT batches),
  QR of A and B and an SVD of the small R_A R_Bᵀ, O((m + n) r²), never forming an m×n SVD.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

KINDS = ("log", "linear")


def check_restraint_args(alpha: float, kind: str, where: str = "restraint") -> None:
    """Raise a clear ``ValueError`` for an unknown ``kind`` or an ``alpha`` that is not a finite number > 1."""
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha) or alpha <= 1:
        raise ValueError(f"{where}: alpha must be a finite number > 1 (the base of the logarithm in F), got {alpha!r}")


def _check_tau(tau: float) -> float:
    tau = float(tau)
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite positive number (σ_max of the original weight), got {tau!r}")
    return tau


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 for everything else (bf16/fp16 weights included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def restraint_fn(sigma, tau: float, alpha: float = math.e, kind: str = "log"):
    """F applied elementwise to singular values ``sigma`` (a tensor, numpy array or float; same type back).

    Values ``≥ tau`` are restrained: ``log_α(σ/τ) + τ`` (``kind="log"``; equal to log_α σ − log_α τ + τ, and exactly
    τ at σ = τ) or ``(σ + τ)/2`` (``kind="linear"``); values below ``tau`` are returned unchanged.
    """
    check_restraint_args(alpha, kind)
    tau = _check_tau(tau)
    back = None
    if isinstance(sigma, Tensor):
        s = sigma
    elif isinstance(sigma, np.ndarray):
        s, back = torch.from_numpy(np.asarray(sigma, dtype=np.float64)), "numpy"
    else:
        s, back = torch.tensor(float(sigma), dtype=torch.float64), "float"
    t = torch.tensor(tau, dtype=s.dtype, device=s.device)
    if kind == "log":
        big = torch.log(s / t) / math.log(alpha) + t
    else:
        big = (s + t) / 2
    out = torch.where(s >= t, big, s)
    if back == "numpy":
        return out.numpy()
    if back == "float":
        return float(out)
    return out


def rank_tolerance(s1: float, shape: tuple[int, int], dtype: torch.dtype) -> float:
    """numpy ``matrix_rank``'s default tolerance ``σ₁ · max(m, n) · eps`` for the compute dtype of ``dtype``."""
    return float(s1) * max(shape) * torch.finfo(compute_dtype(dtype)).eps


def numerical_rank(sigma: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Number of singular values above :func:`rank_tolerance` (``sigma`` sorted descending)."""
    if sigma.numel() == 0:
        return 0
    return int((sigma > rank_tolerance(float(sigma[0]), shape, dtype)).sum())


def n_restrained(sigma: Tensor, tau: float, rank: int | None = None) -> int:
    """How many of the (first ``rank``) singular values F changes: those ``≥ tau``."""
    s = sigma if rank is None else sigma[:rank]
    return int((s >= tau).sum())


# -- spectrum helpers ----------------------------------------------------------------------------------------------
def svdvals(W: Tensor) -> Tensor:
    """All min(m, n) singular values of ``W``, descending, in float32 (float64 for float64 input)."""
    if W.dim() != 2:
        raise ValueError(f"svdvals: expected a 2-D matrix, got shape {tuple(W.shape)}")
    W = W.detach().to(compute_dtype(W.dtype))
    return torch.linalg.svdvals(W.mT if W.shape[0] < W.shape[1] else W)  # LAPACK is several times faster tall


def sigma_max(W: Tensor) -> float:
    """Largest singular value of the 2-D ``W`` (τ when ``W`` is the original weight), computed in float32+."""
    return float(svdvals(W)[0])


def condition_number(W: Tensor) -> float:
    """κ(W) = σ_max / σ_min over the min(m, n) singular values (``inf`` for a singular matrix), float32+.

    Needs all singular values: cheap at 576×1536; about a minute on one CPU core at 4096×14336 (seconds on a GPU).
    """
    s = svdvals(W)
    return float(s[0] / s[-1]) if float(s[-1]) > 0 else math.inf


# -- the SVD of ΔW -------------------------------------------------------------------------------------------------
class DeltaSVD(NamedTuple):
    """Thin SVD ``ΔW = U diag(sigma) Vᵀ`` of an (m, n) update: ``U`` (m, k), ``sigma`` (k,) descending, ``V`` (n, k).

    ``path`` is ``"dense"`` or ``"lowrank"``; ``dtype`` the dtype whose eps defines the numerical rank.
    """

    U: Tensor
    sigma: Tensor
    V: Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    path: str


def _dense_svd(delta: Tensor) -> DeltaSVD:
    if delta.dim() != 2:
        raise ValueError(f"expected a 2-D update ΔW, got shape {tuple(delta.shape)}")
    cd = compute_dtype(delta.dtype)
    D = delta.detach().to(cd)
    if D.shape[0] < D.shape[1]:  # decompose the tall orientation (several times faster), ΔW = (V S Uᵀ)ᵀ
        V, S, Uh = torch.linalg.svd(D.mT, full_matrices=False)
        return DeltaSVD(Uh.mT, S, V, tuple(delta.shape), cd, "dense")
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    return DeltaSVD(U, S, Vh.mT, tuple(delta.shape), cd, "dense")


def _factor_svd(A: Tensor, B: Tensor) -> DeltaSVD:
    """SVD of A Bᵀ via QR: A = Q_A R_A, B = Q_B R_B, R_A R_Bᵀ = Ũ S Ṽᵀ, so ΔW = (Q_A Ũ) S (Q_B Ṽ)ᵀ."""
    cd = torch.float64 if torch.float64 in (A.dtype, B.dtype) else torch.float32
    QA, RA = torch.linalg.qr(A.detach().to(cd))
    QB, RB = torch.linalg.qr(B.detach().to(cd))
    Us, S, Vsh = torch.linalg.svd(RA @ RB.mT, full_matrices=False)
    return DeltaSVD(QA @ Us, S, QB @ Vsh.mT, (A.shape[0], B.shape[0]), cd, "lowrank")


def _check_factors(factors: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    A, B = factors
    if A.dim() == 1:
        A = A[:, None]
    if B.dim() == 1:
        B = B[:, None]
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[1]:
        raise ValueError(
            f"factors must be A (m, r) and B (n, r) with ΔW = A Bᵀ, got {tuple(A.shape)} and {tuple(B.shape)}"
        )
    return A, B


def use_lowrank(shape: tuple[int, int], r: int) -> bool:
    """The automatic choice: the low-rank path when the factors have at most min(m, n)/2 columns."""
    return r <= min(shape) // 2


def delta_svd(delta: Tensor | None = None, factors: tuple[Tensor, Tensor] | None = None) -> DeltaSVD:
    """Thin SVD of ΔW, given densely (``delta``, (m, n)) or as ``factors`` ``(A, B)`` with ΔW = A Bᵀ.

    With factors of r ≤ min(m, n)/2 columns the low-rank path is used (QR + r×r SVD, O((m + n) r²)); otherwise the
    dense (m, n) matrix (``delta`` if given, else A Bᵀ) is decomposed.
    """
    if factors is not None:
        A, B = _check_factors(factors)
        shape = (A.shape[0], B.shape[0])
        if delta is not None and tuple(delta.shape) != shape:
            raise ValueError(f"delta has shape {tuple(delta.shape)} but the factors give {shape}")
        if use_lowrank(shape, A.shape[1]):
            return _factor_svd(A, B)
        if delta is None:
            cd = torch.float64 if torch.float64 in (A.dtype, B.dtype) else torch.float32
            delta = A.detach().to(cd) @ B.detach().to(cd).mT
    if delta is None:
        raise ValueError("delta_svd: give the update densely (delta) or as factors (A, B)")
    return _dense_svd(delta)


# -- the restraint -------------------------------------------------------------------------------------------------
class Restraint(NamedTuple):
    """F applied to the SVD of one accumulated update ΔW (m, n).

    ``svd``: the decomposition of the unrestrained ΔW; ``values``: F(σ̂) for the first ``rank`` singular values
    and 0 beyond the numerical rank (so ΔŴ = U diag(values) Vᵀ); ``n_restrained``: how many σ̂ ≥ τ.
    """

    svd: DeltaSVD
    values: Tensor
    tau: float
    rank: int
    n_restrained: int

    @property
    def sigma(self) -> Tensor:
        """Singular values of the unrestrained ΔW (descending)."""
        return self.svd.sigma

    @property
    def path(self) -> str:
        return self.svd.path

    def factors(self) -> tuple[Tensor, Tensor]:
        """Restrained update as factors ``(A', B')``, ΔŴ = A' B'ᵀ, A' (m, rank), B' (n, rank)."""
        r = self.rank
        return self.svd.U[:, :r] * self.values[:r], self.svd.V[:, :r]

    def delta(self) -> Tensor:
        """Dense restrained update ΔŴ (m, n) in the compute dtype."""
        A, B = self.factors()
        return A @ B.mT

    @property
    def changed(self) -> bool:
        """Whether F changes ΔW at all (some σ̂ ≥ τ, or directions below the rank tolerance dropped)."""
        return bool((self.values != self.svd.sigma).any())

    def correction(self) -> tuple[Tensor, Tensor]:
        """ΔŴ − ΔW as factors ``(C_A, C_B)``: only the directions F changed (restrained or below the rank tolerance).

        Adding ``C_A C_Bᵀ`` to W₀ + ΔW gives W₀ + ΔŴ at O(mn·c) cost, c = number of changed values (often 0).
        """
        change = self.values - self.svd.sigma
        idx = torch.nonzero(change != 0).flatten()
        return self.svd.U[:, idx] * change[idx], self.svd.V[:, idx]


def restraint_of(svd: DeltaSVD, tau: float, alpha: float = math.e, kind: str = "log") -> Restraint:
    """Apply F (threshold ``tau``) to a :class:`DeltaSVD`, truncating to the numerical rank of ΔW."""
    check_restraint_args(alpha, kind)
    tau = _check_tau(tau)
    rank = numerical_rank(svd.sigma, svd.shape, svd.dtype)
    values = torch.zeros_like(svd.sigma)
    values[:rank] = restraint_fn(svd.sigma[:rank], tau, alpha, kind)
    return Restraint(svd, values, tau, rank, n_restrained(svd.sigma, tau, rank))


def prune_delta(delta: Tensor, tau: float, alpha: float = math.e, kind: str = "log") -> Tensor:
    """The restrained update ΔŴ = U_r F(Σ_r) V_rᵀ of a dense ``delta`` (m, n), either orientation.

    Truncated to ``delta``'s numerical rank (numpy's default tolerance); same shape and dtype as ``delta``; computed
    in float32 (float64 for float64 input).
    """
    return restraint_of(_dense_svd(delta), tau, alpha, kind).delta().to(delta.dtype)


def prune_factors(
    A: Tensor, B: Tensor, tau: float, alpha: float = math.e, kind: str = "log"
) -> tuple[Tensor, Tensor, Tensor]:
    """Restrain ΔW = A Bᵀ (A (m, r), B (n, r)) without an m×n SVD: QR of A and B, SVD of R_A R_Bᵀ (r×r).

    Returns ``(A', B', sigma)``: ΔŴ = A' B'ᵀ with A' (m, k), B' (n, k) orthonormal columns, k = numerical rank of
    ΔW (same tolerance as the dense path, with m, n of ΔW); ``sigma`` the singular values of the unrestrained ΔW.
    O((m + n) r²); matches :func:`prune_delta` of A Bᵀ.
    """
    A, B = _check_factors((A, B))
    res = restraint_of(_factor_svd(A, B), tau, alpha, kind)
    Ar, Br = res.factors()
    return Ar, Br, res.sigma


def restrain(
    W0: Tensor,
    delta: Tensor | None = None,
    factors: tuple[Tensor, Tensor] | None = None,
    *,
    tau: float | None = None,
    alpha: float = math.e,
    kind: str = "log",
) -> Restraint:
    """Restrain the accumulated update of the original weight ``W0`` (m, n), choosing the path automatically.

    ``delta``: ΔW dense (m, n); ``factors``: ``(A, B)`` with ΔW = A Bᵀ (low-rank path when r ≤ min(m, n)/2).
    ``tau`` defaults to σ_max(W0) (pass it to reuse a cached value). The restrained weight is
    ``W0 + result.delta()``; ``result.factors()`` / ``result.correction()`` give it in low-rank form.
    """
    if W0.dim() != 2:
        raise ValueError(f"restrain: W0 must be a 2-D matrix, got shape {tuple(W0.shape)}")
    svd = delta_svd(delta, factors)
    if svd.shape != tuple(W0.shape):
        raise ValueError(f"restrain: ΔW has shape {svd.shape}, W0 has {tuple(W0.shape)}")
    return restraint_of(svd, sigma_max(W0) if tau is None else tau, alpha, kind)


def restrained_weight(W0: Tensor, result: Restraint) -> Tensor:
    """W₀ + ΔŴ in ``W0``'s dtype (the sum is formed in the compute dtype)."""
    return (W0.to(result.svd.dtype) + result.delta()).to(W0.dtype)


def compress(svd: DeltaSVD, restrained: Restraint | None = None) -> tuple[Tensor, Tensor]:
    """Factors of ΔW with as few columns as its rank: ``restrained`` given -> ΔŴ truncated to the numerical rank;
    otherwise the unrestrained ΔW, dropping only values at float-noise level of the factorisation (σ̂₁·k·eps).
    """
    if restrained is not None:
        return restrained.factors()
    s = svd.sigma
    if s.numel() == 0:
        return svd.U, svd.V
    keep = int((s > float(s[0]) * s.numel() * torch.finfo(svd.dtype).eps).sum())
    return svd.U[:, :keep] * s[:keep], svd.V[:, :keep]


# -- RECT ----------------------------------------------------------------------------------------------------------
def rect_mask(delta: Tensor, W0: Tensor, fraction: float = 0.4) -> Tensor:
    """RECT's mask M (bool, ``delta``'s shape): True on exactly ⌈fraction · numel⌉ entries, those with the largest
    relative change |ΔW_ij| / |W₀_ij| (an entry with W₀_ij = 0 and ΔW_ij ≠ 0 counts as an infinite change; ties are
    broken by position). Computed in float32 or better; ``delta`` and ``W0`` (m, n) share an orientation."""
    check_rect_fraction(fraction)
    if tuple(delta.shape) != tuple(W0.shape):
        raise ValueError(f"rect_mask: ΔW has shape {tuple(delta.shape)}, W0 has {tuple(W0.shape)}")
    cd = compute_dtype(delta.dtype)
    d, w = delta.detach().to(cd).abs(), W0.detach().to(delta.device, cd).abs()
    rel = torch.where(w > 0, d / w.clamp_min(torch.finfo(cd).tiny), torch.where(d > 0, math.inf, 0.0))
    k = math.ceil(fraction * rel.numel())
    mask = torch.zeros(rel.numel(), dtype=torch.bool, device=rel.device)
    mask[torch.topk(rel.flatten(), k, sorted=False).indices] = True
    return mask.view(rel.shape)


def check_rect_fraction(fraction: float, where: str = "RECT") -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, Real) or not 0 < fraction <= 1:
        raise ValueError(f"{where}: fraction must be a number in (0, 1] (the share of ΔW's entries kept), got {fraction!r}")


class Sparsification(NamedTuple):
    """RECT applied to one accumulated update: ``kept`` of ``total`` entries, ‖ΔW'‖_F / ‖ΔW‖_F as ``kept_norm``."""

    kept: int
    total: int
    kept_norm: float
    changed: bool


# -- the state PRUNE keeps per edited matrix -----------------------------------------------------------------------
class AccumulatedUpdate:
    """PRUNE's state for one edited matrix: W₀, τ = σ_max(W₀) and the accumulated update ΔW (no Lightning).

    ``W0``: the original weight (m, n), in either orientation (``nn.Linear`` out×in, GPT-2 ``Conv1D`` in×out); a
    private copy is kept. ``tau`` defaults to σ_max(W0). ``tracking`` says how ΔW is known:

    - ``"factors"`` (the editors' low-rank updates): every update is added with :meth:`add` as ``A`` (m, r),
      ``B`` (n, r), ΔW = A Bᵀ summed over all updates, kept in float32 (float64 if given) as the concatenated
      factors (recompressed to its rank by an online commit, or once they have more than 2·min(m, n) columns), so
      restraining costs O((m + n) r²) and never an m×n SVD while r ≤ min(m, n)/2;
    - ``"weights"`` (a module trained with gradients): nothing is added; ΔW = W − W₀ is read from the weight passed
      to :meth:`restraint` / :meth:`write_restrained` (a dense m×n SVD each time).

    The protocol (spec §2), for a weight tensor ``W`` that holds W₀ + ΔW:

    - deferred view: ``write_restrained(W, alpha, kind)`` writes W₀ + F(ΔW) into ``W`` and keeps ΔW (the caller keeps a
      copy of the unrestrained ``W`` to put back before the next edit);
    - online commit: ``write_restrained(W, alpha, kind, commit=True)`` writes W₀ + F(ΔW) and makes ΔŴ = F(ΔW) the
      accumulated update, so later updates build on it.

    Example without Lightning (continual fine-tuning, dense)::

        acc = AccumulatedUpdate(layer.weight, tracking="weights")   # before training
        ...                                            # optimizer steps change layer.weight
        acc.write_restrained(layer.weight.data, commit=True)   # online PRUNE after a step

    :meth:`state_dict` / :meth:`load_state_dict` save and restore W₀, τ and the factors (resume is bit-identical).
    """

    TRACKING = ("factors", "weights")

    def __init__(self, W0: Tensor, tau: float | None = None, tracking: str = "factors") -> None:
        if W0.dim() != 2:
            raise ValueError(f"AccumulatedUpdate: W0 must be a 2-D matrix, got shape {tuple(W0.shape)}")
        if tracking not in self.TRACKING:
            raise ValueError(f"AccumulatedUpdate: tracking must be one of {self.TRACKING}, got {tracking!r}")
        self.W0 = W0.detach().clone()
        self.tau = _check_tau(sigma_max(self.W0) if tau is None else tau)
        self.tracking = tracking
        self.A: Tensor | None = None
        self.B: Tensor | None = None

    # -- the accumulated update ------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W0.shape)

    @property
    def num_factors(self) -> int:
        """Columns of the accumulated factors (0 when none were added or ΔW is tracked densely)."""
        return 0 if self.A is None else self.A.shape[1]

    @property
    def tracks_factors(self) -> bool:
        return self.tracking == "factors"

    def add(self, A: Tensor, B: Tensor, sign: float = 1.0) -> None:
        """ΔW += sign · A Bᵀ, with ``A`` (m, r) or (m,), ``B`` (n, r) or (n,), in W₀'s orientation."""
        if not self.tracks_factors:
            raise ValueError("AccumulatedUpdate.add: this matrix tracks ΔW from its weights (tracking='weights')")
        A, B = _check_factors((A, B))
        if (A.shape[0], B.shape[0]) != self.shape:
            raise ValueError(f"AccumulatedUpdate: update has shape {(A.shape[0], B.shape[0])}, W0 has {self.shape}")
        dev = self.W0.device
        cd = torch.float64 if torch.float64 in (A.dtype, B.dtype, self.W0.dtype) else torch.float32
        A, B = A.detach().to(dev, cd) * sign, B.detach().to(dev, cd)
        if self.A is None:
            self.A, self.B = A, B
        else:
            self.A, self.B = torch.cat([self.A.to(cd), A], 1), torch.cat([self.B.to(cd), B], 1)
        if self.num_factors > 2 * min(self.shape):  # more columns than rank: recompress (a dense SVD, rarely)
            self.A, self.B = compress(delta_svd(factors=(self.A, self.B)))

    def remove(self, A: Tensor, B: Tensor) -> None:
        """ΔW −= A Bᵀ (undo an update added before)."""
        self.add(A, B, sign=-1.0)

    def delta(self, weight: Tensor | None = None) -> Tensor:
        """Dense ΔW (m, n) in the compute dtype: A Bᵀ when tracked as factors, else ``weight`` − W₀."""
        if self.tracks_factors:
            if self.A is None:
                return torch.zeros_like(self.W0, dtype=compute_dtype(self.W0.dtype))
            return self.A @ self.B.mT
        if weight is None:
            raise ValueError("AccumulatedUpdate.delta: ΔW is tracked densely; pass the current weight")
        cd = compute_dtype(weight.dtype)
        return weight.detach().to(cd) - self.W0.to(weight.device, cd)

    def svd(self, weight: Tensor | None = None) -> DeltaSVD | None:
        """Thin SVD of ΔW (low-rank path for factors); None when ΔW is zero (nothing added, or ``weight`` == W₀)."""
        if self.tracks_factors:
            return delta_svd(factors=(self.A, self.B)) if self.num_factors else None
        if weight is None:
            raise ValueError("AccumulatedUpdate.svd: ΔW is tracked densely; pass the current weight")
        if torch.equal(weight.detach(), self.W0.to(weight.device, weight.dtype)):
            return None
        return delta_svd(delta=self.delta(weight))

    def restraint(self, alpha: float = math.e, kind: str = "log", weight: Tensor | None = None) -> Restraint | None:
        """F applied to the SVD of ΔW (:class:`Restraint`); None while ΔW is zero."""
        svd = self.svd(weight)
        return None if svd is None else restraint_of(svd, self.tau, alpha, kind)

    def view(self, alpha: float | None = math.e, kind: str = "log", weight: Tensor | None = None) -> Tensor:
        """W₀ + F(ΔW) (``alpha`` None: W₀ + ΔW) as a new tensor in W₀'s dtype; ΔW is unchanged."""
        res = None if alpha is None else self.restraint(alpha, kind, weight)
        if res is not None:
            return (self.W0.to(res.svd.dtype) + res.delta()).to(self.W0.dtype)
        if not self.tracks_factors:
            return (self.W0 if weight is None else weight).detach().clone()
        d = self.delta()
        return (self.W0.to(d.dtype) + d).to(self.W0.dtype)

    @torch.no_grad()
    def write_restrained(
        self,
        weight: Tensor,
        alpha: float = math.e,
        kind: str = "log",
        *,
        commit: bool = False,
        keep: Tensor | None = None,
    ) -> Restraint | None:
        """Turn ``weight`` (m, n), which holds W₀ + ΔW, into W₀ + F(ΔW) in place; returns the restraint (None: ΔW = 0).

        Only the directions F changes are written (``weight += ΔŴ − ΔW`` as a rank-c product, c often 0), in the
        compute dtype and rounded once for low-precision weights. ``commit=False`` (deferred view): ΔW is left as it
        is, so showing a view any number of times never changes the state. ``commit=True`` (online): ΔŴ, as factors
        of its rank, becomes the accumulated update.
        ``keep``: a buffer shaped like ``weight`` that receives the unrestrained weight when (and only when) the
        weight changes (``result.changed``), for the deferred protocol to put back.
        """
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"AccumulatedUpdate: weight has shape {tuple(weight.shape)}, W0 has {self.shape}")
        self.to(weight.device)
        res = self.restraint(alpha, kind, weight)
        if res is None:
            return None
        CA, CB = res.correction()
        if CA.shape[1] > 0:
            if keep is not None:
                keep.copy_(weight)
            if weight.dtype == CA.dtype:
                weight.addmm_(CA, CB.mT)
            else:
                weight.copy_(weight.to(CA.dtype).addmm_(CA, CB.mT))
        if self.tracks_factors and commit:
            self.A, self.B = compress(res.svd, res)
        return res

    @torch.no_grad()
    def write_sparsified(
        self, weight: Tensor, fraction: float = 0.4, *, commit: bool = False, keep: Tensor | None = None
    ) -> Sparsification | None:
        """RECT: turn ``weight`` (W₀ + ΔW) into W₀ + ΔW ⊙ M in place (:func:`rect_mask`); None while ΔW = 0.

        ``commit`` and ``keep`` as in :meth:`write_restrained`. A committed ΔW' is dense: it is kept as factors
        (ΔW', I) of min(m, n) columns, so later low-rank updates still add to it.
        """
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"AccumulatedUpdate: weight has shape {tuple(weight.shape)}, W0 has {self.shape}")
        self.to(weight.device)
        D = self.delta(weight)
        if not bool(D.any()):
            return None
        mask = rect_mask(D, self.W0, fraction)
        dropped = D.masked_fill(mask, 0)
        changed = bool(dropped.any())
        if changed:
            if keep is not None:
                keep.copy_(weight)
            if weight.dtype == dropped.dtype:
                weight.sub_(dropped)
            else:
                weight.copy_(weight.to(dropped.dtype).sub_(dropped))
        kept = D - dropped
        if commit and self.tracks_factors:
            self._set_delta(kept)
        norm = float(D.norm())
        return Sparsification(int(mask.sum()), mask.numel(), float(kept.norm()) / norm if norm > 0 else 1.0, changed)

    def _set_delta(self, delta: Tensor) -> None:
        """Replace the accumulated update by the dense ``delta`` (m, n), as factors with an identity on the small side."""
        m, n = self.shape
        eye = torch.eye(min(m, n), dtype=delta.dtype, device=delta.device)
        self.A, self.B = (eye, delta.mT.contiguous()) if m <= n else (delta.contiguous(), eye)

    def to(self, device: torch.device | str) -> "AccumulatedUpdate":
        """Move W₀ and the factors to ``device`` (in place; returns self)."""
        for k in ("W0", "A", "B"):
            t = getattr(self, k)
            if t is not None and t.device != torch.device(device):
                setattr(self, k, t.to(device))
        return self

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"W0": self.W0, "tau": self.tau, "tracking": self.tracking, "A": self.A, "B": self.B}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace W₀, τ and the factors by a saved state (same shape required)."""
        if tuple(state["W0"].shape) != self.shape:
            raise ValueError(
                f"AccumulatedUpdate: saved W0 has shape {tuple(state['W0'].shape)}, this matrix has {self.shape}"
            )
        self.W0, self.tau = state["W0"].detach().clone(), _check_tau(state["tau"])
        self.tracking = state.get("tracking", self.tracking)
        self.A, self.B = state.get("A"), state.get("B")

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "AccumulatedUpdate":
        acc = cls(state["W0"], tau=state["tau"], tracking=state.get("tracking", "factors"))
        acc.A, acc.B = state.get("A"), state.get("B")
        return acc
