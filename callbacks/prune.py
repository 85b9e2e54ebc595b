"""PruneCallback: PRUNE's restraint of the accumulated update of selected weight matrices, for any LightningModule."""

from __future__ import annotations

import math
from typing import Sequence

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lit_prune.restraint import AccumulatedUpdate, Restraint, check_restraint_args, condition_number

from .restraint import RestraintCallback


class PruneCallback(RestraintCallback):
    """Restrains the singular values of the accumulated update ΔW = W − W₀ of selected matrices (PRUNE, spec §2):
    ΔW = U Σ Vᵀ becomes U F(Σ) Vᵀ with F(σ) = log_α(σ) − log_α(τ) + τ for σ ≥ τ = σ_max(W₀).

    Plug it into any LightningModule::

        trainer = L.Trainer(callbacks=[PruneCallback(params=r"layers\\.4\\.mlp\\.down_proj\\.weight", mode="deferred")])
        trainer.fit(my_module)

    Args:
        params, mode, every_n_steps, spectrum_every_n_steps: see :class:`~lit_prune.callbacks.RestraintCallback`
            (``mode="online"`` by default; ``"deferred"`` is the paper's reference protocol). Online, applying F again
            to an already restrained ΔW shrinks it further, as expected in this mode.
        alpha: base α > 1 of F's logarithm (paper: e, 2, 1.5, 1.2). kind: ``"log"`` or the ``"linear"`` ablation.
        log_spectrum: log ``spectrum/<param>/{delta_sigma_max,n_restrained,condition_number}`` against the number
            of edits whenever the restraint runs (``delta_sigma_max``: σ_max of ΔW before F; ``condition_number``:
            κ of the weight as written).
        log_histogram: also add the singular values of ΔW as a TensorBoard histogram (TensorBoard loggers only).

    With an :class:`~lit_prune.protocols.EditStream` (``SequentialEditingModule``) ΔW is kept as the logged low-rank
    factors and restrained by the low-rank path (QR + r×r SVD, never an m×n SVD while the rank is at most half the
    smaller side); with a module trained with gradients, ΔW = W − W₀ is decomposed densely. The per-matrix state is
    public: ``callback.accumulated[name]`` (:class:`~lit_prune.restraint.AccumulatedUpdate`).
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
        check_restraint_args(alpha, kind, where="PruneCallback")
        super().__init__(params, mode, every_n_steps, log_spectrum, spectrum_every_n_steps)
        self.alpha, self.kind = float(alpha), kind
        self.log_histogram = bool(log_histogram)

    @property
    def state_key(self) -> str:
        params = self.params if isinstance(self.params, (str, type(None))) else tuple(self.params)
        return self._generate_state_key(params=params, alpha=self.alpha, kind=self.kind, mode=self.mode)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.log_histogram and not any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers):
            rank_zero_warn("PruneCallback: log_histogram=True but the trainer has no TensorBoardLogger")

    def restrain(self, acc: AccumulatedUpdate, weight: Tensor, commit: bool, keep: Tensor | None) -> Restraint | None:
        return acc.write_restrained(weight, self.alpha, self.kind, commit=commit, keep=keep)

    def changed(self, result: Restraint) -> bool:
        return result.changed

    def metrics(self, tag: str, result: Restraint, weight: Tensor, with_condition_number: bool) -> dict[str, float]:
        out = {
            f"spectrum/{tag}/delta_sigma_max": float(result.sigma[0]) if result.sigma.numel() else 0.0,
            f"spectrum/{tag}/n_restrained": float(result.n_restrained),
        }
        if with_condition_number:
            out[f"spectrum/{tag}/condition_number"] = condition_number(weight)
        return out

    def log_extra(self, trainer: L.Trainer, results: dict[str, Restraint], step: int) -> None:
        if not self.log_histogram:
            return
        for tag, res in results.items():
            for lg in trainer.loggers:
                if isinstance(lg, TensorBoardLogger):
                    lg.experiment.add_histogram(f"spectrum/{tag}/delta_singular_values", res.sigma.cpu(), global_step=step)
