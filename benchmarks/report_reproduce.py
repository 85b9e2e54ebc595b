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
EDITORS = {"rome": "ROME", "memit": "MEMIT", "mend": "MEND", "ft": "FT", "alphaedit": "AlphaEdit"}


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


# The first (v1) rows, kept as they were measured: r-ROME, MEMIT with the λ borrowed from the Llama presets, 20
# examples per downstream task, perplexity on 20 texts, no intervals.
V1 = {"v1_rome": "v1 r-ROME", "v1_memit": "v1 MEMIT λ=15000", "v1_mend": "v1 MEND"}


# The main table's row order: the rows first (the paper's ROME on both orders, r-ROME, MEMIT, MEND), then the
# rows only the restraint comparison needs, then any other label (sorted); within a label, the views in VIEW_ORDER.
LABEL_ORDER = ("rome_original", "rome_original_seed1", "rome_averaged", "memit_l1500", "mend_bundled", "alphaedit",
               "memit_b10", "alphaedit_b10")
VIEW_ORDER = ("none", "deferred_e", "deferred_1.2", "deferred_rect", "online_e", "rect_online", "rect_prune_online")


def row_order(key: tuple[str, str]) -> tuple:
    """Sort key of a (label, view) row: :data:`LABEL_ORDER`, then :data:`VIEW_ORDER`, unknown ones after, by name."""
    label, view = key
    return (label in V1, LABEL_ORDER.index(label) if label in LABEL_ORDER else len(LABEL_ORDER), label,
            VIEW_ORDER.index(view) if view in VIEW_ORDER else len(VIEW_ORDER), view)


def name(label: str) -> str:
    """A row's editor cell: the v1 rows say so, a label named after an editor is that editor, else the label."""
    return V1.get(label) or EDITORS.get(label, label)


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


def spectrum_max(m: dict, what: str) -> tuple[list[int], list[float]]:
    """N and the largest ``spectrum/<param>/<what>`` over the edited matrices at each N (MEMIT and MEND edit several)."""
    params = sorted({"/".join(k.split("/")[1:-1]) for k in m if k.startswith("spectrum/")})
    ns = sorted(set().union(*(m.get(f"spectrum/{p}/{what}", {}).keys() for p in params))) if params else []
    return ns, [max(m.get(f"spectrum/{p}/{what}", {}).get(n, {"value": float("nan")})["value"] for p in params)
                for n in ns]


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


def _columns(s: dict) -> tuple[list[str], list[tuple[str, float]]]:
    """The table's header and its (metric, scale) columns after the edit scores, for the rows ``s``."""
    extra = [(k, t) for k, t in EXTRA if any(k in m for m in s.values())]
    base = next((m for (lbl, v), m in sorted(s.items()) if v == "none" and any(0 in m.get(k, {}) for k, _ in TASKS)),
                None)  # the unedited model's task scores (the first row that has them)
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
    cols = [("downstream/perplexity", 1)] + [(k, 100) for k, _ in TASKS] + [(k, 1 if "nll" in k else 100)
                                                                           for k, _ in extra]
    return head, cols


def row_cells(m: dict, cols: list[tuple[str, float]]) -> tuple[int, list[str]]:
    """One row of the table for one (label, view)'s metrics ``m``: its largest N and its cells (each at its last
    N > 0, saying so when that is below the row's N)."""
    nmax = max(max(v) for v in m.values())
    vals = []
    for key, _ in EDIT_COLUMNS:
        pts = m.get(f"retention/{key}", {})
        last = max((n for n in pts if n > 0), default=None)
        vals.append(cell(pts.get(last)) + (f" (N={last})" if last is not None and last != nmax else ""))
    vals += [cell(immediate(m, key, nmax)) for key, _ in EDIT_COLUMNS]
    for k, sc in cols:
        pts = m.get(k, {})
        last = max((n for n in pts if n > 0), default=None)
        vals.append(cell(pts.get(last), sc) + (f" (N={last})" if last is not None and last != nmax else ""))
    for what in ("condition_number", "delta_sigma_max"):  # over the edited matrices, at N = nmax
        at = [v[nmax]["value"] for k, v in m.items() if k.startswith("spectrum/") and k.endswith(what) and nmax in v]
        vals.append(f"{max(at):.1f}" if at else "–")
    return nmax, vals


def same_as(m: dict) -> str | None:
    """The view whose model a (label, view) row is, bit for bit, when the driver copied all its rows after N = 0 from
    it (``same_weights_as``: an idle restraint; ``reproduce.py``'s ``Stream.weights_key``), else None."""
    src = {r.get("same_weights_as") for pts in m.values() for n, r in pts.items() if n > 0}
    views = {v.split(":")[1] if ":" in v else v for v in src if v}  # "label/run:view:N" (downstream) or "view"
    return views.pop() if None not in src and len(views) == 1 else None


def _point(c: str) -> str:
    """A cell without its interval: ``'13.63 [12.25, 15.16]'`` -> ``'13.63'``."""
    return c.split(" [", 1)[0]


def unedited_rows(s: dict, v1: bool) -> list[tuple[str, list[str]]]:
    """The distinct N = 0 measurements of the unedited model among the v2 (or the v1) labels, as (label, cells of
    the main table's columns after the edit scores), the fullest first. Every label edits the same unedited model, so
    a measurement whose values all agree with one already kept (fewer tasks, or no interval where the other has one)
    is left out; the v1 sweep measured it on 20 texts and examples, a different measurement."""
    _, cols = _columns(s)
    cands = [(label, [cell(m.get(k, {}).get(0), sc) for k, sc in cols]) for (label, view), m in sorted(s.items())
             if view == "none" and (label in V1) == v1 and 0 in m.get("downstream/perplexity", {})]
    seen: list[tuple[str, list[str]]] = []
    for label, cells in sorted(cands, key=lambda c: (-sum(x != "–" for x in c[1]), -sum("[" in x for x in c[1]))):
        if not any(all(x == "–" or _point(x) == _point(y) for x, y in zip(cells, c)) for _, c in seen):
            seen.append((label, cells))
    return seen


def _unedited_line(who: str, cells: list[str]) -> str:
    """A table line of an unedited measurement (no edit scores, no spectrum)."""
    return f"| {who} | – | 0 | " + " | ".join(["–"] * 6) + " | " + " | ".join(cells) + " | | |"


def table(s: dict, keys: list[tuple[str, str]] | None = None, names: dict | None = None) -> str:
    """A table of each (label, view) at its largest N: ``keys`` (in this order), or else every v2 row in
    :func:`row_order` with the unedited model first; ``names``: (label, view) -> (editor, restraint) cells instead of
    the defaults."""
    head, cols = _columns(s)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if keys is None:
        seen = unedited_rows(s, v1=False)
        for label, cells in seen:
            who = "unedited" if len(seen) == 1 else f"unedited ({name(label)}'s N = 0)"
            lines.append(_unedited_line(who, cells))
        keys = sorted((k for k in s if k[0] not in V1), key=row_order)
    for key in (k for k in keys if k in s):
        nmax, vals = row_cells(s[key], cols)
        editor, restraint = (names or {}).get(key, (name(key[0]), LABELS.get(key[1], key[1])))
        if (src := same_as(s[key])) is not None and src != key[1]:
            restraint += f" (idle: ≡ {(names or {}).get((key[0], src), ('', LABELS.get(src, src)))[1]})"
        lines.append(f"| {editor} | {restraint} | {nmax} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def v1_table(s: dict) -> str:
    """The v1 rows (:data:`V1`) at their largest N, their own unedited measurement first; '' when there are none."""
    keys = sorted((k for k in s if k[0] in V1), key=row_order)
    if not keys:
        return ""
    lines = table(s, keys).splitlines()
    lines[2:2] = [_unedited_line("unedited (v1)", cells) for _, cells in unedited_rows(s, v1=True)]
    return "\n".join(lines)


# The general-abilities table: the tasks that can move on this model, at each N of the downstream passes.
ABILITIES = [("downstream/perplexity", "Perplexity", 1), ("downstream/reasoning", "Reasoning", 100),
             ("downstream/summarization", "Summarization", 100)]


def abilities_table(s: dict) -> str:
    """Perplexity, reasoning and summarization of every v2 (label, view) at each N > 0 where a downstream pass was
    made (columns ``<task> N=<n>``), the unedited model (N = 0) first; '' when no row has a pass after N = 0."""
    keys = sorted((k for k in s if k[0] not in V1), key=row_order)
    ns = sorted({n for k in keys for n in s[k].get("downstream/reasoning", {}) if n > 0})
    if not ns:
        return ""
    head = ["editor", "restraint"] + [f"{t} N={n}" for _, t, _ in ABILITIES for n in ns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = unedited_rows(s, v1=False)  # the measurement the main table shows
    base = s[(first[0][0], "none")] if first else None
    if base:
        lines.append("| unedited (N = 0) | – | " + " | ".join(
            cell(base.get(m, {}).get(0), sc) for m, _, sc in ABILITIES for _ in ns) + " |")
    for key in keys:
        m = s[key]
        if not any(n in m.get("downstream/reasoning", {}) for n in ns):
            continue
        lines.append(f"| {name(key[0])} | {LABELS.get(key[1], key[1])} | " + " | ".join(
            cell(m.get(k, {}).get(n), sc) for k, _, sc in ABILITIES for n in ns) + " |")
    return "\n".join(lines)


# The restraint comparison ("Beyond PRUNE"): per block, the rows (label, view) -> (editor, restraint) on the same
# first N CounterFact edits; QUEUE_STEP: the step of benchmarks/reproduce_queue.sh that writes a label's rows.
def _block(*parts: tuple[str, str, tuple[str, ...], dict]) -> dict:
    """(label, view) -> (editor, restraint) for parts (label, editor, views, restraint names other than LABELS')."""
    return {(lbl, v): (editor, names.get(v, LABELS.get(v, v))) for lbl, editor, views, names in parts for v in views}


_ALPHAEDIT = {"none": "its null-space projection", "online_e": "+ PRUNE online α=e"}
COMPARISON = [
    ("ROME (the paper's key choice), one edit at a time", _block(
        ("rome_original", "ROME", ("none", "deferred_e", "online_e", "rect_online", "rect_prune_online"), {}))),
    ("MEMIT (λ = 1500) and AlphaEdit, one edit at a time", _block(
        ("memit_l1500", "MEMIT", ("none", "deferred_e", "online_e", "deferred_rect", "rect_online"), {}),
        ("alphaedit", "AlphaEdit", ("none", "online_e"), _ALPHAEDIT))),
    ("batches of 10 edits (batch-sequential)", _block(
        ("memit_b10", "MEMIT", ("none", "deferred_e", "online_e", "deferred_rect", "rect_online"), {}),
        ("alphaedit_b10", "AlphaEdit", ("none", "online_e"), _ALPHAEDIT))),
]
QUEUE_STEP = {"rome_original": 2, "memit_l1500": 5, "alphaedit": 6, "memit_b10": 7, "alphaedit_b10": 8}


def comparison(s: dict, plt, figdir: Path) -> tuple[list[str], list[Path]]:
    """The restraint comparison: per block of :data:`COMPARISON`, a table with the main table's columns, the rows
    still missing (with the queue step that writes them), and one figure overlaying the block's rows."""
    text, made = [], []
    for b, (title, rows) in enumerate(COMPARISON):
        present = [k for k in rows if k in s]
        text += [f"### {title}", ""]
        if present:
            text += [table(s, present, rows), ""]
        missing = [lbl for lbl in dict.fromkeys(lbl for lbl, _ in rows) if any(k not in s for k in rows if k[0] == lbl)]
        if missing:
            text += ["Not run yet: " + "; ".join(
                f"{rows[next(k for k in rows if k[0] == lbl)][0]} ("
                + ", ".join(r for k, (_, r) in rows.items() if k[0] == lbl and k not in s)
                + f"): `bash benchmarks/reproduce_queue.sh {QUEUE_STEP.get(lbl, '?')}`" for lbl in missing) + ".", ""]
        if not present:
            continue
        fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
        for key in present:
            m, label = s[key], " ".join(rows[key])
            axes[0].plot(*spectrum_max(m, "condition_number"), label=label)
            for ax, k in ((axes[1], "downstream/perplexity"), (axes[2], "retention/efficacy"),
                          (axes[3], "retention/locality")):
                _band(ax, m.get(k, {}), label)
        axes[0].set_yscale("log")
        axes[1].set_yscale("log")
        made.append(_finish(plt, fig, axes, ["κ(W), largest over the edited matrices (log)",
                                             "held-out perplexity (log), 95 % band", "retention efficacy, 95 % band",
                                             "retention locality, 95 % band"],
                            f"Restraints compared: {title}", figdir / f"comparison_{b + 1}.png"))
    return text, made


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
        fig, axes = plt.subplots(1, 5, figsize=(24, 4.2))
        for v in views:
            m = s[(label, v)]
            for ax, what in ((axes[0], "condition_number"), (axes[1], "delta_sigma_max")):
                ax.plot(*spectrum_max(m, what), label=LABELS.get(v, v))
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
             "bootstrap otherwise; summarization, the mean of ROUGE-1/2/L F1: bootstrap over examples, shown on the "
             "passes made since it is recorded — `reproduce.py downstream --tasks summarization --rescore` adds it to "
             "older ones). Retention: all edits so far re-scored on the evaluated model (the paper's "
             "protocol); immediate: each edit scored right after it, mean over the edits. Perplexity on held-out "
             "bundled Wikipedia summaries (lower is better); max κ(W) and σ_max(ΔW) over the edited matrices "
             "(τ = σ_max(W₀) of each matrix: in the set-up). A value measured at a smaller N than the row's (the "
             "evaluation schedule, or a run stopped early) says so. A task marked (floor) scores 0 (or surely below 5 %) "
             "on the unedited model, (chance) is at chance there: its changes say nothing about general abilities.",
             "",
             text_table, ""]
    if abil := abilities_table(s):
        text += ["### General abilities at each N of the downstream passes", "",
                 "The tasks that can show a change on this model (QA and NLI are at the floor) for every row, at "
                 "each N where the downstream pass was made (the paper's example counts; perplexity every 25 "
                 "edits: the curves), 95 % intervals as above; a row without a pass at some N shows '–' there.", "",
                 abil, ""]
    if v1 := v1_table(s):
        text += ["### v1 rows (the first sweep, kept as measured)", "",
                 "r-ROME, MEMIT with the λ borrowed from the Llama presets (λ = 15000: PRUNE never acted), and MEND "
                 "with the bundled hypernetwork (the same editor as `mend_bundled` above, which supersedes it): "
                 "perplexity on 20 held-out texts, 20 examples per downstream task (one example is 5 points), no "
                 "intervals, no immediate scores; the unedited model measured the same way first.", "", v1, ""]
    comp_text, comp_figs = comparison(s, plt, figdir)
    text += ["## Restraints compared", "",
             "The field's answers to sequential-editing collapse on the same stream and with the same metrics as the "
             "table above: no restraint, PRUNE (deferred and online), RECT (online: the top 40 % of the accumulated "
             "ΔW by |ΔW|/|W₀| kept after every edit), RECT then PRUNE, and AlphaEdit (MEMIT with the update "
             "projected onto the null space of the preserved keys), alone and with PRUNE online.", ""]
    text += comp_text + [f"![{p.stem}](figures/{p.name})" for p in comp_figs] + [""]
    text += ["## Curves", ""] + [f"![{p.stem}](figures/{p.name})" for p in made] + ["", "## Findings", "", findings]
    doc.write_text("\n".join(text) + "\n")
    print(text_table)
    return text_table
