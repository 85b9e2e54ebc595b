"""AlphaEdit's ``nullspace_threshold`` and ``L2`` for the embedded SmolLM2-135M, swept batch-sequentially.

Per setting, from the unedited model: the first ``--n`` CounterFact records (``counterfact-edit.json``) edited in
batches of ``--batch`` with the shipped ``AlphaEdit`` (``editor.compute`` + ``apply_updates``, MEMIT's layer and δ
presets), then all of them re-scored (``score_requests``: retention efficacy / generalization / locality) and
held-out perplexity (the last 20 bundled wiki summaries, ≤128 tokens); then the weights are put back. MEMIT with
its preset on the same stream is the reference row. Also reported: the dimension of the kept null space per layer
and σ_max(ΔW)/τ of the accumulated update. Rows are appended to ``benchmarks/results/alphaedit_sweep.jsonl`` as
each setting completes (a killed sweep resumes); the report is ``alphaedit_sweep.md``.

    OMP_NUM_THREADS=1 python benchmarks/bench_alphaedit.py [--n 20] [--batch 10] [--thresholds 5e-3 1e-2 2e-2 5e-2]
        [--l2 1 10 100] [--report]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "alphaedit_sweep.jsonl"
DATA = Path(os.environ.get("LIT_PRUNE_DATA", ROOT.parent / "shared" / "data"))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def run_setting(model, tok, requests, texts, editor, batch: int) -> dict:
    """Edit ``requests`` in batches with ``editor`` from the current weights, measure, put the weights back."""
    from lit_prune.editors import apply_updates
    from lit_prune.metrics.downstream import text_nll
    from lit_prune.metrics.editing import score_requests
    from lit_prune.restraint import sigma_max

    params = dict(model.named_parameters())
    names = editor.edited_parameters(model)
    W0 = {n: params[n].detach().clone() for n in names}
    t0 = time.perf_counter()
    try:
        for b in range(0, len(requests), batch):
            apply_updates(model, editor.compute(model, tok, requests[b : b + batch]))
        seconds = time.perf_counter() - t0
        scores = score_requests(model, tok, requests)
        with torch.no_grad():
            s, c = text_nll(model, tok, texts, max_length=128)
        ratio = {n: float(sigma_max(params[n].detach() - W0[n])) / float(sigma_max(W0[n])) for n in names}
    finally:
        with torch.no_grad():
            for n in names:
                params[n].copy_(W0[n])
    return {**scores, "perplexity": math.exp(s / c), "sigma_ratio": ratio, "seconds_per_edit": seconds / len(requests)}


def run(args) -> None:
    import lit_prune
    from lit_prune.data.formats import load_requests
    from lit_prune.editors import MEMIT, AlphaEdit
    from lit_prune.models import load_texts

    torch.set_num_threads(args.threads)
    model, tok = lit_prune.load_model("smollm2-135m")
    requests = load_requests(DATA / "counterfact" / "counterfact-edit.json", n=args.n)
    all_texts = load_texts("wiki-offline")
    texts = all_texts[len(all_texts) - 20:]
    done = {(r["editor"], r.get("nullspace_threshold"), r.get("L2")) for r in read_rows(args.out)}
    settings = [("memit", None, None)] + [("alphaedit", t, l2) for t in args.thresholds for l2 in args.l2]
    for kind, thr, l2 in settings:
        if (kind, thr, l2) in done:
            continue
        editor = MEMIT.for_model(model, tok, progress=False) if kind == "memit" else AlphaEdit.for_model(
            model, tok, nullspace_threshold=thr, L2=l2, progress=False)
        row = {"editor": kind, "nullspace_threshold": thr, "L2": l2, "n": args.n, "batch": args.batch}
        if kind == "alphaedit":
            row["null_dims"] = {m: int(editor.projector_basis(model, tok, m).shape[1]) for m in editor.modules(model)}
        row.update(run_setting(model, tok, requests, texts, editor, args.batch))
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k not in ("sigma_ratio", "null_dims")}), flush=True)
    report(args)


def report(args) -> None:
    rows = read_rows(args.out)
    if not rows:
        raise SystemExit(f"no rows in {args.out}")
    lines = [
        "# AlphaEdit's null-space threshold and L2 on the embedded SmolLM2-135M",
        "",
        f"`benchmarks/bench_alphaedit.py`: the first {rows[0]['n']} CounterFact records edited batch-sequentially "
        f"(batches of {rows[0]['batch']}) from the unedited model, then all re-scored (retention, ×100) and held-out "
        "perplexity (20 last bundled wiki summaries, ≤128 tokens); MEMIT with its preset as the reference. "
        "Null dims: directions of C₀ with eigenvalue below the threshold, per edited layer (of 1,536). σ/τ: "
        "σ_max(ΔW)/σ_max(W₀) of the accumulated update, largest over the layers.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, 1 torch thread; seconds are "
        "wall-clock and noisy.",
        "",
        "| editor | threshold | L2 | null dims | efficacy | generalization | locality | perplexity | max σ/τ | s/edit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dims = "–" if "null_dims" not in r else f"{min(r['null_dims'].values())}–{max(r['null_dims'].values())}"
        lines.append(
            f"| {r['editor']} | {r['nullspace_threshold'] if r['nullspace_threshold'] is not None else '–'} | "
            f"{r['L2'] if r['L2'] is not None else '–'} | {dims} | {100 * r['efficacy']:.1f} | "
            f"{100 * r['generalization']:.1f} | {100 * r['locality']:.1f} | {r['perplexity']:.2f} | "
            f"{max(r['sigma_ratio'].values()):.3f} | {r['seconds_per_edit']:.1f} |")
    lines += ["", "Choice: the presets stay the reference's (threshold 2e-2, L2 = 10): on this model they edit as well as "
              "MEMIT (95/85/60, perplexity within 0.01) while keeping 1,070–1,383 of 1,536 key directions untouched; "
              "L2 = 100 under-writes (65 and below), threshold 5e-3 leaves too small a null space (35 at L2 = 10), and "
              "20 edits (one paraphrase and one neighbourhood prompt each: one record = 5 points) cannot separate "
              "L2 = 1 from 10 or 2e-2 from 5e-2. The comparison that matters for AlphaEdit, long batch-sequential "
              "streams, is the reproduction's batch block."]
    path = args.out.with_suffix(".md")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[5e-3, 1e-2, 2e-2, 5e-2])
    ap.add_argument("--l2", type=float, nargs="+", default=[1.0, 10.0, 100.0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    report(args) if args.report else run(args)


if __name__ == "__main__":
    main()
