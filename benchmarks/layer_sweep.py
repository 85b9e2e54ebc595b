"""Which layer(s) to edit in the embedded SmolLM2-135M: ROME over single layers, MEMIT over 5-layer windows.

Each CounterFact edit is applied to the UNEDITED model, scored, and removed again, all with the library's functions
(``load_requests``, ``editor.compute``, ``apply_updates``, ``request_case_values``, ``text_nll``). Scores
(CounterFact probability comparison, spec §4): efficacy = P(new) > P(true) on the edit prompt, paraphrase = the
same on the rephrased prompt, neighbourhood = P(true) > P(new) on a prompt about another subject (locality; the
unedited model's rate is the ceiling), plus the mean change of log P(true) − log P(new) on the neighbourhood prompts
(0 = untouched).
Writes benchmarks/results/layer_sweep.{md,json}. About 15 minutes on one busy CPU core (statistics cached).

    python benchmarks/layer_sweep.py [--n-edits 8] [--rome-layers 1 2 4 6 8] [--memit-windows 2-6 4-8]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from common import RESULTS, counterfact, machine, margins, summarise

from lit_prune.editors import MEMIT, ROME, apply_updates
from lit_prune.metrics.downstream import text_nll
from lit_prune.metrics.editing import request_case_values
from lit_prune.models import load_model, load_texts


def perplexity(model, tok, texts: list[str], max_length: int = 128) -> float:
    """Token-level perplexity of ``texts``, each cut to ``max_length`` tokens (:func:`text_nll`)."""
    s, n = text_nll(model, tok, texts, max_length=max_length)
    return math.exp(s / n)


def edit_each(model, tok, editor, cases: list, batch: bool = False, ppl_texts: list[str] | None = None):
    """Edit each case alone on the unedited model (or all at once with ``batch``): ``editor.compute``, applied,
    scored, removed again (``apply_updates(sign=-1)``). Returns the per-case values of
    :func:`request_case_values` after the edits, the :func:`margins` after them, the seconds per edit, and the
    held-out perplexity ratio (after / before) of each edit."""
    vals: dict[str, list[torch.Tensor]] = {}
    rows, secs, ppl = [], [], []
    base_ppl = perplexity(model, tok, ppl_texts) if ppl_texts else None
    groups = [cases] if batch else [[c] for c in cases]
    for g in groups:
        t0 = time.perf_counter()
        ups = editor.compute(model, tok, g)
        secs.append((time.perf_counter() - t0) / len(g))
        apply_updates(model, ups)
        try:
            for k, v in request_case_values(model, tok, g).items():
                vals.setdefault(k, []).append(v)
            rows.append(margins(model, tok, g))
            if ppl_texts:
                ppl.append(perplexity(model, tok, ppl_texts) / base_ppl)
        finally:
            apply_updates(model, ups, sign=-1)
    return {k: torch.cat(v) for k, v in vals.items()}, torch.cat(rows), secs, ppl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-edits", type=int, default=8)
    ap.add_argument("--rome-layers", type=int, nargs="+", default=[1, 2, 4, 6, 8])
    ap.add_argument("--memit-windows", type=str, nargs="+", default=["2-6", "4-8"])
    ap.add_argument("--mom2-n-samples", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=RESULTS / "layer_sweep")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids OpenMP spin-waits on a busy CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_model("smollm2-135m")
    cases = counterfact(args.n_edits)
    before = margins(model, tok, cases)
    base = summarise(request_case_values(model, tok, cases), before, before)
    windows = [list(range(int(w.split("-")[0]), int(w.split("-")[1]) + 1)) for w in args.memit_windows]
    # statistics of every layer in one pass (cached for later runs)
    all_layers = sorted(set(args.rome_layers) | {x for w in windows for x in w})
    ROME(layers=all_layers, mom2_n_samples=args.mom2_n_samples).load_stats(model, tok)

    ppl_texts = load_texts("wiki-offline")[-16:]  # held out: the statistics use texts from the front
    rows = []
    t_start = time.perf_counter()
    for layer in args.rome_layers:
        ed = ROME(layers=layer, mom2_n_samples=args.mom2_n_samples, progress=False)
        vals, after, secs, ppl = edit_each(model, tok, ed, cases, ppl_texts=ppl_texts)
        rows.append({"method": "ROME", "layers": [layer], **summarise(vals, before, after),
                     "ppl_ratio": statistics.mean(ppl), "ppl_ratio_max": max(ppl),
                     "s_per_edit": statistics.median(secs)})
        print(rows[-1], flush=True)
    for w in windows:
        ed = MEMIT(layers=w, mom2_n_samples=args.mom2_n_samples, progress=False)
        vals, after, secs, ppl = edit_each(model, tok, ed, cases, batch=True, ppl_texts=ppl_texts)
        rows.append({"method": "MEMIT (batch)", "layers": w, **summarise(vals, before, after),
                     "ppl_ratio": ppl[0], "ppl_ratio_max": ppl[0], "s_per_edit": statistics.median(secs)})
        print(rows[-1], flush=True)
    total = time.perf_counter() - t_start

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": "smollm2-135m", "n_edits": args.n_edits, "case_ids": [c.case_id for c in cases],
            "mom2_n_samples": args.mom2_n_samples, "unedited": base, "seconds": total, "machine": machine()}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Layer sweep on SmolLM2-135M (ROME single layers, MEMIT 5-layer windows)",
        "",
        f"Produced by `python benchmarks/layer_sweep.py` ({meta['machine']}; {total / 60:.1f} min).",
        f"{args.n_edits} CounterFact edits (case ids {meta['case_ids']}), each applied alone to the unedited model "
        f"(MEMIT: the {args.n_edits} as one batch), scored, removed. C from {args.mom2_n_samples} wiki-offline texts.",
        "Rates: efficacy / paraphrase = P(new) > P(true) on the edit / rephrased prompt; neighbourhood = "
        "P(true) > P(new) on another subject's prompt; shift = mean |change| of log P(true) − log P(new) there "
        "(nats); margins = mean log P(new) − log P(true) (nats); ppl = perplexity of 16 held-out wiki-offline texts "
        "after / before the edit (mean and worst over edits; MEMIT: after the whole batch).",
        "",
        "| method | layers | efficacy | paraphrase | neighbourhood | neigh. shift | eff. margin | para. margin | "
        "ppl ratio (max) | s/edit |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| unedited | – | {base['efficacy']:.2f} | {base['paraphrase']:.2f} | {base['neighbourhood']:.2f} | 0 | "
        f"{base['efficacy_margin']:.2f} | {base['paraphrase_margin']:.2f} | 1 | – |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {','.join(map(str, r['layers']))} | {r['efficacy']:.2f} | {r['paraphrase']:.2f} | "
            f"{r['neighbourhood']:.2f} | {r['neighbourhood_shift']:.3f} | {r['efficacy_margin']:.2f} | "
            f"{r['paraphrase_margin']:.2f} | {r['ppl_ratio']:.4f} ({r['ppl_ratio_max']:.4f}) | {r['s_per_edit']:.1f} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
