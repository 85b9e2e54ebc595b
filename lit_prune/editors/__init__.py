"""Editors: plain objects that turn edit requests into low-rank weight updates (no Lightning inside).

``ROME``, ``MEMIT`` and ``FT`` edit MLP output matrices of GPT-2-, GPT-J-, GPT-NeoX- and Llama-family models
(module names and hyper-parameters from :mod:`lit_prune.editors.presets`). One-call use::

    editor = ROME.for_model(model, tokenizer)          # preset for this model, statistics computed or loaded
    updates = editor.apply(model, tokenizer, [{"prompt": "{} is located in", "subject": "The Eiffel Tower",
                                              "target_new": "Rome", "target_true": "Paris"}])

``AlphaEdit`` is MEMIT with its update projected onto the null space of the preserved keys (batch-sequential).

``MEND`` edits with a trained hypernetwork (``MEND("smollm2-135m")`` loads the one bundled for the embedded model;
train others with ``python -m lit_prune.mend_training``).
"""

from . import presets
from .alphaedit import AlphaEdit
from .base import EditError, Editor, LowRankUpdate, Updates, apply_updates, check_updates
from .ft import FT
from .memit import MEMIT
from .mend import MEND
from .presets import ARCHITECTURES, HPARAMS, ArchTemplates
from .rome import ROME

__all__ = [
    "ARCHITECTURES",
    "AlphaEdit",
    "ArchTemplates",
    "EditError",
    "Editor",
    "FT",
    "HPARAMS",
    "LowRankUpdate",
    "MEMIT",
    "MEND",
    "ROME",
    "Updates",
    "apply_updates",
    "check_updates",
    "presets",
]
