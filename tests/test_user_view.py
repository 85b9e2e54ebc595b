"""What a user sees: progress lines in a log file, phase messages, and the TensorBoard extras of a default run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml
from conftest import make_llama, make_tokenizer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import TensorBoardLogger

from lit_prune.callbacks import EditProgressBar, HParamsCallback

ROOT = Path(__file__).resolve().parents[1]
N_EDITS = 4
FAST_ROME = {"layers": 1, "context_templates": ["{}", "Hello there. {}"], "v_lr": 0.05, "v_num_grad_steps": 6,
             "v_weight_decay": 0.01, "clamp_norm_factor": 4.0, "mom2_n_samples": 20, "progress": False}
EDITED = "model.layers.1.mlp.down_proj.weight"


def tiny_default_config(tmp: Path, checkpoint_every: int | None = None) -> list[str]:
    """Command-line arguments: ``configs/default.yaml`` on a tiny Llama (4 demo edits, evaluations every 2 edits,
    the progress display with a line after every edit), runs under ``tmp/runs``."""
    tok = make_tokenizer()
    make_llama(tok).save_pretrained(tmp / "tiny")
    tok.save_pretrained(tmp / "tiny")
    cfg = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    for cb in cfg["trainer"]["callbacks"]:
        args = cb.setdefault("init_args", {})
        name = cb["class_path"].rsplit(".", 1)[-1]
        if name == "EditMetricsCallback":
            args["retention_every_n_edits"] = 2
        elif name == "DownstreamEvalCallback":
            args.update(every_n_edits=2, perplexity_n_texts=4, max_length=64)
        elif name in ("SpectrumHistogramCallback", "TextSamplesCallback"):
            args["every_n_edits"] = 2
        elif name == "ModelCheckpoint" and checkpoint_every:
            cb["init_args"] = {"every_n_train_steps": checkpoint_every, "save_top_k": -1}
    # the progress display train.py installs by default, here with a line after every edit
    cfg["trainer"]["callbacks"].append({"class_path": "lit_prune.callbacks.EditProgressBar",
                                        "init_args": {"every_n_seconds": 0}})
    cfg["model"]["editor"]["init_args"] = {**FAST_ROME, "stats_dir": str(tmp / "stats")}
    (tmp / "default.yaml").write_text(yaml.safe_dump(cfg))
    return ["--config", str(tmp / "default.yaml"), "--model.model", str(tmp / "tiny"), "--data.n_edits", str(N_EDITS),
            "--model.export_dir", "null", "--trainer.accelerator", "cpu",
            "--trainer.logger.init_args.save_dir", str(tmp / "runs")]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """``python train.py`` with the tiny default config in a subprocess whose stdout and stderr go to files, as in a
    CI log. Returns (run dir, stdout, stderr)."""
    tmp = tmp_path_factory.mktemp("default_run")
    cmd = [sys.executable, "train.py", *tiny_default_config(tmp)]
    out, err = tmp / "stdout.txt", tmp / "stderr.txt"
    with out.open("w") as fo, err.open("w") as fe:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=fo, stderr=fe, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    assert rc == 0, err.read_text()[-3000:]
    return tmp / "runs" / "default" / "version_0", out.read_text(), err.read_text()


def test_progress_lines_when_stdout_is_a_file(default_run):
    _, out, err = default_run
    line = re.compile(rf"^edits (\d+)/{N_EDITS} \((\d+)%\) \| \d+:\d\d elapsed, [\d.]+ (s/edit|edits/s), "
                      r"ETA \d+:\d\d \| .*\beff [\d.]+", re.M)
    found = [(int(m.group(1)), int(m.group(2))) for m in line.finditer(out)]
    assert found == [(1, 25), (2, 50), (3, 75), (4, 100)], out
    assert "v_num" not in out and "\r" not in out
    # one line per slow phase, on stderr (Lightning's logger), in the order they happen
    phases = ["computing second-moment statistics: 1 module(s), 20 texts", "scoring the unedited model on the run's 4",
              "downstream evaluation at 0 edits", "retention: re-scoring 2 applied edits at 2 edits",
              "retention: re-scoring 4 applied edits at 4 edits", "downstream evaluation at 4 edits"]
    where = [err.find(p) for p in phases]
    assert all(i >= 0 for i in where) and where == sorted(where), err


def test_tensorboard_histograms_text_and_hparams(default_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2, metadata
    from tensorboard.util import tensor_util

    run, _, _ = default_run
    acc = EventAccumulator(str(run), size_guidance={"histograms": 0, "tensors": 0, "scalars": 0}).Reload()
    tags = acc.Tags()
    assert "hp_metric" not in tags["scalars"]

    # spectra of W (32 singular values, from 0 edits) and of ΔW (its rank grows by one per ROME edit)
    W = acc.Histograms(f"spectrum/{EDITED}/W_singular_values")
    dW = acc.Histograms(f"spectrum/{EDITED}/dW_singular_values")
    assert [e.step for e in W] == [0, 2, 4] and all(e.histogram_value.num == 32 for e in W)
    assert [(e.step, e.histogram_value.num) for e in dW] == [(2, 2), (4, 4)]
    assert W[-1].histogram_value.max > W[0].histogram_value.max  # the edits grew σ_max (PRUNE bounds, not zeroes)

    # text panels: the first 3 demo prompts with their targets, applied or not yet, and the general prompts
    def text(tag):
        return {e.step: tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in acc.Tensors(tag)}

    edited, general = text("samples/edited/text_summary"), text("samples/general/text_summary")
    assert sorted(edited) == sorted(general) == [0, 2, 4]
    assert "The Eiffel Tower is located in the city of" in edited[0] and "Rome (Paris)" in edited[0]
    assert edited[0].count("| not yet |") == 3 and edited[2].count("| yes |") == 2 and edited[4].count("| yes |") == 3
    assert "The capital of France is" in general[4] and general[4].startswith("after **4** edits")

    # hparams: one session with the run's settings, ended successfully
    content = acc.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    hp = {k: v.string_value or v.number_value for k, v in start.hparams.items()}
    assert hp["model"].endswith("tiny") and hp["editor"] == "ROME" and hp["editor/layers"] == "1"
    assert hp["editor/matrices"] == "mlp.down_proj.weight" and hp["prune/mode"] == "online"
    assert abs(hp["prune/alpha"] - 2.71828) < 1e-4 and hp["data/batch_size"] == 1 and hp["data/n_edits"] == N_EDITS
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    assert end.status == api_pb2.STATUS_SUCCESS

    # what the HPARAMS tab shows: TensorBoard's own hparams backend over the log directory
    hparams, metrics = hparams_tab(run.parent.parent)
    assert {"model", "editor", "editor/layers", "prune/mode", "prune/alpha", "data/batch_size"} <= set(hparams)
    [(session, values)] = metrics.items()
    final = json.loads((run / "final_metrics.json").read_text())
    for k in ("retention/efficacy", "retention/generalization", "retention/locality", "downstream/perplexity"):
        assert values[k] == pytest.approx(final[k], rel=1e-5), k


def hparams_tab(logdir: Path) -> tuple[list[str], dict[str, dict[str, float]]]:
    """(hparam names, session -> metric tag -> value) as TensorBoard's HPARAMS tab computes them for ``logdir``."""
    from tensorboard import context as tb_context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    ctx = base_plugin.TBContext(logdir=str(logdir), multiplexer=mux,
                                data_provider=data_provider.MultiplexerDataProvider(mux, str(logdir)))
    backend, rc = backend_context.Context(ctx), tb_context.RequestContext()
    content = backend.hparams_metadata(rc, "")
    exp = backend.experiment_from_metadata(rc, "", True, content, backend.hparams_from_data_provider(rc, "", None))
    request = api_pb2.ListSessionGroupsRequest(experiment_name="", start_index=0, slice_size=100,
                                               allowed_statuses=[api_pb2.STATUS_SUCCESS])
    groups = list_session_groups.Handler(rc, backend, "", request).run().session_groups
    return ([h.name for h in exp.hparam_infos],
            {g.name: {m.name.tag: m.value for m in g.metric_values} for g in groups})


def _boring_fit(tmp_path, bar: EditProgressBar, steps: int = 4) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, limit_train_batches=steps, limit_val_batches=0,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[bar],
                        logger=TensorBoardLogger(tmp_path, default_hp_metric=False))
    trainer.fit(BoringModel())
    return trainer


def test_progress_bar_modes_without_v_num(tmp_path, capsys):
    trainer = _boring_fit(tmp_path, EditProgressBar(lines=True, every_n_seconds=0))
    out = capsys.readouterr().out
    steps = re.findall(r"^steps (\d)/4 \(\d+%\) \| .*elapsed", out, re.M)
    assert steps == ["1", "2", "3", "4"], out
    assert "v_num" not in trainer.progress_bar_callback.get_metrics(trainer, trainer.lightning_module)
    _boring_fit(tmp_path, EditProgressBar(lines=False))  # a tqdm bar (here on a captured stream), no lines
    assert not re.search(r"^steps \d", capsys.readouterr().out, re.M)
    with pytest.raises(ValueError, match="every_n_seconds"):
        EditProgressBar(every_n_seconds=-1)


def test_hparams_callback_warns_about_hp_metric(tmp_path):
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[HParamsCallback()],
                        logger=TensorBoardLogger(tmp_path))  # default_hp_metric=True
    with pytest.warns(UserWarning, match="default_hp_metric=False"):
        trainer.fit(BoringModel())


def test_resumed_run_measures_delta_w_from_the_original_weights(tmp_path, default_run):
    """W₀ travels in the checkpoint: resumed after 2 edits, the 4-edit ΔW spectrum equals the uninterrupted run's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sys.path.insert(0, str(ROOT))
    from train import main

    args = tiny_default_config(tmp_path, checkpoint_every=2)
    main(args)
    ckpt = tmp_path / "runs" / "default" / "version_0" / "checkpoints" / "epoch=0-step=2.ckpt"
    main([*args, "--ckpt_path", str(ckpt)])

    def dW(run):
        acc = EventAccumulator(str(run), size_guidance={"histograms": 0}).Reload()
        return {e.step: e.histogram_value for e in acc.Histograms(f"spectrum/{EDITED}/dW_singular_values")}

    resumed, whole = dW(tmp_path / "runs" / "default" / "version_1"), dW(default_run[0])
    assert list(resumed) == [4] and resumed[4].num == whole[4].num == N_EDITS
    assert resumed[4].max == pytest.approx(whole[4].max, rel=1e-4)
