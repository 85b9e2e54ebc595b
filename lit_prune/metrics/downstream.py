"""General abilities along an edit stream: the model calls (greedy generation, held-out text NLL, answer likelihoods)
and the torchmetrics Metrics that accumulate the downstream tasks' scores (spec §5). What the tasks are, their
prompts, data and scoring rules is in :mod:`lit_prune.metrics.tasks`.

One evaluation of a task is ``m = new_task_metric(task)``, ``update_task_metric(m, task, model, tok, examples)``
(per shard), ``task_values(task, m.compute())``. The keys it returns (under ``downstream/`` in TensorBoard):

- ``<task>``: the reference score (reasoning, qa, nli: accuracy; summarization: mean ROUGE-1/2/L F1; perplexity:
  exp(token-weighted NLL));
- ``<task>_n``, every task: the examples evaluated (perplexity: texts);
- ``<task>_correct`` (reasoning, qa, nli): the examples scored correct; with ``<task>_n`` the k and n of a binomial
  rate, e.g. for a Wilson interval;
- ``summarization_{rouge1,rouge2,rougeL}``: the three ROUGE F1 means behind ``summarization``;
  ``perplexity_tokens``: the tokens scored;
- ``nli_parseable``, ``qa_parseable``: the examples whose continuation gave a readable answer (nli: "true" or
  "false" in it; qa: anything left after normalisation); ``nli_accuracy_parseable``, ``qa_accuracy_parseable``:
  the accuracy among those (``_correct / _parseable``; absent when none parsed);
- ``nli_likelihood``: the accuracy of the likelier label, " True" (entailment) against " False" compared by their
  length-normalised NLL at the answer position, without generating;
- ``qa_gold_nll``: the mean over examples of the length-normalised NLL of the likeliest gold answer after the prompt
  (lower is better).

The reference scores are faithful to the paper's scoring: a small model that rarely starts its continuation with
"true"/"false" scores near 0 on NLI whatever it knows; ``_parseable``, ``_accuracy_parseable`` and the likelihood
scores say which is the case. Generation is greedy, batched, left-padded; prompts longer than the token budget are
cut from the left (for generation and likelihoods alike). Every Metric keeps sum-reduced states
(``dist_reduce_fx="sum"``), so shards of any size reduce to the single-process value.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from ..text import answer_ids, pad_batch, pad_id, prefers, special_prefix
from .scoring import score_answers
from .tasks import (
    GENERATION_TASKS,
    MAX_NEW_TOKENS,
    NLI_ANSWERS,
    ROUGE_KEYS,
    TASKS,
    DownstreamDataError,
    Example,
    answer_parsed,
    rouge_f1,
    score_generations,
)


# -- metrics --------------------------------------------------------------------------------------------------------
def _nan() -> Tensor:
    return torch.tensor(float("nan"), dtype=torch.float64)


class _SumMetric(Metric):
    full_state_update = False
    is_differentiable = False

    def _sum_state(self, name: str) -> None:
        self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, name: str, values: Tensor | Sequence[Any] | float) -> None:
        """Add the sum of ``values`` to the state ``name``."""
        v = torch.as_tensor(values, dtype=torch.float64)
        setattr(self, name, getattr(self, name) + v.sum().to(self.device))


class GenerationAccuracy(_SumMetric):
    """Fraction of examples scored correct. ``update(correct)`` takes (n,) bools; states ``correct``, ``total``."""

    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sum_state("correct")
        self._sum_state("total")

    def update(self, correct: Tensor | Sequence[bool]) -> None:
        c = torch.as_tensor(correct, dtype=torch.float64).flatten()
        self._add("correct", c)
        self.total += c.numel()

    def compute(self) -> Tensor:
        return self.correct / self.total if self.total > 0 else _nan()


class TaskAccuracy(GenerationAccuracy):
    """:class:`GenerationAccuracy` with the counts behind it (the reasoning task's metric):
    ``compute()`` -> ``{"accuracy", "correct", "n"}``."""

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        return {"accuracy": super().compute(), "correct": self.correct.clone(), "n": self.total.clone()}


class _ParsedAccuracy(TaskAccuracy):
    """A :class:`TaskAccuracy` that also counts the examples whose answer parsed (state ``parsed``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sum_state("parsed")

    def _update_parsed(self, correct: Tensor | Sequence[bool], parsed: Tensor | Sequence[bool]) -> int:
        c = torch.as_tensor(correct, dtype=torch.float64).flatten()
        p = torch.as_tensor(parsed, dtype=torch.float64).flatten()
        if p.numel() != c.numel():
            raise ValueError(f"{type(self).__name__}: {p.numel()} parsed flags for {c.numel()} examples")
        super().update(c)
        self._add("parsed", p)
        return c.numel()

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        out = super().compute()
        out["parseable"] = self.parsed.clone()
        out["accuracy_parseable"] = self.correct / self.parsed if self.parsed > 0 else _nan()
        return out


class NLIAccuracy(_ParsedAccuracy):
    """The NLI task's metric. ``update(correct, parsed, likelihood_correct)``, each (n,) bools: the reference score
    of each generation, whether it held "true"/"false", and whether the likelier of " True"/" False" is the gold
    label. ``compute()`` -> ``{"accuracy", "correct", "n", "parseable", "accuracy_parseable", "likelihood"}``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sum_state("likelihood_correct")

    def update(  # type: ignore[override]
        self, correct: Tensor | Sequence[bool], parsed: Tensor | Sequence[bool],
        likelihood_correct: Tensor | Sequence[bool],
    ) -> None:
        n = self._update_parsed(correct, parsed)
        lc = torch.as_tensor(likelihood_correct, dtype=torch.float64).flatten()
        if lc.numel() != n:
            raise ValueError(f"NLIAccuracy: {lc.numel()} likelihood results for {n} examples")
        self._add("likelihood_correct", lc)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        out = super().compute()
        out["likelihood"] = self.likelihood_correct / self.total if self.total > 0 else _nan()
        return out


class QAAccuracy(_ParsedAccuracy):
    """The QA task's metric. ``update(correct, parsed, gold_nll)``: (n,) bools (exact match; an answer was given)
    and (n,) floats, each example's gold-answer NLL (NaN: no gold answer with a token; left out of the mean).
    ``compute()`` -> ``{"accuracy", "correct", "n", "parseable", "accuracy_parseable", "gold_nll"}``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sum_state("gold_nll_sum")
        self._sum_state("gold_nll_count")

    def update(  # type: ignore[override]
        self, correct: Tensor | Sequence[bool], parsed: Tensor | Sequence[bool], gold_nll: Tensor | Sequence[float]
    ) -> None:
        n = self._update_parsed(correct, parsed)
        g = torch.as_tensor(gold_nll, dtype=torch.float64).flatten()
        if g.numel() != n:
            raise ValueError(f"QAAccuracy: {g.numel()} gold-answer NLLs for {n} examples")
        ok = ~torch.isnan(g)
        self._add("gold_nll_sum", g[ok])
        self._add("gold_nll_count", ok)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        out = super().compute()
        out["gold_nll"] = self.gold_nll_sum / self.gold_nll_count if self.gold_nll_count > 0 else _nan()
        return out


class RougeF1(_SumMetric):
    """Mean ROUGE-1/2/L F1 over examples. ``update(predictions, references)`` (strings);
    ``compute()`` -> ``{"rouge1", "rouge2", "rougeL", "mean", "n"}`` (``mean``: the average of the three, the paper's
    score; ``n``: examples). :meth:`per_example` gives each example's average of the three (their mean is ``mean``),
    for an interval over examples (the reproduction's bootstrap).
    """

    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for k in ROUGE_KEYS:
            self._sum_state(f"{k}_sum")
        self._sum_state("total")
        self.add_state("example_mean", default=[], dist_reduce_fx="cat")

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        if len(predictions) != len(references):
            raise ValueError(f"RougeF1: {len(predictions)} predictions for {len(references)} references")
        scores = rouge_f1(predictions, references)
        for k, v in scores.items():
            self._add(f"{k}_sum", v)
        self.total += len(predictions)
        # appended on an empty shard too (a (0,) tensor), so every rank has a tensor to gather
        self.example_mean.append(torch.stack([scores[k] for k in ROUGE_KEYS]).mean(0).reshape(-1).to(self.device))

    def per_example(self) -> Tensor:
        """(n,) float64: each example's mean of ROUGE-1/2/L F1, in update order (this process's; after a sync, all)."""
        v = self.example_mean
        if isinstance(v, Tensor):
            return v.double()
        return torch.cat(v).double() if v else torch.zeros(0, dtype=torch.float64)

    def compute(self) -> dict[str, Tensor]:
        if self.total == 0:
            return {**{k: _nan() for k in ROUGE_KEYS}, "mean": _nan(), "n": self.total.clone()}
        out = {k: getattr(self, f"{k}_sum") / self.total for k in ROUGE_KEYS}
        out["mean"] = sum(out.values()) / len(ROUGE_KEYS)
        out["n"] = self.total.clone()
        return out


class TokenPerplexity(_SumMetric):
    """Token-weighted perplexity exp(Σ NLL / Σ tokens). ``update(nll_sum, n_tokens, n_texts=0)``; states
    ``nll_sum``, ``tokens``, ``texts``, sum-reduced."""

    higher_is_better = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sum_state("nll_sum")
        self._sum_state("tokens")
        self._sum_state("texts")

    def update(self, nll_sum: Tensor | float, n_tokens: Tensor | int, n_texts: Tensor | int = 0) -> None:
        self._add("nll_sum", nll_sum)
        self._add("tokens", n_tokens)
        self._add("texts", n_texts)

    def compute(self) -> Tensor:
        if self.tokens == 0:
            return _nan()
        return torch.exp(self.nll_sum / self.tokens)


class TextPerplexity(TokenPerplexity):
    """:class:`TokenPerplexity` with the counts behind it (the perplexity task's metric):
    ``compute()`` -> ``{"perplexity", "tokens", "n"}`` (``n``: texts)."""

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        return {"perplexity": super().compute(), "tokens": self.tokens.clone(), "n": self.texts.clone()}


# -- model calls ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(
    model: nn.Module,
    tok: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
    max_length: int = 1024,
) -> list[str]:
    """Greedy continuations (decoded new tokens only) of each prompt, in order.

    Prompts are batched by length and left-padded; a prompt longer than ``max_length - max_new_tokens`` tokens is cut
    from the left (the instruction and question are at the end of every task's prompt).
    """
    from transformers import GenerationConfig

    prefix = special_prefix(tok)
    keep = max(1, max_length - max_new_tokens - len(prefix))
    ids = [prefix + list(tok(p, add_special_tokens=False)["input_ids"])[-keep:] for p in prompts]
    pad = pad_id(tok)
    eos = getattr(model.generation_config, "eos_token_id", None) or tok.eos_token_id
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                           eos_token_id=eos)
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[str] = [""] * len(ids)
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            x, mask, _, _ = pad_batch([ids[i] for i in rows], pad, "left")
            gen = model.generate(input_ids=x.to(device), attention_mask=mask.to(device), generation_config=cfg)
            texts = tok.batch_decode(gen[:, x.shape[1]:], skip_special_tokens=True)
            for i, t in zip(rows, texts):
                out[i] = t
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def text_nll(
    model: nn.Module, tok: Any, texts: Sequence[str], batch_size: int = 8, max_length: int = 1024
) -> tuple[float, int]:
    """(Σ −log P(x_t | x_<t), number of scored tokens) over ``texts``, each cut to its first ``max_length`` tokens.

    Every token after the first is scored (a BOS, when the tokenizer adds one, is context, never a target).
    """
    prefix = special_prefix(tok)
    ids = [(prefix + list(tok(t, add_special_tokens=False)["input_ids"]))[:max_length] for t in texts]
    ids = [s for s in ids if len(s) > 1]
    device = next(model.parameters()).device
    pad = pad_id(tok)
    total, count = 0.0, 0
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(order), batch_size):
            x, mask, pos, _ = pad_batch([ids[i] for i in order[b : b + batch_size]], pad, "right")
            x, mask = x.to(device), mask.to(device)
            logits = model(input_ids=x, attention_mask=mask, position_ids=pos.to(device), use_cache=False).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            tgt_lp = logp.gather(-1, x[:, 1:, None]).squeeze(-1)
            m = mask[:, 1:].bool()
            total += float(-tgt_lp[m].double().sum())
            count += int(m.sum())
    finally:
        model.train(was_training)
    return total, count


def fit_prompt(tok: Any, prompt: str, room: int) -> str:
    """``prompt`` cut from the left to its last ``room`` tokens (decoded) when it is longer, as :func:`generate`
    cuts the prompts it continues; unchanged otherwise."""
    ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
    return prompt if len(ids) <= room else tok.decode(ids[-max(1, room):])


def nli_likelihood_correct(
    model: nn.Module, tok: Any, examples: Sequence[Example], batch_size: int = 8, max_length: int = 1024
) -> list[bool]:
    """Per NLI example: whether the likelier label after the prompt is the gold one. The labels are the prompt's
    " True" (entailment) and " False", compared by their length-normalised NLL (:func:`score_answers`) at the
    answer position; a tie reads as " False"."""
    if not examples:
        return []
    room = max_length - len(special_prefix(tok)) - max(len(answer_ids(tok, a)) for a in NLI_ANSWERS)
    prompts = [fit_prompt(tok, e.prompt, room) for e in examples]
    n = len(prompts)
    s = score_answers(model, tok, prompts * 2, [NLI_ANSWERS[0]] * n + [NLI_ANSWERS[1]] * n, batch_size)
    says_true = prefers(s.nll[:n], s.nll[n:]).bool().tolist()
    return [t == bool(e.target) for t, e in zip(says_true, examples)]


def gold_answer_nll(
    model: nn.Module, tok: Any, examples: Sequence[Example], batch_size: int = 8, max_length: int = 1024
) -> Tensor:
    """(n,) float64: per QA example, the length-normalised NLL of its likeliest gold answer after the prompt (the
    minimum over its gold answers, each scored as ``" " + answer``); NaN for an example without a non-blank gold
    answer."""
    prefix = len(special_prefix(tok))
    prompts, answers, owner = [], [], []
    for i, e in enumerate(examples):
        golds = [a for a in e.target if a.strip()]
        if not golds:
            continue
        room = max_length - prefix - max(len(answer_ids(tok, a)) for a in golds)
        p = fit_prompt(tok, e.prompt, room)
        for a in golds:
            prompts.append(p)
            answers.append(a)
            owner.append(i)
    out = torch.full((len(examples),), float("inf"), dtype=torch.float64)
    if prompts:
        nll = score_answers(model, tok, prompts, answers, batch_size).nll.double()
        out.scatter_reduce_(0, torch.tensor(owner), nll, reduce="amin")
    out[torch.isinf(out)] = float("nan")
    return out


# -- one evaluation -------------------------------------------------------------------------------------------------
def new_task_metric(task: str, **kwargs: Any) -> Metric:
    """The metric that accumulates ``task``'s scores (see :func:`update_task_metric`, :func:`task_values`)."""
    metrics = {"reasoning": TaskAccuracy, "summarization": RougeF1, "qa": QAAccuracy, "nli": NLIAccuracy,
               "perplexity": TextPerplexity}
    if task not in metrics:
        raise DownstreamDataError(f"unknown downstream task '{task}'; known: {', '.join(TASKS)}")
    return metrics[task](**kwargs)


def update_task_metric(
    metric: Metric,
    task: str,
    model: nn.Module,
    tok: Any,
    examples: Sequence[Example] | Sequence[str],
    batch_size: int = 8,
    max_length: int = 1024,
    max_new_tokens: int | None = None,
) -> None:
    """Run ``task`` on ``examples`` (texts for ``perplexity``) and accumulate into ``metric`` (from
    :func:`new_task_metric`). An empty shard still updates the metric (with nothing), so every rank reaches
    ``compute()`` with a consistent state. NLI and QA cost one teacher-forced pass over the prompts besides the
    generation (the likelihood scores)."""
    if task == "perplexity":
        texts = list(examples)
        s, c = text_nll(model, tok, texts, batch_size, max_length)  # type: ignore[arg-type]
        metric.update(s, c, len(texts))
        return
    if task not in GENERATION_TASKS:
        raise DownstreamDataError(f"unknown downstream task '{task}'; known: {', '.join(TASKS)}")
    exs: list[Example] = list(examples)  # type: ignore[arg-type]
    gens = generate(model, tok, [e.prompt for e in exs], max_new_tokens or MAX_NEW_TOKENS[task], batch_size,
                    max_length) if exs else []
    if task == "summarization":
        metric.update(gens, [e.target for e in exs])
        return
    correct = score_generations(task, gens, exs)
    if task == "nli":
        metric.update(correct, answer_parsed(task, gens),
                      nli_likelihood_correct(model, tok, exs, batch_size, max_length))
    elif task == "qa":
        metric.update(correct, answer_parsed(task, gens), gold_answer_nll(model, tok, exs, batch_size, max_length))
    else:
        metric.update(correct)


def task_values(task: str, value: Any) -> dict[str, float]:
    """The keys of the module docstring (under ``downstream/``) of ``task``'s computed metric, the reference score
    first; values that are NaN (nothing to average) are left out. A bare number (a :class:`GenerationAccuracy` or
    :class:`TokenPerplexity` computed) gives ``{task: value}``."""
    if isinstance(value, dict):
        v = {k: float(x) for k, x in value.items()}
        if task == "summarization":
            out = {"summarization": v["mean"], **{f"summarization_{k}": v[k] for k in ROUGE_KEYS}}
        else:
            main = "perplexity" if task == "perplexity" else "accuracy"
            out = {task: v[main], **{f"{task}_{k}": x for k, x in v.items() if k != main}}
        out[f"{task}_n"] = v["n"]
    else:
        out = {task: float(value)}
    return {k: x for k, x in out.items() if not math.isnan(x)}
