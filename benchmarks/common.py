"""What the benchmark scripts share: where the repository, the results and the (never committed) data are, the
machine line every results file carries, and the CounterFact edit-scoring summary of the editor benchmarks.

A script run as ``python benchmarks/<name>.py`` has this folder on ``sys.path``, so ``from common import ...``
works; importing this module also puts the repository root on ``sys.path`` (``lit_prune`` without installing).
Scoring, perplexity, data conversion and editing are the library's own (``lit_prune.metrics``,
``lit_prune.data.formats``, ``lit_prune.editors``): a benchmark measures the shipped code path, never a copy.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ENV_DATA = "LIT_PRUNE_DATA"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def data_dir() -> Path:
    """The read-only benchmark/test data (CounterFact, ZsRE, downstream sets): ``$LIT_PRUNE_DATA``, else
    ``../shared/data`` beside the repository (as ``tests/conftest.py``)."""
    return Path(os.environ.get(ENV_DATA, ROOT.parent / "shared" / "data")).expanduser()


def counterfact_file(split: str = "edit") -> Path:
    """``<data>/counterfact/counterfact-<split>.json`` (EasyEdit format; splits ``edit`` and ``train``)."""
    return data_dir() / "counterfact" / f"counterfact-{split}.json"


def machine(note: str = "") -> str:
    """``"<processor>, <n> CPUs[ note], torch <version>, <threads> threads"``: the line a results file names its
    machine with (``note``: e.g. ``"(shared)"``)."""
    cpus = f"{os.cpu_count()} CPUs" + (f" {note}" if note else "")
    return (f"{platform.processor() or platform.machine()}, {cpus}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def counterfact(n: int, offset: int = 0) -> list[Any]:
    """Records ``offset .. offset + n - 1`` of the CounterFact edit split as :class:`~lit_prune.EditRequest` s
    (:func:`lit_prune.data.formats.load_requests`)."""
    from lit_prune.data.formats import load_requests

    return load_requests(counterfact_file("edit"), n=offset + n)[offset:]


@torch.no_grad()
def margins(model, tok, requests: Sequence[Any]) -> torch.Tensor:
    """(n, 3) NLL(true) − NLL(new) (nats; > 0: the new object wins) of each request on its edit prompt, its first
    paraphrase and its first neighbourhood prompt (:func:`lit_prune.metrics.scoring.score_answers`)."""
    from lit_prune.metrics.scoring import score_answers

    prompts, answers = [], []
    for r in requests:
        for p in (r.full_prompt, r.paraphrase_prompts[0], r.neighborhood_prompts[0]):
            prompts += [p, p]
            answers += [r.target_new, r.target_true]
    nll = score_answers(model, tok, prompts, answers).nll.view(len(requests), 3, 2)
    return nll[..., 1] - nll[..., 0]


def summarise(case_values: dict[str, torch.Tensor], before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    """The editor benchmarks' row: the rates of :func:`lit_prune.metrics.editing.request_case_values` (per-case
    values, concatenated over the edited groups) as ``efficacy``, ``paraphrase``, ``neighbourhood``, and from the
    :func:`margins` before and after each edit the mean |shift| of the neighbourhood margin and the mean margins."""
    return {
        "efficacy": float(case_values["efficacy"].mean()),
        "paraphrase": float(case_values["generalization"].mean()),
        "neighbourhood": float(case_values["locality"].mean()),
        "neighbourhood_shift": float((after[:, 2] - before[:, 2]).abs().mean()),
        "efficacy_margin": float(after[:, 0].mean()),
        "paraphrase_margin": float(after[:, 1].mean()),
    }
