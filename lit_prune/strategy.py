"""LockstepStrategy: several processes editing one model in lock-step, without DistributedDataParallel."""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.ddp import _sync_module_states


class LockstepStrategy(DDPStrategy):
    """A DDP process group that does not wrap the model.

    DDP refuses a module without trainable parameters and would all-reduce gradients that editing never produces.
    This strategy keeps everything else of DDP (launch, process group, ``broadcast``/``barrier``/``reduce``): at
    fit start the model's parameters and buffers are synchronised from rank 0, each edit update is computed on every
    rank (MEMIT/AlphaEdit batches: the z optimisation split across ranks, the targets all-gathered) and rank 0's is
    broadcast (see :class:`~lit_prune.SequentialEditingModule`), so all ranks hold bit-identical
    weights after every step; evaluation callbacks shard their data across ranks and reduce with torchmetrics.

    Use it as ``strategy: lockstep`` (or ``class_path: lit_prune.strategy.LockstepStrategy``) with ``devices: N``.
    On CPU pass ``process_group_backend: gloo``.
    """

    strategy_name = "lockstep"

    def configure_ddp(self) -> None:
        _sync_module_states(self.model)

    @classmethod
    def register_strategies(cls, strategy_registry: dict) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="DDP process group without the DDP wrapper (lock-step editing)"
        )


if LockstepStrategy.strategy_name not in StrategyRegistry:
    LockstepStrategy.register_strategies(StrategyRegistry)
