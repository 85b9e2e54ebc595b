"""Entry point of MEND's hypernetwork training (the code is :mod:`lit_prune.editors.mend.training`)::

    python -m lit_prune.mend_training --config configs/mend_train_smollm2.yaml
"""

from .editors.mend.training import (
    MENDDataModule,
    MENDExample,
    MENDTrainingCLI,
    MENDTrainingModule,
    kl_pre_post,
    main,
    pair_locality,
)

__all__ = [
    "MENDDataModule",
    "MENDExample",
    "MENDTrainingCLI",
    "MENDTrainingModule",
    "kl_pre_post",
    "main",
    "pair_locality",
]

if __name__ == "__main__":
    main()
