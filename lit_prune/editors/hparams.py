"""Typed hyper-parameters of the editors: one frozen dataclass per method, validated when it is built.

:func:`lit_prune.editors.presets.resolve_hparams` fills one from the model's preset and the editor's constructor
arguments; ``editor.hparams(model)`` returns it. The editors read fields by attribute (``hp.v_lr``); every class is
also a read-only mapping (``hp["layers"]``, ``dict(hp)``, ``hp.get(...)``) for code that records them as a dict.

Validation lives here, once: :meth:`HParams.check` checks the values a constructor was given (None = "take the
preset", not checked) and ``__post_init__`` checks the resolved values with the same rules and messages
(``"ROME: v_lr must be > 0, got -1.0"``). :meth:`HParams.check_layers` checks the layers against a model.

Adding an editor: subclass :class:`HParams` (or :class:`ClosedFormHParams` for an editor of the ROME family),
declare its fields and which of them must be positive, and name the class in the editor's ``hparams_class``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

from .base import EditError

KEY_MODES = ("averaged", "original")
"""ROME's key choices (:mod:`lit_prune.editors.rome`)."""


@dataclass
class DeltaHParams:
    """The settings of ROME's δ optimisation (:func:`~lit_prune.editors.compute_v.optimize_delta`); see
    :class:`ClosedFormHParams` for their meaning."""

    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2


@dataclass(frozen=True, kw_only=True)
class HParams(Mapping):
    """Base of the hyper-parameter classes: the edited ``layers`` (ascending order is not required) and the rules."""

    layers: list[int]
    """Edited layer indices (0-based)."""

    owner: ClassVar[str] = ""
    """Name used in error messages about resolved values (``"ROME"``, ``"MEMIT"``, ...)."""
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {}
    """Fields that must take one of the listed values."""
    finite_positive: ClassVar[tuple[str, ...]] = ()
    """Fields that must be a finite number > 0 (not a bool)."""
    positive: ClassVar[tuple[str, ...]] = ()
    """Fields that must be > 0 when not None."""
    non_negative: ClassVar[tuple[str, ...]] = ()
    """Fields that must be >= 0 when not None."""

    def __post_init__(self) -> None:
        self.check(self.owner or type(self).__name__, {f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def check(cls, owner: str, values: Mapping[str, Any]) -> None:
        """Raise ``ValueError("<owner>: <field> must be ...")`` for the first value of ``values`` (field -> value;
        None values are skipped) that breaks this class's rules."""
        for k, allowed in cls.choices.items():
            if k in values and values[k] not in allowed:
                raise ValueError(f"{owner}: {k} must be one of {allowed}, got {values[k]!r}")
        for k in cls.finite_positive:
            v = values.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
                raise ValueError(f"{owner}: {k} must be a finite number > 0, got {v!r}")
        for k in cls.positive:
            v = values.get(k)
            if v is not None and not v > 0:
                raise ValueError(f"{owner}: {k} must be > 0, got {v!r}")
        for k in cls.non_negative:
            v = values.get(k)
            if v is not None and v < 0:
                raise ValueError(f"{owner}: {k} must be >= 0, got {v!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def check_layers(self, method: str, n_layers: int) -> None:
        """Raise EditError unless every edited layer (and ``v_loss_layer`` if any) lies in a model of ``n_layers``."""
        for layer in self.layers or []:
            if not isinstance(layer, int) or not 0 <= layer < n_layers:
                raise EditError(f"{method}: layers={self.layers}: layer {layer!r} is outside the model "
                                f"(0..{n_layers - 1})")
        if not self.layers:
            raise EditError(f"{method}: layers must name at least one layer, got {self.layers!r}")
        vl = getattr(self, "v_loss_layer", None)
        if vl is not None and not (isinstance(vl, int) and max(self.layers) <= vl < n_layers):
            raise EditError(f"{method}: v_loss_layer={vl!r} must be between the last edited layer and {n_layers - 1}")

    # -- read-only mapping view ----------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key not in self.field_names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.field_names())

    def __len__(self) -> int:
        return len(fields(self))


@dataclass(frozen=True, kw_only=True)
class ClosedFormHParams(HParams):
    """What ROME, MEMIT and AlphaEdit share: the δ optimisation (:mod:`~lit_prune.editors.compute_v`) and the key
    statistics C = E[k kᵀ] (:mod:`lit_prune.stats`)."""

    v_num_grad_steps: int
    """Iterations of the δ optimisation (the last one only evaluates the loss)."""
    v_lr: float
    """Adam learning rate of δ."""
    v_weight_decay: float
    """Weight of ‖δ‖ / ‖v‖² in the loss."""
    clamp_norm_factor: float
    """‖δ‖ is clamped to this × ‖v‖ after each step."""
    kl_factor: float
    """Weight of the KL term on the ``"{subject} is a"`` prompt."""
    mom2_n_samples: int
    """Texts of ``mom2_dataset`` used for C."""
    v_loss_layer: int | None = None
    """The layer whose output the loss reads (None: the last)."""
    early_stop_loss: float = 5e-2
    """Stop the δ optimisation once the loss is below this."""
    mom2_max_length: int = 256
    """Tokens per text for C."""
    context_template_lengths: list[int] | None = None
    """ROME-style generated context templates (new tokens per length); None: the fixed templates."""

    positive: ClassVar[tuple[str, ...]] = ("v_num_grad_steps", "v_lr", "clamp_norm_factor", "mom2_n_samples",
                                           "mom2_max_length")
    non_negative: ClassVar[tuple[str, ...]] = ("v_weight_decay", "kl_factor", "early_stop_loss")

    def delta(self) -> DeltaHParams:
        """The δ-optimisation settings (:func:`~lit_prune.editors.compute_v.optimize_delta`)."""
        return DeltaHParams(
            v_num_grad_steps=self.v_num_grad_steps, v_lr=self.v_lr, v_weight_decay=self.v_weight_decay,
            clamp_norm_factor=self.clamp_norm_factor, kl_factor=self.kl_factor, early_stop_loss=self.early_stop_loss,
        )


@dataclass(frozen=True, kw_only=True)
class ROMEHParams(ClosedFormHParams):
    """ROME (:class:`~lit_prune.editors.ROME`)."""

    mom2_adjustment: bool = True
    """u = C⁻¹k̄ (False: u = k̄, no statistics)."""
    key_mode: Literal["averaged", "original"] = "averaged"
    """The key of the residual and the denominator (see :mod:`lit_prune.editors.rome`)."""

    owner: ClassVar[str] = "ROME"
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"key_mode": KEY_MODES}


@dataclass(frozen=True, kw_only=True)
class MEMITHParams(ClosedFormHParams):
    """MEMIT (:class:`~lit_prune.editors.MEMIT`)."""

    mom2_update_weight: float
    """λ of (λC + KKᵀ); see :mod:`lit_prune.editors.presets` for its scale."""

    owner: ClassVar[str] = "MEMIT"
    positive: ClassVar[tuple[str, ...]] = ClosedFormHParams.positive + ("mom2_update_weight",)


@dataclass(frozen=True, kw_only=True)
class AlphaEditHParams(MEMITHParams):
    """AlphaEdit (:class:`~lit_prune.editors.AlphaEdit`): MEMIT's plus the null-space projection's."""

    nullspace_threshold: float = 2e-2
    """Eigenvalue cut-off of C₀ defining the projector P (reference 2e-2)."""
    L2: float = 10.0
    """λ₂ of M = P (K Kᵀ + K_p K_pᵀ) + λ₂ I (reference 10)."""

    owner: ClassVar[str] = "AlphaEdit"
    finite_positive: ClassVar[tuple[str, ...]] = ("nullspace_threshold", "L2")


@dataclass(frozen=True, kw_only=True)
class FTHParams(HParams):
    """FT-L (:class:`~lit_prune.editors.FT`)."""

    num_steps: int
    """Adam steps."""
    lr: float
    """Adam learning rate."""
    norm_constraint: float | None
    """L∞ bound of the change of each entry (None: no bound)."""
    early_stop_loss: float = 1e-2
    """Stop once the NLL is below this."""

    owner: ClassVar[str] = "FT"
    positive: ClassVar[tuple[str, ...]] = ("num_steps", "lr", "norm_constraint")


HPARAMS_CLASSES: dict[str, type[HParams]] = {"rome": ROMEHParams, "memit": MEMITHParams, "ft": FTHParams}
"""The hyper-parameter class of each preset method (``presets.HPARAMS[model][method]``)."""
