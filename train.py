"""Sequential editing run: ``python train.py --config configs/default.yaml [--ckpt_path last.ckpt]``.

A LightningCLI without subcommands (``run=False``): the config names the model, the editor (``class_path``), the
data and the callbacks (PruneCallback, metrics); ``--print_config`` prints the full resolved config.
"""

from __future__ import annotations

import logging
import sys
import warnings

from lightning.pytorch.cli import LightningCLI

import lit_prune  # noqa: F401  (registers the "lockstep" strategy)
from lit_prune import EditDataModule, SequentialEditingModule
from lit_prune.requests import EditRequestError


# Editing runs are eval-mode, single-epoch, no-worker streams by design: these Lightning warnings do not apply.
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
# A checkpoint is taken after the step's edit by design (it holds the edited weights and the edit log); there is no
# "pre-optimization state" to save in an editing run.
warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
# Lightning's advertisement for its cloud logger is not information about this run.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())


class EditingCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", type=str, default=None, help="checkpoint to resume the edit stream from")


def main(args: list[str] | None = None) -> None:
    try:
        cli = EditingCLI(
            SequentialEditingModule,
            EditDataModule,
            run=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"default_env": False},
            args=args,
        )
    except EditRequestError as e:
        sys.exit(f"error: {e}")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))


if __name__ == "__main__":
    main()
