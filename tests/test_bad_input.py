"""Bad input gets one clear line, never a traceback, and nothing is lost.

CLI cases run ``train.py`` in-process against a tiny Llama and an existing run directory (same logger version):
each asserts the exit status, that the message names the offending file/record/field/parameter, that no traceback
is printed and that the run directory is byte-identical afterwards. API cases assert a ``ValueError``/``TypeError``
naming the problem and unchanged weights. Also: the statistics cache (corrupt files recomputed, atomic writes), JSON
Lines line numbers, the README's multi-device command and its "When something is wrong" messages.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import make_gpt2, make_llama
from editing_helpers import ToyEditor, toy_requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train import main  # noqa: E402

from lit_prune import EditDataModule, SequentialEditingModule, stats  # noqa: E402
from lit_prune.callbacks import PruneCallback  # noqa: E402
from lit_prune.data.formats import load_requests  # noqa: E402
from lit_prune.editors import FT, MEMIT, ROME, EditError, LowRankUpdate, apply_updates  # noqa: E402
from lit_prune.errors import CacheError, LitPruneError, describe  # noqa: E402
from lit_prune.models import ResolveError, load_model  # noqa: E402
from lit_prune.requests import EditRequestError  # noqa: E402
from lit_prune.stats import SecondMoment, load_npz, save_npz, second_moments  # noqa: E402

DOWN = "model.layers.1.mlp.down_proj.weight"


# -- the world the CLI cases run in: a tiny model, data, and one finished run whose directory must stay intact --------
@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("bad_input")
    model = d / "tiny"
    make_llama(tiny_tokenizer).save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)
    (d / "edits.json").write_text(json.dumps(toy_requests(4)))
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False,
            "enable_model_summary": False, "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(d / "runs"), "name": "toy", "version": 0}},
            "callbacks": [
                {"class_path": "lit_prune.callbacks.PruneCallback", "init_args": {"mode": "deferred"}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
            ],
        },
        "model": {"model": str(model), "editor": {"class_path": "editing_helpers.ToyEditor"}, "export_dir": None},
        "data": {"path": str(d / "edits.json"), "batch_size": 2},
    }
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    main(["--config", str(d / "cfg.yaml")])
    run = d / "runs" / "toy" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert (run / "config.yaml").is_file() and ckpt.is_file()

    # checkpoints that must be refused
    (d / "truncated.ckpt").write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    other = {**blob, "lit_prune": {**blob["lit_prune"], "model_name": "/elsewhere/other-model"}}
    torch.save(other, d / "other_model.ckpt")
    reshaped = {**blob, "state_dict": {f"model.{DOWN}": torch.zeros(5, 5)}}
    torch.save(reshaped, d / "other_shapes.ckpt")
    # model folders that must be refused
    (d / "no_config").mkdir()
    (d / "no_config" / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    for name, keep in (("truncated_model", 0.5), ("no_tokenizer", 1.0)):
        f = d / name
        f.mkdir()
        (f / "config.json").write_text((model / "config.json").read_text())
        w = (model / "model.safetensors").read_bytes()
        (f / "model.safetensors").write_bytes(w[: int(len(w) * keep)])
    # data files that must be refused
    recs = toy_requests(4)
    (d / "not_json.json").write_text("[{\"prompt\": ")
    (d / "empty.json").write_text("[]")
    bad_line = '{"prompt": "x" "subject"}'  # line 2: a missing comma
    (d / "bad_line.jsonl").write_text("\n".join([json.dumps(recs[0]), bad_line, json.dumps(recs[2])]))
    (d / "unknown_format.json").write_text(json.dumps([{"question": "Who?", "answer": "Me"}]))
    same = [dict(r) for r in recs]
    same[2]["target_new"] = same[2]["target_true"]
    (d / "same_target.json").write_text(json.dumps(same))
    missing = [dict(r) for r in recs]
    del missing[1]["subject"]
    (d / "missing_field.json").write_text(json.dumps(missing))
    return SimpleNamespace(dir=d, cfg=d / "cfg.yaml", runs=d / "runs", ckpt=ckpt, model=model)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test reaches the network: a hub id fails at once instead of after retries."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_failing(world, args: list[str], capsys) -> tuple[int, str]:
    """Run train.py in-process pointed at the existing run (logger version 0); returns (exit status, output)."""
    before = snapshot(world.runs)
    with pytest.raises(SystemExit) as e:
        main(["--config", str(world.cfg), *args])
    out = capsys.readouterr()
    code = e.value.code
    text = (code if isinstance(code, str) else "") + out.err + out.out
    assert snapshot(world.runs) == before, "a failing run changed the existing run directory"
    return (1 if isinstance(code, str) else code), text


PRUNE = ["--trainer.callbacks+=lit_prune.callbacks.PruneCallback"]
ROME_ = ["--model.editor", "lit_prune.editors.ROME", "--model.editor.mom2_adjustment", "false"]

# (id, args (w = the world), exit status, substrings the message must contain)
CLI_CASES = [
    ("batch_size_0", lambda w: ["--data.batch_size", "0"], 1, ["batch_size", "got 0"]),
    ("batch_size_not_int", lambda w: ["--data.batch_size", "abc"], 2, ["data.batch_size", "abc"]),
    ("n_edits_negative", lambda w: ["--data.n_edits", "-3"], 1, ["n_edits", "-3"]),
    ("n_edits_too_many", lambda w: ["--data.n_edits", "99"], 1, ["n_edits=99", "edits.json", "only 4 records"]),
    ("unknown_option", lambda w: ["--data.nope", "1"], 2, ["--data.nope"]),
    ("data_file_missing", lambda w: ["--data.path", str(w.dir / "nope.json")], 1, ["nope.json", "not found"]),
    ("data_not_json", lambda w: ["--data.path", str(w.dir / "not_json.json")], 1, ["not_json.json", "not valid JSON"]),
    ("data_empty", lambda w: ["--data.path", str(w.dir / "empty.json")], 1, ["empty.json", "no edit records"]),
    ("jsonl_bad_second_line", lambda w: ["--data.path", str(w.dir / "bad_line.jsonl")], 1,
     ["bad_line.jsonl", "line 2 is not valid JSON"]),
    ("unknown_record_format", lambda w: ["--data.path", str(w.dir / "unknown_format.json")], 1,
     ["unknown_format.json", "record 0", "cannot tell the format", "--data.format"]),
    ("unknown_format_name", lambda w: ["--data.format", "rome"], 1, ["unknown format 'rome'"]),
    ("target_new_equals_true", lambda w: ["--data.path", str(w.dir / "same_target.json")], 1,
     ["same_target.json", "record 2", "target_new", "equals 'target_true'"]),
    ("missing_field", lambda w: ["--data.path", str(w.dir / "missing_field.json")], 1,
     ["missing_field.json", "record 1", "missing field 'subject'"]),
    ("prune_alpha_1", lambda w: [*PRUNE, "--trainer.callbacks.alpha", "1"], 1, ["PruneCallback", "alpha", "> 1"]),
    ("prune_alpha_below_1", lambda w: [*PRUNE, "--trainer.callbacks.alpha", "0.5"], 1, ["PruneCallback", "alpha"]),
    ("prune_mode", lambda w: [*PRUNE, "--trainer.callbacks.mode", "later"], 1, ["PruneCallback", "mode", "'later'"]),
    ("prune_kind", lambda w: [*PRUNE, "--trainer.callbacks.kind", "cubic"], 1, ["PruneCallback", "kind", "'cubic'"]),
    ("prune_every_n_steps_0", lambda w: [*PRUNE, "--trainer.callbacks.every_n_steps", "0"], 1,
     ["PruneCallback", "every_n_steps"]),
    ("prune_params_match_nothing", lambda w: [*PRUNE, "--trainer.callbacks.params", "no_such_weight"], 1,
     ["PruneCallback params", "'no_such_weight'", "matches no 2-D parameter"]),
    ("prune_params_unknown_name",
     lambda w: [*PRUNE, "--trainer.callbacks.params", "[model.layers.9.mlp.down_proj.weight]"], 1,
     ["PruneCallback params", "model.layers.9.mlp.down_proj.weight", "not in model"]),
    ("editor_v_lr_negative", lambda w: [*ROME_, "--model.editor.v_lr", "-1"], 1, ["ROME", "v_lr", "-1"]),
    ("editor_layer_outside_model", lambda w: [*ROME_, "--model.editor.layers", "7"], 1,
     ["ROME", "layers=[7]", "outside the model (0..2)"]),
    ("editor_template_matches_nothing",
     lambda w: [*ROME_, "--model.editor.rewrite_module_tmp", "model.layers.{}.mlp.nope"], 1,
     ["rewrite_module_tmp='model.layers.{}.mlp.nope'", "matches no module"]),
    ("editor_parameter_not_in_model", lambda w: ["--model.editor.param", "model.layers.7.mlp.down_proj.weight"], 1,
     ["ToyEditor", "model.layers.7.mlp.down_proj.weight", "does not have"]),
    ("editor_stats_text_missing", lambda w: ["--model.editor", "lit_prune.editors.ROME", "--model.editor.mom2_dataset",
                                             str(w.dir / "no_texts.txt")], 1, ["mom2_dataset", "no_texts.txt"]),
    ("model_folder_missing", lambda w: ["--model.model", str(w.dir / "nowhere")], 1, ["nowhere", "no model folder"]),
    ("model_folder_without_config", lambda w: ["--model.model", str(w.dir / "no_config")], 1,
     ["no_config", "no config.json"]),
    ("model_weights_truncated", lambda w: ["--model.model", str(w.dir / "truncated_model")], 1,
     ["truncated_model", "model.safetensors", "truncated"]),
    ("model_without_tokenizer", lambda w: ["--model.model", str(w.dir / "no_tokenizer")], 1,
     ["no_tokenizer", "no usable tokenizer"]),
    ("hub_id_offline", lambda w: ["--model.model", "no-such-org/no-such-model"], 1,
     ["'no-such-org/no-such-model'", "hub could not provide it"]),
    ("model_dtype", lambda w: ["--model.dtype", "float99"], 1, ["model.dtype", "float99"]),
    ("ckpt_missing", lambda w: ["--ckpt_path", str(w.dir / "gone.ckpt")], 1, ["gone.ckpt", "no such file"]),
    ("ckpt_directory", lambda w: ["--ckpt_path", str(w.dir)], 1, ["is a directory", "last.ckpt"]),
    ("ckpt_truncated", lambda w: ["--ckpt_path", str(w.dir / "truncated.ckpt")], 1,
     ["truncated.ckpt", "cannot be read", "truncated"]),
    ("ckpt_other_model", lambda w: ["--ckpt_path", str(w.dir / "other_model.ckpt")], 1,
     ["other_model.ckpt", "/elsewhere/other-model", "tiny"]),
    ("ckpt_other_shapes", lambda w: ["--ckpt_path", str(w.dir / "other_shapes.ckpt")], 1,
     ["other_shapes.ckpt", DOWN, "(5, 5)", "another model"]),
    ("ckpt_other_editor", lambda w: ["--ckpt_path", str(w.ckpt), "--model.editor.param",
                                     "model.layers.2.mlp.down_proj.weight"], 1,
     ["last.ckpt", "model.layers.2.mlp.down_proj.weight", "editor settings"]),
    ("ckpt_other_data", lambda w: ["--ckpt_path", str(w.ckpt), "--data.shuffle", "true"], 1,
     ["last.ckpt", "edit 0", "same data.path"]),
    ("strategy_ddp", lambda w: ["--trainer.strategy", "ddp"], 1, ["trainer.strategy", "lockstep"]),
    ("accumulate_grad_batches", lambda w: ["--trainer.accumulate_grad_batches", "2"], 1,
     ["trainer.accumulate_grad_batches", "must be 1"]),
    ("gradient_clip_val", lambda w: ["--trainer.gradient_clip_val", "1.0"], 1, ["trainer.gradient_clip_val"]),
]


@pytest.mark.parametrize("make_args, status, needles", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_clear_line(world, capsys, make_args, status, needles):
    code, text = run_failing(world, make_args(world), capsys)
    assert code == status, text
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in: {text}"
    assert len(text.strip().splitlines()) <= 8, text  # a few lines (Lightning's device banner), not a wall


def test_cli_cases_cover_the_issue():
    assert len(CLI_CASES) >= 25


def test_debug_env_shows_the_traceback(world, monkeypatch):
    monkeypatch.setenv("LIT_PRUNE_DEBUG", "1")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        main(["--config", str(world.cfg), "--data.batch_size", "0"])


def test_failure_during_fit_is_one_line_and_keeps_the_run_config(world, capsys):
    """An error only the real model can show (weights that do not load) happens inside fit; it is still one line,
    and the existing run's config.yaml is not rewritten (it is written when training starts)."""
    bad = world.dir / "bad_weights"
    if not bad.exists():
        bad.mkdir()
        for f in world.model.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((bad / "config.json").read_text())
        cfg["intermediate_size"] = 96  # the weights on disk are 64 wide: loading them fails, the config is valid
        (bad / "config.json").write_text(json.dumps(cfg))
    config_before = (world.runs / "toy" / "version_0" / "config.yaml").read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["--config", str(world.cfg), "--model.model", str(bad)])
    out = capsys.readouterr()
    text = out.err + out.out
    assert e.value.code == 1 and "Traceback" not in text
    assert "bad_weights" in text and "error: " in text
    assert (world.runs / "toy" / "version_0" / "config.yaml").read_bytes() == config_before


def test_describe_unexpected_errors_point_to_debug():
    msg = describe(ZeroDivisionError("division by zero"))
    assert msg.startswith("error: unexpected builtins.ZeroDivisionError: division by zero")
    assert "LIT_PRUNE_DEBUG=1" in msg


# -- the README --------------------------------------------------------------------------------------------------
def readme() -> str:
    return (ROOT / "README.md").read_text()


def test_readme_multi_device_command_runs_as_written(tmp_path, tiny_tokenizer):
    """The flags of the README's "Several devices" bullet, verbatim, on 2 CPU processes (gloo), 2 edits."""
    bullet = re.search(r"^- \*\*Several devices\*\*(.*?)(?=^- \*\*|^\S|\Z)", readme(), re.S | re.M)
    assert bullet, "README has no 'Several devices' bullet"
    flags = " ".join(s for s in re.findall(r"`([^`]*)`", bullet.group(1)) if s.startswith("--trainer."))
    assert "--trainer.devices 2" in flags and "lockstep" in flags
    mdir = tmp_path / "tiny"
    make_llama(tiny_tokenizer).save_pretrained(mdir)
    tiny_tokenizer.save_pretrained(mdir)
    (tmp_path / "edits.json").write_text(json.dumps(toy_requests(2)))
    cfg = {
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "enable_checkpointing": False, "log_every_n_steps": 1,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs"), "name": "md"}}},
        "model": {"model": str(mdir), "editor": {"class_path": "editing_helpers.ToyEditor"}, "export_dir": "auto"},
        "data": {"path": str(tmp_path / "edits.json"), "batch_size": 1},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(tmp_path / "cfg.yaml"), *shlex.split(flags)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "MEMBER: 2/2" in out and "Traceback" not in out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "runs" / "md" / "version_0"
    assert [e.step for e in EventAccumulator(str(run)).Reload().Scalars("edit/seconds_per_edit")] == [1, 2]
    # both ranks applied the same edits: the exported weights are the ToyEditor's edits of the start weights
    from safetensors.torch import load_file

    got = load_file(run / "edited_model" / "model.safetensors")[DOWN]
    ref = make_llama(tiny_tokenizer)
    apply_updates(ref, ToyEditor().compute(ref, tiny_tokenizer, load_requests(tmp_path / "edits.json")[:1]))
    apply_updates(ref, ToyEditor().compute(ref, tiny_tokenizer, load_requests(tmp_path / "edits.json")[1:]))
    torch.testing.assert_close(got, ref.get_parameter(DOWN))


def test_readme_shows_real_error_messages(tmp_path, monkeypatch, capsys):
    """The messages in the README's "When something is wrong" section are what train.py prints for its commands."""
    section = re.search(r"^## When something is wrong\n(.*?)(?=^## |\Z)", readme(), re.S | re.M)
    assert section, "README has no 'When something is wrong' section"
    shown = [line for line in section.group(1).splitlines() if line.startswith("error: ")]
    assert len(shown) >= 2 and "LIT_PRUNE_DEBUG=1" in section.group(1)
    monkeypatch.chdir(tmp_path)
    recs = toy_requests(12)  # the default config edits the first 10
    recs[3]["target_new"] = recs[3]["target_true"]
    (tmp_path / "my_edits.json").write_text(json.dumps(recs))
    printed = []
    for args in (["--data.batch_size", "0"], ["--data.path", "my_edits.json"]):
        with pytest.raises(SystemExit):
            main(["--config", str(ROOT / "configs" / "default.yaml"), *args])
        printed += [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert printed == shown[:2]


# -- API: bad arguments are ValueError/TypeError and change nothing ----------------------------------------------------
def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before) -> None:
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


REQ = {"prompt": "The city of {} is in", "subject": "Paris0", "target_new": "Japan", "target_true": "France"}
FAST = dict(mom2_adjustment=False, v_num_grad_steps=2, context_templates=["{}"])


@pytest.mark.parametrize(
    "edit, error, needles",
    [
        (lambda m, t: ROME(layers=[7], **FAST).apply(m, t, [REQ]), EditError, ["layers=[7]", "outside the model"]),
        (lambda m, t: MEMIT(layers=[1, 9], mom2_n_samples=10).apply(m, t, [REQ]), EditError, ["layer 9"]),
        (lambda m, t: ROME(rewrite_module_tmp="model.layers.{}.mlp.nope", **FAST).apply(m, t, [REQ]), EditError,
         ["rewrite_module_tmp", "matches no module"]),
        (lambda m, t: ROME(**FAST).apply(m, t, []), EditError, ["no edit requests"]),
        (lambda m, t: ROME(**FAST).apply(m, t, [{**REQ, "target_new": "France"}]), EditRequestError,
         ["request 0", "target_new", "equals 'target_true'"]),
        (lambda m, t: ROME(**FAST).apply(m, t, [{**REQ, "prompt": "no slot"}]), EditRequestError,
         ["request 0", "'prompt'"]),
        (lambda m, t: FT(layers=[1], lr=-1.0), ValueError, ["FT", "lr"]),
        (lambda m, t: ToyEditor().apply(m, t, [{**REQ, "target_true": " Japan "}]), EditRequestError, ["equals"]),
        (lambda m, t: apply_updates(m, {DOWN: LowRankUpdate(torch.full((32, 1), float("nan")), torch.ones(64, 1))}),
         EditError, [DOWN, "not finite"]),
        (lambda m, t: apply_updates(m, {DOWN: LowRankUpdate(torch.ones(3, 1), torch.ones(64, 1))}), EditError,
         [DOWN, "shape"]),
        (lambda m, t: apply_updates(m, {"model.nope.weight": LowRankUpdate(torch.ones(3, 1), torch.ones(3, 1))}),
         EditError, ["model.nope.weight", "not found"]),
    ],
    ids=["rome_layer", "memit_layer", "template", "no_requests", "same_target", "prompt_slot", "ft_lr",
         "same_target_spaces", "non_finite", "shape", "unknown_param"],
)
def test_api_bad_arguments_are_value_errors_and_change_nothing(tiny_llama, tiny_tokenizer, edit, error, needles):
    before = weights(tiny_llama)
    with pytest.raises(error) as e:
        edit(tiny_llama, tiny_tokenizer)
    assert isinstance(e.value, ValueError)
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    assert_unchanged(tiny_llama, before)


@pytest.mark.parametrize(
    "make, needles",
    [
        (lambda: PruneCallback(alpha=1.0), ["alpha"]),
        (lambda: PruneCallback(alpha=0.3), ["alpha"]),
        (lambda: PruneCallback(mode="later"), ["mode"]),
        (lambda: PruneCallback(kind="cubic"), ["kind"]),
        (lambda: PruneCallback(every_n_steps=0), ["every_n_steps"]),
        (lambda: ROME(v_lr=-1.0), ["v_lr"]),
        (lambda: EditDataModule(batch_size=0), ["batch_size"]),
        (lambda: EditDataModule(n_edits=-2), ["n_edits"]),
        (lambda: load_model("./no/such/folder"), ["no/such/folder"]),
    ],
    ids=["alpha_1", "alpha_below_1", "mode", "kind", "every_n_steps", "v_lr", "batch_size", "n_edits", "model"],
)
def test_api_constructor_errors_are_value_errors(make, needles):
    with pytest.raises((ValueError, TypeError)) as e:
        make()
    for needle in needles:
        assert needle in str(e.value)


def test_error_classes_are_value_errors():
    for cls in (EditError, EditRequestError, ResolveError, CacheError):
        assert issubclass(cls, LitPruneError) and issubclass(cls, ValueError)


def test_undo_past_the_log_changes_nothing(tiny_llama, tiny_tokenizer):
    module = SequentialEditingModule(model="unused", editor=ToyEditor())
    module.set_model(tiny_llama, tiny_tokenizer)
    before = weights(tiny_llama)
    with pytest.raises(ValueError, match="undo: k must be between 0 and 0"):
        module.undo(1)
    assert_unchanged(tiny_llama, before)


# -- data files: line numbers, file names ------------------------------------------------------------------------
def test_jsonl_errors_give_the_line(tmp_path):
    recs = toy_requests(3)
    p = tmp_path / "e.jsonl"
    p.write_text(json.dumps(recs[0]) + "\n\n" + json.dumps(recs[1]) + "\n" + json.dumps({**recs[2], "subject": ""}))
    with pytest.raises(EditRequestError, match=r"e.jsonl: record 2 \(line 4\) \(case_id 2\): field 'subject' is empty"):
        EditDataModule(path=str(p))
    p.write_text(json.dumps(recs[0]) + "\n" + "{oops}\n")
    with pytest.raises(EditRequestError, match=r"e.jsonl': line 2 is not valid JSON"):
        load_requests(p)


def test_non_utf8_data_file_is_named(tmp_path):
    p = tmp_path / "latin1.json"
    p.write_bytes('[{"prompt": "Caf\xe9 {}"}]'.encode("latin-1"))
    with pytest.raises(EditRequestError, match="latin1.json' is not UTF-8"):
        EditDataModule(path=str(p))


# -- the statistics cache --------------------------------------------------------------------------------------------
MODULE = "model.layers.1.mlp.down_proj"


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "texts.txt"
    p.write_text("\n".join(["The Eiffel Tower is in the city of Paris.", "Apple was founded by Steve Jobs."] * 3))
    return str(p)


def test_truncated_statistics_are_named_and_recomputed(tiny_llama, tiny_tokenizer, tmp_path, text_file):
    kw = dict(source=text_file, n_samples=6, max_length=32, stats_dir=tmp_path / "stats", model_name="tiny",
              progress=False)
    first = second_moments(tiny_llama, tiny_tokenizer, [MODULE], **kw)[MODULE]
    path = stats.stats_file(tmp_path / "stats", "tiny", text_file, MODULE, "float32", 6, 32)
    path.write_bytes(path.read_bytes()[:100])  # a statistics run killed half-way through a (non-atomic) write
    with pytest.raises(CacheError, match=re.escape(str(path))):
        load_npz(path)
    with pytest.warns(UserWarning, match=re.escape(str(path)) + ".*recomputing"):
        again = second_moments(tiny_llama, tiny_tokenizer, [MODULE], **kw)[MODULE]
    torch.testing.assert_close(again.mom2, first.mom2)
    assert load_npz(path).count == first.count  # rewritten, whole


def test_statistics_of_another_shape_are_recomputed(tiny_llama, tiny_tokenizer, tmp_path, text_file):
    kw = dict(source=text_file, n_samples=6, max_length=32, stats_dir=tmp_path / "stats", model_name="tiny",
              progress=False)
    path = stats.stats_file(tmp_path / "stats", "tiny", text_file, MODULE, "float32", 6, 32)
    save_npz(path, SecondMoment(torch.eye(5, dtype=torch.float64), 3), 6)
    with pytest.warns(UserWarning, match=r"has shape \(5, 5\).*needs \(64, 64\)"):
        st = second_moments(tiny_llama, tiny_tokenizer, [MODULE], **kw)[MODULE]
    assert tuple(st.mom2.shape) == (64, 64) and load_npz(path).mom2.shape == (64, 64)


def test_statistics_writes_are_atomic(tmp_path, monkeypatch):
    """A write that dies half-way leaves neither a truncated file nor a temporary one behind."""
    path = tmp_path / "s" / "m.npz"

    def dying_savez(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", dying_savez)
    with pytest.raises(KeyboardInterrupt):
        save_npz(path, SecondMoment(torch.eye(3, dtype=torch.float64), 2), 2)
    assert list(path.parent.iterdir()) == []


def test_invalid_statistics_file_names_it(tmp_path):
    p = tmp_path / "nan.npz"
    np.savez(p, **{"mom2.mom2": np.full((2, 2), np.nan), "mom2.count": np.array(3)})
    with pytest.raises(CacheError, match="nan.npz' holds an invalid sum"):
        load_npz(p)


def test_gpt2_checkpoint_is_refused_for_a_llama_run(world, tiny_tokenizer, capsys):
    """A real checkpoint of another model (a GPT-2 run), not a doctored one."""
    d = world.dir / "gpt2_run"
    if not d.exists():
        make_gpt2(tiny_tokenizer).save_pretrained(d / "gpt2")
        tiny_tokenizer.save_pretrained(d / "gpt2")
        main(["--config", str(world.cfg), "--model.model", str(d / "gpt2"),
              "--model.editor.param", "transformer.h.1.mlp.c_proj.weight",
              "--trainer.logger.init_args.save_dir", str(d / "runs")])
    ckpt = d / "runs" / "toy" / "version_0" / "checkpoints" / "last.ckpt"
    code, text = run_failing(world, ["--ckpt_path", str(ckpt)], capsys)
    assert code == 1 and "Traceback" not in text
    assert "written for model" in text and str(d / "gpt2") in text and str(world.model) in text


def test_damaged_converted_model_names_the_folder_to_delete(tmp_path, monkeypatch, world):
    from lit_prune.models import load_model_config

    monkeypatch.setenv("LIT_PRUNE_CACHE", str(tmp_path))
    target = tmp_path / "models" / "smollm2-135m-v2"  # where the bundled model's conversion is cached
    target.mkdir(parents=True)
    (target / "config.json").write_text((world.model / "config.json").read_text())
    w = (world.model / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(w[: len(w) // 3])  # a conversion interrupted by a full disk
    with pytest.raises(CacheError, match=re.escape(str(target)) + ".*delete that folder"):
        load_model_config("smollm2-135m")
