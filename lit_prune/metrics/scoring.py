"""Batched answer likelihoods: the length-normalised NLL of an answer after a prompt, scored on answer tokens only.

For a prompt ``p`` and an answer ``t`` (tokenised as ``" " + t``)::

    NLL(t | p) = −(1/|t|) · Σ_j log P(t_j | p, t_<j)

Prompt and answer ids follow the one rule of :mod:`lit_prune.text` (prompt ids + answer ids, tokenised separately),
so no prompt token and no BOS is ever scored, and the tokens scored are the tokens the editors optimise. Many (prompt, answer) pairs share one forward:

* each distinct prompt runs once; its last position gives the first token of every answer to it, so the true and
  the new object of a CounterFact prompt cost one sequence of the prompt's length;
* answers of several tokens continue from the prompt's key/value cache (rows repeated per answer): only
  ``t[:-1]`` is run again, never the prompt; answers that are prefixes of each other share a continuation;
* prompts are sorted by length and padded (left by default) with position ids from the attention mask, and
  continuations carry on from each prompt's real length, so the numbers do not depend on the padding side or on the
  batch a prompt lands in (up to float rounding);
* logits are computed only at answer positions (``logits_to_keep``), never over the prompt.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..text import answer_ids, pad_batch, pad_id, prompt_ids, special_prefix


@dataclass
class AnswerScores:
    """Scores of ``n`` (prompt, answer) pairs, in the order given.

    ``nll``: (n,) float32, mean over answer tokens of −log P. ``accuracy``: (n,) float32, teacher-forced token
    accuracy (fraction of answer tokens that are the argmax given the prompt and the previous answer tokens).
    ``predictions``: n int64 tensors of shape (|t|,), the argmax token at each answer position. ``answer_ids``: n int64
    tensors (|t|,), the scored answer tokens. All on CPU.
    """

    nll: Tensor
    accuracy: Tensor
    predictions: list[Tensor]
    answer_ids: list[Tensor]

    @property
    def prob(self) -> Tensor:
        """exp(−NLL): the geometric-mean token probability used by the magnitude metrics."""
        return torch.exp(-self.nll)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _cache_kwarg(model: nn.Module) -> str:
    """The forward's name for the key/value cache (``cache`` since transformers 5.2x, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def score_answers(
    model: nn.Module,
    tok: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 32,
    padding_side: str = "left",
) -> AnswerScores:
    """Length-normalised NLL, token accuracy and argmax predictions of each answer after its prompt.

    ``batch_size`` is the number of prompts per forward (and of answer continuations per cached forward). The model
    is put in eval mode for the call (and restored), gradients are off.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"score_answers: {len(prompts)} prompts but {len(answers)} answers")
    if batch_size < 1:
        raise ValueError(f"score_answers: batch_size must be >= 1, got {batch_size}")
    n = len(prompts)
    if n == 0:
        return AnswerScores(torch.zeros(0), torch.zeros(0), [], [])

    prefix = special_prefix(tok)
    p_ids: dict[str, list[int]] = {}
    a_ids: dict[str, list[int]] = {}
    for i, (p, a) in enumerate(zip(prompts, answers)):
        if p not in p_ids:
            p_ids[p] = prompt_ids(tok, p, prefix)
            if not p_ids[p]:
                raise ValueError(f"score_answers: pair {i}: prompt {p!r} has no tokens; nothing predicts the answer")
        if a not in a_ids:
            a_ids[a] = answer_ids(tok, a) if a.strip() else []
            if not a_ids[a]:
                raise ValueError(f"score_answers: pair {i}: answer {a!r} is empty")
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(i)

    device = _device(model)
    keep_arg = _accepts_logits_to_keep(model)
    cache_kw = _cache_kwarg(model)
    pad = pad_id(tok)
    # per pair: answer-position logits' log-prob of the answer token and argmax, filled batch by batch
    logp: list[list[float]] = [[0.0] * len(a_ids[a]) for a in answers]
    preds: list[list[int]] = [[0] * len(a_ids[a]) for a in answers]

    def take(logits: Tensor, rows: list[int], cols: list[int], pairs: list[int], js: list[int]) -> None:
        """Record log P and argmax of answer token ``js[k]`` of pair ``pairs[k]`` from ``logits[rows[k], cols[k]]``."""
        sel = logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)].float()
        tgt = torch.tensor([a_ids[answers[i]][j] for i, j in zip(pairs, js)], device=logits.device)
        lp = (sel.gather(-1, tgt[:, None]).squeeze(-1) - torch.logsumexp(sel, dim=-1)).tolist()
        am = sel.argmax(-1).tolist()
        for k, (i, j) in enumerate(zip(pairs, js)):
            logp[i][j], preds[i][j] = lp[k], am[k]

    order = sorted(by_prompt, key=lambda q: -len(p_ids[q]))
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(order), batch_size):
            batch = order[b : b + batch_size]
            ids, mask, pos, offsets = pad_batch([p_ids[q] for q in batch], pad, padding_side)
            T = ids.shape[1]
            last = [offsets[r] + len(p_ids[q]) - 1 for r, q in enumerate(batch)]  # predicts answer token 0
            # answer continuations: one row per distinct a[:-1] of a multi-token answer, shared by its prefixes
            conts: list[tuple[int, list[int]]] = []  # (prompt row, continuation tokens)
            cont_of: dict[int, int] = {}
            for r, q in enumerate(batch):
                multi = sorted({answers[i] for i in by_prompt[q] if len(a_ids[answers[i]]) > 1},
                               key=lambda a: -len(a_ids[a]))
                rows_q: list[int] = []
                for a in multi:
                    need = a_ids[a][:-1]
                    c = next((k for k in rows_q if conts[k][1][: len(need)] == need), None)
                    if c is None:
                        c = len(conts)
                        conts.append((r, need))
                        rows_q.append(c)
                    for i in by_prompt[q]:
                        if answers[i] == a:
                            cont_of[i] = c
            # kept positions as an index tensor: the head then runs on a contiguous copy (an int keeps a strided
            # slice, which PyTorch multiplies through a slow broadcast bmm on CPU)
            kwargs = {"logits_to_keep": torch.arange(min(last), T, device=device)} if keep_arg else {}
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                        use_cache=bool(conts), **kwargs)
            base = T - out.logits.shape[1]
            pairs = [i for q in batch for i in by_prompt[q]]
            row = {q: r for r, q in enumerate(batch)}
            take(out.logits, [row[prompts[i]] for i in pairs], [last[row[prompts[i]]] - base for i in pairs],
                 pairs, [0] * len(pairs))
            if not conts:
                continue
            cache = getattr(out, "cache", None)
            if cache is None:
                cache = out.past_key_values
            for c0 in range(0, len(conts), batch_size):
                chunk = conts[c0 : c0 + batch_size]
                src = torch.tensor([r for r, _ in chunk])
                cx, cmask, _, _ = pad_batch([t for _, t in chunk], pad, "right")
                cpos = mask[src].sum(-1, keepdim=True) + torch.arange(cx.shape[1])  # continue each prompt's positions
                kv = cache if len(conts) <= batch_size else copy.deepcopy(cache)
                kv.reorder_cache(src.to(device))  # row k of the chunk continues prompt row src[k]
                cout = model(input_ids=cx.to(device), attention_mask=torch.cat([mask[src], cmask], -1).to(device),
                             position_ids=cpos.to(device), use_cache=True, **{cache_kw: kv})
                rows, cols, ps, js = [], [], [], []
                for i in pairs:
                    c = cont_of.get(i)
                    if c is None or not c0 <= c < c0 + len(chunk):
                        continue
                    for j in range(1, len(a_ids[answers[i]])):  # cont position j-1 predicts answer token j
                        rows.append(c - c0)
                        cols.append(j - 1)
                        ps.append(i)
                        js.append(j)
                take(cout.logits, rows, cols, ps, js)
    finally:
        model.train(was_training)
    targets = [torch.tensor(a_ids[a], dtype=torch.long) for a in answers]
    pred_t = [torch.tensor(p, dtype=torch.long) for p in preds]
    nll = torch.tensor([-sum(x) / len(x) for x in logp], dtype=torch.float32)
    acc = torch.tensor([float((p == t).float().mean()) for p, t in zip(pred_t, targets)], dtype=torch.float32)
    return AnswerScores(nll, acc, pred_t, targets)

