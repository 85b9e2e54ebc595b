"""PruneCallback in a fake editing module (low-rank updates, manual optimisation) and in a plain gradient-trained
module: deferred/online semantics against an independent numpy simulation, logging, resume, two processes."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_prune.callbacks import PruneCallback
from lit_prune.editors.base import LowRankUpdate
from lit_prune.protocols import EditStream

TAG = "lin.weight"  # the fake module's edited parameter, in pl_module.model's namespace


pytestmark = pytest.mark.usefixtures("one_thread")


# -- reference: spec §2 in numpy ---------------------------------------------------------------------------------------
def ref_F(s: float, tau: float, alpha: float, kind: str) -> float:
    if s >= tau:
        return math.log(s, alpha) - math.log(tau, alpha) + tau if kind == "log" else 0.5 * s + 0.5 * tau
    return s


def ref_restrain(W0: np.ndarray, W: np.ndarray, alpha: float = math.e, kind: str = "log") -> np.ndarray:
    """W0 + U_r F(Σ_r) V_rᵀ of ΔW = W − W0 (full SVDs, matrix_rank), in float64."""
    W0, W = np.asarray(W0, np.float64), np.asarray(W, np.float64)
    u, s, vt = np.linalg.svd(W - W0, full_matrices=True)
    tau = np.linalg.svd(W0, compute_uv=False)[0]
    r = np.linalg.matrix_rank(W - W0)
    return W0 + u[:, :r] @ np.diag([ref_F(x, tau, alpha, kind) for x in s[:r]]) @ vt[:r]


def n_above(W0, W) -> int:
    return int((np.linalg.svd(np.asarray(W, np.float64) - np.asarray(W0, np.float64), compute_uv=False)
                >= np.linalg.norm(np.asarray(W0, np.float64), 2)).sum())


# -- modules under test ------------------------------------------------------------------------------------------------
def fake_edit(W: torch.Tensor, step: int) -> LowRankUpdate:
    """Rank-one update for edit ``step``, depending on the current weight W (m, n)."""
    g = torch.Generator().manual_seed(1000 + step)
    b = torch.randn(W.shape[1], generator=g)
    b = b / b.norm()
    a = 0.6 * (W.float() @ b) + 1.5 * torch.randn(W.shape[0], generator=g)
    return LowRankUpdate(a[:, None], b[:, None])


@dataclass
class Step:
    """One entry of FakeEditing's edit log (lit_prune.protocols.EditLogEntry)."""

    requests: list
    updates: dict


class FakeEditing(L.LightningModule):
    """Each training_step adds a rank-one LowRankUpdate to ``model.lin`` and logs it in ``edit_log``: a user's own
    module following the lit_prune.protocols.EditStream contract."""

    def __init__(self, seed: int = 0, steps: int = 6, per_epoch: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = nn.Sequential(OrderedDict(lin=nn.Linear(6, 10, bias=False))).requires_grad_(False)
        self.dummy = nn.Parameter(torch.zeros(1))  # trainable, so DDP accepts the module
        self.automatic_optimization = False
        self.steps, self.per_epoch = steps, per_epoch or steps
        self.edit_log: list[Step] = []
        self.edited_parameters = [TAG]
        self.num_edits = 0
        self.seen: list[torch.Tensor] = []  # the weights each edit was computed on
        self.val_seen: list[tuple[int, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        W = self.model.lin.weight
        self.seen.append(W.detach().clone())
        up = fake_edit(W.detach(), self.global_step)
        with torch.no_grad():
            W.add_(up.dense())
        self.edit_log.append(Step([int(batch)], {TAG: up}))
        self.num_edits += 1
        self.manual_backward(self.dummy.sum() * 0)
        self.optimizers().step()

    def validation_step(self, batch, batch_idx):
        self.val_seen.append((self.global_step, self.model.lin.weight.detach().clone()))

    def configure_optimizers(self):
        return torch.optim.SGD([self.dummy], lr=0.0)

    def train_dataloader(self):
        return DataLoader(list(range(self.per_epoch)), batch_size=1)

    def val_dataloader(self):
        return DataLoader([0], batch_size=1)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["num_edits"] = self.num_edits
        checkpoint["edit_log"] = [(r.requests, {k: (u.A, u.B) for k, u in r.updates.items()}) for r in self.edit_log]

    def on_load_checkpoint(self, checkpoint):
        self.num_edits = checkpoint["num_edits"]
        self.edit_log = [Step(q, {k: LowRankUpdate(a, b) for k, (a, b) in u.items()}) for q, u in checkpoint["edit_log"]]


class PlainRegression(L.LightningModule):
    """Continual fine-tuning of a small MLP with SGD; the first layer's W0 is scaled down so updates exceed τ."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
        with torch.no_grad():
            self.net[0].weight.mul_(0.05)
        g = torch.Generator().manual_seed(5)
        self.x = torch.randn(16, 6, generator=g)
        self.y = 3 * torch.randn(16, 3, generator=g)
        self.post_step: list[torch.Tensor] = []  # first-layer weights right after each optimizer step

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.post_step.append(self.net[0].weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.5)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)  # 2 steps per epoch


class Probe(L.Callback):
    """Records the watched weight at batch start and batch end (a user callback that declares nothing)."""

    def __init__(self, get) -> None:
        self.get, self.starts, self.ends = get, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(self.get(pl_module).detach().clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append(self.get(pl_module).detach().clone())


def fake_w(m):
    return m.model.lin.weight


def plain_w(m):
    return m.net[0].weight


def make_trainer(tmp_path, callbacks, **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("limit_val_batches", 0)
    kw.setdefault("max_epochs", 1)
    return L.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, callbacks=callbacks, **kw)


def simulate_fake(W0: torch.Tensor, steps: int, mode: str, every: int, alpha: float = math.e):
    """Independent replay: the weights each edit sees and the weights after each step's callbacks (float64 numpy)."""
    W0n = W0.double().numpy()
    W = W0.clone()  # the weights the editor works on
    starts, ends = [], []
    for t in range(steps):
        starts.append(W.clone())
        W = W + fake_edit(W, t).dense()
        restrained = (t + 1) % every == 0
        view = torch.from_numpy(ref_restrain(W0n, W.double().numpy(), alpha)).float() if restrained else W.clone()
        if mode == "online":
            W = view.clone()
        ends.append(view)
    return starts, ends, W


def close(a, b, tol=2e-5):
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).norm() / b.norm()) < tol


# -- the fake editing module -------------------------------------------------------------------------------------------
def test_deferred_evaluates_restrained_edits_unrestrained(tmp_path):
    module = FakeEditing(steps=7)
    W0 = fake_w(module).detach().clone()
    probe = Probe(fake_w)
    prune = PruneCallback(mode="deferred", every_n_steps=2)
    trainer = make_trainer(tmp_path, [prune, probe], limit_val_batches=1, val_check_interval=3, num_sanity_val_steps=1)
    trainer.fit(module)
    assert isinstance(module, EditStream) and list(trainer.callbacks[:2]) == [prune, probe]  # order kept

    starts, views, unrestrained = simulate_fake(W0, 7, "deferred", 1)
    # every edit was computed on the unrestrained weights ...
    for t in range(7):
        assert close(module.seen[t], starts[t]), t
        assert close(probe.starts[t], starts[t]), t
    # ... later callbacks see the restrained view at the scheduled steps (2, 4, 6), the unrestrained ones otherwise
    for t in range(7):
        expected = views[t] if (t + 1) % 2 == 0 else starts[t + 1] if t < 6 else unrestrained
        assert close(probe.ends[t], expected), t
    assert not close(views[5], starts[6], tol=1e-2)  # the restraint really changed something
    # validation: sanity check on W0, then steps 3 (schedule did not fire: view written before validation) and 6
    assert [s for s, _ in module.val_seen] == [0, 3, 6]
    assert torch.equal(module.val_seen[0][1], W0)
    assert close(module.val_seen[1][1], views[2]) and close(module.val_seen[2][1], views[5])
    # after fit the model holds the restrained view of all 7 edits (step 7 was not scheduled: written at train end)
    assert close(fake_w(module), views[6])
    # spectrum metrics of the last application, against numpy
    m = trainer.callback_metrics
    d = unrestrained.double().numpy() - W0.double().numpy()
    assert float(m[f"spectrum/{TAG}/delta_sigma_max"]) == pytest.approx(np.linalg.norm(d, 2), rel=1e-5)
    assert int(m[f"spectrum/{TAG}/n_restrained"]) == n_above(W0, unrestrained) > 0
    cond = np.linalg.cond(views[6].double().numpy())
    assert float(m[f"spectrum/{TAG}/condition_number"]) == pytest.approx(cond, rel=1e-4)


def test_online_writes_back(tmp_path):
    module = FakeEditing(steps=6)
    W0 = fake_w(module).detach().clone()
    probe = Probe(fake_w)
    trainer = make_trainer(tmp_path, [PruneCallback(mode="online", every_n_steps=2, alpha=2.0), probe])
    trainer.fit(module)
    starts, ends, final = simulate_fake(W0, 6, "online", 2, alpha=2.0)
    for t in range(6):
        assert close(module.seen[t], starts[t]), t  # later edits build on the restrained weights
        assert close(probe.ends[t], ends[t]), t
    assert close(fake_w(module), final)
    assert n_above(W0, starts[3] + fake_edit(starts[3], 3).dense()) > 0


# -- a plain module trained with gradients -----------------------------------------------------------------------------
def test_plain_module_deferred_matches_unrestrained_training(tmp_path):
    free = PlainRegression()
    make_trainer(tmp_path / "free", [], max_epochs=3).fit(free)

    module = PlainRegression()
    W0 = plain_w(module).detach().clone()
    probe = Probe(plain_w)
    trainer = make_trainer(tmp_path / "pruned", [PruneCallback(params=r"net\.0\.weight", mode="deferred"), probe],
                           max_epochs=3)
    trainer.fit(module)
    # training never saw the restrained weights: the optimizer trajectory is bit-identical to training without PRUNE
    assert len(module.post_step) == len(free.post_step) == 6
    for a, b in zip(module.post_step, free.post_step):
        assert torch.equal(a, b)
    # what other callbacks (and the final model) see is W0 + restrained(W − W0)
    for t, W in enumerate(free.post_step):
        assert close(probe.ends[t], ref_restrain(W0.numpy(), W.numpy())), t
    assert close(plain_w(module), ref_restrain(W0.numpy(), free.post_step[-1].numpy()))
    assert n_above(W0, free.post_step[-1]) > 0
    assert int(trainer.callback_metrics["spectrum/net.0.weight/n_restrained"]) == n_above(W0, free.post_step[-1])


def test_plain_module_online_writes_back(tmp_path):
    module = PlainRegression()
    W0 = plain_w(module).detach().clone()
    probe = Probe(plain_w)
    cb = PruneCallback(params=["net.0.weight"], kind="linear")
    make_trainer(tmp_path, [cb, probe], max_epochs=3).fit(module)
    for t, W in enumerate(module.post_step):
        assert close(probe.ends[t], ref_restrain(W0.numpy(), W.numpy(), kind="linear")), t
        if t + 1 < len(module.post_step):
            assert torch.equal(probe.starts[t + 1], probe.ends[t])  # the next step starts from the restrained weights
    assert any(n_above(W0, W) > 0 for W in module.post_step)
    assert list(cb.state_dict()["matrices"]) == ["net.0.weight"]  # W0 of the listed matrix only


# -- the project's own editing module ----------------------------------------------------------------------------------
def edits_file(tmp_path, n: int):
    """``n`` toy edit records (editing_helpers.toy_requests) written as JSON; returns the path."""
    import json

    from editing_helpers import toy_requests

    p = tmp_path / "edits.json"
    p.write_text(json.dumps(toy_requests(n)))
    return p


def test_with_sequential_editing_module(tmp_path, tiny_llama_dir):
    """Deferred PRUNE over SequentialEditingModule: the edit stream is the unrestrained one, the export restrained."""
    from editing_helpers import ToyEditor
    from transformers import AutoModelForCausalLM

    from lit_prune import EditDataModule, SequentialEditingModule

    param = "model.layers.1.mlp.down_proj.weight"
    model_dir, data = tiny_llama_dir, edits_file(tmp_path, 5)

    free = SequentialEditingModule(model=str(model_dir), editor=ToyEditor(param, scale=8.0))
    free.configure_model()
    W0 = free.model.get_parameter(param).detach().clone()
    make_trainer(tmp_path / "free", []).fit(free, datamodule=EditDataModule(path=str(data)))
    W_free = free.model.get_parameter(param).detach()

    module = SequentialEditingModule(model=str(model_dir), editor=ToyEditor(param, scale=8.0),
                                     export_dir=str(tmp_path / "out"))
    cb = PruneCallback(mode="deferred")
    make_trainer(tmp_path / "pruned", [cb]).fit(module, datamodule=EditDataModule(path=str(data)))
    assert list(cb.accumulated) == [param]  # default: the module's edited_parameters
    assert n_above(W0, W_free) > 0
    expected = ref_restrain(W0.numpy(), W_free.numpy())
    assert close(module.model.get_parameter(param), expected)
    for rec_p, rec_f in zip(module.edit_log, free.edit_log):  # same (unrestrained) edit stream
        assert torch.equal(rec_p.updates[param].A, rec_f.updates[param].A)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert close(back.get_parameter(param), expected)  # the exported model is the restrained view


def test_undo_with_deferred_prune_keeps_stream_and_view(tmp_path, tiny_llama_dir):
    """undo under deferred PRUNE: the undone updates leave ΔW, the view is rewritten, later edits continue exactly."""
    from editing_helpers import ToyEditor

    from lit_prune import EditDataModule, SequentialEditingModule

    param = "model.layers.1.mlp.down_proj.weight"
    model_dir, data = tiny_llama_dir, str(edits_file(tmp_path, 5))

    def free_weights(steps):
        m = SequentialEditingModule(model=model_dir, editor=ToyEditor(param, scale=8.0))
        make_trainer(tmp_path / f"free{steps}", [], max_steps=steps).fit(m, datamodule=EditDataModule(path=data))
        return m.model.get_parameter(param).detach().clone()

    W3, W5 = free_weights(3), free_weights(5)
    module = SequentialEditingModule(model=model_dir, editor=ToyEditor(param, scale=8.0))
    module.configure_model()
    W0 = module.model.get_parameter(param).detach().clone()
    cb = PruneCallback(mode="deferred")
    make_trainer(tmp_path / "a", [cb]).fit(module, datamodule=EditDataModule(path=data))
    assert n_above(W0, W3) > 0 and n_above(W0, W5) > 0
    assert close(module.model.get_parameter(param), ref_restrain(W0.numpy(), W5.numpy()))

    removed = module.undo(2)
    assert [r.case_ids for r in removed] == [[4], [3]] and module.num_edits == 3
    assert close(module.model.get_parameter(param), ref_restrain(W0.numpy(), W3.numpy()))  # view of 3 edits
    acc = cb.accumulated[param]
    assert close(acc.delta().double(), (W3 - W0).double(), tol=1e-5)  # ΔW without the undone

    make_trainer(tmp_path / "b", [cb]).fit(module, datamodule=EditDataModule(path=data))  # edits 3, 4 again
    assert module.num_edits == 5
    assert close(module.model.get_parameter(param), ref_restrain(W0.numpy(), W5.numpy()))


def test_undo_with_online_prune(tmp_path, tiny_llama_dir):
    """Online mode: undo is refused (nothing changed) once a restraint changed the weights, allowed before."""
    from editing_helpers import ToyEditor

    from lit_prune import EditDataModule, SequentialEditingModule

    param = "model.layers.1.mlp.down_proj.weight"
    model_dir, data = tiny_llama_dir, str(edits_file(tmp_path, 4))
    module = SequentialEditingModule(model=model_dir, editor=ToyEditor(param, scale=8.0))
    make_trainer(tmp_path / "a", [PruneCallback(mode="online")]).fit(module, datamodule=EditDataModule(path=data))
    before = module.model.get_parameter(param).detach().clone()
    with pytest.raises(ValueError, match=r"PruneCallback \(online\) restrained the weights after edit \d"):
        module.undo(1)
    assert torch.equal(module.model.get_parameter(param), before) and module.num_edits == 4

    # small edits: nothing reaches τ, the restraint never changes the weights, undo stays exact
    small = SequentialEditingModule(model=model_dir, editor=ToyEditor(param, scale=0.01))
    make_trainer(tmp_path / "s1", [], max_steps=2).fit(
        ref := SequentialEditingModule(model=model_dir, editor=ToyEditor(param, scale=0.01)),
        datamodule=EditDataModule(path=data))
    cb = PruneCallback(mode="online")
    make_trainer(tmp_path / "s2", [cb]).fit(small, datamodule=EditDataModule(path=data))
    small.undo(2)
    W2 = ref.model.get_parameter(param).detach()
    assert close(small.model.get_parameter(param), W2, tol=1e-6)
    dW2 = sum(u.dense(torch.float64) for rec in ref.edit_log for u in rec.updates.values())  # not W2 − W0: rounding
    assert close(cb.accumulated[param].delta().double(), dW2, tol=1e-5)


# -- resume ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,mode", [("fake", "deferred"), ("fake", "online"), ("plain", "deferred")])
def test_resume_reproduces_uninterrupted_run(tmp_path, kind, mode):
    make = (lambda seed: FakeEditing(seed=seed, per_epoch=2)) if kind == "fake" else PlainRegression
    get = fake_w if kind == "fake" else plain_w

    full = make(0)
    make_trainer(tmp_path / "full", [PruneCallback(params=None if kind == "fake" else ["net.0.weight"], mode=mode)],
                 max_epochs=3).fit(full)

    ckdir = tmp_path / "ck"
    ck = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckdir, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    part = make(0)
    make_trainer(tmp_path / "part", [PruneCallback(params=None if kind == "fake" else ["net.0.weight"], mode=mode), ck],
                 max_epochs=3, max_steps=3, enable_checkpointing=True).fit(part)
    assert (ckdir / "step=2.ckpt").exists()

    # a module with DIFFERENT initial weights: the W0 snapshot taken at setup must be replaced by the checkpoint's
    resumed = make(1)
    assert not torch.equal(get(resumed), get(full))
    cb = PruneCallback(params=None if kind == "fake" else ["net.0.weight"], mode=mode)
    make_trainer(tmp_path / "resumed", [cb], max_epochs=3).fit(resumed, ckpt_path=str(ckdir / "step=2.ckpt"))
    assert torch.equal(get(resumed), get(full))
    name = TAG if kind == "fake" else "net.0.weight"
    assert torch.equal(cb.accumulated[name].W0, get(make(0)))


# -- two processes -----------------------------------------------------------------------------------------------------
TWO_RANKS = r"""
import sys, torch, lightning as L
sys.path.insert(0, {tests!r})
from test_prune_callback import FakeEditing, PlainRegression
from lit_prune.callbacks import PruneCallback
torch.set_num_threads(1)
out = {{}}
for name, module, cb in [
    ("fake", FakeEditing(steps=5), PruneCallback(mode="deferred")),
    ("plain", PlainRegression(), PruneCallback(params=["net.0.weight"], mode="online")),
]:
    t = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[cb])
    t.fit(module)
    w = module.model.lin.weight if name == "fake" else module.net[0].weight
    tag = "lin.weight" if name == "fake" else "net.0.weight"
    out[name] = (w.detach().clone(), float(t.callback_metrics[f"spectrum/{{tag}}/n_restrained"]), t.global_step)
torch.save(out, {out!r} + f"/rank{{t.global_rank}}.pt")
"""


def test_two_processes_stay_identical(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for name in ("fake", "plain"):
        assert torch.equal(a[name][0], b[name][0]), name
        assert a[name][1] == b[name][1] > 0, name
    # the fake editor does the same on one process (edits are not sharded: same steps, same updates)
    steps = a["fake"][2]
    single = FakeEditing(steps=steps)
    W0 = fake_w(single).detach().clone()
    make_trainer(tmp_path / "single", [PruneCallback(mode="deferred")]).fit(single)
    assert close(a["fake"][0], fake_w(single), tol=1e-6)
    assert close(a["fake"][0], simulate_fake(W0, steps, "deferred", 1)[1][-1])


# -- arguments ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": 1.0}, "alpha must be a finite number > 1"),
        ({"alpha": 0.3}, "alpha"),
        ({"kind": "sqrt"}, "kind must be one of"),
        ({"mode": "eager"}, "mode must be one of"),
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1"),
        ({"spectrum_every_n_steps": 1.5}, "spectrum_every_n_steps"),
        ({"params": "layers.(["}, r"params regex 'layers.\(\[' does not compile"),
        ({"params": []}, "non-empty list"),
        ({"params": [3]}, "non-empty list"),
    ],
)
def test_constructor_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneCallback(**kwargs)


@pytest.mark.parametrize(
    "params,match",
    [
        (r"attn\.q_proj", r"PruneCallback params: regex 'attn\\\\.q_proj' matches no 2-D parameter of PlainRegression"),
        (["net.5.weight"], "PruneCallback params: parameter 'net.5.weight' is not in PlainRegression"),
        (["net.0.bias"], "parameter 'net.0.bias' is not a matrix"),
        (None, "reports no `edited_parameters`"),
    ],
)
def test_setup_names_the_bad_param(tmp_path, params, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, [PruneCallback(params=params)]).fit(PlainRegression())


def test_regex_and_histogram(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = FakeEditing(steps=3)
    logger = TensorBoardLogger(tmp_path, name="tb")
    cb = PruneCallback(params=r"lin\.weight$", log_histogram=True, spectrum_every_n_steps=2)
    make_trainer(tmp_path, [cb], logger=logger).fit(module)
    assert list(cb.accumulated) == ["model.lin.weight"]
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert "spectrum/model.lin.weight/delta_singular_values" in acc.Tags()["histograms"]
    scalars = acc.Tags()["scalars"]
    assert "spectrum/model.lin.weight/n_restrained" in scalars
    # condition number only at steps that are multiples of 2; x-axis = number of edits
    assert [e.step for e in acc.Scalars("spectrum/model.lin.weight/condition_number")] == [2]
    assert [e.step for e in acc.Scalars("spectrum/model.lin.weight/delta_sigma_max")] == [1, 2, 3]


def test_weight_reader_before_prune_fails_at_setup(tmp_path):
    """Order matters and is checked, never silently changed: evaluations must see the restrained weights."""
    from lit_prune.callbacks import EditMetricsCallback

    module = FakeEditing(steps=2)
    W = fake_w(module).detach().clone()
    with pytest.raises(ValueError, match="PruneCallback must come before EditMetricsCallback in trainer.callbacks"):
        make_trainer(tmp_path, [EditMetricsCallback(), PruneCallback()]).fit(module)
    assert torch.equal(fake_w(module), W) and module.num_edits == 0  # failed before the first edit
