"""benchmarks/report_reproduce.py's tables on hand-written rows: one unedited row per distinct measurement, the v1
rows in their own table, the main table's row order, and the general-abilities table at each N of the passes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def rep(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import report_reproduce

    return report_reproduce


def R(label, run, view, n, metric, value, lo=None, hi=None):
    r = {"run": f"{label}/{run}", "view": view, "n": n, "metric": metric, "value": value}
    return r if lo is None else {**r, "lo": lo, "hi": hi}


def unedited(label, run, view, with_summ_ci=True, reasoning=0.682, ppl=13.63):
    return [R(label, run, view, 0, "downstream/perplexity", ppl, ppl - 1, ppl + 1),
            R(label, run, view, 0, "downstream/reasoning", reasoning, reasoning - 0.05, reasoning + 0.05),
            R(label, run, view, 0, "downstream/summarization", 0.116, *((0.101, 0.133) if with_summ_ci else ()))]


def at(label, run, view, n, ppl, reasoning, summ):
    return [R(label, run, view, n, "downstream/perplexity", ppl, ppl * 0.9, ppl * 1.1),
            R(label, run, view, n, "downstream/reasoning", reasoning, reasoning - 0.05, reasoning + 0.05),
            R(label, run, view, n, "downstream/summarization", summ, summ - 0.01, summ + 0.01),
            R(label, run, view, n, "retention/efficacy", 0.9, 0.85, 0.93)]


def rows():
    out = unedited("alphaedit", "stream", "none", with_summ_ci=False) + unedited("rome_original", "stream", "none")
    out += [R("v1_mend", "stream", "none", 0, "downstream/perplexity", 13.77),  # v1: no intervals
            R("v1_mend", "stream", "none", 0, "downstream/reasoning", 0.55)]
    for view, ppl, rsn in (("none", 27.77, 0.243), ("deferred_e", 14.79, 0.578)):
        out += at("rome_original", "stream", view, 100, ppl, rsn, 0.046) + at("rome_original", "stream", view, 200,
                                                                               ppl + 5, rsn - 0.05, 0.04)
    out += at("rome_original", "online", "online_e", 200, 15.37, 0.567, 0.095)
    out += at("alphaedit", "stream", "none", 200, 14.40, 0.687, 0.097)
    out += at("v1_mend", "stream", "none", 200, 1.9e15, 0.0, 0.016)
    return out


def test_one_unedited_row_the_fullest_measurement(rep):
    s = rep.series(rows())
    main = rep.table(s).splitlines()
    first = [line for line in main if line.startswith("| unedited")]
    # alphaedit's N = 0 has the same values without the summarization interval: left out, rome_original's kept
    assert first == [f"| unedited | – | 0 | {' | '.join(['–'] * 6)} | 13.63 [12.63, 14.63] | 68.2 [63.2, 73.2] | "
                     f"11.6 [10.1, 13.3] | – | – | | |"]
    assert not any("v1" in line for line in main)  # the v1 rows are not in the main table
    # the rows first (rome_original before AlphaEdit), views in the order none, deferred, online
    editors = [line.split(" | ")[0:2] for line in main[3:]]
    assert editors == [["| rome_original", "no restraint"], ["| rome_original", "PRUNE deferred α=e"],
                       ["| rome_original", "PRUNE online α=e"], ["| AlphaEdit", "no restraint"]]


def test_v1_rows_have_their_own_table_with_their_unedited_row(rep):
    v1 = rep.v1_table(rep.series(rows())).splitlines()
    assert v1[2].startswith("| unedited (v1) | – | 0 |") and "| 13.77 | 55.0 |" in v1[2]  # no intervals in v1
    assert len(v1) == 4 and v1[3].startswith("| v1 MEND | no restraint | 200 |") and "1.9e+15" in v1[3]
    assert rep.v1_table(rep.series([r for r in rows() if not r["run"].startswith("v1")])) == ""


def test_abilities_table_shows_each_n_of_the_passes(rep):
    t = rep.abilities_table(rep.series(rows())).splitlines()
    assert t[0] == ("| editor | restraint | Perplexity N=100 | Perplexity N=200 | Reasoning N=100 | Reasoning N=200 | "
                    "Summarization N=100 | Summarization N=200 |")
    none = next(line for line in t if line.startswith("| rome_original | no restraint |"))
    cells = [c.strip() for c in none.strip("|").split(" | ")[2:]]
    assert cells == ["27.77 [24.99, 30.55]", "32.77 [29.49, 36.05]", "24.3 [19.3, 29.3]", "19.3 [14.3, 24.3]",
                     "4.6 [3.6, 5.6]", "4.0 [3.0, 5.0]"]
    online = next(line for line in t if line.startswith("| rome_original | PRUNE online α=e |"))
    assert online.strip("|").split(" | ")[2].strip() == "–"  # no pass at N = 100 for that row
    assert t[2].startswith("| unedited (N = 0) | – | 13.63 [12.63, 14.63] |")
    assert not any(line.startswith("| v1") for line in t)
