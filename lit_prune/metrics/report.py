"""The end-of-run table: final metric values of every reporting callback, printed and saved next to the event files.

Callbacks that inherit :class:`FinalMetricsReporter` put their last values in ``self.final_metrics`` (computed on all
ranks). The table is written once per fit, at ``on_fit_end`` of the LAST reporter in ``trainer.callbacks`` (by then every
reporter's ``on_fit_end`` has run, so the order of the callbacks does not matter): it merges all reporters' values,
prints a table and, on rank 0, merges them into ``final_metrics.json`` in the run's log directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from lightning.pytorch.utilities import rank_zero_info

FILE_NAME = "final_metrics.json"


def format_table(metrics: Mapping[str, float]) -> str:
    """A two-column text table of ``metrics`` (tag -> value), sorted by tag."""
    if not metrics:
        return "(no final metrics)"
    w = max(len(k) for k in metrics)
    lines = [f"{'metric':<{w}}  value", f"{'-' * w}  ----------"]
    for k in sorted(metrics):
        v = metrics[k]
        lines.append(f"{k:<{w}}  {v:.4f}" if isinstance(v, float) and not math.isnan(v) else f"{k:<{w}}  {v}")
    return "\n".join(lines)


def write_final_metrics(directory: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Merge ``metrics`` into ``<directory>/final_metrics.json`` (created if missing); returns its path."""
    path = Path(directory) / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    old: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = {}
    old.update(metrics)
    path.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


class FinalMetricsReporter:
    """Mixin for callbacks: fill ``self.final_metrics`` (tag -> float) by ``on_fit_end``; the table is written once
    per fit by the last reporter in ``trainer.callbacks``, whatever their order."""

    final_metrics: dict[str, float]

    def report_final(self, trainer: Any, pl_module: Any) -> None:
        reporters = [cb for cb in trainer.callbacks if isinstance(cb, FinalMetricsReporter)]
        if not reporters or reporters[-1] is not self:
            return
        merged: dict[str, Any] = {}
        for cb in reporters:
            merged.update(getattr(cb, "final_metrics", {}) or {})
        if not merged:
            return
        n = getattr(pl_module, "num_edits", None)
        if n is not None:
            merged["num_edits"] = int(n)
        log_dir = trainer.log_dir  # a collective (broadcast from rank 0): every rank asks
        where = ""
        if trainer.is_global_zero and log_dir is not None:
            where = f"\nsaved to {write_final_metrics(log_dir, merged)}"
        rank_zero_info(f"final metrics after {n} edits:\n{format_table(merged)}{where}")

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.report_final(trainer, pl_module)
