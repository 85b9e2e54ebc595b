"""Second-moment statistics C = E[k kᵀ] of the key entering an edited matrix (ROME/MEMIT ``layer_stats``).

``k`` is the input of the MLP output projection at one layer (k_dim = the MLP's inner size). C is uncentred and
counts every non-padding token of the text sample: ``C = (1/N) Σ_t k_t k_tᵀ``. Each batch's Σ k kᵀ is formed in
float32 from the model's activations and accumulated in float64.

All requested modules are collected in ONE pass over the texts: hooks on every module, and the forward stops at the
deepest one. With ``torch.distributed`` initialised, rank r takes texts r, r + world, ... and the sums and counts
are all-reduced, so every rank returns the same statistics.

Disk cache: ``<stats_dir>/<model>/<source>_stats/<module>_<dtype>_mom2_<n_samples>_len<max_length>.npz`` with
``stats_dir`` = ``cache_dir()/stats`` by default. The file holds ROME's keys (``mom2.mom2`` = the SUM Σ k kᵀ,
``mom2.count`` = N, ``sample_size``) plus ``count``, so ROME's published statistics drop in: a file named as ROME
names it (``<module>_<dtype>_mom2_<n_samples>.npz``, no ``_len``) in the same folder is used when the exact file is
absent.

:class:`SecondMomentCache` holds an editor's C per edited module and solves C⁻¹ rhs from a cached factorisation.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Sequence

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from . import nethook
from .errors import CacheError
from .models import cache_dir, load_texts
from .text import pad_batch, pad_id


@dataclass
class SecondMoment:
    """Σ k kᵀ over ``count`` tokens. ``mom2``: (k_dim, k_dim) float64 sum (CPU); :meth:`moment` = E[k kᵀ]."""

    mom2: Tensor
    count: int

    def moment(self) -> Tensor:
        """C = mom2 / count, float64, (k_dim, k_dim)."""
        return self.mom2 / self.count


class SecondMomentCache:
    """Second moments C (k_dim × k_dim, float64) under caller-chosen keys, and C⁻¹ rhs from a factorisation of each
    made once: Cholesky, LU where C is not numerically positive definite. One per editor instance (nothing is shared
    between instances); replacing a C drops its factor."""

    def __init__(self) -> None:
        self._moments: dict[Hashable, Tensor] = {}
        self._factors: dict[Hashable, tuple[str, Tensor, Tensor | None]] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._moments

    def __getitem__(self, key: Hashable) -> Tensor:
        return self._moments[key]

    def __setitem__(self, key: Hashable, C: Tensor) -> None:
        self._moments[key] = C
        self._factors.pop(key, None)

    def solve(self, key: Hashable, rhs: Tensor) -> Tensor:
        """C⁻¹ rhs in float64 (rhs: (k_dim, n)) for the C held under ``key``, on C's device."""
        if key not in self._factors:
            C = self._moments[key]
            L, info = torch.linalg.cholesky_ex(C)
            if int(info) == 0:
                self._factors[key] = ("cholesky", L, None)
            else:
                LU, piv = torch.linalg.lu_factor(C)
                self._factors[key] = ("lu", LU, piv)
        kind, f, piv = self._factors[key]
        rhs = rhs.to(device=f.device, dtype=torch.float64)
        return torch.cholesky_solve(rhs, f) if kind == "cholesky" else torch.linalg.lu_solve(f, piv, rhs)


def model_key(model: nn.Module) -> str:
    """Cache folder name of a model: the last part of a local path, ``org_name`` for a hub id, else a fingerprint."""
    cfg = getattr(model, "config", None)
    name = str(getattr(cfg, "name_or_path", "") or getattr(cfg, "_name_or_path", "") or "")
    if name:
        p = Path(name).expanduser()
        return p.name if (p.is_absolute() or name.startswith((".", "~"))) else name.replace("/", "_")
    emb = model.get_input_embeddings().weight.detach().flatten()[:4096].float().cpu().numpy()
    digest = hashlib.sha1(emb.tobytes()).hexdigest()[:10]
    return f"unnamed-{getattr(cfg, 'model_type', 'model')}-{digest}"


def source_key(source: str) -> str:
    """File-name-safe name of a text source (a local file gets its stem plus a hash of its absolute path)."""
    p = Path(source).expanduser()
    if p.is_file():
        return f"{p.stem}-{hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:8]}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", source)


def stats_file(
    stats_dir: str | Path, model_name: str, source: str, module: str, dtype: str, n_samples: int, max_length: int
) -> Path:
    """Where the statistics of one module are cached (see the module docstring)."""
    return Path(stats_dir) / model_name / f"{source_key(source)}_stats" / f"{module}_{dtype}_mom2_{n_samples}_len{max_length}.npz"


def rome_stats_file(stats_dir: str | Path, model_name: str, source: str, module: str, dtype: str, n_samples: int) -> Path:
    """The name ROME gives the same statistics (no max length in it)."""
    return Path(stats_dir) / model_name / f"{source_key(source)}_stats" / f"{module}_{dtype}_mom2_{n_samples}.npz"


def save_npz(path: str | Path, stat: SecondMoment, n_samples: int) -> None:
    """Write ``stat`` in ROME's npz layout, atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                **{
                    "constructor": np.array("util.runningstats.CombinedStat(mom2=util.runningstats.SecondMoment())"),
                    "mom2.constructor": np.array("util.runningstats.SecondMoment()"),
                    "mom2.mom2": stat.mom2.double().cpu().numpy(),
                    "mom2.count": np.array(stat.count),
                    "count": np.array(stat.count),
                    "sample_size": np.array(n_samples),
                },
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_npz(path: str | Path) -> SecondMoment:
    """Read a statistics file written by :func:`save_npz` or by ROME's ``layer_stats``.

    Raises :class:`~lit_prune.errors.CacheError` (a ``ValueError``) naming the file when it is truncated, not a
    second-moment file, or holds a non-square, non-finite or empty sum.
    """
    try:
        with np.load(path, allow_pickle=False) as d:
            if "mom2.mom2" not in d:
                raise CacheError(f"{path}: not a second-moment file (no 'mom2.mom2'; keys: {sorted(d.keys())})")
            if "mom2.count" not in d and "count" not in d:
                raise CacheError(f"{path}: not a second-moment file (no 'mom2.count' or 'count')")
            count = int(d["mom2.count"] if "mom2.count" in d else d["count"])
            mom2 = np.array(d["mom2.mom2"], dtype=np.float64)
    except CacheError:
        raise
    except Exception as e:  # noqa: BLE001 - zipfile, numpy and OS errors all mean the same: unreadable
        raise CacheError(f"statistics file '{path}' is unreadable (truncated or damaged: {type(e).__name__}: {e}); "
                         "delete it to have it recomputed") from None
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1] or count < 1 or not np.isfinite(mom2).all():
        raise CacheError(f"statistics file '{path}' holds an invalid sum (shape {mom2.shape}, count {count}); "
                         "delete it to have it recomputed")
    return SecondMoment(torch.from_numpy(mom2), count)


def _k_dim(module: nn.Module) -> int:
    """Size of the input (key) of an edited matrix: ``nn.Linear`` stores (out, in), GPT-2's ``Conv1D`` (in, out)
    (:func:`lit_prune.editors.weights.orientation`)."""
    from .editors.weights import orientation

    return module.weight.shape[1] if orientation(module) == "linear" else module.weight.shape[0]


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce(t: Tensor, device: torch.device, op: Any = None) -> Tensor:
    dist = torch.distributed
    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    x = t.to(dev)
    dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x.to(t.device)


def _batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped (longest first) so that rows × longest row ≤ batch_tokens (at least one row per batch)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= batch_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


@torch.no_grad()
def collect_second_moments(
    model: nn.Module,
    tok: Any,
    modules: Sequence[str],
    texts: Sequence[str],
    max_length: int = 256,
    batch_tokens: int = 8192,
    progress: bool = True,
) -> dict[str, SecondMoment]:
    """Σ k kᵀ of the INPUT of each module over the non-padding tokens of ``texts`` (this rank's share when
    ``torch.distributed`` is initialised; sums all-reduced). Texts are truncated to ``max_length`` tokens."""
    from tqdm.auto import tqdm

    rank, world = _dist()
    device = next(model.parameters()).device
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    for m in modules:
        if m not in order:
            raise ValueError(f"module '{m}' not found in {type(model).__name__}")
    mods = {m: model.get_submodule(m) for m in modules}
    last = max(modules, key=order.__getitem__)

    mine = list(texts[rank::world])
    enc = [list(tok(t, truncation=True, max_length=max_length)["input_ids"]) for t in mine] if mine else []
    enc = [e for e in enc if e]
    sums: dict[str, Tensor | None] = {m: None for m in modules}
    count = 0
    pad = pad_id(tok)
    batches = _batches([len(e) for e in enc], batch_tokens)
    bar = tqdm(batches, desc=f"second moments of {len(modules)} module(s)", unit="batch",
               disable=not progress or rank != 0)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        for b in bar:
            ids, mask, _, _ = pad_batch([enc[i] for i in b], pad, "right", device)
            with nethook.capture_inputs(mods, stop_after=last) as got:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            keep = mask.bool()
            for m in modules:
                k = got[m][keep].float()  # (tokens, k_dim), padding removed
                s = (k.T @ k).double()
                sums[m] = s if sums[m] is None else sums[m].add_(s)
            count += int(keep.sum())
            bar.set_postfix(tokens_per_s=f"{count / (time.perf_counter() - t0):.0f}")
    finally:
        model.train(was_training)
    if world > 1:
        counts = _all_reduce(torch.tensor([count], dtype=torch.float64), device)
        count = int(counts.item())
        for m in modules:
            k_dim = _k_dim(mods[m])
            local = sums[m] if sums[m] is not None else torch.zeros(k_dim, k_dim, dtype=torch.float64, device=device)
            sums[m] = _all_reduce(local, device)
    if count == 0:
        raise ValueError("second moments: no tokens were seen (empty texts?)")
    return {m: SecondMoment(sums[m].cpu(), count) for m in modules}


def _dtype_name(model: nn.Module, module: str) -> str:
    return str(model.get_submodule(module).weight.dtype).replace("torch.", "")


def second_moments(
    model: nn.Module,
    tok: Any,
    modules: Sequence[str],
    source: str = "wiki-offline",
    n_samples: int = 3000,
    max_length: int = 256,
    batch_tokens: int = 8192,
    stats_dir: str | Path | None = None,
    model_name: str | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> dict[str, SecondMoment]:
    """Second moments of the input of each module in ``modules`` from the first ``n_samples`` texts of ``source``.

    Loaded from the disk cache when present; the missing ones are computed together in one pass and saved (rank 0
    writes, atomically). A cached file that is unreadable (e.g. truncated) or has the wrong shape is recomputed and
    replaced, with a warning naming it. ``n_samples`` larger than the source is clipped to the source's size (with a
    warning); the cache key uses the number actually used. ``model_name`` defaults to :func:`model_key`.
    """
    if n_samples < 1:
        raise ValueError(f"second_moments: n_samples must be >= 1, got {n_samples}")
    if max_length < 1:
        raise ValueError(f"second_moments: max_length must be >= 1, got {max_length}")
    stats_dir = Path(stats_dir) if stats_dir is not None else cache_dir() / "stats"
    model_name = model_name or model_key(model)
    rank, world = _dist()
    device = next(model.parameters()).device
    out: dict[str, SecondMoment] = {}
    texts: list[str] | None = None
    n = n_samples

    def paths(m: str, n: int) -> list[Path]:
        dt = _dtype_name(model, m)
        return [stats_file(stats_dir, model_name, source, m, dt, n, max_length),
                rome_stats_file(stats_dir, model_name, source, m, dt, n)]

    def cached(m: str, n: int) -> SecondMoment | None:
        """The cached statistics of ``m``; an unreadable or mismatched file is reported and recomputed."""
        if not use_cache:
            return None
        for p in paths(m, n):
            if not p.is_file():
                continue
            try:
                st = load_npz(p)
            except CacheError as e:
                warnings.warn(f"{e}; recomputing it", stacklevel=3)
                continue
            k = _k_dim(model.get_submodule(m))
            if tuple(st.mom2.shape) != (k, k):
                warnings.warn(f"statistics file '{p}' has shape {tuple(st.mom2.shape)}, '{m}' needs ({k}, {k}) "
                              "(another model cached under the same name?); recomputing it", stacklevel=3)
                continue
            return st
        return None

    got = {m: cached(m, n) for m in modules}
    if any(st is None for st in got.values()):
        texts = load_texts(source)
        if len(texts) < n_samples:
            warnings.warn(f"text source '{source}' has {len(texts)} texts; using all of them, not {n_samples}",
                          stacklevel=2)
            n = len(texts)
            got = {m: cached(m, n) for m in modules}
        texts = texts[:n]
    missing = [m for m in modules if got[m] is None]
    if world > 1:  # every rank must take the same branch
        flag = _all_reduce(torch.tensor([float(bool(missing))]), device, torch.distributed.ReduceOp.MAX)
        if flag.item() > 0:
            missing = list(modules)
    for m in modules:
        if m not in missing:
            out[m] = got[m]
    if missing:
        assert texts is not None or world > 1
        if texts is None:
            texts = load_texts(source)[:n]
        rank_zero_info(f"computing second-moment statistics: {len(missing)} module(s), {len(texts)} texts of '{source}'")
        computed = collect_second_moments(model, tok, missing, texts, max_length, batch_tokens, progress)
        for m, st in computed.items():
            out[m] = st
            if use_cache and rank == 0:
                save_npz(paths(m, n)[0], st, n)
        if world > 1:
            torch.distributed.barrier()
    return {m: out[m] for m in modules}
