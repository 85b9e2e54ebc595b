"""The contract between an editing LightningModule and the callbacks that watch it, written down once.

Callbacks (:class:`~lit_prune.callbacks.PruneCallback`, the metric callbacks) never look for private attributes;
what they may use is declared here as :class:`typing.Protocol` s, checked with ``isinstance`` at ``setup``.

- :class:`EditStream`: what a module that edits (rather than trains with gradients) exposes; :class:`EditingModule`
  adds the language model the metric callbacks score. :class:`~lit_prune.SequentialEditingModule` implements both;
  so can your own module. With an :class:`EditStream`, PruneCallback tracks ΔW exactly as the sum of the logged
  low-rank updates (and restrains by the low-rank path); with any other module (e.g. one trained with gradients),
  it reads ΔW = W − W₀ from the weights (dense path).
- :class:`EditLogEntry`: one entry of ``edit_log``: the requests of one step and the updates it applied.
  The log only grows, except through :meth:`~lit_prune.SequentialEditingModule.undo`, which removes entries from
  its end and tells every :class:`UndoParticipant` among ``trainer.callbacks``. Callbacks consume it with a cursor
  (how many entries they have seen).
- :class:`UndoParticipant`: a callback that keeps state derived from the edit log implements these three hooks.
- :class:`WeightReader`: a callback that reads the evaluated weights in ``on_train_batch_end`` / ``on_train_end``
  (scores, generations, spectra). A restraining callback must run before it; PruneCallback checks the order at
  ``setup`` and fails with a message that says what to move.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class LowRankFactors(Protocol):
    """An additive update ΔW = A Bᵀ to one parameter (m, n): ``A`` (m, r), ``B`` (n, r), in the stored orientation
    (:class:`lit_prune.editors.base.LowRankUpdate`)."""

    A: Tensor
    B: Tensor


@runtime_checkable
class EditLogEntry(Protocol):
    """One step of an edit stream: its ``requests`` and the ``updates`` it added (parameter name in
    ``model.named_parameters()`` -> :class:`LowRankFactors`)."""

    requests: Sequence[Any]
    updates: Mapping[str, LowRankFactors]


@runtime_checkable
class EditStream(Protocol):
    """What a module that edits by logged low-rank updates exposes to :class:`~lit_prune.callbacks.PruneCallback`.

    - ``edited_parameters``: names (in ``model.named_parameters()``, or the module's own) of the edited matrices;
    - ``edit_log``: one :class:`EditLogEntry` per step that edited, in order; a step appends its entry after it has
      written the update into the weights;
    - ``num_edits``: the number of requests applied so far (the x-axis of every curve).
    """

    num_edits: int
    edit_log: Sequence[EditLogEntry]

    @property
    def edited_parameters(self) -> Sequence[str]: ...


@runtime_checkable
class EditingModule(EditStream, Protocol):
    """An :class:`EditStream` with a language model, what the metric callbacks need as well:
    ``model`` (a Hugging Face causal LM, a registered submodule from ``configure_model`` on), ``tokenizer``, and
    ``applied_requests`` (the :class:`~lit_prune.EditRequest` s of ``edit_log``, flattened)."""

    model: nn.Module
    tokenizer: Any

    @property
    def applied_requests(self) -> Sequence[Any]: ...


@runtime_checkable
class UndoParticipant(Protocol):
    """A callback that takes part in ``undo``: ``records`` are the removed :class:`EditLogEntry` s, newest first.

    ``check_undo`` raises (a ``ValueError`` naming why) before anything changes if the undo cannot be exact;
    ``before_undo`` runs before the module subtracts the updates, ``after_undo`` after it removed the entries.
    """

    def check_undo(self, pl_module: Any, records: Sequence[EditLogEntry]) -> None: ...

    def before_undo(self, pl_module: Any, records: Sequence[EditLogEntry]) -> None: ...

    def after_undo(self, pl_module: Any, records: Sequence[EditLogEntry]) -> None: ...


@runtime_checkable
class WeightReader(Protocol):
    """A callback whose ``on_train_batch_end`` / ``on_train_end`` reads the evaluated weights
    (``reads_evaluated_weights = True``); restraining callbacks must come before it in ``trainer.callbacks``."""

    reads_evaluated_weights: bool


def undo_participants(trainer: Any) -> list[UndoParticipant]:
    """The callbacks of ``trainer`` (None: none) that implement :class:`UndoParticipant`, in order."""
    return [cb for cb in (trainer.callbacks if trainer is not None else []) if isinstance(cb, UndoParticipant)]
