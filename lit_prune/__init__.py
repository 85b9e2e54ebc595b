"""lit_prune: PRUNE (perturbation-restrained sequential model editing, ICLR 2025) as a PyTorch Lightning module."""

from .data.datamodule import EditDataModule
from .models import load_model, load_texts
from .module import EditRecord, SequentialEditingModule
from .requests import EditRequest
from .strategy import LockstepStrategy

__version__ = "0.1.0"
__all__ = [
    "EditDataModule",
    "EditRecord",
    "EditRequest",
    "LockstepStrategy",
    "SequentialEditingModule",
    "load_model",
    "load_texts",
]
