"""DownstreamEvalCallback: general abilities (GSM8K, SAMSum, NQ, RTE) and held-out perplexity along the edit stream."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_prune.curves import log_metrics, num_edits
from lit_prune.errors import check_positive_ints
from lit_prune.metrics.downstream import new_task_metric, task_values, update_task_metric
from lit_prune.metrics.report import FinalMetricsReporter
from lit_prune.metrics.tasks import (
    DEFAULT_N,
    GENERATION_TASKS,
    MAX_NEW_TOKENS,
    TASK_FILES,
    TASKS,
    DownstreamDataError,
    Example,
    load_examples,
)
from lit_prune.models import load_texts

ENV_DATA_DIR = "LIT_PRUNE_DOWNSTREAM"


class DownstreamEvalCallback(FinalMetricsReporter, L.Callback):
    """The paper's general-ability tasks and held-out perplexity, at 0 edits, every ``every_n_edits`` edits and at
    the end of training, logged as ``downstream/{reasoning,summarization,qa,nli,perplexity}`` (x = number of edits),
    each with what reads it: ``<task>_n`` (examples), ``<task>_correct``, the ROUGE parts of summarization, and for
    NLI and QA the parseable answers, the accuracy among them and a likelihood score (``nli_likelihood``,
    ``qa_gold_nll``); every key is listed in :mod:`lit_prune.metrics.downstream`.

    Args:
        tasks: any of ``reasoning``, ``summarization``, ``qa``, ``nli``, ``perplexity``. The default, perplexity
            only, needs no data beyond the bundled text and runs offline.
        data_dir: folder with the reference files (``test-reasoning.jsonl``, ``test-summarization.json``,
            ``test-OpenDomainQA.jsonl``, ``test-NLI.tsv``); default ``$LIT_PRUNE_DOWNSTREAM``.
        sources: per-task file path or hub id (``hf:gsm8k:main:test``), overriding ``data_dir``.
        n_examples: per-task number of examples (first n); defaults 358/149/261/299 as the paper.
        every_n_edits: evaluation period in edits (None: only at 0 edits and at the end).
        batch_size: prompts (or texts) per forward / ``generate`` call.
        perplexity_source: text source for perplexity (see :func:`lit_prune.load_texts`).
        perplexity_n_texts: held-out texts for perplexity.
        perplexity_offset: index of the first text; None takes the LAST ``perplexity_n_texts`` texts of the source
            (second-moment statistics use the front of the bundled summaries, so these are held out).
        max_length: token limit of a prompt plus its continuation (prompts are cut from the left) and of a
            perplexity text (cut from the right).
        max_new_tokens: per-task override of the generation lengths (5/25/20/1).

    Missing data for a requested task raises at ``setup``, naming the file and the setting. Examples are sharded
    across ranks (rank r takes r, r + world_size, ...) and the metric states are summed. Model in eval mode, no
    gradients.
    """

    reads_evaluated_weights = True  # lit_prune.protocols.WeightReader: restraining callbacks go first

    def __init__(
        self,
        tasks: Sequence[str] = ("perplexity",),
        data_dir: str | None = None,
        sources: Mapping[str, str] | None = None,
        n_examples: Mapping[str, int] | None = None,
        every_n_edits: int | None = 10,
        batch_size: int = 8,
        perplexity_source: str = "wiki-offline",
        perplexity_n_texts: int = 100,
        perplexity_offset: int | None = None,
        max_length: int = 1024,
        max_new_tokens: Mapping[str, int] | None = None,
        prog_bar: bool = True,
    ) -> None:
        super().__init__()
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise ValueError(f"DownstreamEvalCallback: unknown task(s) {bad or tasks}; known: {', '.join(TASKS)}")
        for name, d in (("sources", sources), ("n_examples", n_examples), ("max_new_tokens", max_new_tokens)):
            unknown = sorted(set(d or {}) - set(GENERATION_TASKS))
            if unknown:
                raise ValueError(f"DownstreamEvalCallback: {name} has unknown task(s) {unknown}; "
                                 f"known: {', '.join(GENERATION_TASKS)}")
        check_positive_ints("DownstreamEvalCallback", {
            "every_n_edits": every_n_edits, "batch_size": batch_size, "perplexity_n_texts": perplexity_n_texts,
            "max_length": max_length}, optional=("every_n_edits",))
        self.tasks = tasks
        self.data_dir = data_dir
        self.sources = dict(sources or {})
        self.n_examples = {**DEFAULT_N, **(n_examples or {})}
        self.every_n_edits = every_n_edits
        self.batch_size = batch_size
        self.perplexity_source = perplexity_source
        self.perplexity_n_texts = perplexity_n_texts
        self.perplexity_offset = perplexity_offset
        self.max_length = max_length
        self.max_new_tokens = {**MAX_NEW_TOKENS, **(max_new_tokens or {})}
        self.prog_bar = prog_bar
        self.metrics = {t: new_task_metric(t) for t in tasks}
        self.data: dict[str, list[Example] | list[str]] = {}
        self.final_metrics: dict[str, float] = {}
        self._last_eval: int | None = None

    # -- data ----------------------------------------------------------------------------------------------------------
    def source_of(self, task: str) -> str:
        """Where ``task``'s data comes from: ``sources[task]``, else ``<data_dir or $LIT_PRUNE_DOWNSTREAM>/<file>``."""
        if task in self.sources:
            return self.sources[task]
        root = self.data_dir or os.environ.get(ENV_DATA_DIR)
        if not root:
            raise DownstreamDataError(
                f"DownstreamEvalCallback: no data for task '{task}': set data_dir, the environment variable "
                f"{ENV_DATA_DIR} (a folder with {TASK_FILES[task]}) or sources.{task} (a file or an hf: dataset id)"
            )
        return str(Path(root).expanduser() / TASK_FILES[task])

    def load_data(self) -> None:
        """Read every task's examples (and the perplexity texts); raises naming the file and the setting."""
        for t in self.tasks:
            if t in self.data:
                continue
            if t == "perplexity":
                if self.perplexity_offset is None:
                    texts = load_texts(self.perplexity_source)
                    if len(texts) < self.perplexity_n_texts:
                        raise DownstreamDataError(
                            f"DownstreamEvalCallback: perplexity_source '{self.perplexity_source}' has {len(texts)} "
                            f"texts, perplexity_n_texts is {self.perplexity_n_texts}")
                    self.data[t] = texts[-self.perplexity_n_texts:]
                else:
                    self.data[t] = load_texts(self.perplexity_source, self.perplexity_n_texts, self.perplexity_offset)
                continue
            src = self.source_of(t)
            try:
                self.data[t] = load_examples(t, src, self.n_examples[t])
            except DownstreamDataError as e:
                setting = f"sources.{t}" if t in self.sources else ("data_dir" if self.data_dir else ENV_DATA_DIR)
                raise DownstreamDataError(f"DownstreamEvalCallback (setting {setting}): {e}") from None

    # -- scheduling ----------------------------------------------------------------------------------------------------
    def should_evaluate(self, edits: int, previous: int | None) -> bool:
        """Whether to evaluate after a batch (override for another schedule; must agree on all ranks)."""
        if self.every_n_edits is None:
            return False
        k = self.every_n_edits
        return edits // k > (previous or 0) // k

    # -- evaluation ----------------------------------------------------------------------------------------------------
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Run every task on this rank's shard, reduce across ranks, log at x = number of edits; returns the values."""
        edits = num_edits(pl_module)
        rank_zero_info(f"downstream evaluation at {edits} edits: {', '.join(self.tasks)}")
        rank, world = trainer.global_rank, trainer.world_size
        values: dict[str, float] = {}
        for t in self.tasks:
            m = self.metrics[t].to(pl_module.device)
            m.reset()
            with torch.no_grad():
                update_task_metric(m, t, pl_module.model, pl_module.tokenizer, self.data[t][rank::world],
                                   self.batch_size, self.max_length, self.max_new_tokens.get(t))
            values.update({f"downstream/{k}": v for k, v in task_values(t, m.compute()).items()})
        bar = {f"downstream/{t}": {"perplexity": "ppl"}.get(t, t[:4]) for t in self.tasks} if self.prog_bar else None
        log_metrics(trainer, values, step=edits, prog_bar=bar)
        self.final_metrics.update(values)
        self._last_eval = edits
        return values

    # -- hooks ---------------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for m in self.metrics.values():
            m.reset()
        self.final_metrics = {}
        self.load_data()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_eval != num_edits(pl_module):
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.should_evaluate(num_edits(pl_module), self._last_eval):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_eval != num_edits(pl_module):
            self.evaluate(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"last_eval": self._last_eval}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_eval = state_dict.get("last_eval")
