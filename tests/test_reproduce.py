"""benchmarks/reproduce.py on a tiny model: resume gives the rows of an uninterrupted sweep, the views and the online
run agree with an independent restraint, and the report carries the driver's numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "lit_prune" / "data" / "demo_edits.json"


@pytest.fixture
def driver(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when run as a script (report_reproduce)
    spec = importlib.util.spec_from_file_location("reproduce_under_test", ROOT / "benchmarks" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def call(*argv):
        monkeypatch.setattr(sys, "argv", ["reproduce.py", *map(str, argv)])
        mod.main()

    call.module = mod
    return call


@pytest.fixture
def model_dir(tiny_llama_dir):
    return Path(tiny_llama_dir)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def metrics(rows, view, n):
    return {r["metric"]: r["value"] for r in rows if r["view"] == view and r["n"] == n}


def F(s: float, tau: float, alpha: float) -> float:
    return math.log(s / tau) / math.log(alpha) + tau if s >= tau else s


def test_resume_views_online_and_report(tmp_path, model_dir, driver, capsys):
    common = ["--editor", "ft", "--model", model_dir, "--data", DEMO, "--eval-every", 1, "--ppl-every", 1,
              "--ppl-texts", 2, "--downstream-n", 0, "--threads", 1]
    full, part = tmp_path / "full", tmp_path / "part"
    driver("run", *common, "--n", 3, "--out", full)
    driver("run", *common, "--n", 2, "--out", part)
    capsys.readouterr()
    driver("run", *common, "--n", 3, "--out", part)  # a stopped sweep continues
    assert "[ft/stream] resuming at edit 2/3" in capsys.readouterr().out

    for run in ("stream", "online"):
        a = [r for r in rows_of(full / f"ft_{run}.jsonl") if not r["metric"].startswith("time/")]
        b = [r for r in rows_of(part / f"ft_{run}.jsonl") if not r["metric"].startswith("time/")]
        assert [(r["view"], r["n"], r["metric"]) for r in a] == [(r["view"], r["n"], r["metric"]) for r in b]
        np.testing.assert_allclose([r["value"] for r in a], [r["value"] for r in b], rtol=1e-5)

    stream, online = rows_of(full / "ft_stream.jsonl"), rows_of(full / "ft_online.jsonl")
    assert {r["n"] for r in stream} == {0, 1, 2, 3}
    m0 = metrics(stream, "none", 0)
    assert m0 and all(metrics(stream, v, 0) == m0 for v in ("deferred_e", "deferred_1.2"))
    assert metrics(online, "online_e", 0) == m0  # N = 0 taken over from the stream, not re-evaluated
    assert set(metrics(stream, "none", 3)) >= {"downstream/perplexity", "retention/efficacy"}

    # independent check of σ_max(ΔW) in each view: numpy SVDs of W₀ and of the saved factors
    name = next(iter(torch.load(full / "ft_stream.pt", weights_only=False)["matrices"]))
    from transformers import AutoModelForCausalLM

    W0 = AutoModelForCausalLM.from_pretrained(model_dir).get_parameter(name).detach().double().numpy()
    tau = np.linalg.norm(W0, 2)
    setup = json.loads((full / "setup.json").read_text())
    assert setup["ft τ = σ_max(W₀)"][name] == pytest.approx(tau, abs=0.006)  # recorded, rounded to 0.01
    st = torch.load(full / "ft_stream.pt", weights_only=False)["matrices"][name]
    A, B = st["A"], st["B"]
    s = np.linalg.svd(A.double().numpy() @ B.double().numpy().T, compute_uv=False)
    key = f"spectrum/{name}/delta_sigma_max"
    assert metrics(stream, "none", 3)[key] == pytest.approx(s[0], rel=1e-5)
    for view, alpha in (("deferred_e", math.e), ("deferred_1.2", 1.2)):
        assert metrics(stream, view, 3)[key] == pytest.approx(F(s[0], tau, alpha), rel=1e-5)
    # one edit: online restraint = the deferred view with α = e
    assert metrics(online, "online_e", 1)[key] == pytest.approx(metrics(stream, "deferred_e", 1)[key], rel=1e-5)
    assert metrics(online, "online_e", 1)["downstream/perplexity"] == pytest.approx(
        metrics(stream, "deferred_e", 1)["downstream/perplexity"], rel=1e-4)

    doc = tmp_path / "docs" / "results.md"
    driver("report", "--out", full, "--doc", doc)
    text = doc.read_text()
    ppl = metrics(stream, "none", 3)["downstream/perplexity"]
    row = next(line for line in text.splitlines() if line.startswith("| FT | no restraint | 3 |"))
    assert f"{ppl:.2f}" in row
    assert (doc.parent / "figures" / "ft_curves.png").stat().st_size > 1000


HP = {"lr": 0.5, "norm_constraint": 1.0}  # large FT updates on the tiny model, so ΔW passes τ and PRUNE acts


def test_driver_rows_equal_train_py_runs_with_prune_callback(tmp_path, model_dir, driver):
    """The driver's deferred and online rows are what ``train.py`` with PruneCallback logs on the same edit stream:
    κ and σ_max(ΔW) after every edit (TensorBoard curves) and the exported weights at N."""
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    from lit_prune.editors import FT
    from lit_prune.restraint import AccumulatedUpdate

    sys.path.insert(0, str(ROOT))
    from train import main as train_main

    out, n = tmp_path / "out", 3
    driver("run", "--editor", "ft", "--model", model_dir, "--data", DEMO, "--eval-every", 10, "--ppl-every", 10,
           "--ppl-texts", 2, "--downstream-n", 0, "--threads", 1, "--n", n, "--out", out,
           "--editor-args", json.dumps(HP))
    stream, online = rows_of(out / "ft_stream.jsonl"), rows_of(out / "ft_online.jsonl")
    name = FT().edited_parameters(_loaded(model_dir))[0]
    kappa, sigma = f"spectrum/{name}/condition_number", f"spectrum/{name}/delta_sigma_max"

    for mode, view, rows, file in (("deferred", "deferred_e", stream, "ft_stream.pt"),
                                   ("online", "online_e", online, "ft_online.pt")):
        cfg = {
            "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False,
                        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                   "init_args": {"save_dir": str(tmp_path / "runs"), "name": mode}},
                        "callbacks": [{"class_path": "lit_prune.callbacks.PruneCallback",
                                       "init_args": {"mode": mode, "alpha": math.e}}]},
            "model": {"model": str(model_dir), "export_dir": "auto",
                      "editor": {"class_path": "lit_prune.editors.FT", "init_args": HP}},
            "data": {"path": str(DEMO), "n_edits": n},
        }
        (tmp_path / f"{mode}.yaml").write_text(yaml.safe_dump(cfg))
        train_main(["--config", str(tmp_path / f"{mode}.yaml")])
        run = tmp_path / "runs" / mode / "version_0"
        acc = EventAccumulator(str(run)).Reload()
        logged = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in (kappa, sigma,
                                                                               f"spectrum/{name}/n_restrained")}
        saved = torch.load(out / file, weights_only=False)
        st = AccumulatedUpdate.from_state_dict(saved["matrices"][name])
        driver_w = saved["weights"][name].clone()  # unrestrained (stream) or online-restrained weights at N
        if mode == "deferred":  # the driver's deferred view at N, written as its Stream.show writes it
            st.write_restrained(driver_w, math.e)
        W = AutoModelForCausalLM.from_pretrained(run / "edited_model").get_parameter(name).detach()
        assert float((W - driver_w).double().norm() / driver_w.double().norm()) < 1e-6
        for k in range(1, n + 1):
            assert metrics(rows, view, k)[kappa] == pytest.approx(logged[kappa][k], rel=1e-5)
            pre_F = logged[sigma][k]  # the callback logs σ_max(ΔW) before F
            if mode == "deferred":
                assert metrics(rows, "none", k)[sigma] == pytest.approx(pre_F, rel=1e-5)
            assert metrics(rows, view, k)[sigma] == pytest.approx(F(pre_F, st.tau, math.e), rel=1e-5)
        assert any(v > 0 for v in logged[f"spectrum/{name}/n_restrained"].values())  # PRUNE acted


def _loaded(model_dir):
    from lit_prune.models import load_model

    return load_model(str(model_dir))[0]


def test_intervals_against_known_values():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from intervals import bootstrap, mean_interval, perplexity_interval, wilson

    lo, hi = wilson(5, 20)  # the textbook Wilson score interval of 5/20
    assert (round(lo, 4), round(hi, 4)) == (0.1119, 0.4687)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)
    m, lo, hi = mean_interval([1, 0, 1, 1])
    assert m == 0.75 and (lo, hi) == wilson(3, 4)
    v = np.random.default_rng(3).normal(size=200)
    a, b = bootstrap(v)
    assert a < v.mean() < b and bootstrap(v) == (a, b)  # seeded: the same interval every time
    se = v.std(ddof=1) / math.sqrt(len(v))
    assert abs((b - a) - 2 * 1.96 * se) < 0.3 * 2 * 1.96 * se  # about the normal-theory width
    ppl, lo, hi = perplexity_interval([10.0, 20.0, 30.0], [5, 10, 15])
    assert ppl == pytest.approx(math.exp(2.0)) and lo == pytest.approx(ppl) == hi  # every text has NLL/token 2


def test_labels_orders_immediate_rows_and_downstream_pass(tmp_path, model_dir, driver, data_dir):
    out = tmp_path / "out"
    common = ["--editor", "ft", "--model", model_dir, "--data", DEMO, "--eval-every", 2, "--ppl-every", 2,
              "--ppl-texts", 3, "--threads", 1, "--n", 2, "--out", out, "--snapshot-at", 2]
    driver("run", *common)
    driver("run", *common, "--label", "ft_seed1", "--order", "seed:1", "--runs", "stream")
    paper, seeded = rows_of(out / "ft_stream.jsonl"), rows_of(out / "ft_seed1_stream.jsonl")
    assert {r["run"] for r in seeded} == {"ft_seed1/stream"}
    setup = json.loads((out / "setup.json").read_text())
    assert "random.Random(1)" in setup["ft_seed1 order"] and "paper" in setup["ft order"]
    # immediate rows: one per edit and view, the request of that edit (the orders differ, so do they)
    imm = [r for r in paper if r["metric"] == "immediate/efficacy" and r["view"] == "none"]
    assert [r["n"] for r in imm] == [1, 2] and all(r["value"] in (0.0, 1.0) for r in imm)
    # retention and perplexity carry 95 % intervals around their value
    for metric in ("retention/efficacy", "retention/locality", "downstream/perplexity"):
        r = next(r for r in paper if r["metric"] == metric and r["n"] == 2 and r["view"] == "none")
        assert r["lo"] <= r["value"] <= r["hi"] and r["count"] > 0, metric
    assert (out / "ft_stream_n2.pt").is_file() and (out / "ft_online_n2.pt").is_file()
    # the downstream pass on the snapshots: two examples per task, every view, resumable
    driver("downstream", "--label", "ft", "--model", model_dir, "--at", "0,2", "--examples", 2, "--threads", 1,
           "--out", out)
    down = rows_of(out / "ft_stream_downstream.jsonl")
    assert {(r["view"], r["n"]) for r in down} == {(v, n) for v in ("none", "deferred_e", "deferred_1.2") for n in (0, 2)}
    nli = next(r for r in down if r["metric"] == "downstream/nli" and r["n"] == 2 and r["view"] == "none")
    assert nli["count"] == 2 and (nli["lo"], nli["hi"]) == pytest.approx(
        __import__("intervals").wilson(nli["value"] * 2, 2))
    # summarization: the bootstrap over examples of each example's mean ROUGE-1/2/L F1, recomputed here from the
    # unedited model's own generations
    summ = next(r for r in down if r["metric"] == "downstream/summarization" and r["n"] == 0 and r["view"] == "none")
    from lit_prune.metrics.downstream import MAX_NEW_TOKENS, generate
    from lit_prune.metrics.tasks import ROUGE_KEYS, rouge_f1
    from lit_prune.models import load_model

    exs = driver.module.load_tasks({"summarization": 2})["summarization"]
    m, tk = load_model(str(model_dir))
    gens = generate(m, tk, [e.prompt for e in exs], MAX_NEW_TOKENS["summarization"], 16, 1024)
    sc = rouge_f1(gens, [e.target for e in exs])
    per = np.mean([sc[k].numpy() for k in ROUGE_KEYS], axis=0)
    assert summ["value"] == pytest.approx(float(per.mean()), rel=1e-6)
    assert (summ["lo"], summ["hi"]) == pytest.approx(__import__("intervals").bootstrap(per), rel=1e-6)
    before = (out / "ft_stream_downstream.jsonl").read_text()
    driver("downstream", "--label", "ft", "--model", model_dir, "--at", "0,2", "--examples", 2, "--threads", 1,
           "--out", out, "--runs", "stream")
    assert (out / "ft_stream_downstream.jsonl").read_text() == before  # nothing evaluated twice
    # --views: only the named views of the stream, the deferred RECT view among them
    driver("downstream", "--label", "ft_seed1", "--model", model_dir, "--at", "0,2", "--examples", 2, "--threads", 1,
           "--out", out, "--runs", "stream", "--views", "none", "deferred_rect")
    seed_down = rows_of(out / "ft_seed1_stream_downstream.jsonl")
    assert {(r["view"], r["n"]) for r in seed_down} == {(v, n) for v in ("none", "deferred_rect") for n in (0, 2)}
    with pytest.raises(SystemExit, match="unknown view"):
        driver("downstream", "--label", "ft", "--model", model_dir, "--out", out, "--views", "rect")
    with pytest.raises(SystemExit, match="--tasks needs --rescore"):
        driver("downstream", "--label", "ft", "--model", model_dir, "--out", out, "--tasks", "nli")
    # --rescore: rows written without the summarization interval get it; the other tasks' rows stay as they were
    f = out / "ft_stream_downstream.jsonl"
    stripped = [{k: v for k, v in r.items() if not (r["metric"] == "downstream/summarization" and k in ("lo", "hi"))}
                for r in rows_of(f)]
    f.write_text("".join(json.dumps(r) + "\n" for r in stripped))
    driver("downstream", "--label", "ft", "--model", model_dir, "--at", "0,2", "--examples", 2, "--threads", 1,
           "--out", out, "--runs", "stream", "--tasks", "summarization", "--rescore",
           "--views", "none", "deferred_e", "deferred_1.2", "deferred_rect")  # no deferred_rect rows: none written
    again = rows_of(f)
    key = lambda r: (r["view"], r["n"], r["metric"])
    assert sorted(map(key, again)) == sorted(map(key, down))
    by = {key(r): r for r in again}
    for r in down:
        assert by[key(r)]["value"] == pytest.approx(r["value"], rel=1e-6), key(r)
        if r["metric"] == "downstream/summarization":
            assert (by[key(r)]["lo"], by[key(r)]["hi"]) == pytest.approx((r["lo"], r["hi"]), rel=1e-6)
        elif "downstream/summarization" not in r["metric"]:
            assert by[key(r)] == next(x for x in stripped if key(x) == key(r))  # untouched


def test_rect_and_composed_runs_equal_the_callbacks(tmp_path, model_dir, driver, monkeypatch):
    """``rect_online`` / ``rect_prune_online`` rows are what RectCallback (and RectCallback + PruneCallback, online)
    produce on the same stream; the report's restraint comparison shows them and names the rows still missing."""
    import lightning as L

    from lit_prune import EditDataModule, SequentialEditingModule
    from lit_prune.callbacks import PruneCallback, RectCallback
    from lit_prune.editors import FT

    out, n = tmp_path / "out", 3
    driver("run", "--editor", "ft", "--model", model_dir, "--data", DEMO, "--eval-every", 10, "--ppl-every", 10,
           "--ppl-texts", 2, "--threads", 1, "--n", n, "--out", out, "--editor-args", json.dumps(HP),
           "--runs", "rect_online", "rect_prune_online", "--snapshot-at", 0)
    name = FT().edited_parameters(_loaded(model_dir))[0]
    kappas = {}
    for run, cbs in (("rect_online", [RectCallback()]), ("rect_prune_online", [RectCallback(), PruneCallback()])):
        module = SequentialEditingModule(model=str(model_dir), editor=FT(**HP))
        L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path / run,
                  callbacks=cbs).fit(module, datamodule=EditDataModule(path=str(DEMO), n_edits=n))
        W = module.model.get_parameter(name).detach().double()
        driver_w = torch.load(out / f"ft_{run}.pt", weights_only=False)["weights"][name].double()
        assert float((W - driver_w).norm() / driver_w.norm()) < 1e-5, run
        rows = rows_of(out / f"ft_{run}.jsonl")
        kappa = metrics(rows, run, n)[f"spectrum/{name}/condition_number"]
        assert kappa == pytest.approx(float(np.linalg.cond(W.numpy())), rel=1e-4)
        kappas[run] = kappa
    from lit_prune.restraint import AccumulatedUpdate

    acc = AccumulatedUpdate.from_state_dict(torch.load(out / "ft_rect_online.pt", weights_only=False)["matrices"][name])
    assert float((acc.delta() != 0).double().mean()) == pytest.approx(0.4, abs=1e-3)  # RECT's sparse committed ΔW

    import report_reproduce

    monkeypatch.setattr(report_reproduce, "COMPARISON", [("FT block", {
        ("ft", "none"): ("FT", "no restraint"), ("ft", "rect_online"): ("FT", "RECT online k=0.4"),
        ("ft", "rect_prune_online"): ("FT", "RECT + PRUNE online")})])
    monkeypatch.setattr(report_reproduce, "QUEUE_STEP", {"ft": 9})
    doc = tmp_path / "docs" / "results.md"
    driver("report", "--out", out, "--doc", doc)
    block = doc.read_text().split("### FT block", 1)[1].split("## Curves", 1)[0]
    for run, label in (("rect_online", "RECT online k=0.4"), ("rect_prune_online", "RECT + PRUNE online")):
        row = next(line for line in block.splitlines() if line.startswith(f"| FT | {label} | {n} |"))
        assert row.split(" | ")[-2] == f"{kappas[run]:.1f}"  # max κ(W), the driver's row
    assert "Not run yet: FT (no restraint): `bash benchmarks/reproduce_queue.sh 9`." in block
    assert (doc.parent / "figures" / "comparison_1.png").stat().st_size > 1000


def test_batch_stream_scores_each_request_and_a_subset_of_views(tmp_path, model_dir, driver):
    """--edit-batch 2: the immediate rows are each request of the batch scored after the batch is applied (one
    batched pass, checked against scoring each request alone); --views keeps only the named views."""
    from lit_prune.data.formats import load_requests
    from lit_prune.editors import FT, apply_updates
    from lit_prune.metrics.editing import request_case_values
    from lit_prune.models import load_model

    out = tmp_path / "out"
    driver("run", "--editor", "ft", "--model", model_dir, "--data", DEMO, "--eval-every", 4, "--ppl-every", 4,
           "--ppl-texts", 2, "--threads", 1, "--n", 4, "--edit-batch", 2, "--runs", "stream",
           "--views", "none", "deferred_e", "--out", out)
    rows = rows_of(out / "ft_stream.jsonl")
    assert {r["view"] for r in rows if r["view"] != "-"} == {"none", "deferred_e"}
    imm = {r["n"]: r["value"] for r in rows if r["metric"] == "immediate/efficacy_magnitude" and r["view"] == "none"}
    assert sorted(imm) == [1, 2, 3, 4]
    model, tok = load_model(str(model_dir))
    reqs, ed = load_requests(DEMO, n=4), FT()
    for b in (0, 2):
        apply_updates(model, ed.compute(model, tok, reqs[b : b + 2]))
        for j in (b, b + 1):
            alone = request_case_values(model, tok, [reqs[j]])["efficacy_magnitude"]
            assert imm[j + 1] == pytest.approx(float(alone[0]), abs=1e-5)
    with pytest.raises(SystemExit, match=r"--views: unknown view\(s\) \['deferred_2'\]"):
        driver("run", "--editor", "ft", "--model", model_dir, "--data", DEMO, "--n", 2, "--runs", "stream",
               "--views", "deferred_2", "--out", tmp_path / "other", "--threads", 1, "--ppl-texts", 2)


def test_views_with_the_same_weights_are_evaluated_once(tmp_path, model_dir, driver):
    """A deferred PRUNE view whose restraint is idle (σ_max(ΔW) ≤ τ: default FT on the tiny model) is the
    unrestrained model bit for bit: its rows are copied from ``none`` and marked; a view whose restraint acts (large
    FT updates) is evaluated on its own. The downstream pass reuses a pass on the same weights across runs."""
    out = tmp_path / "out"
    common = ["--editor", "ft", "--model", model_dir, "--data", DEMO, "--eval-every", 2, "--ppl-every", 2,
              "--ppl-texts", 2, "--threads", 1, "--n", 2, "--snapshot-at", 2]
    driver("run", *common, "--out", out)
    driver("run", *common, "--out", out, "--label", "big", "--editor-args", json.dumps(HP), "--runs", "stream")
    small, big = rows_of(out / "ft_stream.jsonl"), rows_of(out / "big_stream.jsonl")
    name = next(iter(torch.load(out / "ft_stream.pt", weights_only=False)["matrices"]))
    sig = f"spectrum/{name}/delta_sigma_max"
    tau = json.loads((out / "setup.json").read_text())["ft τ = σ_max(W₀)"][name]
    assert metrics(small, "none", 2)[sig] < tau < metrics(big, "none", 2)[sig]  # idle / acting, as the test assumes
    for n in (1, 2):
        copied = [r for r in small if r["n"] == n and r["view"] == "deferred_e"]
        assert copied and all(r["same_weights_as"] == "none" for r in copied)
        assert [(r["metric"], r["value"]) for r in copied] == [
            (r["metric"], r["value"]) for r in small if r["n"] == n and r["view"] == "none"]
        assert not any("same_weights_as" in r for r in big if r["n"] == n)
    # independent: the idle view's weights are W₀ + ΔW exactly, so its perplexity is the unrestrained one
    st = torch.load(out / "ft_stream.pt", weights_only=False)
    from lit_prune.restraint import AccumulatedUpdate

    acc = AccumulatedUpdate.from_state_dict(st["matrices"][name])
    keep = torch.empty_like(st["weights"][name])
    w = st["weights"][name].clone()
    res = acc.write_restrained(w, math.e, commit=False, keep=keep)
    assert (res is None or not res.changed) and torch.equal(w, st["weights"][name])

    # downstream: the online run of default FT never restrained anything, so it is the stream's model at N = 2
    ds = ["downstream", "--label", "ft", "--model", model_dir, "--at", "0,2", "--examples", 2, "--threads", 1,
          "--out", out]
    driver(*ds, "--runs", "stream")
    driver(*ds, "--runs", "online")
    down, onl = rows_of(out / "ft_stream_downstream.jsonl"), rows_of(out / "ft_online_downstream.jsonl")
    evaluated = [r for r in down if r["n"] == 2 and "same_weights_as" not in r]
    assert {r["view"] for r in evaluated} == {"none"}
    on2 = [r for r in onl if r["n"] == 2]
    assert on2 and all(r["same_weights_as"] == "ft/stream:none:2" for r in on2)
    assert [(r["metric"], r["value"]) for r in on2] == [(r["metric"], r["value"]) for r in evaluated]
    assert torch.equal(torch.load(out / "ft_online_n2.pt", weights_only=False)["weights"][name],
                       torch.load(out / "ft_stream_n2.pt", weights_only=False)["weights"][name])
    # N = 0 is the same unedited model for every label: another label's pass on the same examples is taken over
    driver("downstream", "--label", "big", "--model", model_dir, "--at", "0", "--examples", 2, "--threads", 1,
           "--out", out, "--runs", "stream", "--views", "none", "deferred_e")
    big0 = rows_of(out / "big_stream_downstream.jsonl")
    ft0 = [r for r in down if r["n"] == 0 and r["view"] == "none"]
    assert {r["view"] for r in big0} == {"none", "deferred_e"} and {r["run"] for r in big0} == {"big/stream"}
    assert sorted((r["metric"], r["value"]) for r in big0 if r["view"] == "none") == sorted(
        (r["metric"], r["value"]) for r in ft0)
    driver("downstream", "--label", "big3", "--model", model_dir, "--at", "0", "--examples", 3, "--threads", 1,
           "--out", out, "--runs", "stream", "--views", "none")  # other example counts: evaluated, not taken over
    assert {r["count"] for r in rows_of(out / "big3_stream_downstream.jsonl") if r["metric"] == "downstream/nli"} == {3}


def test_an_online_run_whose_prune_never_acts_is_derived_from_the_stream(tmp_path, model_dir, driver):
    """Default FT on the tiny model keeps σ_max(ΔW) < τ after every edit: the online run's rows are the stream's
    (marked), equal to a real online run's (``--no-derive-idle``), and its snapshots hold the same weights; with
    large updates (PRUNE acts) the online run is run."""
    common = ["--editor", "ft", "--model", model_dir, "--data", DEMO, "--eval-every", 2, "--ppl-every", 1,
              "--ppl-texts", 2, "--threads", 1, "--n", 3, "--snapshot-at", 2]
    real, fast = tmp_path / "real", tmp_path / "fast"
    driver("run", *common, "--out", real, "--no-derive-idle")
    driver("run", *common, "--out", fast)
    a, b = rows_of(real / "ft_online.jsonl"), rows_of(fast / "ft_online.jsonl")
    assert all(r["same_weights_as"] == "ft/stream:none" for r in b) and not any("same_weights_as" in r for r in a)
    key = lambda rs: sorted((r["view"], r["n"], r["metric"]) for r in rs if not r["metric"].startswith("time/"))
    assert key(a) == key(b) and {r["view"] for r in b} == {"online_e", "-"}
    va, vb = ({(r["n"], r["metric"]): r["value"] for r in rs if not r["metric"].startswith("time/")} for rs in (a, b))
    for k, v in va.items():  # the same model: equal scores; σ_max(ΔW) from the two runs' factors of the same ΔW
        assert vb[k] == (pytest.approx(v, rel=1e-5) if k[1].endswith("delta_sigma_max") else v), k
    assert "derived from ft/stream" in json.loads((fast / "setup.json").read_text())["ft online"]
    for f in ("ft_online_n2.pt", "ft_online.pt"):
        wa, wb = (torch.load(d / f, weights_only=False)["weights"] for d in (real, fast))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f
    # edited in other batches than the stream: not the same edits, so it is run
    for f in fast.glob("ft_online*"):
        f.unlink()
    driver("run", *common, "--out", fast, "--runs", "online", "--edit-batch", 3)
    assert not any("same_weights_as" in r for r in rows_of(fast / "ft_online.jsonl"))
    acting = tmp_path / "acting"
    driver("run", *common, "--out", acting, "--editor-args", json.dumps(HP))
    assert not any("same_weights_as" in r for r in rows_of(acting / "ft_online.jsonl"))


def test_snapshots_only_recreates_the_snapshots_checked_against_the_rows(tmp_path, model_dir, driver, capsys):
    """``run --snapshots-only`` (a fresh checkout has the rows, not the local snapshots): the snapshots of the
    finished runs again, bit for bit, with nothing else written; a different stream is refused before any snapshot."""
    out = tmp_path / "out"
    common = ["--editor", "ft", "--model", model_dir, "--data", DEMO, "--eval-every", 10, "--ppl-every", 10,
              "--ppl-texts", 2, "--downstream-n", 0, "--threads", 1, "--n", 3, "--out", out,
              "--editor-args", json.dumps(HP), "--snapshot-at", "2,3"]
    driver("run", *common)
    snaps = sorted(out.glob("ft_*_n*.pt"))
    assert [p.name for p in snaps] == ["ft_online_n2.pt", "ft_online_n3.pt", "ft_stream_n2.pt", "ft_stream_n3.pt"]
    before = {p.name: torch.load(p, weights_only=False) for p in snaps}
    others = {p.name: p.read_bytes() for p in out.iterdir() if p not in snaps}
    name = next(iter(before["ft_stream_n3.pt"]["matrices"]))
    assert before["ft_online_n3.pt"]["weights"][name].ne(before["ft_stream_n3.pt"]["weights"][name]).any()  # PRUNE acted
    for p in snaps:
        p.unlink()
    driver("run", *common, "--snapshots-only")
    assert "[ft/online] snapshot at N = 3 written" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("ft_*_n*.pt")) == sorted(before)
    for f, st in before.items():
        again = torch.load(out / f, weights_only=False)
        assert again["next"] == st["next"]
        assert torch.equal(again["weights"][name], st["weights"][name]), f
        for k, v in st["matrices"][name].items():
            assert torch.equal(again["matrices"][name][k], v) if torch.is_tensor(v) else again["matrices"][name][k] == v
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name not in before} == others  # rows, setup untouched

    for p in out.glob("ft_*_n*.pt"):
        p.unlink()
    with pytest.raises(SystemExit, match="ft's editor, constructor arguments or order differ from those in .*setup.json"):
        driver("run", *common, "--snapshots-only", "--order", "seed:1")  # not the recorded stream
    rows_file = out / "ft_stream.jsonl"  # rows that do not describe this stream after edit 2: refused there
    rows = rows_of(rows_file)
    for r in rows:
        if r["n"] == 2 and r["view"] == "none" and r["metric"] == f"spectrum/{name}/delta_sigma_max":
            r["value"] *= 1.05
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match=r"\[ft/stream\] --snapshots-only: after edit 2 .*σ_max\(ΔW\) of "
                                         + re.escape(name) + r" is .*, the rows recorded"):
        driver("run", *common, "--snapshots-only", "--runs", "stream")
    assert not list(out.glob("ft_*_n*.pt"))
    with pytest.raises(SystemExit, match="do not reach N = 5"):
        driver("run", *common, "--snapshots-only", "--snapshot-at", "5")
