"""RestraintCallback: the Lightning wiring shared by the restraints of the accumulated edit update (PRUNE, RECT).

A restraint is a map ΔW ↦ ΔW' applied to the accumulated update of selected matrices; this base class decides when
(online or deferred, on a step schedule), keeps one :class:`~lit_prune.restraint.AccumulatedUpdate` per matrix, takes
part in undo and checkpoints. Subclasses say what the map is (:meth:`RestraintCallback.restrain`) and what to log.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from lit_prune.curves import log_metrics, num_edits
from lit_prune.protocols import EditLogEntry, EditStream, WeightReader
from lit_prune.restraint import AccumulatedUpdate

MODES = ("online", "deferred")


def check_params(params: Any, where: str) -> str | list[str] | None:
    """A callback's ``params`` argument, checked: None, a regex that compiles, or a non-empty list of names."""
    if isinstance(params, str):
        try:
            re.compile(params)
        except re.error as e:
            raise ValueError(f"{where}: params regex {params!r} does not compile: {e}") from None
        return params
    if params is None:
        return None
    if isinstance(params, (bytes, Mapping)) or not isinstance(params, Sequence) or not params or not all(
            isinstance(p, str) for p in params):
        raise ValueError(f"{where}: params must be None, a regex string or a non-empty list of names, got {params!r}")
    return list(params)


class RestraintCallback(L.Callback):
    """Restrains the accumulated update ΔW = W − W₀ of selected weight matrices. Not used directly: see
    :class:`~lit_prune.callbacks.PruneCallback` and :class:`~lit_prune.callbacks.RectCallback`.

    Args:
        params: the matrices: a list of parameter names (as in ``pl_module.named_parameters()`` or, when the module
            has a ``model`` submodule, ``pl_module.model.named_parameters()``) or a regex string (``re.search`` on
            either name; only 2-D parameters count). Default: ``pl_module.edited_parameters`` (an
            :class:`~lit_prune.protocols.EditStream`). Metric tags and the keys of :attr:`accumulated` use the names
            as listed (for a regex: the names in ``pl_module.named_parameters()``).
        mode: ``"online"``: every ``every_n_steps`` steps W₀ + ΔW' is written back and later updates build on it.
            ``"deferred"`` (the PRUNE reference protocol): updates accumulate unrestrained; the restrained view
            W₀ + ΔW' is written at ``on_train_batch_end`` when the schedule fires, before validation and at the end of
            fit, and the unrestrained weights are written back at ``on_train_batch_start``. So every evaluation
            (later callbacks, validation, the exported model) sees the restrained weights while the next step / edit
            is computed on the unrestrained ones; after ``fit`` the model holds the restrained view.
        every_n_steps: restrain when ``trainer.global_step`` is a multiple of it (override :meth:`should_restrain`).
        log_spectrum: log the subclass's metrics against the number of edits whenever the restraint runs.
        spectrum_every_n_steps: compute the condition number of the written weight (all singular values: cheap at
            576×1536, about a minute on one CPU core at 4096×14336) only at steps that are multiples of this.

    How it works: W₀ is snapshotted in ``setup`` (before a checkpoint is restored and before the model moves to its
    device; a module that builds its model in ``configure_model`` has it called there first, as Lightning's
    ``WeightAveraging`` does). With an :class:`~lit_prune.protocols.EditStream`, ΔW is the sum of the logged
    low-rank updates, read from ``pl_module.edit_log`` with a cursor; with any other module, or when several
    restraints share a matrix, ΔW = W − W₀ is read from the weights. Callbacks that read the evaluated weights
    (:class:`~lit_prune.protocols.WeightReader`: the metric callbacks) must come after it in ``trainer.callbacks``;
    ``setup`` fails with a message otherwise. Several restraints compose in list order, online only:
    ``[RectCallback(), PruneCallback()]`` writes W₀ + F(RECT(ΔW)) after each step (a deferred restraint sharing a
    matrix with another restraint fails at setup: whose view is shown and which unrestrained copy goes back would
    have no single meaning). The state (W₀, τ, ΔW, cursor, and in deferred mode the unrestrained weights) is
    checkpointed, so a resumed run continues bit-identically. The computation is deterministic and uses no
    collectives: every rank gets the same result. ``SequentialEditingModule.undo`` takes part through
    :meth:`check_undo` / :meth:`before_undo` / :meth:`after_undo` (:class:`~lit_prune.protocols.UndoParticipant`):
    exact in deferred mode, refused in online mode once a restraint changed the weights.
    """

    def __init__(
        self,
        params: str | Sequence[str] | None = None,
        mode: str = "online",
        every_n_steps: int = 1,
        log_spectrum: bool = True,
        spectrum_every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        where = type(self).__name__
        if mode not in MODES:
            raise ValueError(f"{where}: mode must be one of {MODES}, got {mode!r}")
        for arg, v in (("every_n_steps", every_n_steps), ("spectrum_every_n_steps", spectrum_every_n_steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{where}: {arg} must be an integer >= 1, got {v!r}")
        self.params, self.mode = check_params(params, where), mode
        self.every_n_steps, self.spectrum_every_n_steps = every_n_steps, spectrum_every_n_steps
        self.log_spectrum = bool(log_spectrum)
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

    # -- what a subclass defines ---------------------------------------------------------------------------------------
    def restrain(self, acc: AccumulatedUpdate, weight: Tensor, commit: bool, keep: Tensor | None) -> Any:
        """Turn ``weight`` (holding W₀ + ΔW) into W₀ + ΔW' in place; ``commit``: ΔW' becomes the accumulated update;
        ``keep``: receives the unrestrained weight when the weight changes. Returns a result (None: ΔW = 0)."""
        raise NotImplementedError

    def changed(self, result: Any) -> bool:
        """Whether ``result`` changed the weight."""
        raise NotImplementedError

    def metrics(self, tag: str, result: Any, weight: Tensor, with_condition_number: bool) -> dict[str, float]:
        """Scalars to log for one matrix after a restraint (tags ``<group>/<tag>/<name>``)."""
        return {}

    def log_extra(self, trainer: L.Trainer, results: dict[str, Any], step: int) -> None:
        """Anything else to log (histograms) after the restraint ran at ``step`` edits."""

    # -- which matrices (also used by lit_prune.preflight, on a meta-device model) -----------------------------------
    def match(
        self, shapes: Mapping[str, tuple[int, ...]], alias: Mapping[str, str], edited: Sequence[str] | None, where: str
    ) -> dict[str, str]:
        """Listed names -> parameter names, from ``shapes`` (name -> shape, the module's own names) and ``alias``
        (every accepted name, e.g. the inner model's, -> a key of ``shapes``); ``edited``: the module's
        ``edited_parameters`` (None: it has none). Raises ``ValueError`` naming the parameter and ``where``."""
        me = f"{type(self).__name__} params"
        if self.params is None:
            if edited is None:
                raise ValueError(
                    f"{me}: not given and {where} reports no `edited_parameters` (it is not a "
                    "lit_prune.protocols.EditStream); pass params=[names] or a regex"
                )
            listed = list(edited)
        elif isinstance(self.params, str):
            pat = re.compile(self.params)
            listed = []
            for n, full in alias.items():
                if len(shapes[full]) == 2 and pat.search(n) and full not in [alias[x] for x in listed]:
                    listed.append(full)
            if not listed:
                raise ValueError(f"{me}: regex {self.params!r} matches no 2-D parameter of {where}; its matrices are "
                                 f"named like {[n for n, s in shapes.items() if len(s) == 2][:4]}")
        else:
            listed = list(self.params)
        out = {}
        for tag in listed:
            if tag not in alias:
                stem = tag.rsplit(".", 2)[0]
                near = [n for n in alias if n.startswith(stem)][:5]
                raise ValueError(f"{me}: parameter {tag!r} is not in {where}; similar names: {near}")
            if len(shapes[alias[tag]]) != 2:
                raise ValueError(f"{me}: parameter {tag!r} is not a matrix (shape {tuple(shapes[alias[tag]])})")
            out[tag] = alias[tag]
        return out

    def resolve(self, pl_module: L.LightningModule) -> dict[str, str]:
        """Listed names -> names in ``pl_module.named_parameters()`` (errors name the parameter and the module)."""
        full = dict(pl_module.named_parameters())
        by_id = {id(p): n for n, p in full.items()}
        inner = dict(pl_module.named_children()).get("model")
        short = {}
        if isinstance(inner, nn.Module):
            short = {n: by_id[id(p)] for n, p in inner.named_parameters() if id(p) in by_id}
        alias = {**{n: n for n in full}, **short}
        edited = list(pl_module.edited_parameters) if isinstance(pl_module, EditStream) else None
        out = self.match({n: tuple(p.shape) for n, p in full.items()}, alias, edited, type(pl_module).__name__)
        self._tag_of = {n: t for n, f in alias.items() for t, g in out.items() if f == g}
        return out

    def check_order(self, callbacks: Sequence[Any]) -> None:
        """Fail if a :class:`~lit_prune.protocols.WeightReader` comes before this callback in ``callbacks``."""
        cbs = list(callbacks)
        me = type(self).__name__
        before = [cb for cb in cbs[: cbs.index(self)] if isinstance(cb, WeightReader) and cb.reads_evaluated_weights]
        if before:
            names = ", ".join(type(cb).__name__ for cb in before)
            raise ValueError(
                f"{me} must come before {names} in trainer.callbacks: they read the evaluated weights at "
                f"on_train_batch_end, which must already be restrained. List {me} first (in a config: the first "
                "entry of trainer.callbacks)."
            )

    @staticmethod
    def check_combination(resolved: Mapping["RestraintCallback", set[str]]) -> set["RestraintCallback"]:
        """Fail when restraints that share a matrix include a deferred one; returns the callbacks that share one.

        ``resolved``: each restraint callback -> the parameter names it restrains."""
        shared = set()
        cbs = list(resolved)
        for i, a in enumerate(cbs):
            for b in cbs[i + 1:]:
                if resolved[a] & resolved[b]:
                    if "deferred" in (a.mode, b.mode):
                        names = ", ".join(f"{type(cb).__name__}(mode={cb.mode!r})" for cb in (a, b))
                        raise ValueError(
                            f"{names} restrain the same matrices and one is deferred: a deferred view over another "
                            "restraint's writes has no single meaning. Use mode='online' for all of them (they "
                            "compose in list order), or keep one restraint."
                        )
                    shared |= {a, b}
        return shared

    # -- Lightning hooks -------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(pl_module, L.LightningModule) and is_overridden("configure_model", pl_module):
            pl_module.configure_model()  # the model must exist to snapshot W₀ (configure_model is idempotent)
        self.check_order(trainer.callbacks)
        self._names = self.resolve(pl_module)
        resolved = {cb: set(self._names.values() if cb is self else cb.resolve(pl_module).values())
                    for cb in trainer.callbacks if isinstance(cb, RestraintCallback)}  # in list order
        shared = self in self.check_combination(resolved)
        from_log = isinstance(pl_module, EditStream) and not shared
        new = [tag for tag in self._names if tag not in self.accumulated]
        for tag in new:  # once per matrix, before any edit of this callback's stream; a checkpoint's state replaces it
            W0 = pl_module.get_parameter(self._names[tag]).detach()
            self.accumulated[tag] = AccumulatedUpdate(W0, tracking="factors" if from_log else "weights")
            self._stash[tag] = None
        if new and from_log:
            self._cursor = len(pl_module.edit_log)  # W₀ already holds the edits logged so far
        self._last_step, self._view_step = -1, None

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
        """Add the updates of the edit-log entries after the cursor to ΔW (factor-tracked matrices)."""
        for entry in log[self._cursor:]:
            for key, up in entry.updates.items():
                tag = self._tag_of.get(key)
                if tag is not None and self.accumulated[tag].tracks_factors:
                    self.accumulated[tag].add(up.A, up.B)
        self._cursor = len(log)

    def _view_current(self, trainer: L.Trainer) -> bool:
        return any(s is not None for s in self._stash.values()) or self._view_step == trainer.global_step

    @torch.no_grad()
    def _restore_unrestrained(self, pl_module: L.LightningModule) -> None:
        for tag, kept in self._stash.items():
            if kept is not None:
                pl_module.get_parameter(self._names[tag]).copy_(kept)
                self._stash[tag] = None

    def _buffer(self, tag: str, p: Tensor) -> Tensor:
        """A buffer for the unrestrained copy of ``p`` (deferred mode), reused while it is not holding one."""
        buf = self._spare.get(tag)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = self._spare[tag] = torch.empty_like(p, memory_format=torch.contiguous_format)
        return buf

    @torch.no_grad()
    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule, log: bool = True) -> None:
        """Write W₀ + ΔW' into every listed matrix (online: for good; deferred: as the view, keeping the original)."""
        deferred = self.mode == "deferred"
        if deferred:
            self._restore_unrestrained(pl_module)  # ΔW is always taken from the unrestrained weights
        results: dict[str, Any] = {}
        for tag, acc in self.accumulated.items():
            if tag not in self._names:
                continue
            p = pl_module.get_parameter(self._names[tag])
            acc.to(p.device)
            res = self.restrain(acc, p.data, commit=not deferred, keep=self._buffer(tag, p) if deferred else None)
            if res is None:
                continue
            if self.changed(res):
                if deferred:
                    self._stash[tag] = self._spare[tag]
                else:
                    self._changed_at = num_edits(pl_module)
            results[tag] = res
        if deferred:
            self._view_step = trainer.global_step
        if log and results:
            x = num_edits(pl_module)
            if self.log_spectrum:
                with_cond = trainer.global_step % self.spectrum_every_n_steps == 0
                metrics: dict[str, float] = {}
                for tag, res in results.items():
                    metrics.update(self.metrics(tag, res, pl_module.get_parameter(self._names[tag]), with_cond))
                if metrics:
                    log_metrics(trainer, metrics, step=x)
            self.log_extra(trainer, results, x)

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
            me = type(self).__name__
            raise ValueError(
                f"undo: {me} (online) restrained the weights after edit {self._changed_at}, and the undo would go "
                f"back to edit {before}; the restrained weights no longer contain those edits' updates, so they "
                f"cannot be removed exactly. Use {me}(mode='deferred') to keep edits undoable."
            )

    def before_undo(self, pl_module: L.LightningModule, records: Sequence[EditLogEntry]) -> None:
        """Deferred mode: put the unrestrained weights back, so the module subtracts from the edit stream itself."""
        self._undo_view = self.mode == "deferred" and self._view_current(pl_module.trainer)
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
                        tag = self._tag_of.get(key)
                        if tag is not None and self.accumulated[tag].tracks_factors:
                            self.accumulated[tag].remove(up.A, up.B)
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
                    raise ValueError(f"{type(self).__name__}: checkpoint state for {tag!r} does not fit: {e}") from None
            else:
                self.accumulated[tag] = AccumulatedUpdate.from_state_dict(st)
            self._stash[tag] = state_dict.get("stash", {}).get(tag)
        self._cursor = int(state_dict.get("cursor", 0))
        self._last_step = int(state_dict.get("last_step", -1))
        self._view_step = state_dict.get("view_step")
        self._changed_at = int(state_dict.get("changed_at", -1))
