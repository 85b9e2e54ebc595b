"""Editor interface and the low-rank update type shared by editors, the edit log and the restraint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import LitPruneError
from ..requests import EditRequest


class EditError(LitPruneError):
    """An edit could not be computed or applied (a layer outside the model, a module template that matches nothing,
    no requests, a non-finite update, ...); the message names the request or parameter. A ``ValueError``, like every
    lit_prune error about bad arguments; nothing was written when it is raised."""


@dataclass
class LowRankUpdate:
    """An additive update ``ΔW = A @ B.T`` to one parameter, in the orientation of the STORED weight.

    ``A``: (rows, r), ``B``: (cols, r) where the parameter has shape (rows, cols). For ``nn.Linear`` rows = out
    features (ΔW k for a key k of size cols); for GPT-2 ``Conv1D`` (stored in×out) rows = in features and the update
    acts as ``k @ ΔW``. Factors are kept in float32 or better regardless of the model's dtype.
    """

    A: Tensor
    B: Tensor

    def __post_init__(self) -> None:
        if self.A.dim() == 1:
            self.A = self.A[:, None]
        if self.B.dim() == 1:
            self.B = self.B[:, None]
        if self.A.shape[1] != self.B.shape[1]:
            raise ValueError(f"LowRankUpdate: A has {self.A.shape[1]} columns, B has {self.B.shape[1]}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.A.shape[0], self.B.shape[0])

    @property
    def rank(self) -> int:
        """Number of factor columns (an upper bound of the true rank)."""
        return self.A.shape[1]

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (rows, cols) matrix A Bᵀ."""
        d = self.A @ self.B.T
        return d if dtype is None else d.to(dtype)

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.A).all() and torch.isfinite(self.B).all())

    def to(self, *args: Any, **kwargs: Any) -> "LowRankUpdate":
        return LowRankUpdate(self.A.to(*args, **kwargs), self.B.to(*args, **kwargs))

    @staticmethod
    def concat(updates: Iterable["LowRankUpdate"]) -> "LowRankUpdate":
        """Sum of updates as one factor pair (columns concatenated)."""
        ups = list(updates)
        return LowRankUpdate(torch.cat([u.A for u in ups], 1), torch.cat([u.B for u in ups], 1))


Updates = dict[str, LowRankUpdate]
"""Parameter name (as in ``model.named_parameters()``) -> update."""


def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """``model``'s parameter called ``name``; a clear error listing close names when there is none."""
    params = dict(model.named_parameters())
    if name not in params:
        stem = name.rsplit(".", 2)[0]
        near = [n for n in params if n.startswith(stem)][:5]
        raise EditError(f"parameter '{name}' not found in {type(model).__name__}; similar names: {near}")
    return params[name]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """``model``'s submodule called ``name`` (error names it when missing)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise EditError(f"module '{name}' not found in {type(model).__name__}") from None


def check_updates(model: nn.Module, updates: Mapping[str, LowRankUpdate], where: str = "edit") -> None:
    """Raise before anything is written if an update is non-finite or does not fit its parameter."""
    for name, up in updates.items():
        p = get_parameter(model, name)
        if tuple(p.shape) != up.shape:
            raise EditError(f"{where}: update for '{name}' has shape {up.shape}, parameter has {tuple(p.shape)}")
        if not up.is_finite():
            raise EditError(f"{where}: update for '{name}' is not finite (NaN/inf); nothing was written")


@torch.no_grad()
def apply_updates(model: nn.Module, updates: Mapping[str, LowRankUpdate], sign: float = 1.0) -> None:
    """Add (``sign=1``) or subtract (``sign=-1``) updates in place; every update is checked before any is written."""
    check_updates(model, updates)
    for name, up in updates.items():
        p = get_parameter(model, name)
        p.add_(up.dense(torch.float32).to(device=p.device, dtype=p.dtype), alpha=sign)


class Editor:
    """Base class of the editors. Plain object: no Lightning inside.

    Subclasses implement :meth:`compute`, which returns the updates for a batch of requests computed on the model's
    current weights WITHOUT changing them, and :meth:`edited_parameters`. :meth:`apply` = compute + write.
    """

    def edited_parameters(self, model: nn.Module) -> list[str]:
        """Names of the parameters this editor changes on ``model``."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, tokenizer: Any) -> None:
        """Load or compute what the editor needs before its first edit (e.g. second-moment statistics)."""

    def compute(self, model: nn.Module, tokenizer: Any, requests: list[EditRequest]) -> Updates:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What the editor carries from one edit batch to the next (AlphaEdit: the edited keys); default nothing.
        ``SequentialEditingModule`` saves it in checkpoints."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def forget(self, n_batches: int) -> None:
        """Drop what the last ``n_batches`` computed batches left in the editor's state (called by undo)."""

    def apply(self, model: nn.Module, tokenizer: Any, requests: list[EditRequest | Mapping[str, Any]]) -> Updates:
        """Edit ``model`` in place for ``requests`` (dicts or :class:`EditRequest`); returns the applied updates."""
        reqs = [EditRequest.coerce(r, f"request {i}") for i, r in enumerate(requests)]
        updates = self.compute(model, tokenizer, reqs)
        apply_updates(model, updates)
        return updates


def finite_or_raise(t: Tensor, what: str) -> Tensor:
    if not torch.isfinite(t).all():
        raise EditError(f"{what} is not finite (NaN/inf); nothing was written")
    return t


def default_num_layers(model: nn.Module) -> int:
    cfg = model.config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(cfg, key):
            return int(getattr(cfg, key))
    raise EditError(f"cannot tell the number of layers of {type(model).__name__} from its config")

