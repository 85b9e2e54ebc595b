"""Turn the rows written by ``reproduce.py run`` / ``downstream`` into docs/results.md tables and docs/figures/*.png.

Rows carry a value and, where measured, a 95 % interval (``lo``, ``hi``); the table prints ``value [lo, hi]``, the
plots draw the interval as a band. Immediate scores are one row per edit; the table shows their mean over the edits
so far, with its interval (``intervals.mean_interval``).
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from intervals import mean_interval  # noqa: E402

LABELS = {"none": "no restraint", "deferred_e": "PRUNE deferred α=e", "deferred_1.2": "PRUNE deferred α=1.2",
          "online_e": "PRUNE online α=e", "deferred_rect": "RECT deferred k=0.4", "rect_online": "RECT online k=0.4",
          "rect_prune_online": "RECT + PRUNE online"}
EDIT_COLUMNS = [("efficacy", "Efficacy"), ("generalization", "Generalization"), ("locality", "Locality")]
TASKS = [("downstream/reasoning", "Reasoning"), ("downstream/summarization", "Summarization"),
         ("downstream/qa", "QA"), ("downstream/nli", "NLI")]
EXTRA = [("downstream/nli_likelihood", "NLI likelihood"), ("downstream/qa_gold_nll", "QA gold NLL")]
CHANCE = {"downstream/nli": 0.5}
EDITORS = ("rome", "memit", "mend", "ft", "alphaedit")


def load_rows(out: Path) -> list[dict]:
    rows = []
    for f in sorted(out.glob("*.jsonl")):
        rows += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return rows


def series(rows: list[dict]) -> dict:
    """{(label, view): {metric: {n: row}}} (the view of the online run is 'online_e')."""
    s: dict = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["view"] == "-":
            continue
        s[(r["run"].split("/")[0], r["view"])][r["metric"]][r["n"]] = r
    return s


def name(label: str) -> str:
    return label.upper() if label in EDITORS else label


def immediate(m: dict, key: str, upto: int) -> tuple[float, float, float] | None:
    """Mean (lo, hi) of the immediate ``key`` scores of edits 1..``upto``."""
    vals = [r["value"] for n, r in m.get(f"immediate/{key}", {}).items() if 0 < n <= upto]
    return mean_interval(vals) if vals else None


def _num(v: float, scale: float) -> str:
    v = v * scale
    return f"{v:.1f}" if scale != 1 else (f"{v:.2f}" if abs(v) < 1e4 else f"{v:.1e}")


def cell(r: dict | tuple | None, scale: float = 100) -> str:
    """``value [lo, hi]`` of a row or a (value, lo, hi) triple; '–' when missing."""
    if r is None:
        return "–"
    v, lo, hi = (r["value"], r.get("lo"), r.get("hi")) if isinstance(r, dict) else r
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return _num(v, scale)
    return f"{_num(v, scale)} [{_num(lo, scale)}, {_num(hi, scale)}]"


def _finish(plt, fig, axes, titles, suptitle: str, path: Path) -> Path:
    """Titles, x labels, grid, legend (first axis), save as PNG, close; returns ``path``."""
    for ax, t in zip(axes, titles):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("number of edits N")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _band(ax, pts: dict, label: str, scale: float = 1.0, marker: str = ".") -> None:
    ns = sorted(pts)
    line = ax.plot(ns, [pts[n]["value"] * scale for n in ns], marker=marker, label=label)[0]
    with_ci = [n for n in ns if "lo" in pts[n]]
    if with_ci:
        ax.fill_between(with_ci, [pts[n]["lo"] * scale for n in with_ci], [pts[n]["hi"] * scale for n in with_ci],
                        color=line.get_color(), alpha=0.2)


def table(s: dict) -> str:
    """The main table: each (label, view) at its largest N, the unedited model first."""
    extra = [(k, t) for k, t in EXTRA if any(k in m for m in s.values())]
    base = next((m for (lbl, v), m in sorted(s.items()) if v == "none" and 0 in m.get("downstream/perplexity", {})),
                None)
    flags = {}
    for k, _ in TASKS:
        b = (base or {}).get(k, {}).get(0)
        if b is not None and (b["value"] == 0 or b.get("hi", 1.0) < 0.05):  # nothing, or below 5 % for sure
            flags[k] = " (floor)"
        elif b is not None and k in CHANCE and b.get("lo", 1) <= CHANCE[k] <= b.get("hi", 0):
            flags[k] = " (chance)"
    head = (["editor", "restraint", "N"] + [f"Retention {t}" for _, t in EDIT_COLUMNS]
            + [f"Immediate {t}" for _, t in EDIT_COLUMNS] + ["Perplexity"]
            + [t + flags.get(k, "") for k, t in TASKS] + [t for _, t in extra] + ["max κ(W)", "max σ_max(ΔW)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cols = [("downstream/perplexity", 1)] + [(k, 100) for k, _ in TASKS] + [(k, 1 if "nll" in k else 100)
                                                                           for k, _ in extra]
    seen = []  # one "unedited" row per distinct N = 0 evaluation (the set-ups measured it differently)
    for (label, view), m in sorted(s.items()):
        if view != "none" or 0 not in m.get("downstream/perplexity", {}):
            continue
        cells = [cell(m.get(k, {}).get(0), sc) for k, sc in cols]
        if cells in [c for _, c in seen]:
            continue
        seen.append((label, cells))
    for label, cells in seen:
        who = "unedited" if len(seen) == 1 else f"unedited ({name(label)}'s N = 0)"
        lines.append(f"| {who} | – | 0 | " + " | ".join(["–"] * 6) + " | " + " | ".join(cells) + " | | |")
    for (label, view), m in sorted(s.items()):
        nmax = max(max(v) for v in m.values())
        vals = []
        for key, _ in EDIT_COLUMNS:
            pts = m.get(f"retention/{key}", {})
            last = max((n for n in pts if n > 0), default=None)
            vals.append(cell(pts.get(last)) + (f" (N={last})" if last is not None and last != nmax else ""))
        vals += [cell(immediate(m, key, nmax)) for key, _ in EDIT_COLUMNS]
        for k, sc in [("downstream/perplexity", 1)] + [(k, 100) for k, _ in TASKS] + [(k, 1 if "nll" in k else 100)
                                                                                    for k, _ in extra]:
            pts = m.get(k, {})
            last = max((n for n in pts if n > 0), default=None)
            vals.append(cell(pts.get(last), sc) + (f" (N={last})" if last is not None and last != nmax else ""))
        for what in ("condition_number", "delta_sigma_max"):  # over the edited matrices, at N = nmax
            at = [v[nmax]["value"] for k, v in m.items() if k.startswith("spectrum/") and k.endswith(what) and nmax in v]
            vals.append(f"{max(at):.1f}" if at else "–")
        lines.append(f"| {name(label)} | {LABELS.get(view, view)} | {nmax} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def report(out: Path, doc: Path) -> str:
    """Write ``doc`` (set-up from ``out/setup.json``, the table, the figures, ``out/findings.md``); returns the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(out)
    if not rows:
        raise SystemExit(f"no result rows in {out}; run `python benchmarks/reproduce.py run` first")
    s = series(rows)
    labels = sorted({lbl for lbl, _ in s})
    figdir = doc.parent / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    text_table = table(s)

    made = []
    for label in labels:
        views = sorted(v for (lbl, v) in s if lbl == label)
        params = sorted({"/".join(k.split("/")[1:-1]) for v in views for k in s[(label, v)] if k.startswith("spectrum/")})
        fig, axes = plt.subplots(1, 5, figsize=(24, 4.2))
        for v in views:
            m = s[(label, v)]
            for ax, what in ((axes[0], "condition_number"), (axes[1], "delta_sigma_max")):
                # the largest value over the edited matrices at each N (MEMIT and MEND edit several)
                ns = sorted(set().union(*(m.get(f"spectrum/{p}/{what}", {}).keys() for p in params))) if params else []
                ys = [max(m.get(f"spectrum/{p}/{what}", {}).get(n, {"value": float("nan")})["value"] for p in params)
                      for n in ns]
                ax.plot(ns, ys, label=LABELS.get(v, v))
            for ax, k in ((axes[2], "downstream/perplexity"), (axes[3], "retention/efficacy"),
                          (axes[4], "retention/locality")):
                _band(ax, m.get(k, {}), LABELS.get(v, v))
        axes[0].set_yscale("log")
        axes[2].set_yscale("log")  # MEND's unrestrained perplexity leaves any linear scale
        if max((ln.get_ydata().max() for ln in axes[1].get_lines() if len(ln.get_ydata())), default=0) > 1000:
            axes[1].set_yscale("log")
        titles = ["κ(W), largest over the edited matrices (log)", "σ_max(ΔW), largest over the edited matrices",
                  "held-out perplexity (log), 95 % band", "retention efficacy, 95 % band",
                  "retention locality, 95 % band"]
        made.append(_finish(plt, fig, axes, titles, f"{name(label)} on SmolLM2-135M, sequential CounterFact edits",
                            figdir / f"{label}_curves.png"))

        tasks = [k for k, _ in TASKS]
        if any(s[(label, v)].get(t) for v in views for t in tasks):
            fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8))
            for v in views:
                for ax, t in zip(axes, tasks):
                    _band(ax, s[(label, v)].get(t, {}), LABELS.get(v, v), scale=100, marker="o")
            axes[0].set_ylabel("score ×100")
            made.append(_finish(plt, fig, axes, [t.split("/")[1] for t in tasks],
                                f"{name(label)}: downstream tasks vs N (example counts in the set-up), 95 % bands",
                                figdir / f"{label}_downstream.png"))

    setup = json.loads((out / "setup.json").read_text()) if (out / "setup.json").is_file() else {}
    findings = (out / "findings.md").read_text() if (out / "findings.md").is_file() else "(no findings written yet)"
    text = ["# Reproducing PRUNE on the embedded SmolLM2-135M", "",
            "Generated by `python benchmarks/reproduce.py report` from the rows that `reproduce.py run` wrote to "
            f"`{out.relative_to(doc.parent.parent) if out.is_relative_to(doc.parent.parent) else out}`.", "",
            "## Set-up", ""]
    text += [f"- **{k}**: {v}" for k, v in setup.items()]
    text += ["", "## Results at the largest N", "",
             "Rates ×100 with 95 % intervals in brackets where the rows carry them (Wilson for rates of 0/1 values, "
             "bootstrap otherwise). Retention: all edits so far re-scored on the evaluated model (the paper's "
             "protocol); immediate: each edit scored right after it, mean over the edits. Perplexity on held-out "
             "bundled Wikipedia summaries (lower is better); max κ(W) and σ_max(ΔW) over the edited matrices "
             "(τ = σ_max(W₀) of each matrix: in the set-up). A value measured at a smaller N than the row's (the "
             "evaluation schedule, or a run stopped early) says so. A task marked (floor) scores 0 (or surely below 5 %) "
             "on the unedited model, (chance) is at chance there: its changes say nothing about general abilities.",
             "",
             text_table, ""]
    text += ["## Curves", ""] + [f"![{p.stem}](figures/{p.name})" for p in made] + ["", "## Findings", "", findings]
    doc.write_text("\n".join(text) + "\n")
    print(text_table)
    return text_table
