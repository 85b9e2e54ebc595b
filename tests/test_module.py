"""SequentialEditingModule + EditDataModule: step counting, edit log, undo, checkpoint/resume, export, two ranks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from editing_helpers import ToyEditor, toy_requests

from lit_prune import EditDataModule, SequentialEditingModule

PARAM = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture
def model_dir(tiny_llama_dir):
    return tiny_llama_dir


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "edits.json"
    p.write_text(json.dumps(toy_requests(6)))
    return str(p)


def trainer(tmp_path, **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=1, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, **kw)


def weights(module):
    module.configure_model()  # loads the model once, as fit does (later calls do nothing)
    return module.model.get_parameter(PARAM).detach().clone()


def test_steps_count_edits_and_log(tmp_path, model_dir, data_file):
    module = SequentialEditingModule(model=model_dir, editor=ToyEditor(PARAM))
    w0 = weights(module)
    dm = EditDataModule(path=data_file, batch_size=4)
    trainer(tmp_path).fit(module, datamodule=dm)
    assert module.trainer.global_step == 2  # 6 edits in batches of 4 -> 2 steps
    assert module.num_edits == 6
    assert [len(r.requests) for r in module.edit_log] == [4, 2]
    assert [r.case_id for r in module.applied_requests] == list(range(6))
    total = sum(u.dense() for rec in module.edit_log for u in rec.updates.values())
    torch.testing.assert_close(weights(module), w0 + total, rtol=0, atol=1e-5)
    assert module.edited_parameters == [PARAM]


def test_max_steps_stops_the_stream(tmp_path, model_dir, data_file):
    module = SequentialEditingModule(model=model_dir, editor=ToyEditor(PARAM))
    trainer(tmp_path, max_steps=3).fit(module, datamodule=EditDataModule(path=data_file))
    assert module.num_edits == 3 and module.trainer.global_step == 3


def test_undo_restores_weights(tmp_path, model_dir, data_file):
    module = SequentialEditingModule(model=model_dir, editor=ToyEditor(PARAM))
    trainer(tmp_path, max_steps=2).fit(module, datamodule=EditDataModule(path=data_file))
    w2 = weights(module)
    # a second fit continues the stream where the first stopped
    trainer(tmp_path / "b").fit(module, datamodule=EditDataModule(path=data_file))
    assert module.num_edits == 6
    assert [r.case_id for r in module.applied_requests] == list(range(6))
    removed = module.undo(4)
    assert [r.case_ids for r in removed] == [[5], [4], [3], [2]]
    assert module.num_edits == 2
    assert (weights(module) - w2).abs().max() < 1e-6
    with pytest.raises(ValueError, match="undo: k must be between 0 and 2"):
        module.undo(3)


def test_resume_reaches_same_weights(tmp_path, model_dir, data_file):
    full = SequentialEditingModule(model=model_dir, editor=ToyEditor(PARAM))
    trainer(tmp_path / "full").fit(full, datamodule=EditDataModule(path=data_file))

    ckdir = tmp_path / "ck"
    ck = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckdir, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    part = SequentialEditingModule(model=model_dir, editor=ToyEditor(PARAM))
    trainer(tmp_path / "part", max_steps=2, callbacks=[ck], enable_checkpointing=True).fit(
        part, datamodule=EditDataModule(path=data_file))
    ckpt = ckdir / "step=2.ckpt"
    state = torch.load(ckpt, weights_only=False)
    # only the edited parameter is stored, not the frozen model
    assert list(state["state_dict"]) == ["model." + PARAM]

    resumed = SequentialEditingModule(model=model_dir, editor=ToyEditor(PARAM))
    trainer(tmp_path / "resumed").fit(resumed, datamodule=EditDataModule(path=data_file), ckpt_path=str(ckpt))
    assert resumed.num_edits == 6
    assert [r.case_id for r in resumed.applied_requests] == list(range(6))
    torch.testing.assert_close(weights(resumed), weights(full), rtol=0, atol=0)


def test_export_reloads(tmp_path, model_dir, data_file):
    from transformers import AutoModelForCausalLM

    module = SequentialEditingModule(model=model_dir, editor=ToyEditor(PARAM), export_dir=str(tmp_path / "out"))
    trainer(tmp_path, max_steps=2).fit(module, datamodule=EditDataModule(path=data_file))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(back.get_parameter(PARAM), weights(module))


def test_wrong_model_checkpoint_rejected(tmp_path, model_dir, data_file):
    ckdir = tmp_path / "ck"
    ck = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckdir, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    m = SequentialEditingModule(model=model_dir, editor=ToyEditor(PARAM))
    trainer(tmp_path, max_steps=1, callbacks=[ck], enable_checkpointing=True).fit(m, datamodule=EditDataModule(path=data_file))
    other = SequentialEditingModule(model=model_dir + "/", editor=ToyEditor(PARAM))  # another model name
    with pytest.raises(ValueError, match=f"written for model .* this run uses '{re.escape(model_dir)}/'"):
        trainer(tmp_path / "x").fit(other, datamodule=EditDataModule(path=data_file), ckpt_path=str(ckdir / "step=1.ckpt"))


TWO_RANKS = r"""
import sys, torch, lightning as L
sys.path.insert(0, {tests!r})
from editing_helpers import ToyEditor
from lit_prune import EditDataModule, SequentialEditingModule, LockstepStrategy
PARAM = {param!r}
m = SequentialEditingModule(model={model!r}, editor=ToyEditor(PARAM))
t = L.Trainer(accelerator="cpu", devices=2, strategy=LockstepStrategy(process_group_backend="gloo"), max_epochs=1,
              logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
t.fit(m, datamodule=EditDataModule(path={data!r}))
torch.save({{"w": m.model.get_parameter(PARAM).detach(), "edits": m.num_edits,
            "ids": [r.case_id for r in m.applied_requests]}}, {out!r} + f"/rank{{t.global_rank}}.pt")
"""


def test_two_processes_stay_identical(tmp_path, model_dir, data_file):
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(tests=str(Path(__file__).parent), param=PARAM, model=model_dir,
                                       data=data_file, out=str(tmp_path)))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert a["edits"] == b["edits"] == 6 and a["ids"] == b["ids"] == list(range(6))
    assert torch.equal(a["w"], b["w"])
    single = SequentialEditingModule(model=model_dir, editor=ToyEditor(PARAM))
    trainer(tmp_path / "single").fit(single, datamodule=EditDataModule(path=data_file))
    torch.testing.assert_close(a["w"], weights(single), rtol=0, atol=1e-6)


def test_model_is_a_submodule_before_the_strategy_moves_it(tmp_path, model_dir, data_file, monkeypatch):
    """No PruneCallback: the model is loaded in configure_model, so the strategy moves (and a multi-process strategy
    syncs) the HF model itself, whatever callbacks are configured."""
    from lightning.pytorch.strategies import SingleDeviceStrategy
    from transformers import PreTrainedModel

    seen = []
    move = SingleDeviceStrategy.model_to_device

    def spy(strategy):
        children = dict(strategy.lightning_module.named_children())
        seen.append(isinstance(children.get("model"), PreTrainedModel))
        return move(strategy)

    monkeypatch.setattr(SingleDeviceStrategy, "model_to_device", spy)
    module = SequentialEditingModule(model=model_dir, editor=ToyEditor(PARAM))
    with pytest.raises(AttributeError, match="loaded in configure_model"):
        module.model
    trainer(tmp_path, max_steps=1).fit(module, datamodule=EditDataModule(path=data_file))
    assert seen == [True]
    assert module.num_edits == 1
