"""MEND on the embedded SmolLM2-135M: the training run, one MEND edit vs one ROME edit, and a short sequential run.

Reads the TensorBoard events of a training run of ``python -m lit_prune.mend_training --config
configs/mend_train_smollm2.yaml`` (steps, wall time, the validation curve), then with the exported hypernetwork:
- timing: median seconds of ``MEND.compute`` for one request over held-out records, and of ``ROME.compute`` on the
  same records (statistics already cached), in the same process;
- sequential: ``--n-seq`` held-out edits applied one after another with MEND; immediate efficacy (each edit right
  after it is applied), retention efficacy/generalization of all edits at the end, and neighbourhood locality
  before/after (CounterFact probability comparison, spec §4).

Writes benchmarks/results/mend.md and mend.json.

    OMP_NUM_THREADS=1 python benchmarks/bench_mend.py --run-dir lightning_logs/mend_smollm2/version_0
    python benchmarks/bench_mend.py --run-dir . --from-json     # rewrite mend.md from mend.json only
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import RESULTS, counterfact_file, machine

from lit_prune.editors.mend import MEND
from lit_prune.metrics.scoring import score_answers
from lit_prune.text import prefers as nll_prefers
from lit_prune.mend_training import MENDDataModule
from lit_prune.models import cache_dir, load_model

VAL_TAGS = ("val/edit_success", "val/paraphrase_success", "val/edit_acc", "val/locality_drawdown", "val/loc_kl",
            "val/edit_success_pre")


def read_run(run_dir: Path) -> dict:
    """Validation curve, steps and wall time of a training run from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    curve: dict[int, dict[str, float]] = {}
    for tag in VAL_TAGS:
        if tag in tags:
            for e in acc.Scalars(tag):
                curve.setdefault(e.step, {})[tag] = e.value
    train = acc.Scalars("train/loss") if "train/loss" in tags else []
    walls = [e.wall_time for t in tags for e in acc.Scalars(t)]
    lrs = {t.split("/", 1)[1]: acc.Scalars(t)[-1].value for t in tags if t.startswith("edit_lr/")}
    return {
        "run_dir": str(run_dir),
        "steps": max((e.step for e in train), default=0) + 1 if train else 0,
        "wall_s": (max(walls) - min(walls)) if walls else 0.0,
        "curve": {int(k): v for k, v in sorted(curve.items())},
        "final_edit_lrs": lrs,
        "config": (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else "",
    }


def prefers(model, tok, prompts: list[str], first: str, second: str) -> list[bool]:
    """Per prompt: NLL(first) < NLL(second) (:func:`lit_prune.metrics.scoring.score_answers`)."""
    n = len(prompts)
    nll = score_answers(model, tok, list(prompts) * 2, [first] * n + [second] * n).nll
    return nll_prefers(nll[:n], nll[n:]).bool().tolist()


def timing(model, tok, editor: MEND, examples, n_mend: int, n_rome: int) -> dict:
    reqs = [ex.request for ex in examples]
    editor.compute(model, tok, reqs[:1])  # warm-up
    mend = []
    for r in reqs[:n_mend]:
        t0 = time.perf_counter()
        editor.compute(model, tok, [r])
        mend.append(time.perf_counter() - t0)
    out = {"mend_s": mend, "mend_median_s": statistics.median(mend)}
    if n_rome:
        from lit_prune.editors import ROME

        rome = ROME.for_model(model, tok, progress=False)
        rome.compute(model, tok, reqs[:1])  # warm-up (statistics load, fast-path check)
        secs = []
        for r in reqs[:n_rome]:
            t0 = time.perf_counter()
            rome.compute(model, tok, [r])
            secs.append(time.perf_counter() - t0)
        out |= {"rome_s": secs, "rome_median_s": statistics.median(secs)}
    return out


def sequential(model, tok, editor: MEND, examples, n: int) -> dict:
    exs = examples[:n]
    w0 = {p: model.get_parameter(p).detach().clone() for p in editor.hypernet.params}
    nb_before = [prefers(model, tok, ex.request.neighborhood_prompts[:1], ex.request.target_true, ex.request.target_new)[0]
                 for ex in exs]
    immediate = []
    t0 = time.perf_counter()
    for ex in exs:
        r = ex.request
        editor.apply(model, tok, [r])
        immediate.append(prefers(model, tok, [r.full_prompt], r.target_new, r.target_true)[0])
    seconds = time.perf_counter() - t0
    eff = [prefers(model, tok, [ex.request.full_prompt], ex.request.target_new, ex.request.target_true)[0] for ex in exs]
    gen = [prefers(model, tok, ex.request.paraphrase_prompts[:1], ex.request.target_new, ex.request.target_true)[0]
           for ex in exs]
    nb_after = [prefers(model, tok, ex.request.neighborhood_prompts[:1], ex.request.target_true, ex.request.target_new)[0]
                for ex in exs]
    norms = {p: float(torch.linalg.matrix_norm(model.get_parameter(p) - w0[p], ord=2)) for p in w0}
    taus = {p: float(torch.linalg.matrix_norm(w.float(), ord=2)) for p, w in w0.items()}
    with torch.no_grad():
        for p, w in w0.items():
            model.get_parameter(p).copy_(w)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"n": n, "seconds": seconds, "immediate_efficacy": mean(immediate), "retention_efficacy": mean(eff),
            "retention_generalization": mean(gen), "locality_before": mean(nb_before), "locality_after": mean(nb_after),
            "delta_sigma_max": norms, "tau": taus}


def write_md(res: dict, path: Path) -> None:
    run, t, s = res["run"], res["timing"], res["sequential"]
    curve = run["curve"]
    best_step = max(curve, key=lambda k: curve[k].get("val/edit_success", -1)) if curve else None
    lines = [
        "# MEND on the embedded SmolLM2-135M-Instruct",
        "",
        f"Produced by `benchmarks/bench_mend.py` on {res['machine']}.",
        "",
        "## Training (`python -m lit_prune.mend_training --config configs/mend_train_smollm2.yaml`)",
        "",
        f"Run `{run['run_dir']}`: **{run['steps']} steps in {run['wall_s'] / 60:.1f} min** wall time (including the "
        f"validations), batch = 1 edit + 1 paraphrase + 1 locality text. Edited weights: "
        f"{', '.join(res['params'])}. Hypernetwork: {res['hypernet_params']:,} parameters "
        f"({res['hypernet_mb']:.1f} MB file).",
        "",
        f"Validation on {res['n_val']} held-out CounterFact records (one edit at a time on the unedited model; step 0 = "
        "the untrained, identity-initialised transform = a plain gradient step with the initial edit learning rate):",
        "",
        "| step | edit success | paraphrase success | edit token acc | locality drawdown | KL(pre‖post) on locality |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for step, m in curve.items():
        lines.append(f"| {step} | {m.get('val/edit_success', float('nan')):.2f} | "
                     f"{m.get('val/paraphrase_success', float('nan')):.2f} | {m.get('val/edit_acc', float('nan')):.2f} | "
                     f"{m.get('val/locality_drawdown', float('nan')):.2f} | {m.get('val/loc_kl', float('nan')):.3f} |")
    pre = next(iter(curve.values()), {}).get("val/edit_success_pre")
    if pre is not None:
        lines += ["", f"Before any edit the new object already beats the true one on {pre:.2f} of these prompts."]
    if best_step is not None:
        lines += ["", f"Best (exported) checkpoint: step {best_step}, validation edit success "
                  f"**{curve[best_step]['val/edit_success']:.2f}**."]
    lines += ["", "Final learned edit learning rates: "
              + ", ".join(f"`{k}` {v:.3g}" for k, v in run["final_edit_lrs"].items()), ""]
    lines += [
        "## One edit: MEND vs ROME (same process, same records)",
        "",
        f"MEND `compute` for one request: median **{t['mend_median_s']:.2f} s** over {len(t['mend_s'])} edits "
        "(one forward/backward of the fine-tuning loss + the transform).",
    ]
    if "rome_median_s" in t:
        lines.append(f"ROME `compute` (SmolLM2 preset, cached statistics): median **{t['rome_median_s']:.2f} s** over "
                     f"{len(t['rome_s'])} edits, i.e. MEND is {t['rome_median_s'] / t['mend_median_s']:.0f}× faster per edit "
                     "(MEND's cost moved into training).")
    else:
        lines.append("ROME was not timed in this run (see benchmarks/results/editors.md).")
    lines += [
        "",
        f"## {s['n']} sequential MEND edits (held-out records, never restored, no PRUNE)",
        "",
        f"- immediate efficacy (each edit right after it is applied): {s['immediate_efficacy']:.2f}",
        f"- retention after {s['n']} edits: efficacy {s['retention_efficacy']:.2f}, generalization "
        f"{s['retention_generalization']:.2f}",
        f"- neighbourhood locality (true object preferred): {s['locality_before']:.2f} before, "
        f"{s['locality_after']:.2f} after",
        f"- σ_max(ΔW) after {s['n']} edits (τ = σ_max(W₀), PRUNE's threshold): "
        + ", ".join(f"`{k}` {v:.1f} (τ {s['tau'][k]:.1f})" for k, v in s["delta_sigma_max"].items()),
        f"- {s['seconds'] / s['n']:.2f} s per edit including the efficacy check",
        "",
        "## Sequential MEND editing with train.py",
        "",
        "```yaml",
        "model:",
        "  model: smollm2-135m",
        "  editor:",
        "    class_path: lit_prune.editors.mend.MEND",
        "    init_args:",
        "      checkpoint: ~/.cache/lit_prune/mend/smollm2-135m.pt   # written by the training run (export_path)",
        "```",
        "",
        "Add `lit_prune.callbacks.PruneCallback` (e.g. `{mode: deferred}`) to `trainer.callbacks` for MEND + PRUNE.",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True, help="the training run's TensorBoard version folder")
    ap.add_argument("--checkpoint", default=str(cache_dir() / "mend" / "smollm2-135m.pt"))
    ap.add_argument("--data", default=str(counterfact_file("train")))
    ap.add_argument("--n-val", type=int, default=50, help="must match the training config (same split)")
    ap.add_argument("--n-mend", type=int, default=10)
    ap.add_argument("--n-rome", type=int, default=3)
    ap.add_argument("--n-seq", type=int, default=20)
    ap.add_argument("--from-json", action="store_true", help="only rewrite mend.md from the saved mend.json")
    args = ap.parse_args()
    if args.from_json:
        res = json.loads((RESULTS / "mend.json").read_text())
        res["run"]["curve"] = {int(k): v for k, v in res["run"]["curve"].items()}
        write_md(res, RESULTS / "mend.md")
        return

    run = read_run(Path(args.run_dir))
    model, tok = load_model("smollm2-135m")
    editor = MEND(args.checkpoint)
    examples = MENDDataModule(args.data, n_val=args.n_val, n_train=1, seed=0).val_examples
    res = {
        "machine": machine("(shared)"),
        "params": editor.hypernet.params,
        "hypernet_params": sum(p.numel() for p in editor.hypernet.parameters()),
        "hypernet_mb": Path(args.checkpoint).expanduser().stat().st_size / 2**20,
        "n_val": args.n_val,
        "run": run,
        "timing": timing(model, tok, editor, examples, args.n_mend, args.n_rome),
        "sequential": sequential(model, tok, editor, examples, args.n_seq),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mend.json").write_text(json.dumps({k: v for k, v in res.items() if k != "run"} |
                                                  {"run": {k: v for k, v in run.items() if k != "config"}}, indent=1))
    write_md(res, RESULTS / "mend.md")
    print((RESULTS / "mend.md").read_text())


if __name__ == "__main__":
    main()
