"""MEND training curves on CounterFact train: the validation curve of each run, side by side, and the decision.

Reads the TensorBoard events of training runs of ``python -m lit_prune.mend_training`` (``bench_mend.read_run``),
writes ``benchmarks/results/mend_training.{json,md,png}``. The bundled hypernetwork's run is taken from
``benchmarks/results/mend.json`` (its events are not kept). The goal (issue: "MEND trained further") is a
validation edit success >= 0.9 with a neighbourhood drawdown <= 0.2; a new hypernetwork replaces the bundled one
only if its best checkpoint is better on both measures.

    python benchmarks/report_mend_training.py --run "c_loc=1=/path/to/mend_a/version_0" --run "c_loc=5=/path/..."
    python benchmarks/report_mend_training.py --from-json        # rewrite the .md/.png from the .json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_mend import read_run
from common import RESULTS, machine

GOAL_SUCCESS, GOAL_DRAWDOWN = 0.9, 0.2


def best_step(curve: dict[int, dict[str, float]]) -> int:
    """The checkpoint the training exports: the best validation edit success (first one on ties), step > 0."""
    steps = [s for s in curve if s > 0 and "val/edit_success" in curve[s]] or list(curve)
    return max(steps, key=lambda s: (curve[s]["val/edit_success"], -s))


def collect(args: argparse.Namespace) -> dict:
    bundled = json.loads((RESULTS / "mend.json").read_text())["run"]
    runs = {"bundled (500 steps, c_loc=1)": {**bundled, "curve": {int(k): v for k, v in bundled["curve"].items()}}}
    for spec in args.run:
        label, _, path = spec.rpartition("=")
        runs[label] = read_run(Path(path))
    return {"machine": machine(), "runs": runs, "commands": args.command}


def write(res: dict) -> None:
    runs = res["runs"]
    lines = [
        "# MEND trained further on CounterFact train",
        "",
        f"Produced by `benchmarks/report_mend_training.py` from the runs' TensorBoard events; machine: {res['machine']}.",
        "",
        f"Goal: validation edit success ≥ {GOAL_SUCCESS} with neighbourhood drawdown ≤ {GOAL_DRAWDOWN} (50 held-out",
        "CounterFact records, one edit at a time on the unedited model; drawdown = share of neighbourhood prompts that",
        "preferred their own answer over the new object before the edit and no longer do after it).",
        "",
        "Commands:",
        "",
        *[f"    {c}" for c in res["commands"]],
        "",
        "| run | step | edit success | paraphrase success | locality drawdown | KL on locality |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, run in runs.items():
        for step, v in sorted(run["curve"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {label} | {int(step)} | {v.get('val/edit_success', float('nan')):.2f} | "
                         f"{v.get('val/paraphrase_success', float('nan')):.2f} | "
                         f"{v.get('val/locality_drawdown', float('nan')):.2f} | {v.get('val/loc_kl', float('nan')):.3f} |")
    lines += ["", "Best checkpoint of each run (by validation edit success, what the training exports):", "",
              "| run | steps trained | wall time | best step | edit success | locality drawdown | goal met |",
              "|---|---:|---:|---:|---:|---:|---|"]
    best = {}
    for label, run in runs.items():
        curve = {int(k): v for k, v in run["curve"].items()}
        s = best_step(curve)
        e, d = curve[s]["val/edit_success"], curve[s]["val/locality_drawdown"]
        best[label] = (e, d)
        ok = "yes" if e >= GOAL_SUCCESS and d <= GOAL_DRAWDOWN else "no"
        lines.append(f"| {label} | {run['steps']} | {run['wall_s'] / 60:.0f} min | {s} | {e:.2f} | {d:.2f} | {ok} |")
    (b_e, b_d), = [v for k, v in best.items() if k.startswith("bundled")]
    better = [k for k, (e, d) in best.items() if not k.startswith("bundled") and e > b_e and d < b_d]
    lines += ["", "Decision: " + (
        f"`{better[0]}` is better than the bundled hypernetwork on both measures and replaces it." if better else
        "no new run is better than the bundled hypernetwork on both measures, so the bundled one stays "
        "(`lit_prune/data/mend-smollm2-135m.pt`). Neither run reaches the goal: on CounterFact the neighbourhood "
        "prompts share the edited relation (and often the true object), and the transform that writes the edit "
        "also moves them; a larger locality weight lowers the drawdown only together with the edit success. "
        "`single_edit.md`'s MEND row is therefore the bundled hypernetwork's."), ""]
    (RESULTS / "mend_training.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for label, run in runs.items():
            curve = sorted((int(k), v) for k, v in run["curve"].items())
            xs = [s for s, _ in curve]
            axes[0].plot(xs, [v["val/edit_success"] for _, v in curve], marker="o", label=label)
            axes[1].plot(xs, [v["val/locality_drawdown"] for _, v in curve], marker="o", label=label)
        axes[0].axhline(GOAL_SUCCESS, ls="--", c="grey")
        axes[1].axhline(GOAL_DRAWDOWN, ls="--", c="grey")
        axes[0].set(title="validation edit success (higher is better)", xlabel="training step")
        axes[1].set(title="neighbourhood drawdown (lower is better)", xlabel="training step")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / "mend_training.png", dpi=110)
    except ImportError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", default=[], help="LABEL=RUN_DIR (a TensorBoard version folder)")
    ap.add_argument("--command", action="append", default=[], help="the training command of each run (recorded)")
    ap.add_argument("--from-json", action="store_true")
    args = ap.parse_args()
    path = RESULTS / "mend_training.json"
    if args.from_json:
        res = json.loads(path.read_text())
    else:
        res = collect(args)
        path.write_text(json.dumps(res, indent=1))
    write(res)
    print((RESULTS / "mend_training.md").read_text())


if __name__ == "__main__":
    main()
