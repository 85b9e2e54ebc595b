"""Curves of a run: their x-axis (the number of applied edits) and how their scalars reach the loggers.

(Formerly ``lit_prune.logging``, renamed so that no module of the package shadows the standard library's.)"""

from __future__ import annotations

from typing import Mapping

import torch


def num_edits(pl_module) -> int:
    """Edits applied so far: the module's counter when it has one, else the trainer's global step."""
    n = getattr(pl_module, "num_edits", None)
    if n is not None:
        return int(n)
    return int(pl_module.trainer.global_step)


def log_metrics(trainer, metrics: Mapping[str, float], step: int, prog_bar: Mapping[str, str] | None = None) -> None:
    """Write scalars to every logger at ``step`` (the number of edits) and expose them as callback metrics.

    Must be called with identical ``metrics`` keys on every rank (the values are already reduced); the loggers
    themselves write on rank 0 only. ``prog_bar`` maps a metric name to a short label shown in the progress bar.
    """
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(clean, step=step)
    for k, v in clean.items():
        trainer.callback_metrics[k] = torch.tensor(v)
    if prog_bar:
        for k, label in prog_bar.items():
            if k in clean:
                trainer.progress_bar_metrics[label] = clean[k]
