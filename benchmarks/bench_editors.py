"""Speed of ROME / MEMIT on the embedded SmolLM2-135M on this machine, and how edit quality depends on the number
of texts behind the statistics C.

Part ``timing`` (about 6 min on 2 shared cores): median seconds per edit over CounterFact edits for ROME and MEMIT
(one request per call, statistics already cached), and the same ROME edits with the straightforward δ forward
(``fast=False``: whole model on the padded prompts at every step, logits over the full vocabulary at every position)
measured in the same run, on the first few edits.

Part ``mom2`` (about 7 min): one pass over the first N texts of wiki-offline, with C_n saved at N = 100, 300, 1000,
2000 (statistics throughput in tokens/s from the same pass), and a held-out C from texts at the back of the source.
The v* optimisation does not depend on C, so each edit's k*, v* are computed once and the rank-one update is then
built with each C_n. Reported per count: efficacy / paraphrase / neighbourhood rates after the edit, and the
disturbance of the layer on held-out text, tr(ΔW C_held ΔWᵀ) / tr(W C_held Wᵀ) (the mean squared change of the MLP
output relative to its mean squared size, the quantity C⁻¹ in u = C⁻¹k* is meant to keep small).

Writes benchmarks/results/editors.json (each part updates its own section) and editors.md.

    python benchmarks/bench_editors.py [--part timing|mom2|all]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_sweep import ROOT, counterfact, margins, summarise  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def part_timing(model, tok, n_edits: int, n_plain: int) -> dict:
    from lit_prune.editors import MEMIT, ROME

    cases = counterfact(n_edits, offset=100)
    out: dict = {"n_edits": n_edits, "n_plain": n_plain, "case_ids": [c["request"]["case_id"] for c in cases]}
    for name, cls in (("ROME", ROME), ("MEMIT", MEMIT)):
        ed = cls.for_model(model, tok, progress=False)
        ed.compute(model, tok, [cases[0]["request"]])  # warm-up: one-time fast-path check
        secs, steps = [], []
        for c in cases:
            t0 = time.perf_counter()
            ed.compute(model, tok, [c["request"]])
            secs.append(time.perf_counter() - t0)
            steps.append(ed.last_info[0]["steps"])
        out[name] = {"s_per_edit": secs, "median": statistics.median(secs), "steps": steps,
                     "hparams": {k: v for k, v in ed.hparams(model).items() if k != "context_template_lengths"}}
        print(name, out[name]["median"], secs, flush=True)
    # same ROME edits, fast vs plain, interleaved so that load changes hit both
    fast, plain = ROME(progress=False), ROME(fast=False, progress=False)
    rows = []
    for c in cases[:n_plain]:
        row = {}
        for label, ed in (("fast", fast), ("plain", plain)):
            t0 = time.perf_counter()
            ed.compute(model, tok, [c["request"]])
            row[label] = time.perf_counter() - t0
            row[f"{label}_steps"] = ed.last_info[0]["steps"]
            row[f"{label}_loss"] = ed.last_info[0]["losses"][-1]
        rows.append(row)
        print(row, flush=True)
    out["fast_vs_plain"] = rows
    return out


def part_mom2(model, tok, counts: list[int], n_edits: int, n_heldout: int) -> dict:
    from lit_prune.editors import ROME
    from lit_prune.editors.compute_u import compute_u
    from lit_prune.editors.weights import EditedMatrix
    from lit_prune.editors import apply_updates
    from lit_prune.models import load_texts
    from lit_prune.stats import collect_second_moments

    ed = ROME(progress=False)
    layer = ed.hparams(model)["layers"][0]
    mat = EditedMatrix(model, ed.arch(model).rewrite_module_tmp.format(layer))
    texts = load_texts("wiki-offline")
    # one pass, chunked at the counts
    Cs, total, count, seconds, prev = {}, None, 0, 0.0, 0
    for n in counts:
        t0 = time.perf_counter()
        st = collect_second_moments(model, tok, [mat.name], texts[prev:n], max_length=256, progress=False)[mat.name]
        seconds += time.perf_counter() - t0
        total = st.mom2 if total is None else total + st.mom2
        count += st.count
        Cs[n] = total / count
        prev = n
        print(f"C from {n} texts: {count} tokens, {count / seconds:.0f} tokens/s", flush=True)
    held = collect_second_moments(model, tok, [mat.name], texts[-n_heldout:], max_length=256, progress=False)[mat.name]
    C_held = held.moment()
    W = mat.W().double()
    base_energy = float(torch.trace(W @ C_held @ W.T))

    cases = counterfact(n_edits, offset=200)
    before = margins(model, tok, cases)
    ed.set_second_moment(model, layer, Cs[counts[-1]])
    per_count: dict[int, list] = {n: [] for n in counts}
    dist: dict[int, list] = {n: [] for n in counts}
    for c in cases:
        ed.compute(model, tok, [c["request"]])
        k, v = ed.last_info[0]["k_star"].double(), ed.last_info[0]["v_star"].double()
        resid = v - mat.value(k).double()
        for n in counts:
            u = compute_u(k, lambda x, n=n: torch.linalg.solve(Cs[n], x))
            up = mat.update(V=resid, K=u / (u @ k))
            D = up.dense().double()
            D = D if mat.stored_out_in else D.T
            dist[n].append(float(torch.trace(D @ C_held @ D.T)) / base_energy)
            apply_updates(model, {mat.param_name: up})
            try:
                per_count[n].append(margins(model, tok, [c]))
            finally:
                apply_updates(model, {mat.param_name: up}, sign=-1)
    rows = []
    for n in counts:
        s = summarise(before, torch.cat(per_count[n]))
        rows.append({"n_texts": n, **s, "disturbance": statistics.mean(dist[n]),
                     "disturbance_max": max(dist[n])})
        print(rows[-1], flush=True)
    return {"layer": layer, "tokens": count, "seconds": seconds, "tokens_per_s": count / seconds,
            "n_heldout": n_heldout, "n_edits": n_edits, "case_ids": [c["request"]["case_id"] for c in cases],
            "rows": rows}


def write_md(res: dict, path: Path) -> None:
    L = ["# Editing speed and statistics sample size (SmolLM2-135M, CPU)", ""]
    if "timing" in res:
        t = res["timing"]
        r, m = t["ROME"], t["MEMIT"]
        fp = t["fast_vs_plain"]
        fast_med = statistics.median([x["fast"] for x in fp])
        plain_med = statistics.median([x["plain"] for x in fp])
        L += [
            f"## Seconds per edit ({t['machine']}; `python benchmarks/bench_editors.py --part timing`)",
            "",
            f"CounterFact case ids {t['case_ids']}, one request per call, statistics cached, after one warm-up edit.",
            "",
            "| editor | layers | median s/edit | all (s) | optimisation steps |",
            "|---|---|---|---|---|",
            f"| ROME | {r['hparams']['layers']} | {r['median']:.1f} | {', '.join(f'{x:.1f}' for x in r['s_per_edit'])} | "
            f"{r['steps']} |",
            f"| MEMIT (batch of 1) | {m['hparams']['layers']} | {m['median']:.1f} | "
            f"{', '.join(f'{x:.1f}' for x in m['s_per_edit'])} | {m['steps']} |",
            "",
            f"Same run, ROME on the first {len(fp)} edits with the fast δ forward (prefix key/value cache, layers "
            "below the edited one skipped, LM head only at the scored positions) and with the straightforward one "
            "(`fast=False`: whole model on the padded prompts every step, full-vocabulary logits at every position), "
            "interleaved:",
            "",
            "| edit | fast (s) | plain (s) | speed-up | steps fast / plain | final loss fast / plain |",
            "|---|---|---|---|---|---|",
        ]
        for i, x in enumerate(fp):
            L.append(f"| {i} | {x['fast']:.1f} | {x['plain']:.1f} | {x['plain'] / x['fast']:.1f}× | "
                     f"{x['fast_steps']} / {x['plain_steps']} | {x['fast_loss']:.3f} / {x['plain_loss']:.3f} |")
        L += ["", f"Median: fast {fast_med:.1f} s, plain {plain_med:.1f} s per edit ({plain_med / fast_med:.1f}× "
                  "faster). Both give the same loss curve up to float rounding (tested in tests/test_editors.py). "
                  "The CPU is shared with other jobs, so absolute times drift between runs; the ratio is measured "
                  "on interleaved edits.", ""]
    if "mom2" in res:
        s = res["mom2"]
        L += [
            f"## Statistics sample size ({s['machine']}; `python benchmarks/bench_editors.py --part mom2`)",
            "",
            f"C of layer {s['layer']} (`down_proj` input, 1536-d) from the first N wiki-offline texts (≤ 256 tokens "
            f"each): {s['tokens']} tokens for the largest N in {s['seconds']:.0f} s, "
            f"**{s['tokens_per_s']:.0f} tokens/s** (forward stopped at the layer, one module).",
            f"ROME edits of {s['n_edits']} CounterFact cases (ids {s['case_ids']}), each on the unedited model, "
            "with the same k*, v* and u = C_N⁻¹k*. Disturbance = tr(ΔW C ΔWᵀ)/tr(W C Wᵀ) with C from "
            f"{s['n_heldout']} held-out texts (mean squared change of the MLP output on unrelated text, relative).",
            "",
            "| N texts | efficacy | paraphrase | neighbourhood | neigh. shift (nats) | disturbance mean | max |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in s["rows"]:
            L.append(f"| {r['n_texts']} | {r['efficacy']:.2f} | {r['paraphrase']:.2f} | {r['neighbourhood']:.2f} | "
                     f"{r['neighbourhood_shift']:.3f} | {r['disturbance']:.2e} | {r['disturbance_max']:.2e} |")
        L.append("")
    path.write_text("\n".join(L))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["timing", "mom2", "all"], default="all")
    ap.add_argument("--n-edits", type=int, default=5)
    ap.add_argument("--n-plain", type=int, default=2)
    ap.add_argument("--counts", type=int, nargs="+", default=[100, 300, 1000, 2000])
    ap.add_argument("--mom2-edits", type=int, default=8)
    ap.add_argument("--heldout", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids OpenMP spin-waits on a busy CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from lit_prune.models import load_model

    model, tok = load_model("smollm2-135m")
    out_json = RESULTS / "editors.json"
    res = json.loads(out_json.read_text()) if out_json.is_file() else {}
    if args.part in ("timing", "all"):
        res["timing"] = {**part_timing(model, tok, args.n_edits, args.n_plain), "machine": machine()}
    if args.part in ("mom2", "all"):
        res["mom2"] = {**part_mom2(model, tok, args.counts, args.mom2_edits, args.heldout), "machine": machine()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=1))
    write_md(res, RESULTS / "editors.md")
    print((RESULTS / "editors.md").read_text())


if __name__ == "__main__":
    main()
