"""SequentialEditingModule: sequential model editing as a LightningModule whose steps are edit batches."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from .editors.base import Editor, LowRankUpdate, Updates, apply_updates, check_updates
from .curves import log_metrics
from .protocols import undo_participants
from .requests import EditRequest


@dataclass
class EditRecord:
    """One applied edit batch: the requests, the step that applied them and the updates (float32 factors, CPU)."""

    step: int
    requests: list[EditRequest]
    updates: Updates
    seconds: float = 0.0
    case_ids: list[Any] = field(default_factory=list)

    def to_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "requests": [r.to_dict() for r in self.requests],
            "updates": {k: (u.A, u.B) for k, u in self.updates.items()},
            "seconds": self.seconds,
        }

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "EditRecord":
        reqs = [EditRequest(**r) for r in s["requests"]]
        ups = {k: LowRankUpdate(a, b) for k, (a, b) in s["updates"].items()}
        return cls(s["step"], reqs, ups, s.get("seconds", 0.0), [r.case_id for r in reqs])


class _NoOpOptimizer(torch.optim.Optimizer):
    """Stands in for an optimizer: stepping it is how manual optimisation advances ``trainer.global_step``."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {})

    def step(self, closure: Any = None) -> None:  # noqa: D401 - nothing to optimise
        return None


class SequentialEditingModule(L.LightningModule):
    """Applies one batch of edit requests per ``training_step``, sequentially, never restoring weights.

    Args:
        model: a model name for :func:`lit_prune.load_model` (local folder, ``smollm2-135m``, or a hub id).
        editor: the editor (``class_path`` in a config): ``lit_prune.editors.ROME``, ``MEMIT``, ``FT``, ``MEND``.
        dtype: the model's dtype (``float32``, ``bfloat16``, ...); editors compute their linear algebra in float32+.
        export_dir: where the edited (and, with a PruneCallback, restrained) model is saved with ``save_pretrained``
            at the end of ``fit``; ``"auto"`` = ``<log_dir>/edited_model``; ``None`` = no export.

    It implements :class:`lit_prune.protocols.EditingModule`, the contract callbacks rely on: ``model``,
    ``tokenizer``, ``edited_parameters`` (names in ``model.named_parameters()``), ``num_edits`` (requests applied so
    far, the x-axis of every curve), ``edit_log`` (one :class:`EditRecord` per step, appended after the step wrote
    its update) and ``applied_requests``.

    The HF model is loaded in :meth:`configure_model` (Lightning calls it after ``setup`` and before moving the
    module to its device and syncing the ranks), so ``--print_config`` and data validation never wait for it, and
    device placement never depends on which callbacks are configured. Outside a Trainer call
    ``module.configure_model()`` (or :meth:`set_model`) before using ``module.model``. Multi-device runs compute each
    update on every rank and broadcast rank 0's, so all ranks hold bit-identical weights after every step; for an
    editor that declares ``shares_targets`` (MEMIT, AlphaEdit) and a batch of two or more requests, the ranks split
    the batch's δ/z optimisation (rank r takes requests r, r + world_size, ...), all-gather the targets and each
    solves the same closed-form update.
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        editor: Editor | None = None,
        dtype: str = "float32",
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.model_name, self.dtype_name, self.export_dir = model, dtype, export_dir
        if editor is None:
            from .editors import ROME

            editor = ROME()
        if not isinstance(editor, Editor):
            raise TypeError(f"SequentialEditingModule: editor must be a lit_prune Editor, got {type(editor).__name__}")
        self.editor = editor
        self.tokenizer: Any = None
        self.edit_log: list[EditRecord] = []
        self.num_edits = 0
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the edited parameters
        self._dummy = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.save_hyperparameters(ignore=["editor"])

    # -- the model, loaded in configure_model ------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name == "model" and "model" not in self._modules:
            raise AttributeError(
                f"{type(self).__name__}.model is not loaded yet: it is loaded in configure_model() (Lightning calls "
                "it in fit); call module.configure_model() or module.set_model(model, tokenizer) first"
            )
        return super().__getattr__(name)

    def configure_model(self) -> None:
        """Load ``self.model_name`` (once; later calls do nothing) unless :meth:`set_model` already gave a model."""
        if "model" not in self._modules:
            from .models import load_model

            self.set_model(*load_model(self.model_name, dtype=self.dtype_name))

    def set_model(self, model: nn.Module, tokenizer: Any) -> None:
        """Use an already loaded model (tests, notebooks) instead of loading ``self.model_name``."""
        model.eval().requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer

    @property
    def edited_parameters(self) -> list[str]:
        """Names (in ``self.model.named_parameters()``) of the parameters the editor changes."""
        return list(self.editor.edited_parameters(self.model))

    @property
    def applied_requests(self) -> list[EditRequest]:
        return [r for rec in self.edit_log for r in rec.requests]

    # -- Lightning hooks -------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _NoOpOptimizer([self._dummy])

    def on_fit_start(self) -> None:
        self.model.eval()
        self.editor.prepare(self.model, self.tokenizer)

    def train(self, mode: bool = True) -> "SequentialEditingModule":
        super().train(mode)
        if "model" in self._modules:
            self._modules["model"].eval()  # editing never uses dropout
        return self

    def training_step(self, batch: list[EditRequest], batch_idx: int) -> None:
        t0 = time.perf_counter()
        for i, r in enumerate(batch):
            r.validate(f"edit batch {batch_idx}, request {i}")
        world = self.trainer.world_size
        if world > 1 and len(batch) > 1 and getattr(self.editor, "shares_targets", False):
            updates = self._shared_compute(batch)
        else:
            updates = self.editor.compute(self.model, self.tokenizer, batch)
        updates = {k: LowRankUpdate(u.A.detach().float().cpu(), u.B.detach().float().cpu()) for k, u in updates.items()}
        if world > 1:  # every rank solved the same update; rank 0's makes the weights bit-identical regardless
            updates = self.trainer.strategy.broadcast(updates, src=0)
        check_updates(self.model, updates, where=f"edit batch {batch_idx} (case ids {[r.case_id for r in batch]})")
        apply_updates(self.model, updates)
        seconds = time.perf_counter() - t0
        self.edit_log.append(EditRecord(self.global_step, list(batch), updates, seconds, [r.case_id for r in batch]))
        self.num_edits += len(batch)
        self.optimizers().step()  # advances global_step: max_steps, step checkpoints and logging work
        self.log("edits", float(self.num_edits), prog_bar=True, logger=False)
        metrics = {"edit/seconds_per_edit": seconds / len(batch)}
        for k, u in updates.items():
            metrics[f"edit/{k}/update_norm"] = float(torch.linalg.matrix_norm(u.dense(torch.float32)))
        log_metrics(self.trainer, metrics, step=self.num_edits)

    def _shared_compute(self, batch: list[EditRequest]) -> Updates:
        """The batch's update with the work shared by the ranks (editors with ``shares_targets``, e.g. MEMIT): rank r
        computes the targets of requests r, r + world, ...; the shares are all-gathered and put back in request
        order, and every rank solves the same closed-form update from all targets."""
        import torch.distributed as dist

        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = list(range(rank, len(batch), world))
        targets = self.editor.compute_targets(self.model, self.tokenizer, batch, mine)
        shares: list[Any] = [None] * world
        dist.all_gather_object(shares, targets.detach().double().cpu())
        cols: list[Any] = [None] * len(batch)
        for r, share in enumerate(shares):
            for j, i in enumerate(range(r, len(batch), world)):
                cols[i] = share[:, j]
        all_targets = torch.stack(cols, 1).to(targets.device)
        return self.editor.compute_from_targets(self.model, self.tokenizer, batch, all_targets)

    def on_train_end(self) -> None:
        if self.export_dir is None:
            return
        out = Path(self.trainer.log_dir or ".") / "edited_model" if self.export_dir == "auto" else Path(self.export_dir)
        if self.trainer.is_global_zero:
            self.export(out)
        self.trainer.strategy.barrier()

    def export(self, directory: str | Path) -> Path:
        """``save_pretrained`` the model as it is now (edited, and restrained if a PruneCallback is in use)."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        rank_zero_info(f"edited model saved to {directory} ({self.num_edits} edits)")
        return directory

    @torch.no_grad()
    def undo(self, k: int = 1) -> list[EditRecord]:
        """Subtract the updates of the last ``k`` logged edit batches (newest first); returns the removed records.

        The weights return to the state before those edits, up to float rounding. Callbacks of the attached trainer
        that track the weights take part (:class:`lit_prune.protocols.UndoParticipant`, e.g.
        :class:`lit_prune.callbacks.PruneCallback`): in deferred mode the undone updates leave the accumulated ΔW and the
        restrained view is rewritten; in online mode undo is refused (``ValueError``, nothing changed) once a
        restraint has changed the weights after the oldest undone edit.
        """
        if not 0 <= k <= len(self.edit_log):
            raise ValueError(f"undo: k must be between 0 and {len(self.edit_log)} (logged edit batches), got {k}")
        records = self.edit_log[len(self.edit_log) - k:][::-1]
        hooks = undo_participants(self._trainer)
        for cb in hooks:
            cb.check_undo(self, records)
        for cb in hooks:
            cb.before_undo(self, records)
        for rec in records:
            self.edit_log.pop()
            apply_updates(self.model, rec.updates, sign=-1.0)
            self.num_edits -= len(rec.requests)
        self.editor.forget(len(records))
        for cb in hooks:
            cb.after_undo(self, records)
        return records

    # -- checkpoints: only what editing changed ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        names = set(self.edited_parameters)
        checkpoint["state_dict"] = {
            f"model.{n}": p.detach().cpu().clone() for n, p in self.model.named_parameters() if n in names
        }
        checkpoint["lit_prune"] = {
            "num_edits": self.num_edits,
            "edit_log": [r.to_state() for r in self.edit_log],
            "model_name": self.model_name,
            "editor": self.editor.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("lit_prune", {})
        if state.get("model_name") not in (None, self.model_name):
            raise ValueError(
                f"checkpoint was written for model '{state['model_name']}', this run uses '{self.model_name}'"
            )
        self.configure_model()  # the base model, before Lightning loads the edited parameters into it
        self.num_edits = int(state.get("num_edits", 0))
        self.edit_log = [EditRecord.from_state(s) for s in state.get("edit_log", [])]
        self.editor.load_state_dict(state.get("editor", {}))
