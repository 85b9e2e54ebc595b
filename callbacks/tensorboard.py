"""TensorBoard views of a run beyond its scalars: spectra, the model's own words, and the run's settings.

- :class:`SpectrumHistogramCallback`: ``spectrum/<param>/W_singular_values`` and ``.../dW_singular_values``
  histograms (HISTOGRAMS / DISTRIBUTIONS tabs);
- :class:`TextSamplesCallback`: ``samples/edited`` and ``samples/general`` text panels (TEXT tab);
- :class:`HParamsCallback`: the run's key settings as TensorBoard hparams (HPARAMS tab).

They write to every :class:`~lightning.pytorch.loggers.TensorBoardLogger` of the trainer, on rank 0 only (no
collectives), with the number of edits (:func:`lit_prune.curves.num_edits`; the global step for a module without
one) as the step. They work in any LightningModule whose language model is ``pl_module.model`` (or is the module).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lit_prune.curves import num_edits
from lit_prune.restraint import numerical_rank, svdvals

from .restraint import check_params


def tensorboard_writers(trainer: L.Trainer) -> list[Any]:
    """The ``SummaryWriter`` of each TensorBoardLogger of ``trainer`` (empty on ranks other than 0)."""
    if not trainer.is_global_zero:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def _warn_without_tensorboard(trainer: L.Trainer, where: str) -> None:
    if not any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers):
        rank_zero_warn(f"{where}: the trainer has no TensorBoardLogger; nothing will be written")


def _check_every(where: str, every_n_edits: int | None) -> None:
    if every_n_edits is not None and (isinstance(every_n_edits, bool) or not isinstance(every_n_edits, int)
                                      or every_n_edits < 1):
        raise ValueError(f"{where}: every_n_edits must be a positive int or None, got {every_n_edits!r}")


def _due(edits: int, previous: int | None, every_n_edits: int | None) -> bool:
    """Whether a multiple of ``every_n_edits`` was crossed since ``previous`` (the metric callbacks' schedule)."""
    if every_n_edits is None or edits == 0:
        return False
    return edits // every_n_edits > (previous or 0) // every_n_edits


def language_model(pl_module: L.LightningModule) -> nn.Module:
    """``pl_module.model`` when the module has one (an :class:`~lit_prune.protocols.EditingModule`), else itself."""
    inner = getattr(pl_module, "model", None)
    return inner if isinstance(inner, nn.Module) else pl_module


class _Scheduled(L.Callback):
    """Runs :meth:`write` at 0 edits (``on_train_start``), every ``every_n_edits`` edits and at the end of training."""

    reads_evaluated_weights = True  # lit_prune.protocols.WeightReader: restraining callbacks go first

    def __init__(self, every_n_edits: int | None) -> None:
        super().__init__()
        _check_every(type(self).__name__, every_n_edits)
        self.every_n_edits = every_n_edits
        self._last: int | None = None

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if tensorboard_writers(trainer):
            self.write(trainer, pl_module)
        self._last = num_edits(pl_module)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            _warn_without_tensorboard(trainer, type(self).__name__)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last != num_edits(pl_module):
            self._write(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if _due(num_edits(pl_module), self._last, self.every_n_edits):
            self._write(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last != num_edits(pl_module):
            self._write(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"last": self._last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last = state_dict.get("last")


class SpectrumHistogramCallback(_Scheduled):
    """Histograms of the singular values of each watched matrix W and of its accumulated update ΔW = W − W₀.

    Tags (x = number of edits): ``spectrum/<param>/W_singular_values`` (all min(m, n) singular values of W, from 0
    edits on) and ``spectrum/<param>/dW_singular_values`` (the non-zero ones of ΔW, i.e. above numpy's rank
    tolerance: after k rank-one edits at most k values), at 0 edits, every ``every_n_edits`` edits and at the end.
    With a :class:`~lit_prune.callbacks.PruneCallback` listed before this callback, W is the evaluated (restrained)
    weight and ΔW the restrained update; PRUNE's threshold τ = σ_max(W₀) is the right edge of the 0-edit W
    histogram.

    Args:
        params: the matrices: ``None`` (default) = ``pl_module.edited_parameters``; a list of names in
            ``pl_module.model.named_parameters()`` (or the module's own when it has no ``model``); or a regex
            (``re.search`` on those names, 2-D parameters only).
        every_n_edits: period in edits (``None``: only at 0 edits and at the end).

    W₀ is copied at ``on_fit_start`` (one copy of each matrix) and saved in checkpoints, so a resumed run measures ΔW
    from the original weights. Cost: two SVDs per matrix and evaluation (milliseconds at 576×1536, about a minute on
    one CPU core at 4096×14336).
    """

    def __init__(self, params: str | Sequence[str] | None = None, every_n_edits: int | None = 10) -> None:
        super().__init__(every_n_edits)
        self.params = check_params(params, "SpectrumHistogramCallback")
        self.W0: dict[str, Tensor] = {}
        self._names: list[str] = []

    def _resolve(self, pl_module: L.LightningModule) -> list[str]:
        named = dict(language_model(pl_module).named_parameters())
        where = f"SpectrumHistogramCallback ({type(pl_module).__name__})"
        if self.params is None:
            names = list(getattr(pl_module, "edited_parameters", None) or [])
            if not names:
                raise ValueError(f"{where}: params not given and the module reports no `edited_parameters`; "
                                 "pass params=[names] or a regex")
        elif isinstance(self.params, str):
            pat = re.compile(self.params)
            names = [n for n, p in named.items() if p.dim() == 2 and pat.search(n)]
            if not names:
                raise ValueError(f"{where}: params regex {self.params!r} matches no 2-D parameter")
        else:
            names = list(self.params)
        missing = [n for n in names if n not in named]
        if missing:
            raise ValueError(f"{where}: no parameter named {missing} (names as in model.named_parameters())")
        flat = [n for n in names if named[n].dim() != 2]
        if flat:
            raise ValueError(f"{where}: {flat} are not matrices")
        return names

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._names = self._resolve(pl_module)
        model = language_model(pl_module)
        resumed = [n for n in self._names if n not in self.W0 and trainer.ckpt_path is not None]
        if resumed:
            rank_zero_warn(f"SpectrumHistogramCallback: the checkpoint holds no W0 for {resumed}; their ΔW is "
                           "measured from the resumed weights")
        with torch.no_grad():
            for n in self._names:
                if n not in self.W0:  # a checkpoint's W0 (restored before on_fit_start) wins
                    self.W0[n] = model.get_parameter(n).detach().clone()

    @torch.no_grad()
    def spectra(self, pl_module: L.LightningModule) -> dict[str, tuple[Tensor, Tensor]]:
        """Per watched matrix: (singular values of W, non-zero singular values of ΔW), descending, on the CPU."""
        model = language_model(pl_module)
        out = {}
        for n in self._names:
            W = model.get_parameter(n).detach()
            W0 = self.W0[n] = self.W0[n].to(W.device)
            dW = W - W0
            d = svdvals(dW)
            out[n] = (svdvals(W).cpu(), d[: numerical_rank(d, tuple(dW.shape), dW.dtype)].cpu())
        return out

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = num_edits(pl_module)
        for n, (s, d) in self.spectra(pl_module).items():
            for w in tensorboard_writers(trainer):
                w.add_histogram(f"spectrum/{n}/W_singular_values", s, global_step=step)
                if d.numel():
                    w.add_histogram(f"spectrum/{n}/dW_singular_values", d, global_step=step)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "W0": {n: t.detach().cpu().clone() for n, t in self.W0.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.W0 = dict(state_dict.get("W0", {}))


GENERAL_PROMPTS = (
    "The capital of France is",
    "Water is made of hydrogen and",
    "The first person to walk on the Moon was",
    "My favourite way to spend a Sunday morning is",
)


def _cell(text: str) -> str:
    """``text`` as one markdown table cell: one line, pipes escaped."""
    return " ".join(text.replace("|", "\\|").split()) or " "


class TextSamplesCallback(_Scheduled):
    """The model's greedy completions of a few edited and a few general prompts, as TensorBoard text.

    Two panels (TEXT tab), at 0 edits, every ``every_n_edits`` edits and at the end (x = number of edits):

    - ``samples/edited``: the first ``n_edited`` requests of the run (``trainer.datamodule.requests`` or the train
      dataset's ``requests``; else the first applied ones), each as prompt, completion, new target (true target)
      and whether it is applied yet: the edits take hold where the completion turns into the new target;
    - ``samples/general``: ``prompts``, fixed general prompts: fluency dropping shows here first.

    Args:
        n_edited: number of edited prompts (0: none).
        prompts: the general prompts (empty: none).
        every_n_edits: period in edits (``None``: only at 0 edits and at the end).
        max_new_tokens: length of each greedy completion.

    The completions use :func:`lit_prune.metrics.downstream.generate` (batched, left-padded, no sampling) on
    ``pl_module.model`` and ``pl_module.tokenizer``; with a PruneCallback listed before this callback, on the
    restrained model. 1–2 s per evaluation for SmolLM2-135M on one CPU core.
    """

    def __init__(
        self,
        n_edited: int = 3,
        prompts: Sequence[str] = GENERAL_PROMPTS,
        every_n_edits: int | None = 10,
        max_new_tokens: int = 16,
    ) -> None:
        super().__init__(every_n_edits)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if isinstance(n_edited, bool) or not isinstance(n_edited, int) or n_edited < 0:
            raise ValueError(f"TextSamplesCallback: n_edited must be an int >= 0, got {n_edited!r}")
        if not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"TextSamplesCallback: prompts must be non-empty strings, got {prompts!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"TextSamplesCallback: max_new_tokens must be a positive int, got {max_new_tokens!r}")
        self.n_edited, self.prompts, self.max_new_tokens = n_edited, prompts, max_new_tokens

    def edited_requests(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Any]:
        """The requests shown in ``samples/edited``: the run's first ``n_edited`` (the same rows at every step)."""
        from .edit_metrics import EditMetricsCallback

        if self.n_edited == 0:
            return []
        run = EditMetricsCallback.run_requests(trainer)
        if run is None:
            run = list(getattr(pl_module, "applied_requests", None) or [])
        return list(run[: self.n_edited])

    def samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, str]:
        """The two panels as markdown (tag -> text) for the model as it is now."""
        from lit_prune.metrics.downstream import generate

        model, tok, edits = pl_module.model, pl_module.tokenizer, num_edits(pl_module)
        requests = self.edited_requests(trainer, pl_module)
        prompts = [r.full_prompt for r in requests] + list(self.prompts)
        if not prompts:
            return {}
        outs = generate(model, tok, prompts, self.max_new_tokens, batch_size=len(prompts))
        head = f"after **{edits}** edits, greedy, {self.max_new_tokens} new tokens\n\n"
        panels = {}
        if requests:
            rows = ["| prompt | completion | new target (true) | applied |", "|---|---|---|---|"]
            for i, (r, out) in enumerate(zip(requests, outs)):
                target = f"{r.target_new} ({r.target_true})" if r.target_true else r.target_new
                rows.append(f"| {_cell(r.full_prompt)} | {_cell(out)} | {_cell(target)} | "
                            f"{'yes' if i < edits else 'not yet'} |")
            panels["samples/edited"] = head + "\n".join(rows)
        if self.prompts:
            rows = ["| prompt | completion |", "|---|---|"]
            rows += [f"| {_cell(p)} | {_cell(out)} |" for p, out in zip(self.prompts, outs[len(requests):])]
            panels["samples/general"] = head + "\n".join(rows)
        return panels

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = num_edits(pl_module)
        for tag, text in self.samples(trainer, pl_module).items():
            for w in tensorboard_writers(trainer):
                w.add_text(tag, text, global_step=step)


def _layers(names: Sequence[str]) -> str:
    """``"4"`` or ``"2,3,4"``: the layer indices in parameter names like ``model.layers.4.mlp.down_proj.weight``."""
    found = sorted({int(m.group(1)) for n in names for m in [re.search(r"\.(\d+)\.", n)] if m})
    return ",".join(map(str, found))


def _matrices(names: Sequence[str]) -> str:
    """The matrix kinds in parameter names, without the layer prefix: ``"mlp.down_proj.weight"``."""
    return ",".join(dict.fromkeys(re.sub(r"^.*?\.\d+\.", "", n) for n in names))


class HParamsCallback(L.Callback):
    """The run's key settings as TensorBoard hparams, so that runs can be compared in the HPARAMS tab.

    At ``on_train_start`` it writes one session-start record into the run's event file with:
    ``model`` (``pl_module.model_name`` or the HF config's name), ``editor`` (the editor's class) and
    ``editor/layers`` / ``editor/matrices`` (from ``pl_module.edited_parameters``), ``prune/mode`` (``none`` without
    a :class:`~lit_prune.callbacks.PruneCallback`) with ``prune/alpha``, ``prune/kind``, ``prune/every_n_steps``,
    ``data/path``, ``data/batch_size`` and ``data/n_edits`` (from the datamodule), ``seed``, ``precision``,
    ``devices``, and ``extra``. At ``on_fit_end`` a session-end record (``on_exception``: failed).

    The metrics of each run in the HPARAMS tab are the LAST values of its scalar tags, computed by TensorBoard: for
    ``retention/*``, ``downstream/*`` and the ``spectrum/*`` tags that is the end-of-run value (the values in
    ``final_metrics.json``). No experiment summary is written, so TensorBoard takes the hparams of all runs in the
    log directory and the scalar tags of all of them as metrics. A run whose logger writes Lightning's default
    ``hp_metric`` summary breaks that (TensorBoard then shows only ``hp_metric``): give every
    ``TensorBoardLogger`` ``default_hp_metric=False`` (this callback warns otherwise).
    """

    def __init__(self, extra: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        extra = dict(extra or {})
        bad = {k: v for k, v in extra.items() if not isinstance(v, (str, bool, int, float))}
        if bad:
            raise ValueError(f"HParamsCallback: extra values must be str, bool, int or float, got {bad}")
        self.extra = extra
        self._started = False

    def hparams(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, str | bool | int | float]:
        """The recorded settings (see the class docstring), only those the run has."""
        from .prune import PruneCallback

        model = language_model(pl_module)
        name = getattr(pl_module, "model_name", None) or getattr(getattr(model, "config", None), "name_or_path", "")
        out: dict[str, Any] = {"model": str(name or type(model).__name__)}
        editor = getattr(pl_module, "editor", None)
        if editor is not None:
            out["editor"] = type(editor).__name__
        edited = list(getattr(pl_module, "edited_parameters", None) or [])
        if edited:
            out["editor/layers"], out["editor/matrices"] = _layers(edited), _matrices(edited)
        prune = [cb for cb in trainer.callbacks if isinstance(cb, PruneCallback)]
        out["prune/mode"] = prune[0].mode if prune else "none"
        if prune:
            out.update({"prune/alpha": prune[0].alpha, "prune/kind": prune[0].kind,
                        "prune/every_n_steps": prune[0].every_n_steps})
        dm = getattr(trainer, "datamodule", None)
        for key, value in (("data/path", getattr(dm, "path", None)), ("data/batch_size", getattr(dm, "batch_size", None)),
                           ("data/n_edits", len(dm.requests) if getattr(dm, "requests", None) is not None else None)):
            if value is not None:
                out[key] = value if isinstance(value, (int, float, bool)) else str(value)
        if os.environ.get("PL_GLOBAL_SEED"):
            out["seed"] = int(os.environ["PL_GLOBAL_SEED"])
        out["precision"] = str(trainer.precision)
        out["devices"] = int(trainer.world_size)
        out.update(self.extra)
        return out

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _warn_without_tensorboard(trainer, "HParamsCallback")
        # the flag is TensorBoardLogger(default_hp_metric=...), kept private by Lightning
        if any(isinstance(lg, TensorBoardLogger) and getattr(lg, "_default_hp_metric", False) for lg in trainer.loggers):
            rank_zero_warn("HParamsCallback: the TensorBoardLogger writes Lightning's placeholder `hp_metric`, which "
                           "hides these hparams in the HPARAMS tab; set its default_hp_metric=False")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writers = tensorboard_writers(trainer)
        if not writers:
            return
        from tensorboard.plugins.hparams import metadata
        from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionStartInfo

        info = SessionStartInfo(start_time_secs=time.time())
        for k, v in self.hparams(trainer, pl_module).items():
            if isinstance(v, bool):  # before int: bool is an int
                info.hparams[k].bool_value = v
            elif isinstance(v, (int, float)):
                info.hparams[k].number_value = v
            else:
                info.hparams[k].string_value = str(v)
        _write_hparams_record(writers, metadata.SESSION_START_INFO_TAG, HParamsPluginData(session_start_info=info))
        self._started = True

    def _end(self, trainer: L.Trainer, status: str) -> None:
        from tensorboard.plugins.hparams import api_pb2, metadata
        from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo

        writers = tensorboard_writers(trainer)
        if writers and self._started:
            self._started = False
            info = SessionEndInfo(status=api_pb2.Status.Value(status), end_time_secs=time.time())
            _write_hparams_record(writers, metadata.SESSION_END_INFO_TAG, HParamsPluginData(session_end_info=info))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end(trainer, "STATUS_SUCCESS")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._end(trainer, "STATUS_FAILURE")


def _write_hparams_record(writers: list[Any], tag: str, data: Any) -> None:
    """One hparams-plugin record ``data`` (``HParamsPluginData``) under ``tag`` in each writer's event file, in
    TensorBoard's own format (written without TensorFlow)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata

    smd = metadata.create_summary_metadata(data)
    summary = Summary(value=[Summary.Value(tag=tag, metadata=smd, tensor=metadata.NULL_TENSOR)])
    for w in writers:
        w._get_file_writer().add_summary(summary)  # SummaryWriter has no public call for a raw summary
        w.flush()
