"""Turn the rows written by ``reproduce.py run`` into docs/results.md tables and docs/figures/*.png plots."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

LABELS = {"none": "no restraint", "deferred_e": "PRUNE deferred α=e", "deferred_1.2": "PRUNE deferred α=1.2",
          "online_e": "PRUNE online α=e"}
COLUMNS = [("retention/efficacy", "Efficacy", 100), ("retention/generalization", "Generalization", 100),
           ("retention/locality", "Locality", 100), ("downstream/reasoning", "Reasoning", 100),
           ("downstream/summarization", "Summarization", 100), ("downstream/qa", "QA", 100),
           ("downstream/nli", "NLI", 100), ("downstream/perplexity", "Perplexity", 1)]


def load_rows(out: Path) -> list[dict]:
    rows = []
    for f in sorted(out.glob("*.jsonl")):
        rows += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return rows


def series(rows: list[dict]) -> dict:
    """{(editor, view): {metric: {n: value}}} (the view of the online run is 'online_e')."""
    s: dict = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        editor = r["run"].split("/")[0]
        if r["view"] == "-":
            continue
        s[(editor, r["view"])][r["metric"]][r["n"]] = r["value"]
    return s


def _fmt(v, scale) -> str:
    if v is None:
        return "–"
    return f"{v * scale:.1f}" if scale != 1 else (f"{v:.2f}" if abs(v) < 1e4 else f"{v:.1e}")


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


def report(out: Path, doc: Path) -> str:
    """Write ``doc`` (set-up from ``out/setup.json``, the table, the figures, ``out/findings.md``); returns the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(out)
    if not rows:
        raise SystemExit(f"no result rows in {out}; run `python benchmarks/reproduce.py run` first")
    s = series(rows)
    editors = sorted({e for e, _ in s})
    figdir = doc.parent / "figures"
    figdir.mkdir(parents=True, exist_ok=True)

    # main table at the largest N reached by each (editor, view), plus the unedited model (N = 0)
    lines = ["| editor | restraint | N | " + " | ".join(c[1] for c in COLUMNS) + " | max κ(W) | max σ_max(ΔW) |",
             "|---|---|---|" + "---|" * (len(COLUMNS) + 2)]
    base = None
    for key, m in sorted(s.items()):
        if key[1] == "none" and "downstream/perplexity" in m and 0 in m["downstream/perplexity"]:
            base = {c: m.get(c, {}).get(0) for c, _, _ in COLUMNS}
            break
    if base:
        lines.append("| unedited | – | 0 | " + " | ".join(_fmt(base[c], sc) for c, _, sc in COLUMNS) + " | | |")
    for (editor, view), m in sorted(s.items()):
        nmax = max(max(v) for v in m.values())
        vals = []
        for c, _, sc in COLUMNS:
            pts = m.get(c, {})
            last = max((n for n in pts if n > 0), default=None)
            v = _fmt(pts.get(last) if last is not None else None, sc)
            vals.append(v + (f" (N={last})" if last is not None and last != nmax else ""))
        for what in ("condition_number", "delta_sigma_max"):  # over the edited matrices, at N = nmax
            at = [v[nmax] for k, v in m.items() if k.startswith("spectrum/") and k.endswith(what) and nmax in v]
            vals.append(f"{max(at):.1f}" if at else "–")
        lines.append(f"| {editor.upper()} | {LABELS.get(view, view)} | {nmax} | " + " | ".join(vals) + " |")
    table = "\n".join(lines)

    # plots per editor: κ(W) (log) and σ_max(ΔW) of each edited matrix's worst case, perplexity, efficacy vs N;
    # and the downstream task scores vs N
    made = []
    for editor in editors:
        views = sorted(v for (e, v) in s if e == editor)
        params = sorted({"/".join(k.split("/")[1:-1]) for v in views for k in s[(editor, v)] if k.startswith("spectrum/")})
        fig, axes = plt.subplots(1, 5, figsize=(24, 4.2))
        for v in views:
            m = s[(editor, v)]
            for ax, what in ((axes[0], "condition_number"), (axes[1], "delta_sigma_max")):
                # the largest value over the edited matrices at each N (MEMIT and MEND edit several)
                ns = sorted(set().union(*(m.get(f"spectrum/{p}/{what}", {}).keys() for p in params))) if params else []
                ys = [max(m.get(f"spectrum/{p}/{what}", {}).get(n, float("nan")) for p in params) for n in ns]
                ax.plot(ns, ys, label=LABELS.get(v, v))
            for ax, k in ((axes[2], "downstream/perplexity"), (axes[3], "retention/efficacy"),
                          (axes[4], "retention/locality")):
                pts = sorted(m.get(k, {}).items())
                ax.plot([a for a, _ in pts], [b for _, b in pts], marker=".", label=LABELS.get(v, v))
        axes[0].set_yscale("log")
        axes[2].set_yscale("log")  # MEND's unrestrained perplexity leaves any linear scale
        if max((ln.get_ydata().max() for ln in axes[1].get_lines() if len(ln.get_ydata())), default=0) > 1000:
            axes[1].set_yscale("log")
        titles = ["κ(W), largest over the edited matrices (log)", "σ_max(ΔW), largest over the edited matrices",
                  "held-out perplexity (log)", "retention efficacy", "retention locality"]
        made.append(_finish(plt, fig, axes, titles, f"{editor.upper()} on SmolLM2-135M, sequential CounterFact edits",
                            figdir / f"{editor}_curves.png"))

        tasks = [c for c, _, _ in COLUMNS if c.startswith("downstream/") and c != "downstream/perplexity"]
        if any(s[(editor, v)].get(t) for v in views for t in tasks):
            fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8))
            for v in views:
                for ax, t in zip(axes, tasks):
                    pts = sorted(s[(editor, v)].get(t, {}).items())
                    ax.plot([a for a, _ in pts], [b * 100 for _, b in pts], marker="o", label=LABELS.get(v, v))
            axes[0].set_ylabel("score ×100")
            made.append(_finish(plt, fig, axes, [t.split("/")[1] for t in tasks],
                                f"{editor.upper()}: downstream tasks vs N (reduced example counts, see set-up)",
                                figdir / f"{editor}_downstream.png"))

    setup = json.loads((out / "setup.json").read_text()) if (out / "setup.json").is_file() else {}
    findings = (out / "findings.md").read_text() if (out / "findings.md").is_file() else "(no findings written yet)"
    text = ["# Reproducing PRUNE on the embedded SmolLM2-135M", "",
            "Generated by `python benchmarks/reproduce.py report` from the rows that `reproduce.py run` wrote to "
            f"`{out.relative_to(doc.parent.parent) if out.is_relative_to(doc.parent.parent) else out}`.", "",
            "## Set-up", ""]
    text += [f"- **{k}**: {v}" for k, v in setup.items()]
    text += ["", "## Results at the largest N", "",
             "Rates ×100 (retention protocol: all edits so far re-scored on the evaluated model); perplexity on "
             "held-out bundled Wikipedia summaries (lower is better); max κ(W) and σ_max(ΔW) over the edited matrices "
             "(τ = σ_max(W₀) of each matrix: in the set-up). A value measured at a smaller N than the row's (the "
             "evaluation schedule, or a run stopped early) says so.", "", table, ""]
    text += ["## Curves", ""] + [f"![{p.stem}](figures/{p.name})" for p in made] + ["", "## Findings", "", findings]
    doc.write_text("\n".join(text) + "\n")
    print(table)
    return table
