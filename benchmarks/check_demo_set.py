"""Does the embedded model know the facts of the bundled demo edit set?

For every record, the length-normalised answer NLL ``-mean log p(" " + target tokens | prompt)`` of the true and the
new object is computed on the edit prompt, on each paraphrase and on each neighbourhood prompt. A prompt "prefers the
true object" when ``NLL(true) < NLL(new)``. Before any edit, a good demo set has the true object preferred almost
everywhere: that is what an edit must overturn (edit prompt, paraphrases) or keep (neighbourhood prompts).

    python benchmarks/check_demo_set.py [--path demo] [--model smollm2-135m] [--out benchmarks/results/demo_set.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lit_prune.data.formats import load_requests
from lit_prune.metrics.scoring import score_answers
from lit_prune.text import prefers
from lit_prune.models import load_model


def prefers_true(model, tok, prompts: list[str], true: list[str], new: list[str]) -> tuple[torch.Tensor, ...]:
    """(NLL of the true objects, NLL of the new objects, bool mask ``NLL(true) < NLL(new)``), each ``[n]``
    (:func:`lit_prune.metrics.scoring.score_answers`, :func:`lit_prune.text.prefers`)."""
    nll_true, nll_new = score_answers(model, tok, prompts, true).nll, score_answers(model, tok, prompts, new).nll
    return nll_true, nll_new, prefers(nll_true, nll_new).bool()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", default="demo", help="edit data file, or 'demo' for the bundled set")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "demo_set.md"))
    args = ap.parse_args()

    model, tok = load_model(args.model)
    model.eval()
    reqs = load_requests(args.path)

    # One flat batch per prompt kind; `owner[k]` is the record index of prompt k.
    kinds = {
        "edit prompt": [(i, r.full_prompt) for i, r in enumerate(reqs)],
        "paraphrases": [(i, p) for i, r in enumerate(reqs) for p in r.paraphrase_prompts],
        "neighbourhood": [(i, p) for i, r in enumerate(reqs) for p in r.neighborhood_prompts],
    }
    per_record = {}  # kind -> list over records of (number preferring true, number of prompts)
    edit_nll = None
    for kind, pairs in kinds.items():
        owner = [i for i, _ in pairs]
        nt, nn, ok = prefers_true(model, tok, [p for _, p in pairs],
                                  [reqs[i].target_true for i in owner], [reqs[i].target_new for i in owner])
        if kind == "edit prompt":
            edit_nll = (nt, nn)
        counts = [[0, 0] for _ in reqs]
        for i, good in zip(owner, ok.tolist()):
            counts[i][0] += int(good)
            counts[i][1] += 1
        per_record[kind] = counts
    n = len(reqs)

    lines = [
        "# Demo edit set: what the unedited model knows",
        "",
        f"`python benchmarks/check_demo_set.py --path {args.path} --model {args.model}` ({n} records).",
        "",
        "Score: length-normalised answer NLL, `-mean log p(\" \" + target tokens | prompt)`; a prompt *prefers the "
        "true object* when NLL(target_true) < NLL(target_new). Neighbourhood prompts are about other subjects with "
        "the same relation and the same true object, so this is also the pre-edit locality baseline.",
        "",
        "| prompts | records with all prompts preferring the true object | prompts preferring the true object |",
        "|---|---|---|",
    ]
    for kind, counts in per_record.items():
        rec_ok = sum(c == t for c, t in counts if t)
        rec_n = sum(1 for _, t in counts if t)
        good, tot = sum(c for c, _ in counts), sum(t for _, t in counts)
        lines.append(
            f"| {kind} | {rec_ok}/{rec_n} ({100 * rec_ok / rec_n:.0f}%) | {good}/{tot} ({100 * good / tot:.0f}%) |"
        )
    lines += [
        "",
        "| case | subject | true | new | NLL true | NLL new | edit | paraphrases | neighbourhood |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(reqs):
        e = per_record["edit prompt"][i][0]
        p, q = per_record["paraphrases"][i], per_record["neighbourhood"][i]
        lines.append(
            f"| {r.case_id} | {r.subject} | {r.target_true} | {r.target_new} | {edit_nll[0][i]:.2f} | "
            f"{edit_nll[1][i]:.2f} | {'yes' if e else 'no'} | {p[0]}/{p[1]} | {q[0]}/{q[1]} |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
