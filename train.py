"""Sequential editing run: ``python train.py --config configs/default.yaml [--ckpt_path last.ckpt]``.

A LightningCLI without subcommands (``run=False``): the config names the model, the editor (``class_path``), the
data and the callbacks (PruneCallback, metrics); ``--print_config`` prints the full resolved config.

Bad input (configuration, data, model, checkpoint, cache) ends the run with one ``error: ...`` line naming the
parameter, file or record, and exit status 1 (2 for a command line that does not parse); ``LIT_PRUNE_DEBUG=1`` shows
the traceback instead. Everything is checked (:func:`lit_prune.preflight.check_run`) before the run directory, its
``config.yaml``, event files or checkpoints are created, so a failing run leaves an existing run directory as it was.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any, NoReturn

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

import lit_prune  # noqa: F401  (registers the "lockstep" strategy)
from lit_prune import EditDataModule, SequentialEditingModule
from lit_prune.callbacks import EditProgressBar
from lit_prune.errors import debug_enabled, fail
from lit_prune.preflight import check_run

# Editing runs are eval-mode, single-epoch, no-worker streams by design: these Lightning warnings do not apply.
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
# A checkpoint is taken after the step's edit by design (it holds the edited weights and the edit log); there is no
# "pre-optimization state" to save in an editing run.
warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
# Lightning's advertisement for its cloud logger is not information about this run.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())


def expand_strategy_name(args: list[str]) -> list[str]:
    """``--trainer.strategy lockstep --trainer.strategy.process_group_backend gloo`` as jsonargparse needs it.

    jsonargparse takes ``--trainer.strategy.<arg>`` only after a class path, not after a registered strategy name;
    when such arguments are present, a registered name (``lockstep``, ``ddp``, ...) is replaced by its class path
    followed by the init arguments the registry gives that name (the user's own arguments come later and win).
    """
    if not any(a.startswith("--trainer.strategy.") for a in args):
        return list(args)
    from lightning.pytorch.strategies import StrategyRegistry

    def expand(name: str) -> list[str] | None:
        if name not in StrategyRegistry:
            return None
        entry = StrategyRegistry[name]  # not .get(): that instantiates the strategy
        cls, init = entry["strategy"], entry.get("init_params") or {}
        if not all(isinstance(v, (bool, int, float, str)) for v in init.values()):
            return None
        fmt = lambda v: str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
        return [f"{cls.__module__}.{cls.__qualname__}"] + [f"--trainer.strategy.{k}={fmt(v)}" for k, v in init.items()]

    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--trainer.strategy" and i + 1 < len(args) and (new := expand(args[i + 1])) is not None:
            out += [a, *new]
            i += 2
            continue
        if a.startswith("--trainer.strategy=") and (new := expand(a.split("=", 1)[1])) is not None:
            out += [f"--trainer.strategy={new[0]}", *new[1:]]
        else:
            out.append(a)
        i += 1
    return out


def condense_error(message: str) -> str:
    """jsonargparse's error for a class argument (``Does not validate against any of the Union subtypes`` with its
    subtypes, the ``NoneType`` alternative and the given value) as one line: the key, the class and what was wrong
    (``LIT_PRUNE_DEBUG=1`` shows the original)."""
    noise = ("Does not validate against any of the Union subtypes", "Errors:", "- Expected a", "Given value type")
    lines = [ln.strip() for ln in message.strip().splitlines() if not ln.strip().startswith(noise) and "NestedArg(" not in ln]
    at = next((i for i, ln in enumerate(lines) if ln.startswith("- Problem with given class_path")), None)
    if at is None:
        return " ".join(lines)
    cls = lines[at].split("'")[1] if lines[at].count("'") >= 2 else "?"
    detail = []
    for ln in lines[at + 1:]:
        if ln.startswith("- "):
            break
        detail.append(ln)
    return f"{lines[0].rstrip(':')}: {cls}: {' '.join(detail)}"


class EditingArgumentParser(LightningArgumentParser):
    """A command line that does not parse gets its error and a pointer to ``--help``, not the 50-line usage."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debug_enabled():
            super().error(message, ex)
        prog = self.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {condense_error(message)}\n(`{prog} --help` lists every option)\n")
        sys.exit(2)


class SaveConfigAtTrainStart(SaveConfigCallback):
    """Writes ``config.yaml`` into the run directory when training starts instead of in ``setup``: after the model,
    the checkpoint and the editor's statistics have loaded, so a run that fails on them never touches a run
    directory it was pointed at."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        return None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().setup(trainer, pl_module, "fit")


class EditingCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", type=str, default=None, help="checkpoint to resume the edit stream from")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with EditProgressBar as its progress bar (lines when stdout is not a terminal, no v_num)
        unless the config names a progress bar or disables it."""
        cfg = self._get(self.config_init, "trainer", default={})
        callbacks = cfg.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if cfg.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, EditProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        if args is None or isinstance(args, (list, tuple)):
            self.config = parser.parse_args(expand_strategy_name(list(sys.argv[1:] if args is None else args)))
        else:
            super().parse_arguments(parser, args)


def preflight(cli: LightningCLI) -> None:
    """:func:`lit_prune.preflight.check_run` on what the command line configured."""
    model = cli.model
    cfg = cli.config.get("model") or {}
    check_run(
        model=getattr(model, "model_name", None) or cfg.get("model"),
        editor=getattr(model, "editor", None),
        callbacks=list(cli.trainer.callbacks),
        ckpt_path=cli.config.get("ckpt_path"),
        dtype=getattr(model, "dtype_name", None) or cfg.get("dtype") or "float32",
        requests=getattr(cli.datamodule, "requests", None),
        trainer=cli.trainer,
    )


def main(args: list[str] | None = None) -> None:
    try:
        cli = EditingCLI(
            SequentialEditingModule,
            EditDataModule,
            run=False,
            save_config_callback=SaveConfigAtTrainStart,
            save_config_kwargs={"overwrite": True},
            parser_class=EditingArgumentParser,
            parser_kwargs={"default_env": False},
            args=args,
        )
        preflight(cli)
    except Exception as e:  # noqa: BLE001 - every configuration error ends here as one line
        fail(e)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    except Exception as e:  # noqa: BLE001 - a failing run ends with one line too (LIT_PRUNE_DEBUG=1: traceback)
        fail(e)


if __name__ == "__main__":
    main()
