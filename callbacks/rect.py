"""RectCallback: RECT's sparsification of the accumulated update (Gu et al., 2024), on the same wiring as PRUNE."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from lit_prune.restraint import AccumulatedUpdate, Sparsification, check_rect_fraction, condition_number

from .restraint import RestraintCallback


class RectCallback(RestraintCallback):
    """RECT (Gu et al., "Model Editing Harms General Abilities of Large Language Models: Regularization to the
    Rescue", EMNLP 2024): keep only the ``fraction`` of the entries of the accumulated update with the largest
    relative change and zero the rest,

        M_ij = 1 for the ⌈k·mn⌉ largest |ΔW_ij| / |W₀_ij|, else 0;        ΔW' = ΔW ⊙ M        (k = 0.4)

    applied, like PRUNE here, to the ACCUMULATED update ΔW = W − W₀ (the public ports apply it to each batch's update).

    Args:
        fraction: k, the share of ΔW's entries kept (0.4 as in the public MEMIT_rect ports).
        params, mode, every_n_steps, log_spectrum, spectrum_every_n_steps: see
            :class:`~lit_prune.callbacks.RestraintCallback`. Online (default), the sparsified ΔW' becomes the
            accumulated update; deferred, every evaluation sees W₀ + ΔW ⊙ M while edits accumulate unrestrained.

    Logs ``rect/<param>/kept_norm`` (‖ΔW'‖_F / ‖ΔW‖_F) and ``spectrum/<param>/condition_number`` (κ of the written
    weight). With PRUNE on the same matrices: ``callbacks: [RectCallback(), PruneCallback()]``, both online, gives
    W₀ + F(ΔW ⊙ M) after every step (see RestraintCallback on composition).
    """

    def __init__(
        self,
        params: str | Sequence[str] | None = None,
        fraction: float = 0.4,
        mode: str = "online",
        every_n_steps: int = 1,
        log_spectrum: bool = True,
        spectrum_every_n_steps: int = 1,
    ) -> None:
        check_rect_fraction(fraction, where="RectCallback")
        super().__init__(params, mode, every_n_steps, log_spectrum, spectrum_every_n_steps)
        self.fraction = float(fraction)

    @property
    def state_key(self) -> str:
        params = self.params if isinstance(self.params, (str, type(None))) else tuple(self.params)
        return self._generate_state_key(params=params, fraction=self.fraction, mode=self.mode)

    def restrain(self, acc: AccumulatedUpdate, weight: Tensor, commit: bool, keep: Tensor | None) -> Sparsification | None:
        return acc.write_sparsified(weight, self.fraction, commit=commit, keep=keep)

    def changed(self, result: Sparsification) -> bool:
        return result.changed

    def metrics(self, tag: str, result: Sparsification, weight: Tensor, with_condition_number: bool) -> dict[str, float]:
        out = {f"rect/{tag}/kept_norm": result.kept_norm}
        if with_condition_number:
            out[f"spectrum/{tag}/condition_number"] = condition_number(weight)
        return out
