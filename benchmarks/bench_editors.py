"""Speed of ROME / MEMIT on the embedded SmolLM2-135M on this machine, and how edit quality depends on the number
of texts behind the statistics C.

Part ``timing`` (about 6 min on 2 cores): ROME and MEMIT edit the first 10 CounterFact records sequentially, as in
the EasyEdit figures of the developers' guide (:data:`EASYEDIT`): seconds per edit (statistics already cached) and
the retention scores after the 10 edits; then the same ROME edits with the straightforward δ forward
(``fast=False``: whole model on the padded prompts at every step, logits over the full vocabulary at every position)
measured in the same run, on the first few edits.

Part ``stats`` (about 2 min): seconds to collect C for ROME's layer and for MEMIT's layers (one pass) on the first
1,000 texts, against EasyEdit's 78 s per layer.

Part ``mom2`` (about 8 min): one pass over the first N texts of wiki-offline, with C_n saved at N = 100, 300, 1000,
3000 (the preset) (statistics throughput in tokens/s from the same pass), and a held-out C from texts at the back of the source.
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
import statistics
import time
from pathlib import Path

import torch
from common import RESULTS, counterfact, counterfact_file, machine, margins, summarise


# EasyEdit on this machine (2 cores), embedded model, first 10 CounterFact edits, sequential (developers' guide):
EASYEDIT = {
    "ROME": {"s_per_edit": 27.0, "setting": "layer 4, 21 context templates, <= 25 steps",
             "efficacy": 1.0, "generalization": 1.0, "locality": 0.7},
    "MEMIT": {"s_per_edit": 13.0, "setting": "layers 4-8", "efficacy": 0.7},
    "stats_s_per_layer_per_1000_texts": 78.0,
}


def part_timing(model, tok, n_edits: int, n_plain: int) -> dict:
    """Sequential editing of the first ``n_edits`` CounterFact records (each edit applied before the next is
    computed), timed per edit; then the retention scores of all of them, as EasyEdit's sequential evaluation."""
    from lit_prune.data.formats import load_requests
    from lit_prune.editors import MEMIT, ROME, apply_updates
    from lit_prune.metrics.editing import score_requests

    reqs = load_requests(counterfact_file("edit"), n=n_edits)
    out: dict = {"n_edits": n_edits, "n_plain": n_plain, "case_ids": [r.case_id for r in reqs]}
    for name, cls in (("ROME", ROME), ("MEMIT", MEMIT)):
        ed = cls.for_model(model, tok, progress=False)
        ed.prepare(model, tok)  # statistics loaded (cached on disk) outside the timed edits
        names = ed.edited_parameters(model)
        W0 = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
        secs, steps, immediate = [], [], []
        for r in reqs:
            t0 = time.perf_counter()
            ups = ed.compute(model, tok, [r])
            secs.append(time.perf_counter() - t0)
            apply_updates(model, ups)
            steps.append(ed.last_info[0]["steps"] if getattr(ed, "last_info", None) else None)
            immediate.append(score_requests(model, tok, [r]))
        retention = score_requests(model, tok, reqs)
        with torch.no_grad():  # back to the unedited model
            for n, p in model.named_parameters():
                if n in W0:
                    p.copy_(W0[n])
        out[name] = {"s_per_edit": secs, "median": statistics.median(secs), "mean": statistics.mean(secs),
                     "steps": steps, "retention": retention,
                     "immediate": {k: statistics.mean(d[k] for d in immediate) for k in immediate[0]},
                     "hparams": {k: v for k, v in ed.hparams(model).items() if k != "context_template_lengths"}}
        print(name, out[name]["median"], secs, retention, flush=True)
    # the same ROME edits (each on the unedited model), fast vs plain δ forward, interleaved
    fast, plain = ROME(progress=False), ROME(fast=False, progress=False)
    rows = []
    for r in reqs[:n_plain]:
        row = {}
        for label, ed in (("fast", fast), ("plain", plain)):
            t0 = time.perf_counter()
            ed.compute(model, tok, [r])
            row[label] = time.perf_counter() - t0
            row[f"{label}_steps"] = ed.last_info[0]["steps"]
            row[f"{label}_loss"] = ed.last_info[0]["losses"][-1]
        rows.append(row)
        print(row, flush=True)
    out["fast_vs_plain"] = rows
    return out


def part_stats(model, tok, n_texts: int) -> dict:
    """Seconds to collect C on the first ``n_texts`` wiki-offline texts: ROME's one layer, and MEMIT's layers in one
    pass (the forward stops after the last of them)."""
    from lit_prune.editors import MEMIT, ROME
    from lit_prune.models import load_texts
    from lit_prune.stats import collect_second_moments

    texts = load_texts("wiki-offline")[:n_texts]
    out: dict = {"n_texts": n_texts}
    for name, cls in (("ROME", ROME), ("MEMIT", MEMIT)):
        ed = cls(progress=False)
        mods = ed.modules(model)
        t0 = time.perf_counter()
        st = collect_second_moments(model, tok, mods, texts, max_length=256, progress=False)
        sec = time.perf_counter() - t0
        tokens = next(iter(st.values())).count
        out[name] = {"modules": mods, "seconds": sec, "tokens": tokens, "tokens_per_s": tokens / sec,
                     "s_per_layer_per_1000_texts": sec / len(mods) * 1000 / n_texts}
        print(name, out[name], flush=True)
    return out


def part_mom2(model, tok, counts: list[int], n_edits: int, n_heldout: int) -> dict:
    from lit_prune.editors import ROME, apply_updates
    from lit_prune.editors.compute_u import compute_u
    from lit_prune.editors.weights import EditedMatrix
    from lit_prune.metrics.editing import request_case_values
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
    values: dict[int, dict[str, list]] = {n: {} for n in counts}
    dist: dict[int, list] = {n: [] for n in counts}
    for c in cases:
        ed.compute(model, tok, [c])
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
                for k, v in request_case_values(model, tok, [c]).items():
                    values[n].setdefault(k, []).append(v)
            finally:
                apply_updates(model, {mat.param_name: up}, sign=-1)
    rows = []
    for n in counts:
        s = summarise({k: torch.cat(v) for k, v in values[n].items()}, before, torch.cat(per_count[n]))
        rows.append({"n_texts": n, **s, "disturbance": statistics.mean(dist[n]),
                     "disturbance_max": max(dist[n])})
        print(rows[-1], flush=True)
    return {"layer": layer, "tokens": count, "seconds": seconds, "tokens_per_s": count / seconds,
            "n_heldout": n_heldout, "n_edits": n_edits, "case_ids": [c.case_id for c in cases],
            "rows": rows}


def write_md(res: dict, path: Path) -> None:
    L = ["# Editing speed and statistics sample size (SmolLM2-135M, CPU)", ""]
    if "timing" in res:
        t = res["timing"]
        fp = t["fast_vs_plain"]
        fast_med = statistics.median([x["fast"] for x in fp])
        plain_med = statistics.median([x["plain"] for x in fp])
        pct = lambda v: f"{round(v * t['n_edits'])}/{t['n_edits']}"  # noqa: E731
        L += [
            f"## Sequential editing vs EasyEdit ({t['machine']}; `python benchmarks/bench_editors.py --part timing`)",
            "",
            f"The first {t['n_edits']} CounterFact edits of counterfact-edit.json (case ids {t['case_ids']}), one "
            "request per call, each edit applied before the next is computed (sequential), statistics loaded from "
            "the disk cache before the timed edits. Scores after all edits (retention, the sequential protocol): "
            "efficacy = new object beats the true one on the edit prompt, paraphrase = on the rephrased prompt, "
            "locality = the true object still beats the new one on the neighbourhood prompt.",
            "",
            "| editor | setting | s/edit (median) | vs EasyEdit | efficacy | paraphrase | locality |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in ("ROME", "MEMIT"):
            r, e = t[name], EASYEDIT[name]
            ret = r["retention"]
            L.append(f"| {name} (lit_prune) | layers {r['hparams']['layers']}, {r['hparams'].get('v_num_grad_steps')} "
                     f"steps, 11 context templates | {r['median']:.1f} | {e['s_per_edit'] / r['median']:.1f}× faster | "
                     f"{pct(ret['efficacy'])} | {pct(ret['generalization'])} | {pct(ret['locality'])} |")
            L.append(f"| {name} (EasyEdit) | {e['setting']} | {e['s_per_edit']:.0f} | – | "
                     + " | ".join(pct(e[k]) if k in e else "–" for k in ("efficacy", "generalization", "locality"))
                     + " |")
        L += ["", "Per-edit seconds: " + "; ".join(
            f"{n}: {', '.join(f'{x:.1f}' for x in t[n]['s_per_edit'])} (steps {t[n]['steps']})" for n in ("ROME", "MEMIT")),
              "",
              f"Same run, ROME on the first {len(fp)} edits (each on the unedited model) with the fast δ forward "
              "(prefix key/value cache, layers below the edited one skipped, LM head only at the scored positions) "
              "and with the straightforward one (`fast=False`: whole model on the padded prompts every step, "
              "full-vocabulary logits at every position), interleaved:",
              "",
              "| edit | fast (s) | plain (s) | speed-up | steps fast / plain | final loss fast / plain |",
              "|---|---|---|---|---|---|"]
        for i, x in enumerate(fp):
            L.append(f"| {i} | {x['fast']:.1f} | {x['plain']:.1f} | {x['plain'] / x['fast']:.1f}× | "
                     f"{x['fast_steps']} / {x['plain_steps']} | {x['fast_loss']:.3f} / {x['plain_loss']:.3f} |")
        L += ["", f"Median: fast {fast_med:.1f} s, plain {plain_med:.1f} s per edit ({plain_med / fast_med:.1f}× "
                  "faster). Both give the same loss curve up to float rounding (tested in tests/test_editors.py).", ""]
    if "stats" in res:
        st = res["stats"]
        L += [f"## Statistics throughput ({st['machine']}; `python benchmarks/bench_editors.py --part stats`)", "",
              f"Second moments C of the first {st['n_texts']} wiki-offline texts (≤ 256 tokens each), the forward "
              "stopped after the last module needed:", "",
              "| editor | modules | tokens | seconds | tokens/s | s per layer per 1,000 texts | EasyEdit |",
              "|---|---|---|---|---|---|---|"]
        for name in ("ROME", "MEMIT"):
            r = st[name]
            L.append(f"| {name} | {len(r['modules'])} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"**{r['s_per_layer_per_1000_texts']:.0f}** | {EASYEDIT['stats_s_per_layer_per_1000_texts']:.0f} |")
        L.append("")
    if "mom2" in res:
        s = res["mom2"]
        L += [
            f"## Statistics sample size ({s['machine']}; `python benchmarks/bench_editors.py --part mom2`)",
            "",
            f"C of layer {s['layer']} (`down_proj` input, 1536-d) from the first N wiki-offline texts (≤ 256 tokens "
            f"each): {s['tokens']} tokens for the largest N in {s['seconds']:.0f} s, "
            f"{s['tokens_per_s']:.0f} tokens/s in this run (throughput on a quiet machine: the section above).",
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
    ap.add_argument("--part", choices=["timing", "stats", "mom2", "all"], default="all")
    ap.add_argument("--stats-texts", type=int, default=1000)
    ap.add_argument("--n-edits", type=int, default=10)
    ap.add_argument("--n-plain", type=int, default=2)
    ap.add_argument("--counts", type=int, nargs="+", default=[100, 300, 1000, 3000])
    ap.add_argument("--mom2-edits", type=int, default=8)
    ap.add_argument("--heldout", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (EasyEdit's figures used the 2 cores)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lit_prune.models import load_model

    model, tok = load_model("smollm2-135m")
    out_json = RESULTS / "editors.json"
    res = json.loads(out_json.read_text()) if out_json.is_file() else {}
    if args.part in ("timing", "all"):
        res["timing"] = {**part_timing(model, tok, args.n_edits, args.n_plain), "machine": machine()}
    if args.part in ("stats", "all"):
        res["stats"] = {**part_stats(model, tok, args.stats_texts), "machine": machine()}
    if args.part in ("mom2", "all"):
        res["mom2"] = {**part_mom2(model, tok, args.counts, args.mom2_edits, args.heldout), "machine": machine()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=1))
    write_md(res, RESULTS / "editors.md")
    print((RESULTS / "editors.md").read_text())


if __name__ == "__main__":
    main()
