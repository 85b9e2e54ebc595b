"""Checks of a run's configuration against its model, made before anything is loaded or written.

``train.py`` calls :func:`check_run` after the command line is parsed (which already validated the data and every
constructor argument) and before ``trainer.fit``: a run that would fail on its configuration fails here, with one
message naming the parameter, file or record, and no run directory, config file, event file or checkpoint is
created or touched. The checks use the model's ``config.json`` and a model built on the meta device (names and
shapes only, no weights, no memory), so they cost a second even for large models and do not depend on how or when
the module loads its model.

What is checked:

- the model name resolves (local folder with ``config.json`` and readable weight files, bundled model, or a hub id
  that is reachable or cached): :func:`lit_prune.models.load_model_config`;
- the editor's hyper-parameters against that model: layers inside the model, module templates that name modules,
  edited parameters that exist, the statistics text source (:func:`check_editor`);
- the restraint callbacks' ``params`` name or match 2-D parameters of the model, they come before the callbacks
  that read the evaluated weights and combine meaningfully (their own checks); DownstreamEvalCallback's task data
  is readable (:func:`check_callbacks`);
- the trainer settings editing cannot run with (:func:`check_trainer`);
- ``ckpt_path``: a readable Lightning checkpoint of a lit_prune run of the same model, same edited parameters
  (same shapes) and the same first edits as the data (:func:`check_checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .models import check_text_source, check_tokenizer, load_model_config, meta_model

# Exceptions that mean "this check cannot run on a meta-device model" (an editor that reads weight values): the
# check is skipped and the run checks it on the real model.
_CANNOT_CHECK = (RuntimeError, NotImplementedError, AttributeError, IndexError)


@dataclass
class ModelInfo:
    """What the checks know about the model: its name as given, where it loads from, its config and a meta copy."""

    name: str
    path: str
    config: Any
    meta: nn.Module

    @property
    def parameters(self) -> dict[str, tuple[int, ...]]:
        """Parameter name (as in ``model.named_parameters()``) -> shape."""
        return {n: tuple(p.shape) for n, p in self.meta.named_parameters()}


def check_model(name: str, dtype: str = "float32") -> ModelInfo:
    """Resolve ``name`` and build the model on the meta device; raises ResolveError/CacheError naming it."""
    if not isinstance(getattr(torch, str(dtype).replace("torch.", ""), None), torch.dtype):
        raise ConfigError(f"model.dtype: unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    path, config = load_model_config(name)
    check_tokenizer(path)
    return ModelInfo(name, path, config, meta_model(config, dtype))


def _near(names: Sequence[str], name: str, k: int = 5) -> list[str]:
    stem = name.rsplit(".", 2)[0]
    near = [n for n in names if n.startswith(stem)]
    return (near or list(names))[:k]


def editor_parameters(editor: Any, info: ModelInfo) -> list[str] | None:
    """The parameters ``editor`` edits on the model (checked to exist), or None if that cannot be told without
    weights. Resolving them runs the editor's own checks (layers, module templates, presets)."""
    try:
        names = list(editor.edited_parameters(info.meta))
    except _CANNOT_CHECK:
        return None
    params = info.parameters
    for n in names:
        if n not in params:
            raise ConfigError(
                f"model.editor ({type(editor).__name__}) edits parameter '{n}', which model '{info.name}' does not "
                f"have; similar names: {_near(list(params), n)}"
            )
    return names


def check_editor(editor: Any, info: ModelInfo) -> list[str] | None:
    """Check the editor against the model; returns the edited parameters (None if unknown without weights)."""
    if editor is None:
        return None
    names = editor_parameters(editor, info)
    source = getattr(editor, "mom2_dataset", None)
    if source is not None and hasattr(editor, "hparams"):
        try:
            needs_stats = editor.hparams(info.meta).get("mom2_adjustment", True)
        except _CANNOT_CHECK:
            needs_stats = True
        if needs_stats:
            try:
                check_text_source(source)
            except ValueError as e:
                raise ConfigError(f"model.editor ({type(editor).__name__}) mom2_dataset: {e}") from None
    return names


def check_callbacks(callbacks: Sequence[Any], info: ModelInfo, edited: Sequence[str] | None = None) -> None:
    """The restraint callbacks' own checks (:class:`~lit_prune.callbacks.RestraintCallback`: ``params`` name or match
    2-D parameters, the order against the callbacks that read the evaluated weights, meaningful combinations), run on
    the meta-device model as a ``SequentialEditingModule`` would show it; DownstreamEvalCallback's data readable.
    ``edited``: the editor's parameters (None: unknown, then a restraint with ``params=None`` is not checked here)."""
    from lit_prune.callbacks import DownstreamEvalCallback, RestraintCallback

    callbacks = list(callbacks)
    params = info.parameters
    shapes = {f"model.{n}": s for n, s in params.items()}  # as the module's named_parameters() shows them
    alias = {**{n: n for n in shapes}, **{n: f"model.{n}" for n in params}}
    resolved = {}
    for cb in callbacks:
        if isinstance(cb, DownstreamEvalCallback):
            cb.load_data()  # raises naming the task, the file and the setting
        if not isinstance(cb, RestraintCallback):
            continue
        try:
            cb.check_order(callbacks)
            if cb.params is None and edited is None:
                continue
            resolved[cb] = set(cb.match(shapes, alias, edited, f"model '{info.name}'").values())
        except ValueError as e:
            raise ConfigError(f"trainer.callbacks: {e}") from None
    try:
        RestraintCallback.check_combination(resolved)
    except ValueError as e:
        raise ConfigError(f"trainer.callbacks: {e}") from None


def check_trainer(trainer: Any) -> None:
    """Trainer settings an editing run cannot work with (design notes: manual optimisation, no backward pass)."""
    if trainer is None:
        return
    from lightning.pytorch.strategies import DDPStrategy

    from .strategy import LockstepStrategy

    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, DDPStrategy) and not isinstance(strategy, LockstepStrategy):
        raise ConfigError(
            f"trainer.strategy: {type(strategy).__name__} wraps the model in DistributedDataParallel, which refuses a "
            "model without trainable parameters; use --trainer.strategy lockstep"
        )
    if getattr(getattr(trainer, "precision_plugin", None), "scaler", None) is not None:
        raise ConfigError(f"trainer.precision: {trainer.precision!r} scales gradients, and editing has no backward "
                          "pass; use 32-true or bf16-true")
    if getattr(trainer, "accumulate_grad_batches", 1) != 1:
        raise ConfigError("trainer.accumulate_grad_batches must be 1: every batch is one edit step")
    if getattr(trainer, "gradient_clip_val", None) not in (None, 0, 0.0):
        raise ConfigError("trainer.gradient_clip_val must be unset: edits are not gradient steps")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The contents of a Lightning checkpoint file (CPU tensors, memory-mapped when possible), or a
    :class:`~lit_prune.errors.CheckpointError` naming the file."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise CheckpointError(f"ckpt_path '{p}' is a directory; pass a checkpoint file, e.g. '{p / 'last.ckpt'}'")
    if not p.is_file():
        raise CheckpointError(f"ckpt_path '{p}': no such file (runs keep theirs in <run dir>/checkpoints/)")
    try:
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip archive: mmap is impossible; load plainly for the real error
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated files raise OSError, RuntimeError, EOFError, pickle errors...
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"ckpt_path '{p}' cannot be read ({type(e).__name__}{': ' + detail if detail else ''}): it is truncated or "
            "not a Lightning checkpoint; pass another checkpoint (e.g. checkpoints/last.ckpt) or none"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or not ({"loops", "global_step"} & set(ckpt)):
        raise CheckpointError(f"ckpt_path '{p}' is not a Lightning checkpoint (no 'state_dict' and 'loops' entries)")
    return ckpt


def check_checkpoint(
    path: str | Path,
    info: ModelInfo,
    edited: Sequence[str] | None = None,
    requests: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Check that ``path`` can resume this run: same model, same edited parameters and shapes, same first edits.

    ``edited``: the parameters the configured editor edits (None: not checked); ``requests``: the run's edit
    requests in order (None: not checked). Returns the checkpoint's contents.
    """
    p = Path(path).expanduser()
    ckpt = read_checkpoint(p)
    state = ckpt.get("lit_prune")
    if not isinstance(state, dict):
        raise CheckpointError(f"ckpt_path '{p}' was not written by a lit_prune editing run (no 'lit_prune' entry)")
    written_for = state.get("model_name")
    if written_for not in (None, info.name):
        raise CheckpointError(
            f"ckpt_path '{p}' was written for model '{written_for}', this run uses '{info.name}' (model.model); "
            f"resume with --model.model {written_for}, or start a new run without --ckpt_path"
        )
    params = info.parameters
    saved = {}
    for key, value in ckpt["state_dict"].items():
        name = key.removeprefix("model.")
        if not key.startswith("model.") or not isinstance(value, torch.Tensor):
            continue
        if name not in params:
            raise CheckpointError(f"ckpt_path '{p}' holds parameter '{name}', which model '{info.name}' does not "
                                  "have: it was written for another model")
        if tuple(value.shape) != params[name]:
            raise CheckpointError(f"ckpt_path '{p}': parameter '{name}' has shape {tuple(value.shape)} there and "
                                  f"{params[name]} in model '{info.name}': it was written for another model")
        saved[name] = value
    if edited is not None and saved and set(saved) != set(edited):
        raise CheckpointError(
            f"ckpt_path '{p}' holds the edited parameters {sorted(saved)}, but this run's editor edits "
            f"{sorted(edited)}; resume with the editor settings of that run (its config.yaml)"
        )
    if requests is not None:
        _check_replayed_requests(p, state, requests)
    return ckpt


def _check_replayed_requests(p: Path, state: dict[str, Any], requests: Sequence[Any]) -> None:
    """The requests the checkpoint already applied must be the data's first requests (the stream skips them)."""
    done = []
    for rec in state.get("edit_log") or []:
        if not isinstance(rec, dict) or not isinstance(rec.get("requests"), list):
            return  # a log this check does not know: leave it to the run
        done.extend(rec["requests"])
    if len(done) > len(requests):
        raise CheckpointError(
            f"ckpt_path '{p}' has already applied {len(done)} edits, more than the {len(requests)} of this run's data "
            "(data.n_edits / data.path)"
        )
    for i, (old, new) in enumerate(zip(done, requests)):
        if not isinstance(old, dict):
            return
        keys = ("prompt", "subject", "target_new")
        if any(old.get(k) != getattr(new, k, None) for k in keys):
            raise CheckpointError(
                f"ckpt_path '{p}': edit {i} of that run (case_id {old.get('case_id')!r}, subject "
                f"{old.get('subject')!r}) is not request {i} of this run's data (case_id "
                f"{getattr(new, 'case_id', None)!r}, subject {getattr(new, 'subject', None)!r}); resume with the same "
                "data.path, format, shuffle and seed"
            )


def check_run(
    model: str,
    editor: Any = None,
    callbacks: Sequence[Any] = (),
    ckpt_path: str | Path | None = None,
    dtype: str = "float32",
    requests: Sequence[Any] | None = None,
    trainer: Any = None,
) -> ModelInfo:
    """Every check above, in order; raises a :class:`~lit_prune.errors.LitPruneError` (a ``ValueError``) naming
    the parameter, file or record at the first problem. Loads no weights and writes nothing (except that a bundled
    model is converted into the cache on first use). Returns what it learned about the model."""
    check_trainer(trainer)
    info = check_model(model, dtype)
    edited = check_editor(editor, info)
    check_callbacks(callbacks, info, edited)
    if ckpt_path is not None:
        check_checkpoint(ckpt_path, info, edited, requests)
    return info
