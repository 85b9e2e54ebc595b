"""MEND (Mitchell et al. 2022, "Fast Model Editing at Scale") in one package.

- :mod:`.editor`: the :class:`MEND` editor and the hypernetwork checkpoints (save, load, the bundled one);
- :mod:`.factors`: the per-token rank-one factors of the fine-tuning gradient that MEND transforms;
- :mod:`.hypernet`: the gradient-transform hypernetwork;
- :mod:`.training`: training the hypernetwork as a Lightning run (``python -m lit_prune.mend_training``).

The bundled hypernetwork for the embedded model is package data: ``lit_prune/data/mend-smollm2-135m.pt``.
"""

from .editor import (
    BUNDLED,
    FORMAT,
    MEND,
    STATE_PREFIX,
    check_compatible,
    load_hypernetwork,
    model_info,
    model_signature,
    resolve_checkpoint,
    save_hypernetwork,
)
from .hypernet import MENDHypernetwork

__all__ = [
    "BUNDLED",
    "FORMAT",
    "MEND",
    "MENDHypernetwork",
    "STATE_PREFIX",
    "check_compatible",
    "load_hypernetwork",
    "model_info",
    "model_signature",
    "resolve_checkpoint",
    "save_hypernetwork",
]
