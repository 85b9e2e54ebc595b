"""EditDataModule: a stream of edit-request batches, in the same order on every rank."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset

from ..errors import ConfigError
from ..requests import EditRequest, EditRequestError
from .formats import FORMATS, demo_path, read_records_with_lines, records_to_requests


class EditStream(IterableDataset):
    """Yields lists of :class:`EditRequest` (one list = one edit batch = one training step), from batch ``start``.

    An iterable dataset on purpose: Lightning never shards it with a distributed sampler, so every rank sees the
    same edits in the same order (edits must be identical on all ranks; evaluation is what gets sharded).
    """

    def __init__(self, requests: list[EditRequest], batch_size: int, start: int = 0) -> None:
        self.requests, self.batch_size, self.start = requests, batch_size, start

    def __len__(self) -> int:
        # the whole stream's length, also when starting later: a resumed fit loop counts the restored batches
        return -(-len(self.requests) // self.batch_size)

    def __iter__(self) -> Iterator[list[EditRequest]]:
        for i in range(self.start * self.batch_size, len(self.requests), self.batch_size):
            yield self.requests[i : i + self.batch_size]


def _identity(batch: Any) -> Any:
    return batch


class EditDataModule(L.LightningDataModule):
    """Edit requests for sequential editing.

    Args:
        path: a local ``.json``/``.jsonl`` file, ``"demo"`` (the bundled hand-written set), or a Hugging Face hub
            dataset id (loaded with ``datasets.load_dataset(path, split=split)``).
        format: one of ``counterfact`` (ROME), ``easyedit``, ``zsre`` (MEND), ``lit_prune``; ``None`` detects it
            from the first record (see :mod:`lit_prune.data.formats`).
        n_edits: use the first ``n_edits`` records (after the optional shuffle); ``None`` = all.
        batch_size: edit requests per training step (1 = the paper's one-fact-at-a-time editing).
        shuffle: shuffle the records once with ``seed`` (deterministic and identical on every rank).
        split: dataset split for hub ids.
        skip_invalid: leave out the records that cannot be edited (an empty field, ``target_new`` equal to
            ``target_true``: 18 of the 1,000 records of the usual ZsRE sample), with a warning naming them and the
            first reason, instead of refusing the file; ``n_edits`` then counts the records kept. Default False:
            the first such record is an error naming it.

    The records are read and validated in the constructor, so a malformed file fails before any model is loaded.
    On resume (or a second ``fit`` of the same module) the stream restarts at the first edit not yet applied:
    the module's ``num_edits`` (else ``trainer.global_step`` batches) are skipped.
    """

    def __init__(
        self,
        path: str = "demo",
        format: str | None = None,
        n_edits: int | None = None,
        batch_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        split: str = "train",
        skip_invalid: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"EditDataModule: batch_size must be an integer >= 1, got {batch_size!r}")
        if n_edits is not None and (isinstance(n_edits, bool) or not isinstance(n_edits, int) or n_edits < 1):
            raise ConfigError(
                f"EditDataModule: n_edits must be a positive integer or null, got {n_edits!r}"
            )
        if format is not None and format not in FORMATS:
            raise EditRequestError(f"EditDataModule: unknown format '{format}'; known formats: {', '.join(FORMATS)}")
        self.path, self.format, self.n_edits = path, format, n_edits
        self.batch_size, self.shuffle, self.seed, self.split = batch_size, shuffle, seed, split
        self.skip_invalid = bool(skip_invalid)
        self.requests = self._load()

    def _load(self) -> list[EditRequest]:
        p = demo_path() if self.path == "demo" else Path(self.path).expanduser()
        lines = None
        if p.exists():
            records, lines = read_records_with_lines(p)
            source = str(p)
        elif self.path.startswith((".", "/", "~")) or self.path.endswith((".json", ".jsonl")):
            raise EditRequestError(f"edit data file not found: '{p}'")
        else:
            import datasets

            try:
                records = list(datasets.load_dataset(self.path, split=self.split))
            except Exception as e:  # noqa: BLE001 - name the source whatever datasets raised
                raise EditRequestError(f"'{self.path}' is not a local file and could not be loaded from the hub: {e}") from None
            source = f"hub dataset {self.path}[{self.split}]"
        if not records:
            raise EditRequestError(f"{source} holds no edit records")
        order = list(range(len(records)))
        if self.shuffle:
            random.Random(self.seed).shuffle(order)
        if self.skip_invalid:
            skipped: list[tuple[int, str]] = []
            reqs = records_to_requests([records[i] for i in order], self.format, source=source, indices=order,
                                       lines=lines, skipped=skipped)
            if skipped:
                ids = [i for i, _ in skipped]
                rank_zero_warn(f"EditDataModule: skipped {len(skipped)} record(s) of {source} that cannot be edited "
                               f"(records {ids[:10]}{' ...' if len(ids) > 10 else ''}); the first: {skipped[0][1]}")
            if self.n_edits is not None:
                if self.n_edits > len(reqs):
                    raise EditRequestError(f"n_edits={self.n_edits} but {source} has only {len(reqs)} records to "
                                           f"edit ({len(skipped)} skipped)")
                reqs = reqs[: self.n_edits]
            return reqs
        if self.n_edits is not None:
            if self.n_edits > len(records):
                raise EditRequestError(f"n_edits={self.n_edits} but {source} has only {len(records)} records")
            order = order[: self.n_edits]
        # validated with the original record indices so messages point into the file
        try:
            return records_to_requests(
                [records[i] for i in order], self.format, source=source, indices=order, lines=lines
            )
        except EditRequestError as e:
            if "cannot tell the format" in str(e) or "unknown data format" in str(e):
                raise  # the file's format, not one record
            raise EditRequestError(f"{e} (--data.skip_invalid true leaves such records out)") from None

    @property
    def num_batches(self) -> int:
        return -(-len(self.requests) // self.batch_size)

    def train_dataloader(self) -> DataLoader:
        start = 0
        if self.trainer is not None:
            done = getattr(self.trainer.lightning_module, "num_edits", None)
            start = self.trainer.global_step if done is None else -(-int(done) // self.batch_size)
        return DataLoader(EditStream(self.requests, self.batch_size, start), batch_size=None, collate_fn=_identity)
