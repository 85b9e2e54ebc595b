"""lit_prune.restraint against a straightforward numpy implementation of spec §2 (the reference code's procedure)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lit_prune.restraint import (
    condition_number,
    delta_svd,
    n_restrained,
    prune_delta,
    prune_factors,
    restrain,
    restrained_weight,
    restraint_fn,
    sigma_max,
)

ALPHAS = [math.e, 2.0, 1.5, 1.2]


pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = ["log", "linear"]


def ref_F(s: float, tau: float, alpha: float, kind: str) -> float:
    """Scalar F of the spec, as the reference code writes it (threshold test ≥)."""
    if s >= tau:
        return math.log(s, alpha) - math.log(tau, alpha) + tau if kind == "log" else 0.5 * s + 0.5 * tau
    return s


def ref_restrained_weight(W0: np.ndarray, W: np.ndarray, alpha: float, kind: str, tau: float | None = None):
    """Reference procedure: full SVDs of ΔW and W0, matrix_rank of ΔW, F on the first rank values, rebuild."""
    delta = W - W0
    u, s, vt = np.linalg.svd(delta, full_matrices=True)
    s0 = np.linalg.svd(W0, full_matrices=True, compute_uv=False)
    tau = s0[0] if tau is None else tau
    rank = np.linalg.matrix_rank(delta)
    s2 = np.array([ref_F(float(x), tau, alpha, kind) for x in s])
    return W0 + u[:, :rank] @ np.diag(s2[:rank]) @ vt[:rank]


def ref_prune_delta(delta: np.ndarray, tau: float, alpha: float, kind: str) -> np.ndarray:
    return ref_restrained_weight(np.zeros_like(delta), delta, alpha, kind, tau)


def spectrum_matrix(rng, m: int, n: int, s: np.ndarray) -> np.ndarray:
    """m×n matrix with singular values ``s`` (random orthonormal bases)."""
    k = len(s)
    U = np.linalg.qr(rng.standard_normal((m, k)))[0]
    V = np.linalg.qr(rng.standard_normal((n, k)))[0]
    return U @ np.diag(s) @ V.T


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- F ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_restraint_fn_matches_formula(alpha, kind):
    tau = 2.7
    s = np.concatenate([np.linspace(0, 3 * tau, 37), [tau, 1e-9, 50 * tau]])
    expected = np.array([ref_F(x, tau, alpha, kind) for x in s])
    np.testing.assert_allclose(restraint_fn(s, tau, alpha, kind), expected, rtol=1e-12, atol=1e-12)
    got32 = restraint_fn(torch.tensor(s, dtype=torch.float32), tau, alpha, kind)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), expected, rtol=2e-6, atol=1e-6)
    assert restraint_fn(3 * tau, tau, alpha, kind) == pytest.approx(ref_F(3 * tau, tau, alpha, kind), rel=1e-12)
    # F is continuous and monotone; above τ its slope is 1/(τ ln α) (log) or 1/2 (linear)
    big = np.sort(s[s > tau])
    out = restraint_fn(big, tau, alpha, kind)
    assert np.all(out > tau) and np.all(np.diff(out) > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_threshold_edge_sigma_equal_tau(kind, dtype):
    tau = 3.3
    t = torch.tensor(tau, dtype=dtype)
    below, above = (torch.nextafter(t, torch.tensor(x, dtype=dtype)) for x in (0.0, 9.0))
    s = torch.stack([below, t, above])
    out = restraint_fn(s, float(t), math.e, kind)
    assert out[0] == s[0]  # below τ: unchanged, bit for bit
    assert out[1] == t  # exactly τ: restrained branch, F(τ) = τ exactly (continuity)
    assert t <= out[2] < s[2] or kind == "linear" and out[2] <= s[2]
    assert n_restrained(s, float(t)) == 2  # the test is σ ≥ τ, as in the reference code


# -- dense ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("shape,rank", [((12, 7), 7), ((7, 12), 7), ((20, 20), 20), ((16, 9), 3), ((9, 16), 3)])
def test_prune_delta_matches_reference(shape, rank, alpha, kind):
    rng = np.random.default_rng(hash((shape, rank)) % 2**32)
    tau = 1.7
    s = np.sort(tau * np.exp(rng.uniform(-2, 2.5, rank)))[::-1]  # straddles τ
    delta = spectrum_matrix(rng, *shape, s)
    expected = ref_prune_delta(delta, tau, alpha, kind)
    got = prune_delta(torch.from_numpy(delta), tau, alpha, kind)
    assert got.dtype == torch.float64 and tuple(got.shape) == shape
    assert rel(got, expected) < 1e-12
    # float32 input: computed in float32, same answer to float32 accuracy
    got32 = prune_delta(torch.from_numpy(delta).float(), tau, alpha, kind)
    assert got32.dtype == torch.float32
    assert rel(got32, expected) < 1e-5
    assert (s >= tau).any() and (s < tau).any()


def test_prune_delta_orientation_and_low_precision():
    rng = np.random.default_rng(1)
    d = torch.from_numpy(spectrum_matrix(rng, 40, 15, np.array([9.0, 4.0, 2.0, 0.5]))).float()
    a, b = prune_delta(d, 2.5), prune_delta(d.T.contiguous(), 2.5)
    torch.testing.assert_close(a.T, b, rtol=0, atol=1e-6)
    got = prune_delta(d.bfloat16(), 2.5)
    assert got.dtype == torch.bfloat16 and got.shape == d.shape
    # bf16 input is computed in float32: equal to restraining the bf16 values exactly, then rounding once
    ref = ref_prune_delta(d.bfloat16().double().numpy(), 2.5, math.e, "log")
    torch.testing.assert_close(got, torch.from_numpy(ref).bfloat16(), rtol=0, atol=0.02)


def test_rank_truncation():
    rng = np.random.default_rng(2)
    # exact rank 4 formed in float32: the float noise beyond rank 4 is dropped, as numpy's matrix_rank decides
    A, B = rng.standard_normal((30, 4)) * 3, rng.standard_normal((20, 4))
    d32 = torch.from_numpy(A @ B.T).float()
    assert np.linalg.matrix_rank(d32.numpy()) == 4
    out = prune_delta(d32, 2.0)
    assert np.linalg.matrix_rank(out.numpy()) == 4
    u, s, vt = np.linalg.svd(d32.double().numpy())
    assert s[4] > 0  # float32 rounding noise beyond the rank ...
    F = [math.log(x / 2.0) + 2.0 if x >= 2.0 else x for x in s[:4]]
    assert rel(out, u[:, :4] @ np.diag(F) @ vt[:4]) < 1e-5  # ... is not in the result
    assert rel(out, ref_prune_delta(d32.double().numpy(), 2.0, math.e, "log")) < 1e-5
    # a genuine tiny component below the tolerance (σ₁·max(m,n)·eps) is removed too
    d = spectrum_matrix(rng, 12, 8, np.array([5.0, 2.0, 1e-14]))
    assert np.linalg.matrix_rank(d) == 2
    out = prune_delta(torch.from_numpy(d), 3.0)
    np.testing.assert_allclose(out.numpy(), ref_prune_delta(d, 3.0, math.e, "log"), atol=1e-13)
    u, s, vt = np.linalg.svd(d)
    np.testing.assert_allclose(out.numpy(), u[:, :2] @ np.diag([math.log(5 / 3) + 3, 2.0]) @ vt[:2], atol=1e-13)
    assert torch.count_nonzero(prune_delta(torch.zeros(5, 3), 1.0)) == 0


# -- low-rank --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape", [(50, 30), (30, 50)])
@pytest.mark.parametrize("r", [1, 5, 12, 40])
def test_lowrank_matches_dense(shape, r, dtype, tol):
    kind = "linear" if r == 12 else "log"
    g = torch.Generator().manual_seed(r * 100 + shape[0])
    A = torch.randn(shape[0], r, generator=g, dtype=dtype) * torch.linspace(0.3, 3, r, dtype=dtype)
    B = torch.randn(shape[1], r, generator=g, dtype=dtype)
    tau = 6.0
    dense = prune_delta(A @ B.T, tau, 1.5, kind)
    Ar, Br, sigma = prune_factors(A, B, tau, 1.5, kind)
    assert Ar.shape[0] == shape[0] and Br.shape[0] == shape[1] and Ar.shape[1] == Br.shape[1] <= min(r, *shape)
    assert rel(Ar @ Br.T, dense) <= tol
    np.testing.assert_allclose(sigma.numpy(), np.linalg.svd((A @ B.T).double().numpy(), compute_uv=False)[: len(sigma)],
                               rtol=10 * tol, atol=10 * tol * float(sigma[0]))
    assert (sigma >= tau).any()


def test_lowrank_rank_truncation_matches_dense_notion():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(64, 5, generator=g) * 4
    A = torch.cat([a, a[:, :1] + a[:, 1:2], 2 * a[:, 2:3]], 1)  # 7 columns, rank 5
    B = torch.cat([torch.randn(24, 5, generator=g), torch.zeros(24, 2)], 1)
    B[:, 5] = B[:, 0]
    B[:, 6] = B[:, 3]
    d = A @ B.T
    true_rank = np.linalg.matrix_rank(d.numpy())
    Ar, Br, _ = prune_factors(A, B, 3.0)
    assert Ar.shape[1] == true_rank == np.linalg.matrix_rank(prune_delta(d, 3.0).numpy())
    assert rel(Ar @ Br.T, prune_delta(d, 3.0)) < 1e-5


def test_restrain_chooses_path_and_matches_reference():
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(40, 24, generator=g, dtype=torch.float64)
    A = torch.randn(40, 4, generator=g, dtype=torch.float64) * 5
    B = torch.randn(24, 4, generator=g, dtype=torch.float64)
    expected = ref_restrained_weight(W0.numpy(), (W0 + A @ B.T).numpy(), 2.0, "log")
    low = restrain(W0, factors=(A, B), alpha=2.0)
    assert low.path == "lowrank" and low.rank == 4 and low.n_restrained >= 1
    assert low.tau == pytest.approx(np.linalg.norm(W0.numpy(), 2), rel=1e-12)
    dense = restrain(W0, delta=A @ B.T, alpha=2.0)
    assert dense.path == "dense"
    wide = torch.randn(40, 13, generator=g, dtype=torch.float64), torch.randn(24, 13, generator=g, dtype=torch.float64)
    assert restrain(W0, factors=wide).path == "dense"  # r > min(m, n)/2: the dense SVD is cheaper
    for res in (low, dense):
        np.testing.assert_allclose(restrained_weight(W0, res).numpy(), expected, atol=1e-11)
        # the correction form (what the callback adds to W0 + ΔW) gives the same weight
        CA, CB = res.correction()
        np.testing.assert_allclose((W0 + A @ B.T + CA @ CB.T).numpy(), expected, atol=1e-11)
        assert CA.shape[1] == res.n_restrained + int((res.sigma[res.rank:] > 0).sum())  # + noise beyond the rank
    assert delta_svd(factors=(A, B)).path == "lowrank"


# -- spectrum helpers -------------------------------------------------------------------------------------------------
def test_spectrum_helpers():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(30, 70, generator=g)
    Wn = W.double().numpy()
    assert sigma_max(W) == pytest.approx(np.linalg.norm(Wn, 2), rel=1e-5)
    assert condition_number(W) == pytest.approx(np.linalg.cond(Wn), rel=1e-4)
    assert condition_number(W.T) == pytest.approx(np.linalg.cond(Wn), rel=1e-4)
    assert sigma_max(W.bfloat16()) == pytest.approx(np.linalg.norm(W.bfloat16().double().numpy(), 2), rel=1e-5)
    assert condition_number(torch.ones(4, 3)) == math.inf
    assert n_restrained(torch.tensor([5.0, 3.0, 2.0, 1.0]), 2.0) == 3
    assert n_restrained(torch.tensor([5.0, 3.0, 2.0, 1.0]), 2.0, rank=2) == 2


# -- errors ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [1.0, 0.5, -2.0, float("nan"), float("inf"), "e"])
def test_alpha_must_exceed_one(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number > 1"):
        restraint_fn(torch.ones(3), 1.0, alpha)
    with pytest.raises(ValueError, match="alpha"):
        prune_delta(torch.ones(3, 2), 1.0, alpha)


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        prune_delta(torch.ones(3, 2), 1.0, kind="sqrt")
    with pytest.raises(ValueError, match="tau must be a finite positive"):
        prune_delta(torch.ones(3, 2), 0.0)
    with pytest.raises(ValueError, match="2-D"):
        prune_delta(torch.ones(3, 2, 2), 1.0)
    with pytest.raises(ValueError, match="factors must be"):
        prune_factors(torch.ones(3, 2), torch.ones(4, 3), 1.0)
    with pytest.raises(ValueError, match=r"ΔW has shape \(3, 4\), W0 has \(4, 3\)"):
        restrain(torch.ones(4, 3), factors=(torch.ones(3, 1), torch.ones(4, 1)))


# -- AccumulatedUpdate: the per-matrix state PruneCallback and the reproduction share --------------------------------
def ref_view(W0: np.ndarray, dW: np.ndarray, alpha: float = math.e) -> np.ndarray:
    """W0 + U_r F(Σ_r) V_rᵀ of a dense ΔW, float64, full numpy SVDs."""
    u, s, vt = np.linalg.svd(dW)
    tau = np.linalg.norm(W0, 2)
    r = np.linalg.matrix_rank(dW)
    return W0 + (u[:, :r] * [ref_F(x, tau, alpha, "log") for x in s[:r]]) @ vt[:r]


def test_accumulated_update_factors_protocol():
    from lit_prune.restraint import AccumulatedUpdate

    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(12, 30, generator=g)
    tau = float(np.linalg.norm(W0.double().numpy(), 2))
    ups = [(4 * torch.randn(12, 1, generator=g), torch.randn(30, 1, generator=g)) for _ in range(4)]
    acc = AccumulatedUpdate(W0)
    assert acc.tau == pytest.approx(tau, rel=1e-6) and acc.num_factors == 0 and acc.restraint() is None
    W = W0.clone()
    for A, B in ups:
        acc.add(A, B)
        W += A @ B.T
    dW = sum(A.double() @ B.double().T for A, B in ups).numpy()
    np.testing.assert_allclose(acc.delta().double().numpy(), dW, rtol=1e-5, atol=1e-5)
    expected = ref_view(W0.double().numpy(), dW)
    assert np.linalg.svd(dW, compute_uv=False)[0] > tau  # the restraint has something to do
    np.testing.assert_allclose(acc.view().double().numpy(), expected, atol=2e-5)
    # deferred view written into the weights: the state is unchanged, the unrestrained weight kept
    keep = torch.empty_like(W)
    before = W.clone()
    res = acc.write_restrained(W, keep=keep)
    assert res.changed and torch.equal(keep, before) and acc.num_factors == 4
    np.testing.assert_allclose(W.double().numpy(), expected, atol=2e-5)
    # undo the last update: ΔW of the first three
    acc.remove(*ups[-1])
    np.testing.assert_allclose(acc.delta().double().numpy(), dW - (ups[-1][0] @ ups[-1][1].T).double().numpy(),
                               rtol=1e-5, atol=1e-5)
    acc.add(*ups[-1])
    # online commit: ΔŴ becomes the accumulated update, factors of its rank
    W = before.clone()
    acc.write_restrained(W, commit=True)
    np.testing.assert_allclose((W0.double() + acc.delta().double()).numpy(), expected, atol=2e-5)
    np.testing.assert_allclose(W.double().numpy(), expected, atol=2e-5)
    assert acc.num_factors == np.linalg.matrix_rank(dW)
    # state round trip
    back = AccumulatedUpdate.from_state_dict(acc.state_dict())
    assert torch.equal(back.W0, acc.W0) and back.tau == acc.tau and torch.equal(back.delta(), acc.delta())


def test_accumulated_update_weights_tracking_and_errors():
    from lit_prune.restraint import AccumulatedUpdate

    g = torch.Generator().manual_seed(4)
    W0 = torch.randn(20, 8, generator=g)
    acc = AccumulatedUpdate(W0, tracking="weights")
    W = W0 + 5 * torch.randn(20, 8, generator=g)
    expected = ref_view(W0.double().numpy(), (W - W0).double().numpy(), alpha=2.0)
    res = acc.write_restrained(W, alpha=2.0, commit=True)
    assert res.path == "dense" and res.n_restrained > 0
    np.testing.assert_allclose(W.double().numpy(), expected, atol=2e-5)
    assert acc.write_restrained(W0.clone()) is None  # ΔW = 0: nothing to do
    with pytest.raises(ValueError, match="tracks ΔW from its weights"):
        acc.add(torch.ones(20), torch.ones(8))
    with pytest.raises(ValueError, match="update has shape \\(20, 9\\), W0 has \\(20, 8\\)"):
        AccumulatedUpdate(W0).add(torch.ones(20), torch.ones(9))
    with pytest.raises(ValueError, match="tracking must be one of"):
        AccumulatedUpdate(W0, tracking="dense")
    with pytest.raises(ValueError, match="saved W0 has shape \\(3, 3\\)"):
        acc.load_state_dict(AccumulatedUpdate(torch.eye(3)).state_dict())
