"""MEND (Mitchell et al. 2022, "Fast Model Editing at Scale"): edits from a trained gradient-transform hypernetwork.

An edit = one forward/backward pass of the fine-tuning loss of ``target_new`` to get the per-token gradient factors
of the edited weights (:mod:`.factors`), then the trained transform (:mod:`.hypernet`) turns them into a
low-rank update per weight. The hypernetwork is trained with ``python -m lit_prune.mend_training --config
configs/mend_train_smollm2.yaml`` (:mod:`.training`); its checkpoint records the model and the weights it was trained for.

The gradient transform deviates from the reference code (eric-mitchell/mend) in two ways that change what it can
learn, both documented in :mod:`.hypernet`: its outputs are mapped back out of the normalised space (the
reference multiplies the normalised outputs), and its block structure differs (one residual low-rank MLP block
with the nonlinearity on the rank-r bottleneck and per-layer scale/shift on the input, against the reference's two
``LRLinear`` layers with a full-width ReLU and per-layer scale/shift on each layer's output). The bundled
``smollm2-135m`` hypernetwork was trained for 500 steps (the reference trains for up to 100k): it is
under-trained (``benchmarks/results/single_edit.md``), so MEND results on the embedded model are this
hypernetwork's, not the paper's MEND's.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ...requests import EditRequest
from ..base import EditError, Editor, LowRankUpdate, Updates, default_num_layers, get_parameter
from .factors import factor_dims, gradient_factors, orientation
from .hypernet import MENDHypernetwork

FORMAT = "lit_prune.mend/1"
STATE_PREFIX = "hypernet."  # key prefix of the hypernetwork in a MENDTrainingModule's Lightning checkpoint


def model_signature(model: nn.Module) -> dict[str, Any]:
    """What identifies a base model for MEND: architecture sizes plus the norm of its (never edited) input embedding."""
    cfg = model.config
    hidden = next((getattr(cfg, k) for k in ("hidden_size", "n_embd", "d_model") if hasattr(cfg, k)), None)
    return {
        "model_type": getattr(cfg, "model_type", type(model).__name__),
        "num_layers": default_num_layers(model),
        "hidden_size": hidden,
        "vocab_size": getattr(cfg, "vocab_size", None),
        "embedding_norm": float(model.get_input_embeddings().weight.detach().float().norm()),
    }


def model_info(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """``{"name", "signature"}`` stored in a hypernetwork checkpoint."""
    return {"name": name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
            "signature": model_signature(model)}


def _describe(info: Mapping[str, Any]) -> str:
    s = info.get("signature", {})
    return (f"'{info.get('name', '?')}' ({s.get('model_type')}, {s.get('num_layers')} layers, hidden {s.get('hidden_size')}, "
            f"vocab {s.get('vocab_size')}, embedding norm {s.get('embedding_norm', float('nan')):.4g})")


def check_compatible(hypernet: MENDHypernetwork, model: nn.Module, source: str = "MEND checkpoint") -> None:
    """Raise :class:`EditError` naming both sides when ``hypernet`` was trained for another model or other weights."""
    trained = hypernet.model_info
    here = model_info(model)
    a, b = trained.get("signature", {}), here["signature"]
    same = all(a.get(k) == b[k] for k in ("model_type", "num_layers", "hidden_size", "vocab_size"))
    if same and "embedding_norm" in a:
        same = math.isclose(a["embedding_norm"], b["embedding_norm"], rel_tol=1e-2)
    if not same:
        raise EditError(f"{source} was trained for model {_describe(trained)}, but the model being edited is {_describe(here)}")
    names = {n for n, _ in model.named_parameters()}
    for p in hypernet.params:
        if p not in names:
            raise EditError(
                f"{source} was trained for the weights {hypernet.params}; the model being edited ({_describe(here)}) "
                f"has no parameter '{p}'"
            )
        if factor_dims(model, p) != hypernet.dims[p] or orientation(model, p) != hypernet.orientations[p]:
            raise EditError(
                f"{source}: '{p}' was trained as a {hypernet.orientations[p]} map {hypernet.dims[p][0]}->"
                f"{hypernet.dims[p][1]}, but in the model being edited it is a {orientation(model, p)} map of shape "
                f"{tuple(get_parameter(model, p).shape)}"
            )


def save_hypernetwork(hypernet: MENDHypernetwork, path: str | Path) -> Path:
    """Write the hypernetwork (config + state dict, CPU tensors) to ``path`` atomically; returns the path."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": FORMAT, "mend_config": hypernet.config(),
            "state_dict": {k: v.detach().cpu() for k, v in hypernet.state_dict().items()}}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        torch.save(blob, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# Hypernetworks shipped in the package, by the model name they were trained for. The SmolLM2 one (4.4 MB) is
# bundled because training it takes ~22 min on 2 CPU cores (benchmarks/results/mend.md); it keeps MEND usable
# offline from a fresh install, like the embedded model itself.
BUNDLED = {"smollm2-135m": "mend-smollm2-135m.pt"}


def resolve_checkpoint(name: str | Path) -> Path:
    """A checkpoint path, or a bundled hypernetwork's name (a key of :data:`BUNDLED`) -> its file in the package."""
    key = str(name)
    if key in BUNDLED and not Path(key).exists():
        return Path(__file__).resolve().parents[2] / "data" / BUNDLED[key]
    return Path(key).expanduser()


def load_hypernetwork(path: str | Path) -> MENDHypernetwork:
    """A hypernetwork from a file of :func:`save_hypernetwork`, a ``MENDTrainingModule`` Lightning checkpoint, or a
    bundled name (``"smollm2-135m"``)."""
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise EditError(f"MEND checkpoint not found: '{path}' (train one with `python -m lit_prune.mend_training`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the file whatever torch raised
        raise EditError(f"cannot read MEND checkpoint '{path}': {e}") from None
    if not isinstance(blob, dict) or "mend_config" not in blob:
        raise EditError(f"'{path}' is not a MEND hypernetwork checkpoint (no 'mend_config' entry)")
    state = blob["state_dict"]
    if blob.get("format") != FORMAT:  # a Lightning checkpoint: keep the hypernetwork's entries only
        state = {k[len(STATE_PREFIX):]: v for k, v in state.items() if k.startswith(STATE_PREFIX)}
    hypernet = MENDHypernetwork.from_config(blob["mend_config"])
    try:
        hypernet.load_state_dict(state)
    except RuntimeError as e:
        raise EditError(f"MEND checkpoint '{path}' does not match its own config: {e}") from None
    return hypernet.eval().requires_grad_(False)


class MEND(Editor):
    """MEND editor: loads a trained hypernetwork and edits with it, one request batch at a time.

    Args:
        checkpoint: a hypernetwork file written by the training run (``export_path``), one of its Lightning
            ``.ckpt`` files, or the name of a bundled hypernetwork (``"smollm2-135m"``, the default: trained on
            CounterFact for the embedded model, layers 27-29 ``up_proj``/``down_proj``). Loaded in the constructor, so a missing or malformed file fails before any model loads.
        params: the weights to edit; ``None`` = those the hypernetwork was trained for. A different list raises
            :class:`EditError` naming both.

    ``compute`` returns, per edited weight, ``ΔW = A Bᵀ`` with ``A = -η δ̃ᵀ`` (out×T) and ``B = x̃ᵀ`` (in×T) for
    ``nn.Linear`` (GPT-2 ``Conv1D``: ``A = x̃ᵀ``, ``B = -η δ̃ᵀ``), T = tokens of the batch's fine-tuning loss with a
    non-zero gradient. Each call works on the model's current weights, so sequential editing needs no state here.
    """

    def __init__(self, checkpoint: str = "smollm2-135m", params: list[str] | None = None) -> None:
        self.checkpoint = str(resolve_checkpoint(checkpoint))
        self.hypernet = load_hypernetwork(self.checkpoint)
        if params is not None and list(params) != self.hypernet.params:
            raise EditError(
                f"MEND checkpoint '{self.checkpoint}' was trained for the weights {self.hypernet.params}, "
                f"but the editor was asked to edit {list(params)}"
            )
        self._checked: int | None = None

    def _check(self, model: nn.Module) -> None:
        if self._checked != id(model):
            check_compatible(self.hypernet, model, f"MEND checkpoint '{self.checkpoint}'")
            self._checked = id(model)

    def edited_parameters(self, model: nn.Module) -> list[str]:
        self._check(model)
        return list(self.hypernet.params)

    def prepare(self, model: nn.Module, tokenizer: Any) -> None:
        self._check(model)

    def compute(self, model: nn.Module, tokenizer: Any, requests: list[EditRequest]) -> Updates:
        self._check(model)
        device = next(model.parameters()).device
        hypernet = self.hypernet.to(device).eval()
        factors = gradient_factors(model, tokenizer, requests, hypernet.params)
        with torch.no_grad():
            updates = hypernet(factors)
        return {p: LowRankUpdate(u.A.detach().float(), u.B.detach().float()) for p, u in updates.items()}
