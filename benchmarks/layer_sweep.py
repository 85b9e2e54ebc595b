"""Which layer(s) to edit in the embedded SmolLM2-135M: ROME over single layers, MEMIT over 5-layer windows.

Each CounterFact edit is applied to the UNEDITED model, scored, and removed again. Scores (CounterFact probability
comparison, spec §4): efficacy = P(new) > P(true) on the edit prompt, paraphrase = the same on the rephrased
prompt, neighbourhood = P(true) > P(new) on a prompt about another subject (locality; the unedited model's rate is
the ceiling), plus the mean change of log P(true) − log P(new) on the neighbourhood prompts (0 = untouched).
Writes benchmarks/results/layer_sweep.{md,json}. About 15 minutes on one busy CPU core (statistics cached).

    python benchmarks/layer_sweep.py [--n-edits 8] [--rome-layers 1 2 4 6 8] [--memit-windows 2-6 4-8]
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def data_file() -> Path:
    d = Path(os.environ.get("LIT_PRUNE_DATA", ROOT.parent / "shared" / "data"))
    return d / "counterfact" / "counterfact-edit.json"


def counterfact(n: int, offset: int = 0) -> list[dict]:
    """``n`` CounterFact records (EasyEdit format) with the edit request built from the full prompt."""
    from lit_prune.requests import template_from_prompt

    recs = json.loads(data_file().read_text())[offset: offset + n]
    out = []
    for r in recs:
        out.append({
            "request": {"prompt": template_from_prompt(r["prompt"], r["subject"]), "subject": r["subject"],
                        "target_new": r["target_new"], "target_true": r["ground_truth"], "case_id": r["case_id"]},
            "prompt": r["prompt"], "paraphrase": r["rephrase_prompt"], "neighbourhood": r["locality_prompt"],
        })
    return out


@torch.no_grad()
def margins(model, tok, cases: list[dict]) -> torch.Tensor:
    """(n, 3) NLL(true) − NLL(new) on the edit prompt, the paraphrase and the neighbourhood prompt (> 0: new wins)."""
    from lit_prune.metrics.scoring import answer_nll

    prompts, answers = [], []
    for c in cases:
        for key in ("prompt", "paraphrase", "neighbourhood"):
            prompts += [c[key]] * 2
            answers += [c["request"]["target_new"], c["request"]["target_true"]]
    nll = answer_nll(model, tok, prompts, answers).view(len(cases), 3, 2)
    return nll[..., 1] - nll[..., 0]


def summarise(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    """Rates from margins (n, 3) before and after each edit."""
    return {
        "efficacy": float((after[:, 0] > 0).float().mean()),
        "paraphrase": float((after[:, 1] > 0).float().mean()),
        "neighbourhood": float((after[:, 2] < 0).float().mean()),
        "neighbourhood_shift": float((after[:, 2] - before[:, 2]).abs().mean()),
        "efficacy_margin": float(after[:, 0].mean()),
        "paraphrase_margin": float(after[:, 1].mean()),
    }


@torch.no_grad()
def perplexity(model, tok, texts: list[str], max_length: int = 128) -> float:
    """Token-level perplexity of ``texts`` (each truncated to ``max_length`` tokens, one batch, padding masked)."""
    from lit_prune.editors.tokens import pad_right

    ids = [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    x, mask = pad_right(ids, tok.pad_token_id, next(model.parameters()).device)
    logits = model(input_ids=x, attention_mask=mask).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
    m = mask[:, 1:].float()
    return float(torch.exp((nll * m).sum() / m.sum()))


def edit_each(model, tok, editor, cases: list[dict], batch: bool = False, ppl_texts: list[str] | None = None):
    """Margins after editing each case alone on the unedited model (or all at once with ``batch``), seconds per
    edit, and the held-out perplexity ratio (after / before) of each edit."""
    from lit_prune.editors import apply_updates

    rows, secs, ppl = [], [], []
    base_ppl = perplexity(model, tok, ppl_texts) if ppl_texts else None
    groups = [cases] if batch else [[c] for c in cases]
    for g in groups:
        t0 = time.perf_counter()
        ups = editor.compute(model, tok, [c["request"] for c in g])
        secs.append((time.perf_counter() - t0) / len(g))
        apply_updates(model, ups)
        try:
            rows.append(margins(model, tok, g))
            if ppl_texts:
                ppl.append(perplexity(model, tok, ppl_texts) / base_ppl)
        finally:
            apply_updates(model, ups, sign=-1)
    return torch.cat(rows), secs, ppl


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
    sys.path.insert(0, str(ROOT))
    from lit_prune.editors import MEMIT, ROME
    from lit_prune.models import load_model

    model, tok = load_model("smollm2-135m")
    cases = counterfact(args.n_edits)
    before = margins(model, tok, cases)
    base = summarise(before, before)
    windows = [list(range(int(w.split("-")[0]), int(w.split("-")[1]) + 1)) for w in args.memit_windows]
    # statistics of every layer in one pass (cached for later runs)
    all_layers = sorted(set(args.rome_layers) | {x for w in windows for x in w})
    ROME(layers=all_layers, mom2_n_samples=args.mom2_n_samples).load_stats(model, tok)

    from lit_prune.models import load_texts

    ppl_texts = load_texts("wiki-offline")[-16:]  # held out: the statistics use texts from the front
    rows = []
    t_start = time.perf_counter()
    for layer in args.rome_layers:
        ed = ROME(layers=layer, mom2_n_samples=args.mom2_n_samples, progress=False)
        after, secs, ppl = edit_each(model, tok, ed, cases, ppl_texts=ppl_texts)
        rows.append({"method": "ROME", "layers": [layer], **summarise(before, after),
                     "ppl_ratio": statistics.mean(ppl), "ppl_ratio_max": max(ppl),
                     "s_per_edit": statistics.median(secs)})
        print(rows[-1], flush=True)
    for w in windows:
        ed = MEMIT(layers=w, mom2_n_samples=args.mom2_n_samples, progress=False)
        after, secs, ppl = edit_each(model, tok, ed, cases, batch=True, ppl_texts=ppl_texts)
        rows.append({"method": "MEMIT (batch)", "layers": w, **summarise(before, after),
                     "ppl_ratio": ppl[0], "ppl_ratio_max": ppl[0], "s_per_edit": statistics.median(secs)})
        print(rows[-1], flush=True)
    total = time.perf_counter() - t_start

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": "smollm2-135m", "n_edits": args.n_edits, "case_ids": [c["request"]["case_id"] for c in cases],
            "mom2_n_samples": args.mom2_n_samples, "unedited": base, "seconds": total,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                       f"torch {torch.__version__}, {torch.get_num_threads()} threads"}
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
