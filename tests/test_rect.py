"""RECT (lit_prune.restraint.rect_mask, RectCallback) against an independent numpy computation, and its composition
with PRUNE on the same matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_prune_callback import TAG, FakeEditing, close, fake_edit, fake_w, make_trainer, ref_restrain

from lit_prune.callbacks import PruneCallback, RectCallback
from lit_prune.restraint import rect_mask


pytestmark = pytest.mark.usefixtures("one_thread")


def ref_rect(W0: np.ndarray, W: np.ndarray, fraction: float = 0.4) -> np.ndarray:
    """W0 + ΔW ⊙ M, M = the ⌈k·mn⌉ largest |ΔW| / |W0| (numpy, float64)."""
    W0, W = np.asarray(W0, np.float64), np.asarray(W, np.float64)
    d = W - W0
    rel = np.abs(d) / np.abs(W0)
    keep = np.argsort(-rel, axis=None, kind="stable")[: math.ceil(fraction * d.size)]
    m = np.zeros(d.size, bool)
    m[keep] = True
    return W0 + d * m.reshape(d.shape)


@pytest.mark.parametrize("fraction", [0.4, 0.05, 1.0])
def test_rect_mask_keeps_exactly_the_top_fraction(fraction):
    g = torch.Generator().manual_seed(0)
    W0, d = torch.randn(9, 14, generator=g), torch.randn(9, 14, generator=g)
    mask = rect_mask(d, W0, fraction)
    k = math.ceil(fraction * d.numel())
    assert int(mask.sum()) == k
    rel = (d.abs() / W0.abs()).double().numpy()
    assert rel[mask.numpy()].min() >= rel[~mask.numpy()].max(initial=-1)  # every kept entry beats every dropped one
    np.testing.assert_allclose((W0 + d * mask).double().numpy(), ref_rect(W0.numpy(), (W0 + d).numpy(), fraction),
                               atol=1e-6)


def test_rect_mask_zero_original_entries_and_errors():
    W0 = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    d = torch.tensor([[1e-3, 0.5], [0.1, 0.1]])
    assert rect_mask(d, W0, 0.25).tolist() == [[True, False], [False, False]]  # W0 = 0: an infinite change
    with pytest.raises(ValueError, match=r"fraction must be a number in \(0, 1\]"):
        rect_mask(d, W0, 0.0)
    with pytest.raises(ValueError, match=r"ΔW has shape \(2, 2\), W0 has \(2, 3\)"):
        rect_mask(d, torch.ones(2, 3))
    with pytest.raises(ValueError, match="RectCallback: fraction"):
        RectCallback(fraction=1.5)


def simulate(W0: torch.Tensor, steps: int, restrain) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Online replay: the weights each edit sees and the weights after each step's restraint (float64 numpy)."""
    W, starts, ends = W0.clone(), [], []
    for t in range(steps):
        starts.append(W.clone())
        W = W + fake_edit(W, t).dense()
        W = torch.from_numpy(restrain(W0.double().numpy(), W.double().numpy())).float()
        ends.append(W.clone())
    return starts, ends


def test_rect_online_builds_on_the_sparsified_update(tmp_path):
    module = FakeEditing(steps=5)
    W0 = fake_w(module).detach().clone()
    cb = RectCallback(fraction=0.4)
    trainer = make_trainer(tmp_path, [cb])
    trainer.fit(module)
    starts, ends = simulate(W0, 5, ref_rect)
    for t in range(5):
        assert close(module.seen[t], starts[t]), t
    assert close(fake_w(module), ends[-1])
    kept = cb.accumulated[TAG].delta()  # the committed ΔW' is sparse (the weights hold it up to float rounding)
    assert int((kept != 0).sum()) == math.ceil(0.4 * W0.numel())
    assert close(W0 + kept, fake_w(module), tol=1e-6)
    assert 0 < float(trainer.callback_metrics[f"rect/{TAG}/kept_norm"]) < 1


def test_rect_deferred_view_and_unrestrained_stream(tmp_path):
    free = FakeEditing(steps=4)
    make_trainer(tmp_path / "free", []).fit(free)
    module = FakeEditing(steps=4)
    W0 = fake_w(module).detach().clone()
    make_trainer(tmp_path / "rect", [RectCallback(mode="deferred")]).fit(module)
    for a, b in zip(module.seen, free.seen):
        assert torch.equal(a, b)  # every edit computed on the unrestrained weights
    assert close(fake_w(module), ref_rect(W0.numpy(), fake_w(free).numpy()))


def test_rect_then_prune_online_composes_in_list_order(tmp_path):
    module = FakeEditing(steps=5)
    W0 = fake_w(module).detach().clone()
    make_trainer(tmp_path, [RectCallback(), PruneCallback()]).fit(module)
    starts, ends = simulate(W0, 5, lambda w0, w: ref_restrain(w0, ref_rect(w0, w)))
    for t in range(5):
        assert close(module.seen[t], starts[t]), t
    assert close(fake_w(module), ends[-1])
    rect_only = simulate(W0, 5, ref_rect)[1][-1]
    assert not close(ends[-1], rect_only, tol=1e-3)  # PRUNE did act on top of RECT


def test_deferred_restraint_sharing_a_matrix_is_refused(tmp_path):
    module = FakeEditing(steps=2)
    with pytest.raises(ValueError, match=r"RectCallback\(mode='online'\), PruneCallback\(mode='deferred'\) restrain "
                                         r"the same matrices and one is deferred"):
        make_trainer(tmp_path, [RectCallback(), PruneCallback(mode="deferred")]).fit(module)
    assert module.num_edits == 0
