"""PruneCallback: PRUNE's restraint of the accumulated update of selected weight matrices, for any LightningModule."""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from lit_prune.logging import log_metrics, num_edits
from lit_prune.protocols import EditLogEntry, EditStream, WeightReader
from lit_prune.restraint import AccumulatedUpdate, Restraint, check_restraint_args, condition_number

MODES = ("online", "deferred")


class PruneCallback(L.Callback):
    """Restrains the accumulated update ΔW = W − W₀ of selected weight matrices (PRUNE, spec §2).

    Plug it into any LightningModule::

        trainer = L.Trainer(callbacks=[PruneCallback(params=r"layers\\.4\\.mlp\\.down_proj\\.weight", mode="deferred")])
        trainer.fit(my_module)

    Args:
        params: the matrices to restrain: a list of parameter names (as in ``pl_module.named_parameters()`` or, when
            the module has a ``model`` submodule, ``pl_module.model.named_parameters()``) or a regex string
            (``re.search`` on either name; only 2-D parameters count). Default: ``pl_module.edited_parameters``
            (an :class:`~lit_prune.protocols.EditStream`). Metric tags and the keys of :attr:`accumulated` use
            the names as listed (for a regex: the names in ``pl_module.named_parameters()``).
        alpha: base α > 1 of F's logarithm (paper: e, 2, 1.5, 1.2). kind: ``"log"`` or the ``"linear"`` ablation.
        mode: ``"online"`` (default): every ``every_n_steps`` steps W₀ + ΔŴ is written back and later updates build
            on it (applying F again to an already restrained ΔW shrinks it further, as expected in this mode).
            ``"deferred"`` (the paper's reference protocol): updates accumulate unrestrained; the restrained view
            W₀ + ΔŴ is written at ``on_train_batch_end`` when the schedule fires, before validation and at the end of
            fit, and the unrestrained weights are written back at ``on_train_batch_start``. So every evaluation
            (later callbacks, validation, the exported model) sees the restrained weights while the next training
            step / edit is computed on the unrestrained ones; after ``fit`` the model holds the restrained view.
        every_n_steps: restrain when ``trainer.global_step`` is a multiple of it (override :meth:`should_restrain`
            for another schedule).
        log_spectrum: log ``spectrum/<param>/{delta_sigma_max,n_restrained,condition_number}`` against the number
            of edits whenever the restraint runs (``delta_sigma_max``: σ_max of ΔW before F; ``condition_number``:
            κ of the weight as written).
        spectrum_every_n_steps: compute the condition number (all singular values of W: cheap at 576×1536, about a
            minute on one CPU core at 4096×14336) only at steps that are multiples of this.
        log_histogram: also add the singular values of ΔW as a TensorBoard histogram (TensorBoard loggers only).

    How it works: one :class:`~lit_prune.restraint.AccumulatedUpdate` per matrix (public: :attr:`accumulated`) holds
    W₀, τ = σ_max(W₀) and ΔW; the hooks below only decide when to call it. W₀ is snapshotted in ``setup`` (before a
    checkpoint is restored and before the model moves to its device; a module that builds its model in
    ``configure_model`` has it called there first, as Lightning's ``WeightAveraging`` does). With an
    :class:`~lit_prune.protocols.EditStream`, ΔW is the sum of the logged low-rank updates, read from
    ``pl_module.edit_log`` with a cursor, and restrained by the low-rank path (QR + r×r SVD); with any other module
    ΔW = W − W₀ is decomposed densely. Callbacks that read the evaluated weights
    (:class:`~lit_prune.protocols.WeightReader`: the metric callbacks) must come after it in ``trainer.callbacks``;
    ``setup`` fails with a message otherwise. The state (W₀, τ, ΔW, cursor, and in deferred mode the unrestrained
    weights) is checkpointed, so a resumed run continues bit-identically. The computation is deterministic and uses
    no collectives: every rank gets the same result. ``SequentialEditingModule.undo`` takes part through
    :meth:`check_undo` / :meth:`before_undo` / :meth:`after_undo` (:class:`~lit_prune.protocols.UndoParticipant`):
    exact in deferred mode, refused in online mode once a restraint changed the weights.
    """

    def __init__(
        self,
        params: str | Sequence[str] | None = None,
        alpha: float = math.e,
        kind: str = "log",
        mode: str = "online",
        every_n_steps: int = 1,
        log_spectrum: bool = True,
        log_histogram: bool = False,
        spectrum_every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        check_restraint_args(alpha, kind, where="PruneCallback")
        if mode not in MODES:
            raise ValueError(f"PruneCallback: mode must be one of {MODES}, got {mode!r}")
        for arg, v in (("every_n_steps", every_n_steps), ("spectrum_every_n_steps", spectrum_every_n_steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PruneCallback: {arg} must be an integer >= 1, got {v!r}")
        if isinstance(params, str):
            try:
                re.compile(params)
            except re.error as e:
                raise ValueError(f"PruneCallback: params regex {params!r} does not compile: {e}") from None
        elif params is not None:
            if not isinstance(params, Sequence) or not params or not all(isinstance(p, str) for p in params):
                raise ValueError(
                    f"PruneCallback: params must be None, a regex string or a non-empty list of names, got {params!r}"
                )
            params = list(params)
        self.params = params
        self.alpha, self.kind, self.mode = float(alpha), kind, mode
        self.every_n_steps, self.spectrum_every_n_steps = every_n_steps, spectrum_every_n_steps
        self.log_spectrum, self.log_histogram = bool(log_spectrum), bool(log_histogram)
        self.accumulated: dict[str, AccumulatedUpdate] = {}
        """Listed name -> its :class:`~lit_prune.restraint.AccumulatedUpdate` (W₀, τ, ΔW), filled in ``setup``."""
        self._names: dict[str, str] = {}  # listed name -> name in pl_module.named_parameters()
        self._tag_of: dict[str, str] = {}  # a parameter's name in either namespace -> its listed name
        self._stash: dict[str, Tensor | None] = {}  # deferred mode: the unrestrained weight while the view is shown
        self._spare: dict[str, Tensor] = {}  # deferred mode: reused buffers for the stash
        self._cursor = 0  # edit-log entries already added to ΔW
        self._last_step = -1
        self._view_step: int | None = None
        self._changed_at = -1  # online mode: number of edits when a restraint last changed the weights
        self._undo_view = False

    @property
    def state_key(self) -> str:
        params = self.params if isinstance(self.params, (str, type(None))) else tuple(self.params)
        return self._generate_state_key(params=params, alpha=self.alpha, kind=self.kind, mode=self.mode)

    # -- which matrices ------------------------------------------------------------------------------------------
    def _resolve(self, pl_module: L.LightningModule) -> dict[str, str]:
        """Listed names -> names in ``pl_module.named_parameters()``."""
        full = dict(pl_module.named_parameters())
        by_id = {id(p): n for n, p in full.items()}
        inner = dict(pl_module.named_children()).get("model")
        short = {}
        if isinstance(inner, nn.Module):
            short = {n: by_id[id(p)] for n, p in inner.named_parameters() if id(p) in by_id}
        alias = {**{n: n for n in full}, **short}
        where = type(pl_module).__name__
        if self.params is None:
            if not isinstance(pl_module, EditStream):
                raise ValueError(
                    f"PruneCallback: params not given and {where} reports no `edited_parameters` (it is not a "
                    "lit_prune.protocols.EditStream); pass params=[names] or a regex"
                )
            listed = list(pl_module.edited_parameters)
        elif isinstance(self.params, str):
            pat = re.compile(self.params)
            listed = [n for n, p in full.items() if p.dim() == 2 and pat.search(n)]
            listed += [alias[s] for s in short if full[alias[s]].dim() == 2 and pat.search(s) and alias[s] not in listed]
            if not listed:
                raise ValueError(f"PruneCallback: params regex {self.params!r} matches no 2-D parameter of {where}")
        else:
            listed = list(self.params)
        out = {}
        for tag in listed:
            if tag not in alias:
                stem = tag.rsplit(".", 2)[0]
                near = [n for n in alias if n.startswith(stem)][:5]
                raise ValueError(
                    f"PruneCallback: parameter {tag!r} not found in {where} (names of pl_module.named_parameters() "
                    f"or pl_module.model.named_parameters()); similar: {near}"
                )
            if full[alias[tag]].dim() != 2:
                raise ValueError(f"PruneCallback: parameter {tag!r} is not a matrix (shape {tuple(full[alias[tag]].shape)})")
            out[tag] = alias[tag]
        self._tag_of = {n: out_tag for n, full_name in alias.items() for out_tag, f in out.items() if f == full_name}
        return out

    def _check_order(self, trainer: L.Trainer) -> None:
        cbs = list(trainer.callbacks)
        before = [cb for cb in cbs[: cbs.index(self)] if isinstance(cb, WeightReader) and cb.reads_evaluated_weights]
        if before:
            names = ", ".join(type(cb).__name__ for cb in before)
            raise ValueError(
                f"PruneCallback must come before {names} in trainer.callbacks: they read the evaluated weights at "
                "on_train_batch_end, which must already be restrained. List PruneCallback first (in a config: the "
                "first entry of trainer.callbacks)."
            )

    # -- Lightning hooks -------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(pl_module, L.LightningModule) and is_overridden("configure_model", pl_module):
            pl_module.configure_model()  # the model must exist to snapshot W₀ (configure_model is idempotent)
        self._check_order(trainer)
        self._names = self._resolve(pl_module)
        editing = isinstance(pl_module, EditStream)
        new = [tag for tag in self._names if tag not in self.accumulated]
        for tag in new:  # once per matrix, before any edit of this callback's stream; a checkpoint's state replaces it
            W0 = pl_module.get_parameter(self._names[tag]).detach()
            self.accumulated[tag] = AccumulatedUpdate(W0, tracking="factors" if editing else "weights")
            self._stash[tag] = None
        if new and editing:
            self._cursor = len(pl_module.edit_log)  # W₀ already holds the edits logged so far
        self._last_step, self._view_step = -1, None
        if self.log_histogram and not any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers):
            rank_zero_warn("PruneCallback: log_histogram=True but the trainer has no TensorBoardLogger")

    def should_restrain(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Whether to restrain after this training batch (default: ``global_step`` a multiple of every_n_steps)."""
        step = trainer.global_step
        return step > 0 and step % self.every_n_steps == 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.mode == "deferred":
            self._restore_unrestrained(pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if isinstance(pl_module, EditStream):
            self._consume(pl_module.edit_log)
        step = trainer.global_step
        if step != self._last_step and self.should_restrain(trainer, pl_module):
            self._last_step = step
            self._apply(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.mode == "deferred" and trainer.state.fn == "fit" and not self._view_current(trainer):
            self._apply(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.mode == "deferred" and not self._view_current(trainer):
            self._apply(trainer, pl_module)

    # -- the work --------------------------------------------------------------------------------------------------
    def _consume(self, log: Sequence[EditLogEntry]) -> None:
        """Add the updates of the edit-log entries after the cursor to ΔW."""
        for entry in log[self._cursor:]:
            for key, up in entry.updates.items():
                if key in self._tag_of:
                    self.accumulated[self._tag_of[key]].add(up.A, up.B)
        self._cursor = len(log)

    def _view_current(self, trainer: L.Trainer) -> bool:
        return any(s is not None for s in self._stash.values()) or self._view_step == trainer.global_step

    @torch.no_grad()
    def _restore_unrestrained(self, pl_module: L.LightningModule) -> None:
        for tag, kept in self._stash.items():
            if kept is not None:
                pl_module.get_parameter(self._names[tag]).copy_(kept)
                self._stash[tag] = None

    @torch.no_grad()
    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule, log: bool = True) -> None:
        """Write W₀ + ΔŴ into every listed matrix (online: for good; deferred: as the view, keeping the original)."""
        deferred = self.mode == "deferred"
        if deferred:
            self._restore_unrestrained(pl_module)  # ΔW is always taken from the unrestrained weights
        results: dict[str, Restraint] = {}
        for tag, acc in self.accumulated.items():
            if tag not in self._names:
                continue
            p = pl_module.get_parameter(self._names[tag])
            keep = self._buffer(tag, p) if deferred else None
            res = acc.write_restrained(p, self.alpha, self.kind, commit=not deferred, keep=keep)
            if res is None:
                continue
            if res.changed:
                if deferred:
                    self._stash[tag] = keep
                else:
                    self._changed_at = num_edits(pl_module)
            results[tag] = res
        if deferred:
            self._view_step = trainer.global_step
        if log:
            self._log(trainer, pl_module, results)

    def _buffer(self, tag: str, p: Tensor) -> Tensor:
        """A buffer for the unrestrained copy of ``p`` (deferred mode), reused while it is not holding one."""
        buf = self._spare.get(tag)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = self._spare[tag] = torch.empty_like(p, memory_format=torch.contiguous_format)
        return buf

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, results: dict[str, Restraint]) -> None:
        if not results or not (self.log_spectrum or self.log_histogram):
            return
        x = num_edits(pl_module)
        with_cond = trainer.global_step % self.spectrum_every_n_steps == 0
        metrics: dict[str, float] = {}
        for tag, res in results.items():
            if self.log_spectrum:
                metrics[f"spectrum/{tag}/delta_sigma_max"] = float(res.sigma[0]) if res.sigma.numel() else 0.0
                metrics[f"spectrum/{tag}/n_restrained"] = float(res.n_restrained)
                if with_cond:
                    metrics[f"spectrum/{tag}/condition_number"] = condition_number(
                        pl_module.get_parameter(self._names[tag]))
            if self.log_histogram:
                for lg in trainer.loggers:
                    if isinstance(lg, TensorBoardLogger):
                        lg.experiment.add_histogram(f"spectrum/{tag}/delta_singular_values", res.sigma.cpu(),
                                                    global_step=x)
        if metrics:
            log_metrics(trainer, metrics, step=x)

    # -- undo (UndoParticipant; called by SequentialEditingModule.undo) ----------------------------------------------
    def check_undo(self, pl_module: L.LightningModule, records: Sequence[EditLogEntry]) -> None:
        """Raise before any weight changes if the edit batches ``records`` cannot be undone exactly.

        Deferred mode: always possible (ΔW is kept unrestrained). Online mode: only while no restraint has changed
        the weights since the oldest of them, because later edits were computed on, and the written weights hold,
        the restrained update, which no longer contains the edit's own update.
        """
        if not self.accumulated or not records:
            return
        before = num_edits(pl_module) - sum(len(r.requests) for r in records)  # edits left after the undo
        if self.mode == "online" and self._changed_at > before:
            raise ValueError(
                f"undo: PruneCallback (online) restrained the weights after edit {self._changed_at}, and the undo "
                f"would go back to edit {before}; the restrained weights no longer contain those edits' updates, so "
                "they cannot be removed exactly. Use PruneCallback(mode='deferred') to keep edits undoable."
            )

    def before_undo(self, pl_module: L.LightningModule, records: Sequence[EditLogEntry]) -> None:
        """Deferred mode: put the unrestrained weights back, so the module subtracts from the edit stream itself."""
        trainer = pl_module.trainer
        self._undo_view = self.mode == "deferred" and self._view_current(trainer)
        if self.mode == "deferred":
            self._restore_unrestrained(pl_module)

    @torch.no_grad()
    def after_undo(self, pl_module: L.LightningModule, records: Sequence[EditLogEntry]) -> None:
        """Remove the undone (and already added) updates from ΔW; rewrite the restrained view if it was shown."""
        if isinstance(pl_module, EditStream):
            left = len(pl_module.edit_log)  # entries [left, left + len(records)) were removed, newest first
            for i, rec in zip(range(left + len(records) - 1, left - 1, -1), records):
                if i < self._cursor:
                    for key, up in rec.updates.items():
                        if key in self._tag_of:
                            self.accumulated[self._tag_of[key]].remove(up.A, up.B)
            self._cursor = min(self._cursor, left)
        if self._undo_view:
            self._apply(pl_module.trainer, pl_module, log=False)
            self._undo_view = False

    # -- checkpoint state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "matrices": {tag: acc.state_dict() for tag, acc in self.accumulated.items()},
            "stash": {tag: (None if s is None else s.clone()) for tag, s in self._stash.items()},
            "cursor": self._cursor,
            "last_step": self._last_step,
            "view_step": self._view_step,
            "changed_at": self._changed_at,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replace the snapshot taken in ``setup`` by the checkpoint's W₀, τ, ΔW, cursor and stash."""
        for tag, st in state_dict["matrices"].items():
            if tag in self.accumulated:
                try:
                    self.accumulated[tag].load_state_dict(st)
                except ValueError as e:
                    raise ValueError(f"PruneCallback: checkpoint state for {tag!r} does not fit: {e}") from None
            else:
                self.accumulated[tag] = AccumulatedUpdate.from_state_dict(st)
            self._stash[tag] = state_dict.get("stash", {}).get(tag)
        self._cursor = int(state_dict.get("cursor", 0))
        self._last_step = int(state_dict.get("last_step", -1))
        self._view_step = state_dict.get("view_step")
        self._changed_at = int(state_dict.get("changed_at", -1))
