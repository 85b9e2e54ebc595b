"""PruneCallback: PRUNE's restraint of the accumulated update of selected weight matrices, for any LightningModule."""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lit_prune.logging import log_metrics, num_edits
from lit_prune.restraint import (
    Restraint,
    check_restraint_args,
    compress,
    compute_dtype,
    condition_number,
    delta_svd,
    restraint_of,
    sigma_max,
)

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
            (what :class:`lit_prune.SequentialEditingModule` reports). Metric tags use the names as listed (for a
            regex: the names in ``pl_module.named_parameters()``).
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
            of edits (:func:`lit_prune.logging.log_metrics`) whenever the restraint runs.
        spectrum_every_n_steps: compute the condition number (all singular values of W: cheap at 576×1536, about a
            minute on one CPU core at 4096×14336) only at steps that are multiples of this.
        log_histogram: also add the singular values of ΔW as a TensorBoard histogram (TensorBoard loggers only).

    How it works: in ``setup`` (before a checkpoint is restored and before the model moves to its device) it
    snapshots W₀ of the listed matrices only and caches τ = σ_max(W₀), and moves itself to the FRONT of
    ``trainer.callbacks`` so that every other callback's ``on_train_batch_end`` sees the restrained weights. If the
    module reports its updates as low-rank factors (``pl_module.last_updates``: name -> ``LowRankUpdate``, set in
    every ``training_step``), the accumulated ΔW is kept as factors (recompressed to its rank whenever it is
    restrained) and restrained by the low-rank path (QR + r×r SVD); otherwise (a module trained with gradients)
    ΔW = W − W₀ is decomposed densely. W₀, τ, the accumulated factors and (deferred mode) the unrestrained weights
    are part of the callback's checkpoint state, so a resumed run never takes edited weights as W₀ and continues
    bit-identically. The computation is deterministic and uses no collectives, so every rank gets the same result.
    Memory: one copy of each listed matrix (W₀), plus one more in deferred mode while the view is written.
    ``SequentialEditingModule.undo`` takes part through :meth:`check_undo` / :meth:`before_undo` /
    :meth:`after_undo`: exact in deferred mode, refused in online mode once a restraint changed the weights.
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
        # per matrix (key: name in pl_module.named_parameters()): W0, tau, A, B (accumulated ΔW = A Bᵀ), stash
        self._mats: dict[str, dict[str, Any]] = {}
        self._tags: dict[str, str] = {}
        self._alias: dict[str, str] = {}
        self._lowrank = False
        self._seen: tuple[Any, list[Any]] | None = None
        self._spare: dict[str, Tensor] = {}  # deferred mode: reused buffers for the unrestrained weights
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
        """Listed names -> names in ``pl_module.named_parameters()``; fills the alias table (both namespaces)."""
        inner = getattr(pl_module, "model", None)  # first: a module may load its model lazily on this access
        full = dict(pl_module.named_parameters())
        by_id = {id(p): n for n, p in full.items()}
        short = {}
        if isinstance(inner, nn.Module):
            short = {n: by_id[id(p)] for n, p in inner.named_parameters() if id(p) in by_id}
        alias = {**{n: n for n in full}, **short}
        if self.params is None:
            names = getattr(pl_module, "edited_parameters", None)
            if not names:
                raise ValueError(
                    f"PruneCallback: params not given and {type(pl_module).__name__} reports no `edited_parameters`; "
                    "pass params=[names] or a regex"
                )
            listed = {n: n for n in names}
        elif isinstance(self.params, str):
            pat = re.compile(self.params)
            listed = {n: n for n, p in full.items() if p.dim() == 2 and pat.search(n)}
            listed.update({alias[s]: alias[s] for s in short if full[alias[s]].dim() == 2 and pat.search(s)})
            if not listed:
                raise ValueError(
                    f"PruneCallback: params regex {self.params!r} matches no 2-D parameter of "
                    f"{type(pl_module).__name__}"
                )
        else:
            listed = {n: n for n in self.params}
        out = {}
        for tag in listed:
            if tag not in alias:
                stem = tag.rsplit(".", 2)[0]
                near = [n for n in alias if n.startswith(stem)][:5]
                raise ValueError(
                    f"PruneCallback: parameter {tag!r} not found in {type(pl_module).__name__} (names of "
                    f"pl_module.named_parameters() or pl_module.model.named_parameters()); similar: {near}"
                )
            name = alias[tag]
            if full[name].dim() != 2:
                raise ValueError(f"PruneCallback: parameter {tag!r} is not a matrix (shape {tuple(full[name].shape)})")
            out[name] = tag
        self._alias = alias
        return out

    # -- Lightning hooks -------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._tags = self._resolve(pl_module)
        if trainer.callbacks and trainer.callbacks[0] is not self:  # restrain before other callbacks read weights
            trainer.callbacks.remove(self)
            trainer.callbacks.insert(0, self)
        self._lowrank = getattr(pl_module, "last_updates", None) is not None
        with torch.no_grad():
            for name in self._tags:
                if name not in self._mats:  # once per matrix, before any edit; a checkpoint's W0 replaces it
                    W0 = pl_module.get_parameter(name).detach().clone()
                    self._mats[name] = {"W0": W0, "tau": sigma_max(W0), "A": None, "B": None, "stash": None}
        self._seen, self._last_step, self._view_step = None, -1, None
        if self.log_histogram and not any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers):
            rank_zero_warn("PruneCallback: log_histogram=True but the trainer has no TensorBoardLogger")

    def should_restrain(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Whether to restrain after this training batch (default: ``global_step`` a multiple of every_n_steps)."""
        step = trainer.global_step
        return step > 0 and step % self.every_n_steps == 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.mode == "deferred":
            self._restore_unrestrained(pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._consume(pl_module)
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
    def _view_current(self, trainer: L.Trainer) -> bool:
        stashed = any(st["stash"] is not None for n, st in self._mats.items() if n in self._tags)
        return stashed or self._view_step == trainer.global_step

    @torch.no_grad()
    def _restore_unrestrained(self, pl_module: L.LightningModule) -> None:
        for name in self._tags:
            st = self._mats[name]
            if st["stash"] is not None:
                pl_module.get_parameter(name).copy_(st["stash"])
                st["stash"] = None

    def _consume(self, pl_module: L.LightningModule) -> None:
        """Append this step's low-rank updates (``pl_module.last_updates``) to the accumulated factors, once."""
        ups = getattr(pl_module, "last_updates", None) if self._lowrank else None
        if not ups:
            return
        vals = list(ups.values())
        if self._seen is not None and ups is self._seen[0] and len(vals) == len(self._seen[1]) and all(
            a is b for a, b in zip(vals, self._seen[1])
        ):
            return  # the same updates as last time: the module did not edit in this step
        self._seen = (ups, vals)
        for key, up in ups.items():
            name = self._alias.get(key)
            if name not in self._tags:
                continue
            A, B = (up.A, up.B) if hasattr(up, "A") else up
            A, B = (A[:, None] if A.dim() == 1 else A), (B[:, None] if B.dim() == 1 else B)
            p = pl_module.get_parameter(name)
            if (A.shape[0], B.shape[0]) != tuple(p.shape):
                raise ValueError(
                    f"PruneCallback: update for {key!r} has shape {(A.shape[0], B.shape[0])}, "
                    f"parameter is {tuple(p.shape)}"
                )
            self._append(name, p, A, B)

    def _append(self, name: str, p: Tensor, A: Tensor, B: Tensor) -> None:
        """ΔW += A Bᵀ for the accumulated factors of ``name`` (A: (m, r), B: (n, r), in p's orientation)."""
        st = self._mats[name]
        self._to_device(st, p.device)
        cd = torch.float64 if torch.float64 in (A.dtype, p.dtype) else torch.float32
        A, B = A.detach().to(p.device, cd), B.detach().to(p.device, cd)
        st["A"] = A if st["A"] is None else torch.cat([st["A"].to(cd), A], 1)
        st["B"] = B if st["B"] is None else torch.cat([st["B"].to(cd), B], 1)

    @staticmethod
    def _to_device(st: dict[str, Any], device: torch.device) -> None:
        for k in ("W0", "A", "B", "stash"):
            if st[k] is not None and st[k].device != device:
                st[k] = st[k].to(device)

    @torch.no_grad()
    def _restrain_one(self, name: str, p: Tensor) -> Restraint | None:
        """F applied to the accumulated update of one matrix; None while there is none."""
        st = self._mats[name]
        self._to_device(st, p.device)
        if self._lowrank:
            if st["A"] is None or st["A"].shape[1] == 0:
                return None
            svd = delta_svd(factors=(st["A"], st["B"]))
        else:
            if torch.equal(p, st["W0"]):
                return None
            cd = compute_dtype(p.dtype)
            svd = delta_svd(delta=p.detach().to(cd) - st["W0"].to(cd))
        return restraint_of(svd, st["tau"], self.alpha, self.kind)

    @torch.no_grad()
    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule, log: bool = True) -> None:
        """Write W₀ + ΔŴ into every listed matrix (online: for good; deferred: as the view, keeping the original)."""
        if self.mode == "deferred":
            self._restore_unrestrained(pl_module)  # ΔW is always taken from the unrestrained weights
        results: dict[str, Restraint] = {}
        for name in self._tags:
            p = pl_module.get_parameter(name)
            res = self._restrain_one(name, p)
            if res is None:
                continue
            st = self._mats[name]
            CA, CB = res.correction()  # ΔŴ − ΔW: only the directions F changes
            if CA.shape[1] > 0:
                if self.mode == "online":
                    self._changed_at = num_edits(pl_module)
                if self.mode == "deferred":
                    st["stash"] = self._stash_buffer(name, p).copy_(p)
                if p.dtype == CA.dtype:
                    p.addmm_(CA, CB.mT)
                else:  # low-precision weights: add in the compute dtype, round once
                    p.copy_(p.to(CA.dtype).addmm_(CA, CB.mT))
            if self._lowrank:
                st["A"], st["B"] = compress(res.svd, res if self.mode == "online" else None)
            results[name] = res
        if self.mode == "deferred":
            self._view_step = trainer.global_step
        if log:
            self._log(trainer, pl_module, results)

    def _stash_buffer(self, name: str, p: Tensor) -> Tensor:
        """A reusable buffer for the unrestrained copy of ``p`` (deferred mode): no new allocation per step."""
        buf = self._spare.get(name)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = self._spare[name] = torch.empty_like(p, memory_format=torch.contiguous_format).detach()
        return buf

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, results: dict[str, Restraint]) -> None:
        if not results or not (self.log_spectrum or self.log_histogram):
            return
        x = num_edits(pl_module)
        with_cond = trainer.global_step % self.spectrum_every_n_steps == 0
        metrics: dict[str, float] = {}
        for name, res in results.items():
            tag = self._tags[name]
            if self.log_spectrum:
                metrics[f"spectrum/{tag}/delta_sigma_max"] = float(res.sigma[0]) if res.sigma.numel() else 0.0
                metrics[f"spectrum/{tag}/n_restrained"] = float(res.n_restrained)
                if with_cond:
                    metrics[f"spectrum/{tag}/condition_number"] = condition_number(pl_module.get_parameter(name))
            if self.log_histogram:
                for lg in trainer.loggers:
                    if isinstance(lg, TensorBoardLogger):
                        lg.experiment.add_histogram(
                            f"spectrum/{tag}/delta_singular_values", res.sigma.cpu(), global_step=x
                        )
        if metrics:
            log_metrics(trainer, metrics, step=x)

    # -- undo (called by SequentialEditingModule.undo) -------------------------------------------------------------
    def check_undo(self, pl_module: L.LightningModule, records: Sequence[Any]) -> None:
        """Raise before any weight changes if the edit batches ``records`` (``EditRecord``) cannot be undone exactly.

        Deferred mode: always possible (ΔW is kept unrestrained). Online mode: only while no restraint has changed
        the weights since the oldest of them, because later edits were computed on, and the written weights hold,
        the restrained update, which no longer contains the edit's own update.
        """
        if not self._tags or not records:
            return
        before = num_edits(pl_module) - sum(len(r.requests) for r in records)  # edits left after the undo
        if self.mode == "online" and self._changed_at > before:
            raise ValueError(
                f"undo: PruneCallback (online) restrained the weights after edit {self._changed_at}, and the undo "
                f"would go back to edit {before}; the restrained weights no longer contain those edits' updates, so "
                "they cannot be removed exactly. Use PruneCallback(mode='deferred') to keep edits undoable."
            )

    def before_undo(self, pl_module: L.LightningModule, records: Sequence[Any]) -> None:
        """Deferred mode: put the unrestrained weights back, so the module subtracts from the edit stream itself."""
        self._undo_view = self.mode == "deferred" and self._view_current(pl_module.trainer)
        if self.mode == "deferred":
            self._restore_unrestrained(pl_module)

    @torch.no_grad()
    def after_undo(self, pl_module: L.LightningModule, records: Sequence[Any]) -> None:
        """Remove the undone updates from the accumulated factors; rewrite the restrained view if it was shown."""
        if self._lowrank:
            for rec in records:
                for key, up in rec.updates.items():
                    name = self._alias.get(key)
                    if name in self._tags:
                        A, B = (up.A, up.B) if hasattr(up, "A") else up
                        A, B = (A[:, None] if A.dim() == 1 else A), (B[:, None] if B.dim() == 1 else B)
                        self._append(name, pl_module.get_parameter(name), -A, B)
        ups = getattr(pl_module, "last_updates", None)
        self._seen = (ups, list(ups.values())) if ups else None  # the previous batch's updates are already counted
        if self._undo_view:
            self._apply(pl_module.trainer, pl_module, log=False)
            self._undo_view = False

    # -- checkpoint state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        mats = {n: dict(st) for n, st in self._mats.items()}
        for st in mats.values():
            if st["stash"] is not None:  # the live buffer is reused later: save a copy
                st["stash"] = st["stash"].clone()
        return {
            "matrices": mats,
            "last_step": self._last_step,
            "view_step": self._view_step,
            "changed_at": self._changed_at,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replace the snapshot taken in ``setup`` by the checkpoint's W₀, τ, accumulated update and stash."""
        mats = state_dict["matrices"]
        for name, st in mats.items():
            mine = self._mats.get(name)
            if mine is not None and tuple(mine["W0"].shape) != tuple(st["W0"].shape):
                raise ValueError(
                    f"PruneCallback: checkpoint's W0 for {name!r} has shape {tuple(st['W0'].shape)}, "
                    f"the parameter has {tuple(mine['W0'].shape)}"
                )
            self._mats[name] = dict(st)
        missing = [n for n in self._tags if n not in mats]
        if missing:
            rank_zero_warn(f"PruneCallback: checkpoint has no W0 for {missing}; using the snapshot taken at setup")
        self._last_step = int(state_dict.get("last_step", -1))
        self._view_step = state_dict.get("view_step")
        self._changed_at = int(state_dict.get("changed_at", -1))
