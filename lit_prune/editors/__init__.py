"""Editors: plain objects that turn edit requests into low-rank weight updates (no Lightning inside).

``ROME``, ``MEMIT`` and ``FT`` edit MLP output matrices of GPT-2-, GPT-J-, GPT-NeoX- and Llama-family models
(module names and hyper-parameter presets from :mod:`lit_prune.editors.presets`, typed and validated by
:mod:`lit_prune.editors.hparams`). One-call use::

    editor = ROME.for_model(model, tokenizer)          # preset for this model, statistics computed or loaded
    updates = editor.apply(model, tokenizer, [{"prompt": "{} is located in", "subject": "The Eiffel Tower",
                                              "target_new": "Rome", "target_true": "Paris"}])

``AlphaEdit`` is MEMIT with its update projected onto the null space of the preserved keys (batch-sequential).

``MEND`` edits with a trained hypernetwork (``MEND("smollm2-135m")`` loads the one bundled for the embedded model;
train others with ``python -m lit_prune.mend_training``); all of MEND is the package :mod:`lit_prune.editors.mend`.
"""

from . import architectures, hparams, presets
from .alphaedit import AlphaEdit
from .base import EditError, Editor, LowRankUpdate, Updates, apply_updates, check_updates
from .ft import FT
from .hparams import AlphaEditHParams, FTHParams, HParams, MEMITHParams, ROMEHParams
from .memit import MEMIT
from .mend import MEND
from .architectures import ARCHITECTURES, ArchTemplates
from .presets import HPARAMS
from .rome import ROME

__all__ = [
    "ARCHITECTURES",
    "AlphaEdit",
    "AlphaEditHParams",
    "ArchTemplates",
    "EditError",
    "Editor",
    "FT",
    "FTHParams",
    "HPARAMS",
    "HParams",
    "LowRankUpdate",
    "MEMIT",
    "MEMITHParams",
    "MEND",
    "ROME",
    "ROMEHParams",
    "Updates",
    "apply_updates",
    "architectures",
    "check_updates",
    "hparams",
    "presets",
]
