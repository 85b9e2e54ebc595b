"""The paper's general-ability (downstream) tasks (spec §5) as data: which tasks exist, their prompts, how a record
of a reference file or hub dataset becomes an :class:`Example`, where the data comes from, and how one continuation
is scored. The model calls and the torchmetrics Metrics that accumulate these scores are in
:mod:`lit_prune.metrics.downstream`.

| task              | data (default file in ``$LIT_PRUNE_DOWNSTREAM``) | n   | new tokens | score                    |
|-------------------|------------------------------------------------|-----|------------|--------------------------|
| ``reasoning``     | GSM8K test, ``test-reasoning.jsonl``           | 358 | 5          | gold number in output    |
| ``summarization`` | SAMSum test, ``test-summarization.json``       | 149 | 25         | mean ROUGE-1/2/L F1      |
| ``qa``            | Natural Questions, ``test-OpenDomainQA.jsonl`` | 261 | 20         | span exact match         |
| ``nli``           | RTE, ``test-NLI.tsv``                          | 299 | 1          | "true"/"false" accuracy  |

A task's source is a local file (``.json`` list, ``.jsonl``, ``.tsv``) or a hub dataset
``hf:<name>[:<config>][:<split>]`` (e.g. ``hf:gsm8k:main:test``, ``hf:samsum::test``, ``hf:glue:rte:validation``)
read through ``datasets``; records are adapted from the field names of the reference files and of the usual hub
datasets. The first ``n`` examples are used.
"""

from __future__ import annotations

import csv
import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics.functional.text.rouge import rouge_score

GENERATION_TASKS = ("reasoning", "summarization", "qa", "nli")
TASKS = GENERATION_TASKS + ("perplexity",)
TASK_FILES = {
    "reasoning": "test-reasoning.jsonl",
    "summarization": "test-summarization.json",
    "qa": "test-OpenDomainQA.jsonl",
    "nli": "test-NLI.tsv",
}
DEFAULT_N = {"reasoning": 358, "summarization": 149, "qa": 261, "nli": 299}
MAX_NEW_TOKENS = {"reasoning": 5, "summarization": 25, "qa": 20, "nli": 1}
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
NLI_ANSWERS = ("True", "False")  # the labels the NLI prompt asks for; scored as " True" / " False" after it


class DownstreamDataError(ValueError):
    """A downstream task's data is missing or malformed; the message names the file/source, record and setting."""


@dataclass
class Example:
    """One downstream example: the prompt to continue and what the continuation is scored against
    (reasoning: the gold number; summarization: the reference summary; qa: the gold answers; nli: True for
    entailment)."""

    prompt: str
    target: Any


# -- scoring of one generation --------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation, drop articles (a, an, the), collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def qa_exact_match(generation: str, answers: Sequence[str]) -> bool:
    """True if some contiguous word span of the normalised generation equals some normalised gold answer.

    Each example counts at most once. The reference code's counter has two bugs, fixed here: its match flag was
    never reset between examples (after the first hit every later example counted as correct), and an example was
    counted once per matching (span, answer) combination (several matching spans or answers inflated the count).
    Gold answers that normalise to nothing are ignored.
    """
    words = normalize_answer(generation).split()
    for ans in answers:
        gold = normalize_answer(ans).split()
        if not gold:
            continue
        k = len(gold)
        if any(words[i : i + k] == gold for i in range(len(words) - k + 1)):
            return True
    return False


def qa_parseable(generation: str) -> bool:
    """Whether a QA continuation gave an answer at all: something is left after :func:`normalize_answer` (a
    continuation of only whitespace, punctuation or articles is not an answer, and cannot match)."""
    return bool(normalize_answer(generation))


def parse_true_false(generation: str) -> bool | None:
    """The answer of an NLI continuation: True/False from the first "true"/"false" it contains (case-insensitive),
    None (scored wrong) when it contains neither."""
    s = generation.lower()
    t, f = s.find("true"), s.find("false")
    if t < 0 and f < 0:
        return None
    if f < 0 or (0 <= t < f):
        return True
    return False


def gsm8k_answer(solution: str) -> str:
    """The final number of a GSM8K solution (the text after ``####``), without thousands separators."""
    return solution.split("####")[-1].strip().replace(",", "")


def reasoning_correct(generation: str, gold: str) -> bool:
    """The reference criterion: the gold number is a substring of the continuation (commas removed from both, so
    "65,960" matches "65960")."""
    return bool(gold) and gold in generation.replace(",", "")


def rouge_f1(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Tensor]:
    """Per-example ROUGE-1/2/L F1 from torchmetrics (keys ``rouge1``, ``rouge2``, ``rougeL``; each (n,) float64)."""
    out: dict[str, list[float]] = {k: [] for k in ROUGE_KEYS}
    for p, r in zip(predictions, references):
        s = rouge_score(p, r, rouge_keys=ROUGE_KEYS)
        for k in ROUGE_KEYS:
            out[k].append(float(s[f"{k}_fmeasure"]))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


# -- data -----------------------------------------------------------------------------------------------------------
def _field(rec: Mapping[str, Any], names: Sequence[str], where: str) -> Any:
    for n in names:
        if n in rec and rec[n] is not None:
            return rec[n]
    raise DownstreamDataError(f"{where}: none of the fields {list(names)} found (fields: {sorted(rec)})")


def make_example(task: str, rec: Mapping[str, Any], where: str) -> Example:
    """Adapt one record (reference file or hub dataset fields) to the task's prompt and target (spec §5)."""
    if task == "reasoning":
        q = _field(rec, ("question",), where)
        sol = _field(rec, ("answer", "solution"), where)
        if "####" not in sol:
            raise DownstreamDataError(f"{where}: field 'answer' has no '####' before the final number")
        steps = sol.split("####")[0].strip()
        prompt = f"Q: {q} A:Let's think step by step. {steps} Therefore, the answer (arabic numerals) is:"
        return Example(prompt, gsm8k_answer(sol))
    if task == "summarization":
        return Example(f"{_field(rec, ('dialogue', 'document'), where)}\nTL;DR:", _field(rec, ("summary",), where))
    if task == "qa":
        q = _field(rec, ("question",), where)
        q = q["text"] if isinstance(q, Mapping) else q
        ans = _field(rec, ("answer", "answers"), where)
        ans = ans.get("text", []) if isinstance(ans, Mapping) else ans
        ans = [ans] if isinstance(ans, str) else list(ans)
        passage = _field(rec, ("output", "passage", "context"), where)
        passage = passage[0] if isinstance(passage, (list, tuple)) and passage else passage
        if not isinstance(passage, str) or not ans:
            raise DownstreamDataError(f"{where}: needs a passage string and at least one gold answer")
        prompt = (f"Refer to the passage below and answer the following question. Passage: {passage.strip()} "
                  f"Question: {q}. Answer:")
        return Example(prompt, ans)
    if task == "nli":
        s1 = _field(rec, ("sentence1", "premise"), where)
        s2 = _field(rec, ("sentence2", "hypothesis"), where)
        label = _field(rec, ("label",), where)
        if isinstance(label, str) and label.strip() in ("entailment", "not_entailment"):
            gold = label.strip() == "entailment"
        elif isinstance(label, int) and label in (0, 1):
            gold = label == 0  # GLUE / SuperGLUE RTE: 0 = entailment
        else:
            raise DownstreamDataError(f"{where}: field 'label' must be entailment/not_entailment or 0/1, got {label!r}")
        return Example(f"{s1} entails the {s2}. True or False? answer:", gold)
    raise DownstreamDataError(f"unknown downstream task '{task}'; known: {', '.join(GENERATION_TASKS)}")


def _read_records(path: Path) -> list[Mapping[str, Any]]:
    try:
        if path.suffix == ".tsv":
            with path.open(encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise DownstreamDataError(f"cannot read '{path}': {e}") from None
    if isinstance(data, Mapping) and "data" in data:
        data = data["data"]
    if not isinstance(data, list):
        raise DownstreamDataError(f"'{path}': expected a JSON list of records, got {type(data).__name__}")
    return data


def _hub_records(source: str, n: int | None) -> list[Mapping[str, Any]]:
    parts = source[3:].split(":")
    name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 and parts[2] else "test"
    if n is not None:
        split = f"{split}[:{n}]"
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; name the source either way
        raise DownstreamDataError(f"could not load the hub dataset '{source}': {e}") from None
    return list(ds)


def load_examples(task: str, source: str | Path, n: int | None = None) -> list[Example]:
    """The first ``n`` examples of ``task`` from a local file or an ``hf:`` hub id (see the module docstring)."""
    if task not in GENERATION_TASKS:
        raise DownstreamDataError(f"unknown downstream task '{task}'; known: {', '.join(GENERATION_TASKS)}")
    src = str(source)
    if src.startswith("hf:"):
        records = _hub_records(src, n)
    else:
        path = Path(src).expanduser()
        if not path.is_file():
            raise DownstreamDataError(f"downstream task '{task}': data file not found: '{path}'")
        records = _read_records(path)
    if n is not None:
        if len(records) < n:
            raise DownstreamDataError(f"downstream task '{task}': '{src}' has {len(records)} examples, asked for {n}")
        records = records[:n]
    return [make_example(task, r, f"{src}: record {i}") for i, r in enumerate(records)]


# -- scoring of one task --------------------------------------------------------------------------------------------
def score_generations(task: str, generations: Sequence[str], examples: Sequence[Example]) -> list[bool]:
    """Per-example correctness for reasoning, qa and nli."""
    if task == "reasoning":
        return [reasoning_correct(g, e.target) for g, e in zip(generations, examples)]
    if task == "qa":
        return [qa_exact_match(g, e.target) for g, e in zip(generations, examples)]
    if task == "nli":
        return [parse_true_false(g) is e.target for g, e in zip(generations, examples)]
    raise DownstreamDataError(f"task '{task}' is not scored by correctness")


def answer_parsed(task: str, generations: Sequence[str]) -> list[bool]:
    """Per example of ``qa`` or ``nli``: whether the continuation gave an answer the scoring rule can read (nli: a
    "true" or "false" in it, :func:`parse_true_false`; qa: anything left after normalisation, :func:`qa_parseable`).
    An example scored correct always parsed."""
    if task == "nli":
        return [parse_true_false(g) is not None for g in generations]
    if task == "qa":
        return [qa_parseable(g) for g in generations]
    raise DownstreamDataError(f"task '{task}' has no answer parser (only qa and nli)")
