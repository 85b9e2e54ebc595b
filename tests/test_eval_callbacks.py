"""EditMetricsCallback and DownstreamEvalCallback in a real (tiny) editing run: TensorBoard tags, values against
independent recomputation, the final table, two ranks, missing data."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from editing_helpers import ToyEditor, toy_requests
from lightning.pytorch.loggers import TensorBoardLogger

from lit_prune import EditDataModule, SequentialEditingModule
from lit_prune.callbacks import DownstreamEvalCallback, EditMetricsCallback
from lit_prune.editors.base import apply_updates
from lit_prune.metrics.downstream import text_nll
from lit_prune.metrics.editing import EditScores, neighborhood_predictions, request_case_values, score_requests
from lit_prune.metrics.tasks import DownstreamDataError
from lit_prune.models import load_model, load_texts
from lit_prune.requests import EditRequest

PARAM = "model.layers.1.mlp.down_proj.weight"
N_PPL = 4


def records() -> list[dict]:
    """Six edits: four CounterFact-style, two ZsRE-style (no target_true, locality by agreement)."""
    recs = toy_requests(6)
    for r in recs[4:]:
        r["target_true"] = None
        r["neighborhood_prompts"] = ["The capital of Japan is", "Apple was founded by"]
        r["neighborhood_answers"] = ["Tokyo", "Steve Jobs"]
    return recs


@pytest.fixture
def model_dir(tiny_llama_dir):
    return tiny_llama_dir


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "edits.json"
    p.write_text(json.dumps(records()))
    return str(p)


def callbacks(data_dir: Path | None):
    tasks = ["perplexity"] + (["nli", "qa"] if data_dir else [])
    return [
        EditMetricsCallback(retention_every_n_edits=4, batch_size=5),
        DownstreamEvalCallback(tasks=tasks, data_dir=str(data_dir / "downstream") if data_dir else None,
                               n_examples={"nli": 3, "qa": 3}, every_n_edits=4, batch_size=2,
                               perplexity_n_texts=N_PPL, max_length=64),
    ]


def fit(tmp_path, model_dir, data_file, data_dir, **trainer_kw):
    module = SequentialEditingModule(model=model_dir, editor=ToyEditor(PARAM))
    logger = TensorBoardLogger(tmp_path / "tb", name="run")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=logger, callbacks=callbacks(data_dir),
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, **trainer_kw)
    trainer.fit(module, datamodule=EditDataModule(path=data_file, batch_size=2))
    return module, trainer


def read_scalars(log_dir: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir)
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_run_logs_every_curve_and_the_numbers_are_right(tmp_path, model_dir, data_file, data_dir):
    module, trainer = fit(tmp_path, model_dir, data_file, data_dir)
    s = read_scalars(trainer.log_dir)
    for k in ("efficacy", "generalization", "locality"):
        assert set(s[f"immediate/{k}"]) == {2, 4, 6}
        assert set(s[f"retention/{k}"]) == {4, 6}
        assert set(s[f"baseline/{k}"]) == {0}
        for tag in (f"immediate/{k}", f"retention/{k}", f"baseline/{k}"):
            assert all(0.0 <= v <= 1.0 for v in s[tag].values()), tag
        for tag in (f"immediate/{k}_magnitude", f"retention/{k}_magnitude"):
            assert all(-1.0 <= v <= 1.0 for v in s[tag].values()), tag
    for t in ("perplexity", "nli", "qa"):
        assert set(s[f"downstream/{t}"]) == {0, 4, 6}
    assert all(0.0 <= v <= 1.0 for t in ("nli", "qa") for v in s[f"downstream/{t}"].values())
    assert trainer.progress_bar_metrics["eff"] == pytest.approx(s["immediate/efficacy"][6])

    # independent replay of the run: fresh model, same edits, scored with the (separately tested) scorer
    model, tok = load_model(model_dir)
    reqs = [EditRequest.coerce(r) for r in records()]
    pre = neighborhood_predictions(model, tok, reqs)
    base = score_requests(model, tok, reqs, pre_predictions=pre)
    nll, count = text_nll(model, tok, load_texts()[-N_PPL:], max_length=64)
    assert s["downstream/perplexity"][0] == pytest.approx(math.exp(nll / count), rel=1e-4)
    for k, v in base.items():
        assert s[f"baseline/{k}"][0] == pytest.approx(v, abs=1e-6), k
    immediate, editor = EditScores(), ToyEditor(PARAM)
    for step in range(3):
        batch = reqs[2 * step : 2 * step + 2]
        apply_updates(model, editor.compute(model, tok, batch))
        immediate.update(request_case_values(model, tok, batch, pre_predictions=pre))
        for k, v in immediate.compute().items():
            assert s[f"immediate/{k}"][2 * step + 2] == pytest.approx(float(v), abs=1e-6), (step, k)
    final = score_requests(model, tok, reqs, pre_predictions=pre)
    for k, v in final.items():
        assert s[f"retention/{k}"][6] == pytest.approx(v, abs=1e-6), k
    torch.testing.assert_close(module.model.get_parameter(PARAM), model.get_parameter(PARAM))

    table = json.loads((Path(trainer.log_dir) / "final_metrics.json").read_text())
    assert table["num_edits"] == 6
    assert table["retention/efficacy"] == pytest.approx(s["retention/efficacy"][6])
    assert table["downstream/perplexity"] == pytest.approx(s["downstream/perplexity"][6])
    assert "baseline/locality" in table and "immediate/generalization" in table


TWO_RANKS = r"""
import sys, lightning as L
sys.path.insert(0, {tests!r})
from lightning.pytorch.loggers import TensorBoardLogger
from test_eval_callbacks import callbacks
from editing_helpers import ToyEditor
from lit_prune import EditDataModule, SequentialEditingModule, LockstepStrategy
m = SequentialEditingModule(model={model!r}, editor=ToyEditor({param!r}))
t = L.Trainer(accelerator="cpu", devices=2, strategy=LockstepStrategy(process_group_backend="gloo"), max_epochs=1,
              logger=TensorBoardLogger({out!r}, name="run"), callbacks=callbacks(None), enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir={out!r})
t.fit(m, datamodule=EditDataModule(path={data!r}, batch_size=2))
"""


def test_two_ranks_log_the_single_process_values(tmp_path, model_dir, data_file):
    """Sharded scoring (3 of 6 requests per rank, 1 of a 2-request batch) reduces to the single-process values."""
    out = tmp_path / "two"
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(tests=str(Path(__file__).parent), model=model_dir, param=PARAM,
                                       data=data_file, out=str(out)))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(next(out.rglob("final_metrics.json")).read_text())
    _, trainer = fit(tmp_path / "one", model_dir, data_file, None)
    one = json.loads((Path(trainer.log_dir) / "final_metrics.json").read_text())
    assert set(two) == set(one) and len(one) > 10
    for k, v in one.items():
        assert two[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_without_known_requests_pre_predictions_come_per_batch(tmp_path, model_dir):
    """A plain dataloader (no '.requests'): no baseline, ZsRE locality against the model before each batch."""
    from torch.utils.data import DataLoader

    reqs = [EditRequest.coerce(r) for r in records()[3:]]
    batches = [reqs[:2], reqs[2:]]
    module = SequentialEditingModule(model=model_dir, editor=ToyEditor(PARAM))
    cb = EditMetricsCallback(retention_every_n_edits=None)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, callbacks=[cb],
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="EditMetricsCallback: the run's requests are not known in advance"):
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    assert not any(k.startswith("baseline/") for k in cb.final_metrics)
    assert {"immediate/locality", "retention/locality"} <= set(cb.final_metrics)
    model, tok = load_model(model_dir)  # the ZsRE requests are in the second batch: predictions after edit 2
    apply_updates(model, ToyEditor(PARAM).compute(model, tok, batches[0]))
    assert cb.pre_predictions == neighborhood_predictions(model, tok, reqs[1:])
    assert (tmp_path / "final_metrics.json").is_file()  # no logger: next to default_root_dir


def test_missing_downstream_data_fails_at_setup(tmp_path, model_dir, data_file, monkeypatch):
    monkeypatch.delenv("LIT_PRUNE_DOWNSTREAM", raising=False)
    for cb, msg in (
        (DownstreamEvalCallback(tasks=["qa"], data_dir=str(tmp_path)),
         r"setting data_dir\).*task 'qa': data file not found: '.*test-OpenDomainQA.jsonl'"),
        (DownstreamEvalCallback(tasks=["nli"]), r"no data for task 'nli': set data_dir, .*LIT_PRUNE_DOWNSTREAM"),
        (DownstreamEvalCallback(tasks=["nli"], sources={"nli": str(tmp_path / "rte.tsv")}),
         r"setting sources.nli\).*rte.tsv"),
    ):
        module = SequentialEditingModule(model=model_dir, editor=ToyEditor(PARAM))
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, callbacks=[cb],
                            enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                            default_root_dir=tmp_path)
        with pytest.raises(DownstreamDataError, match=msg):
            trainer.fit(module, datamodule=EditDataModule(path=data_file))


def test_constructor_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown task.*'gsm8k'"):
        DownstreamEvalCallback(tasks=["gsm8k"])
    with pytest.raises(ValueError, match="n_examples has unknown task"):
        DownstreamEvalCallback(n_examples={"perplexity": 3})
    with pytest.raises(ValueError, match="retention_every_n_edits must be a positive int"):
        EditMetricsCallback(retention_every_n_edits=0)


def test_resume_continues_the_curves(tmp_path, model_dir, data_file):
    """A run stopped after 2 steps and resumed from its checkpoint ends with the uninterrupted run's values: the
    pre-edit predictions, the immediate running means and the schedules survive in the callbacks' state."""

    def run(root, max_steps=-1, ckpt_path=None):
        cbs = [EditMetricsCallback(retention_every_n_edits=4),
               DownstreamEvalCallback(every_n_edits=4, perplexity_n_texts=2, max_length=32)]
        ck = L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ck", every_n_train_steps=1, save_top_k=-1,
                                                 filename="{step}")
        module = SequentialEditingModule(model=model_dir, editor=ToyEditor(PARAM))
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, max_steps=max_steps, logger=False,
                            callbacks=cbs + [ck], enable_model_summary=False, enable_progress_bar=False,
                            default_root_dir=root)
        trainer.fit(module, datamodule=EditDataModule(path=data_file, batch_size=2), ckpt_path=ckpt_path)
        return {**cbs[0].final_metrics, **cbs[1].final_metrics}

    full = run(tmp_path / "full")
    run(tmp_path / "part", max_steps=2)
    resumed = run(tmp_path / "resumed", ckpt_path=str(tmp_path / "part" / "ck" / "step=2.ckpt"))
    assert not any(k.startswith("baseline/") for k in resumed)  # taken once, before the first edit
    for k, v in resumed.items():
        assert v == pytest.approx(full[k], abs=1e-6), k
    assert {"immediate/efficacy", "retention/locality", "downstream/perplexity"} <= set(resumed)
