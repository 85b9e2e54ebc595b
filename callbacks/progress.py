"""EditProgressBar: training progress that reads well on a terminal and in a log file alike."""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


def _is_terminal(stream: Any) -> bool:
    """Whether ``stream`` shows a live bar: a terminal, or a Jupyter cell's output."""
    if type(stream).__module__.startswith("ipykernel"):
        return True
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        return False


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour) of a non-negative number of seconds."""
    s = int(round(max(seconds, 0.0)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e6 else f"{v:.3g}"
    return str(v)


class EditProgressBar(TQDMProgressBar):
    """The progress of ``fit``: a tqdm bar on a terminal, periodic one-line reports when stdout is not one.

    Line mode (stdout is a file, a pipe or a CI log; or ``lines=True``) prints to stdout, flushed, one line at the
    first step, every ``every_n_seconds`` seconds, and at the end::

        edits 3/10 (30%) | 0:45 elapsed, 15.0 s/edit, ETA 1:45 | eff 1, ret_eff 0.9, ppl 14.1

    The counted unit is edits (``pl_module.num_edits``, out of the datamodule's ``requests``) for an editing module,
    else training steps (out of the batches of the epoch, capped by ``max_steps``). The rate and the ETA are over
    this ``fit`` call (a resumed run counts from where it resumed), evaluations included. The values after the
    second ``|`` are the progress-bar metrics (``prog_bar=True``; the editing callbacks put the latest immediate
    efficacy there as ``eff``). The tqdm bar shows the same metrics; neither shows Lightning's ``v_num``.

    Args:
        lines: ``None`` (default): line mode exactly when stdout is not a terminal (nor a Jupyter output);
            ``True``/``False``: always/never.
        every_n_seconds: minimum time between two lines in line mode.
        refresh_rate, process_position, leave: as :class:`~lightning.pytorch.callbacks.TQDMProgressBar` (tqdm mode).
    """

    def __init__(
        self,
        lines: bool | None = None,
        every_n_seconds: float = 30.0,
        refresh_rate: int = 1,
        process_position: int = 0,
        leave: bool = False,
    ) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        if lines is not None and not isinstance(lines, bool):
            raise ValueError(f"EditProgressBar: lines must be None, True or False, got {lines!r}")
        if isinstance(every_n_seconds, bool) or not isinstance(every_n_seconds, (int, float)) or every_n_seconds < 0:
            raise ValueError(f"EditProgressBar: every_n_seconds must be a number >= 0, got {every_n_seconds!r}")
        self.lines = lines
        self.every_n_seconds = float(every_n_seconds)
        self._line_mode = bool(lines)
        self._t0 = 0.0
        self._done0 = 0
        self._total: int | None = None
        self._unit = "steps"
        self._last_line: float | None = None
        self._last_done: int | None = None

    # -- mode ----------------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._line_mode = self.lines if self.lines is not None else not _is_terminal(sys.stdout)

    @property
    def line_mode(self) -> bool:
        """Whether progress is printed as lines (decided at ``setup``)."""
        return self._line_mode

    @property
    def is_enabled(self) -> bool:
        """The tqdm bars are enabled (off in line mode)."""
        return super().is_enabled and not self._line_mode

    def _prints_lines(self) -> bool:
        return self._line_mode and TQDMProgressBar.is_enabled.fget(self)  # off on ranks > 0 and with refresh_rate 0

    # -- what is counted -----------------------------------------------------------------------------------------------
    def _done(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        edits = getattr(pl_module, "num_edits", None)
        if self._unit == "edits" and isinstance(edits, int):
            return edits
        return int(trainer.global_step)

    def _count_total(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[str, int | None]:
        requests = getattr(getattr(trainer, "datamodule", None), "requests", None)
        if isinstance(getattr(pl_module, "num_edits", None), int) and requests is not None:
            return "edits", len(requests)
        total = self.total_train_batches
        steps = int(total) if isinstance(total, (int, float)) and total == total and total != float("inf") else None
        if trainer.max_steps is not None and trainer.max_steps > 0:
            steps = trainer.max_steps if steps is None else min(steps + trainer.global_step, trainer.max_steps)
        elif steps is not None:
            steps += trainer.global_step
        return "steps", steps

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The progress-bar metrics without ``v_num``; whole numbers shown without decimals."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {k: (int(v) if isinstance(v, float) and v.is_integer() else v) for k, v in items.items()}

    # -- hooks ---------------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._unit, self._total = self._count_total(trainer, pl_module)
        self._t0, self._done0 = time.monotonic(), self._done(trainer, pl_module)
        self._last_line, self._last_done = None, None

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if self._unit == "edits" and self.is_enabled:
            self.train_progress_bar.set_description("editing")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self._prints_lines():
            return
        now, done = time.monotonic(), self._done(trainer, pl_module)
        last = self._total is not None and done >= self._total
        if self._last_line is None or last or now - self._last_line >= self.every_n_seconds:
            self._print_line(trainer, pl_module, now, done)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        done = self._done(trainer, pl_module)
        if self._prints_lines() and self._last_done != done:
            self._print_line(trainer, pl_module, time.monotonic(), done)

    def progress_line(self, trainer: L.Trainer, pl_module: L.LightningModule, now: float, done: int) -> str:
        """One report: count (and share) done, elapsed time, time per unit, ETA, progress-bar metrics."""
        unit = self._unit[:-1]
        elapsed = now - self._t0
        head = f"{self._unit} {done}" + (f"/{self._total} ({100 * done / self._total:.0f}%)" if self._total else "")
        timing = f"{format_duration(elapsed)} elapsed"
        new = done - self._done0
        if new > 0:
            per = elapsed / new
            timing += f", {per:.1f} s/{unit}" if per >= 0.1 else f", {1 / per:.1f} {self._unit}/s"
            if self._total:
                timing += f", ETA {format_duration(per * max(self._total - done, 0))}"
        metrics = self.get_metrics(trainer, pl_module)
        metrics.pop(self._unit, None)  # the count itself (the editing module shows `edits`)
        tail = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        return " | ".join(p for p in (head, timing, tail) if p)

    def _print_line(self, trainer: L.Trainer, pl_module: L.LightningModule, now: float, done: int) -> None:
        print(self.progress_line(trainer, pl_module, now, done), file=sys.stdout, flush=True)
        self._last_line, self._last_done = now, done
