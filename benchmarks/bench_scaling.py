"""Seconds per edit vs batch size for MEMIT on the embedded SmolLM2-135M (preset hyper-parameters, cached
statistics), with the batch's z optimised one request at a time (``batch_z=False``, the behaviour before batched z)
and together (``batch_z=True``, the default).

Rows: batch size 1 (``editor.compute`` on one request, each of the first ``--singles`` records), batch size ``--batch``
(one ``compute`` on the first ``--batch`` records) with ``batch_z`` False and True. Every compute runs on the
unedited model. Besides the time, the batched and per-request z of the batch are compared (max abs/rel difference).
Writes ``benchmarks/results/scaling.md``.

    OMP_NUM_THREADS=1 python benchmarks/bench_scaling.py [--batch 10] [--singles 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


def counterfact(n: int):
    from lit_prune.data.formats import load_requests

    d = Path(os.environ.get("LIT_PRUNE_DATA", ROOT.parent / "shared" / "data")).expanduser()
    return load_requests(d / "counterfact" / "counterfact-edit.json", n=n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--singles", type=int, default=3, help="records timed at batch size 1")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lit_prune.editors import MEMIT
    from lit_prune.models import load_model

    model, tok = load_model("smollm2-135m")
    reqs = counterfact(max(args.batch, args.singles))
    rows = []

    def timed(editor, batch):
        t0 = time.perf_counter()
        editor.compute(model, tok, batch)
        return time.perf_counter() - t0

    per = MEMIT.for_model(model, tok, progress=False, batch_z=False)
    bat = MEMIT.for_model(model, tok, progress=False, batch_z=True)
    timed(per, reqs[:1])  # warm-up: fast-path check, templates
    timed(bat, reqs[:1])
    singles = [timed(per, [r]) for r in reqs[: args.singles]]
    rows.append({"batch_size": 1, "batch_z": "-", "seconds": sum(singles), "edits": len(singles)})
    batch = reqs[: args.batch]
    s_per = timed(per, batch)
    z_per = torch.stack([i["z"] for i in per.last_info], 1)
    steps_per = [i["steps"] for i in per.last_info]
    rows.append({"batch_size": len(batch), "batch_z": False, "seconds": s_per, "edits": len(batch)})
    s_bat = timed(bat, batch)
    z_bat = torch.stack([i["z"] for i in bat.last_info], 1)
    steps_bat = [i["steps"] for i in bat.last_info]
    rows.append({"batch_size": len(batch), "batch_z": True, "seconds": s_bat, "edits": len(batch)})
    d = (z_bat - z_per).abs().max()
    check = {"max_abs": float(d), "max_rel": float(d / z_per.abs().max()), "steps_per_request": steps_per,
             "steps_batched": steps_bat}

    mach = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs SHARED with other running jobs, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [
        "# MEMIT: seconds per edit vs batch size (embedded SmolLM2-135M, preset hyper-parameters)",
        "",
        f"Measured on a shared machine ({mach}): other jobs ran at the same time, so the absolute numbers are noisy;",
        "the ratio between rows measured minutes apart is the useful part. Produced by `benchmarks/bench_scaling.py`.",
        "Each row is `editor.compute` on the unedited model (z optimisation + keys + closed-form solve); batch size 1 is",
        f"the mean over {args.singles} records, the batches are the first {len(batch)} CounterFact edit records.",
        "",
        "| batch size | z optimisation | seconds / edit | seconds (total) |",
        "|---:|---|---:|---:|",
    ]
    for r in rows:
        how = {"-": "one request", False: "one request at a time (`batch_z=False`)",
               True: "batched (`batch_z=True`)"}[r["batch_z"]]
        lines.append(f"| {r['batch_size']} | {how} | {r['seconds'] / r['edits']:.2f} | {r['seconds']:.1f} |")
    lines += [
        "",
        f"Batched vs per-request z of the batch: max abs difference {check['max_abs']:.2e}, relative to max |z| "
        f"{check['max_rel']:.2e}; optimisation steps per request {steps_per} (per request) vs {steps_bat} (batched).",
        "",
    ]
    (RESULTS / "scaling.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
