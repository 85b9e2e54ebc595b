"""train.py (LightningCLI, run=False): configs parse, a run logs to TensorBoard, bad data fails cleanly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_llama
from editing_helpers import toy_requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train import main  # noqa: E402

# configs/mend_train_*.yaml belong to the MEND training CLI (python -m lit_prune.mend_training; see tests/test_mend.py)
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("mend_train"))


def test_configs_exist():
    names = {c.name for c in CONFIGS}
    assert "default.yaml" in names and len(names) >= 6


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--config", str(config), "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["editor"]["class_path"].startswith("lit_prune.editors.")
    assert printed["trainer"]["logger"]["class_path"].endswith("TensorBoardLogger")


def _config(tmp_path, tiny_tokenizer, data_path):
    mdir = tmp_path / "tiny"
    make_llama(tiny_tokenizer).save_pretrained(mdir)
    tiny_tokenizer.save_pretrained(mdir)
    cfg = {
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path / "runs"), "name": "toy"}},
        },
        "model": {"model": str(mdir), "editor": {"class_path": "editing_helpers.ToyEditor"}, "export_dir": "auto"},
        "data": {"path": str(data_path), "batch_size": 2},
    }
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_run_logs_tensorboard_and_exports(tmp_path, tiny_tokenizer):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "edits.json"
    data.write_text(json.dumps(toy_requests(4)))
    main(["--config", str(_config(tmp_path, tiny_tokenizer, data))])
    run = tmp_path / "runs" / "toy" / "version_0"
    acc = EventAccumulator(str(run)).Reload()
    steps = [e.step for e in acc.Scalars("edit/seconds_per_edit")]
    assert steps == [2, 4]  # x-axis = number of edits (batches of 2)
    assert (run / "config.yaml").is_file() and (run / "edited_model" / "config.json").is_file()
    # a second run gets its own directory; nothing is written over the first
    main(["--config", str(_config(tmp_path, tiny_tokenizer, data))])
    assert (tmp_path / "runs" / "toy" / "version_1").is_dir()


def test_malformed_data_exits_with_message(tmp_path, tiny_tokenizer, capsys):
    data = tmp_path / "bad.json"
    recs = toy_requests(3)
    del recs[2]["subject"]
    data.write_text(json.dumps(recs))
    with pytest.raises(SystemExit) as e:
        main(["--config", str(_config(tmp_path, tiny_tokenizer, data))])
    msg = str(e.value.code) + capsys.readouterr().err
    assert "bad.json: record 2: missing field 'subject'" in msg
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_default_config_shows_all_curves(tmp_path):
    """The shipped default (embedded model, ROME, PRUNE, metric callbacks) on 2 demo edits: every curve is logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("DownstreamEvalCallback"):
            cb["init_args"]["perplexity_n_texts"] = 10
    (tmp_path / "default.yaml").write_text(yaml.safe_dump(cfg))
    main(["--config", str(tmp_path / "default.yaml"), "--data.n_edits", "2",
          "--model.editor.init_args.mom2_n_samples", "100", "--model.export_dir", "null",
          "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    run = tmp_path / "default" / "version_0"
    tags = EventAccumulator(str(run)).Reload().Tags()["scalars"]
    acc = EventAccumulator(str(run)).Reload()
    for group in ("retention", "immediate", "baseline"):
        for k in ("efficacy", "generalization", "locality"):
            vals = [e.value for e in acc.Scalars(f"{group}/{k}")]
            assert vals and all(0.0 <= v <= 1.0 for v in vals), (group, k, vals)
    assert [e.step for e in acc.Scalars("retention/efficacy")][-1] == 2
    ppl = [e.value for e in acc.Scalars("downstream/perplexity")]
    assert len(ppl) >= 2 and all(1.0 < v < 1000.0 for v in ppl)
    spectrum = [t for t in tags if t.startswith("spectrum/") and t.endswith("/condition_number")]
    assert spectrum and all(e.value >= 1.0 for e in acc.Scalars(spectrum[0]))
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["num_edits"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2_mend.yaml", "smollm2_mend_prune.yaml"])
def test_mend_configs_run_sequential_edits(tmp_path, name):
    """The bundled MEND hypernetwork edits the embedded model from train.py, with and without PRUNE."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = yaml.safe_load((ROOT / "configs" / name).read_text())
    cfg["trainer"]["callbacks"] = [cb for cb in cfg["trainer"]["callbacks"]
                                   if cb["class_path"].rsplit(".", 1)[-1] in ("PruneCallback", "EditMetricsCallback")]
    (tmp_path / name).write_text(yaml.safe_dump(cfg))
    main(["--config", str(tmp_path / name), "--data.n_edits", "3", "--model.export_dir", "null",
          "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    run = next((tmp_path / cfg["trainer"]["logger"]["init_args"]["name"]).glob("version_*"))
    acc = EventAccumulator(str(run)).Reload()
    assert [e.step for e in acc.Scalars("retention/efficacy")][-1] == 3
    assert [e.step for e in acc.Scalars("immediate/efficacy")] == [1, 2, 3]
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["num_edits"] == 3
    # MEND edits the six layer-27..29 MLP weights; PRUNE logs their spectrum only when it is in the run
    spectrum = [t for t in acc.Tags()["scalars"] if t.startswith("spectrum/") and t.endswith("/condition_number")]
    if "prune" in name:
        assert len(spectrum) == 6 and all("layers.2" in t for t in spectrum)
    else:
        assert spectrum == []


@pytest.mark.parametrize("arg, needles", [
    (["--model.editor.init_args.v_lrr", "0.1"], ["model.editor", "lit_prune.editors.ROME", "Option 'v_lrr' is not accepted"]),
    (["--trainer.max_epochs", "x"], ["trainer.max_epochs", "Given value: x"]),
])
def test_bad_option_is_one_line(arg, needles, capsys):
    """A value jsonargparse rejects: one error line naming the key (and the class), then the --help pointer."""
    with pytest.raises(SystemExit) as e:
        main(["--config", str(ROOT / "configs" / "smollm2_rome.yaml"), *arg])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("error: ") and "--help" in err[1], err
    assert all(n in err[0] for n in needles), err[0]
