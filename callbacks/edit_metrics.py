"""EditMetricsCallback: editing scores (efficacy, generalization, locality) under both scoring protocols."""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_prune.curves import log_metrics, num_edits
from lit_prune.errors import check_positive_ints
from lit_prune.metrics.editing import (
    EditScores,
    PrePredictions,
    neighborhood_predictions,
    request_case_values,
)
from lit_prune.metrics.report import FinalMetricsReporter
from lit_prune.requests import EditRequest


def _shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    return list(items[rank::world_size])


class EditMetricsCallback(FinalMetricsReporter, L.Callback):
    """Efficacy, generalization and locality of the edits (spec §4), logged against the number of edits.

    * ``baseline/{efficacy,generalization,locality}[_magnitude]`` at x = 0: the pre-edit scores of every request of
      the run, taken at ``on_train_start`` on the unedited model. The run's requests are read from
      ``trainer.datamodule.requests`` or from the train dataloader's dataset (``.requests``, as
      :class:`~lit_prune.EditDataModule` provides). When neither exists, no baseline is logged and the pre-edit
      predictions that ZsRE-style locality needs are taken for each batch at ``on_train_batch_start``, i.e. on the
      model right before that batch's edit.
    * ``immediate/...`` (``immediate=True``): each batch is scored on the model right after its edit; the logged value
      at N edits is the mean over all N edits of their immediate scores.
    * ``retention/...`` (the paper's protocol): every ``retention_every_n_edits`` edits and at the end of training,
      all requests applied so far (``pl_module.applied_requests``) are re-scored on the model as it is then. With a
      deferred :class:`~lit_prune.callbacks.PruneCallback` (which must come first) that is the restrained model.
      ``max_retention_edits`` caps the re-scored requests (and the baseline's) at that many, evenly spaced.

    Scoring is batched (``batch_size`` sequences per forward), in eval mode without gradients, and sharded across
    ranks (rank r scores requests r, r + world_size, ...); the torchmetrics states are summed, so every rank logs
    the same values. The latest efficacy shows in the progress bar (``eff``/``ret_eff``) when ``prog_bar``.

    It needs ``pl_module.model``, ``.tokenizer``, ``.num_edits`` and ``.applied_requests``
    (:class:`~lit_prune.SequentialEditingModule` has them).
    """

    reads_evaluated_weights = True  # lit_prune.protocols.WeightReader: restraining callbacks go first

    def __init__(
        self,
        retention_every_n_edits: int | None = 10,
        immediate: bool = True,
        baseline: bool = True,
        batch_size: int = 32,
        max_retention_edits: int | None = None,
        prog_bar: bool = True,
    ) -> None:
        super().__init__()
        check_positive_ints("EditMetricsCallback", {
            "retention_every_n_edits": retention_every_n_edits, "batch_size": batch_size,
            "max_retention_edits": max_retention_edits}, optional=("retention_every_n_edits", "max_retention_edits"))
        self.retention_every_n_edits = retention_every_n_edits
        self.immediate = immediate
        self.baseline = baseline
        self.batch_size = batch_size
        self.max_retention_edits = max_retention_edits
        self.prog_bar = prog_bar
        self.immediate_scores = EditScores()  # cumulative over the run
        self.batch_scores = EditScores()  # one evaluation (baseline, retention)
        self.pre_predictions: PrePredictions = {}
        self.final_metrics: dict[str, float] = {}
        self._baseline_done = False
        self._last_retention: int | None = None
        self._immediate_state: dict[str, float] | None = None  # synced immediate sums, restored from a checkpoint
        self._synced_immediate: dict[str, float] | None = None  # synced immediate sums, for the checkpoint
        self._known_requests = False

    # -- scheduling ----------------------------------------------------------------------------------------------------
    def should_score_retention(self, edits: int, previous: int | None) -> bool:
        """Whether to re-score all applied edits now (override for another schedule; must agree on all ranks)."""
        if self.retention_every_n_edits is None or edits == 0:
            return False
        k = self.retention_every_n_edits
        return edits // k > (previous or 0) // k

    # -- helpers -------------------------------------------------------------------------------------------------------
    @staticmethod
    def run_requests(trainer: L.Trainer) -> list[EditRequest] | None:
        """All requests of the run in order, if the datamodule or the train dataloader's dataset exposes them."""
        reqs = getattr(getattr(trainer, "datamodule", None), "requests", None)
        if reqs is None:
            loaders = trainer.train_dataloader
            for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
                reqs = getattr(getattr(loader, "dataset", None), "requests", None)
                if reqs is not None:
                    break
        if reqs is None:
            return None
        return [EditRequest.coerce(r, f"run request {i}") for i, r in enumerate(reqs)]

    def _capped(self, requests: list[EditRequest]) -> list[EditRequest]:
        """At most ``max_retention_edits`` requests, evenly spaced over ``requests`` (first and last included)."""
        if self.max_retention_edits is None or len(requests) <= self.max_retention_edits:
            return requests
        idx = torch.linspace(0, len(requests) - 1, self.max_retention_edits).round().long().unique().tolist()
        return [requests[i] for i in idx]

    def _case_values(self, pl_module: L.LightningModule, requests: Sequence[EditRequest]) -> dict[str, torch.Tensor]:
        model = pl_module.model
        with torch.no_grad():
            return request_case_values(model, pl_module.tokenizer, requests, self.batch_size, self.pre_predictions)

    def _evaluate(
        self, trainer: L.Trainer, pl_module: L.LightningModule, requests: Sequence[EditRequest]
    ) -> dict[str, float]:
        """Score ``requests`` sharded over ranks into a fresh metric state; returns the reduced values (all ranks)."""
        m = self.batch_scores.to(pl_module.device)
        m.reset()
        m.update(self._case_values(pl_module, _shard(requests, trainer.global_rank, trainer.world_size)))
        return {k: float(v) for k, v in m.compute().items()}

    def _gather_pre_predictions(
        self, trainer: L.Trainer, pl_module: L.LightningModule, requests: Sequence[EditRequest]
    ) -> None:
        mine = neighborhood_predictions(pl_module.model, pl_module.tokenizer,
                                        _shard(requests, trainer.global_rank, trainer.world_size), self.batch_size)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, mine)
            for p in parts:
                self.pre_predictions.update(p)
        else:
            self.pre_predictions.update(mine)

    # -- hooks ---------------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.immediate_scores.reset()
        self.batch_scores.reset()
        self.final_metrics = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.immediate_scores.to(pl_module.device)
        if self._immediate_state is not None:  # resumed: the run's immediate sums so far, held by rank 0
            if trainer.global_rank == 0:
                self.immediate_scores.load_sums(self._immediate_state)
            self._immediate_state = None
        requests = self.run_requests(trainer)
        self._known_requests = requests is not None
        if requests is None:
            rank_zero_warn("EditMetricsCallback: the run's requests are not known in advance (no datamodule/dataset "
                           "'.requests'); no baseline is logged and pre-edit predictions are taken per batch.")
            return
        if self._baseline_done:
            return
        rank_zero_info(f"scoring the unedited model on the run's {len(requests)} edit requests (baseline)")
        self._gather_pre_predictions(trainer, pl_module, requests)
        if self.baseline and requests:
            values = self._evaluate(trainer, pl_module, self._capped(requests))
            log_metrics(trainer, {f"baseline/{k}": v for k, v in values.items()}, step=0)
            self.final_metrics.update({f"baseline/{k}": v for k, v in values.items()})
        self._baseline_done = True

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._known_requests:
            return
        todo = [r for r in batch if any((q, a) not in self.pre_predictions
                                        for q, a in zip(r.neighborhood_prompts, r.neighborhood_answers))]
        if todo:
            self.pre_predictions.update(
                neighborhood_predictions(pl_module.model, pl_module.tokenizer, todo, self.batch_size))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        edits = num_edits(pl_module)
        if self.immediate and batch:
            first = edits - len(batch)  # global index of the batch's first request: shard as retention does
            mine = [r for j, r in enumerate(batch) if (first + j) % trainer.world_size == trainer.global_rank]
            self.immediate_scores.to(pl_module.device)
            self.immediate_scores.update(self._case_values(pl_module, mine))
            values = {f"immediate/{k}": float(v) for k, v in self.immediate_scores.compute().items()}
            self._snapshot_immediate()
            log_metrics(trainer, values, step=edits, prog_bar={"immediate/efficacy": "eff"} if self.prog_bar else None)
            self.final_metrics.update(values)
        if self.should_score_retention(edits, self._last_retention):
            self._retention(trainer, pl_module, edits)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        edits = num_edits(pl_module)
        if edits > 0 and self._last_retention != edits:
            self._retention(trainer, pl_module, edits)

    def _retention(self, trainer: L.Trainer, pl_module: L.LightningModule, edits: int) -> None:
        requests = self._capped(list(pl_module.applied_requests))
        rank_zero_info(f"retention: re-scoring {len(requests)} applied edits at {edits} edits")
        values = {f"retention/{k}": v for k, v in self._evaluate(trainer, pl_module, requests).items()}
        log_metrics(trainer, values, step=edits, prog_bar={"retention/efficacy": "ret_eff"} if self.prog_bar else None)
        self.final_metrics.update(values)
        self._last_retention = edits

    def _snapshot_immediate(self) -> None:
        """Keep the reduced immediate sums (same on all ranks) so a checkpoint can restore the running means."""
        self._synced_immediate = self.immediate_scores.sums()  # a collective when distributed; local sums kept

    # -- resume --------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "baseline_done": self._baseline_done,
            "last_retention": self._last_retention,
            "pre_predictions": [[q, a, p] for (q, a), p in self.pre_predictions.items()],
            "immediate": self._synced_immediate,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._baseline_done = bool(state_dict.get("baseline_done", False))
        self._last_retention = state_dict.get("last_retention")
        self.pre_predictions = {(q, a): list(p) for q, a, p in state_dict.get("pre_predictions", [])}
        self._immediate_state = state_dict.get("immediate")
