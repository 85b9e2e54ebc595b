"""The one text layer: how prompts and answers become token ids, how rows are padded, how an answer is scored.

Every part of lit_prune that turns text into ids uses these rules (editors, metrics, MEND, statistics, benchmarks),
so the tokens an editor optimises are the tokens the metrics score (``tests/test_text.py`` pins it for a GPT-2, a
Llama-2 (SentencePiece) and a Llama-3 (byte-level + BOS) style tokenizer):

* **prompt ids** = the tokenizer's special prefix (BOS, if it adds one) + the prompt's own tokens; never a special
  suffix (an EOS after the prompt would sit between the prompt and its answer);
* **answer ids** = the tokens of ``" " + answer`` as they follow a word (:func:`answer_ids`), without special
  tokens. The scored sequence is ``prompt ids + answer ids``. (For the embedded SmolLM2 tokenizer this equals the
  joint tokenisation of ``prompt + " " + answer`` on all 10,000 CounterFact edit records.) Decision: the answer is
  tokenised independently of its prompt, so one answer has one set of tokens whichever prompt (edit, paraphrase,
  neighbour, context template) it follows, and the same tokens are optimised and scored;
* **pad id** = ``pad_token_id``, else ``eos_token_id``, else 0 (padded positions are always masked, so the value
  never changes a result);
* **padding** right or left, with position ids that count real tokens only (0 at each row's first token), so a row
  gets the same positions whichever side it is padded on.

Shapes: ids, masks, labels and position ids are (B, L) int64; logits (B, L, V); per-row scores (B,).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor


def special_prefix(tok: Any) -> list[int]:
    """Ids the tokenizer puts before a text (BOS for Llama-style tokenizers, nothing for GPT-2/SmolLM2)."""
    plain = tok("x", add_special_tokens=False)["input_ids"]
    full = tok("x")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i])
    return []


def prompt_ids(tok: Any, prompt: str, prefix: list[int] | None = None) -> list[int]:
    """Ids of a prompt: the special prefix (``prefix``, default :func:`special_prefix`) + the prompt's own tokens."""
    pre = special_prefix(tok) if prefix is None else prefix
    return pre + list(tok(prompt, add_special_tokens=False)["input_ids"])


def prompt_ids_and_offsets(
    tok: Any, prompt: str, prefix: list[int] | None = None
) -> tuple[list[int], list[tuple[int, int]] | None]:
    """:func:`prompt_ids` and, for a fast tokenizer, each id's character span in ``prompt`` (``(0, 0)`` for the
    special prefix); None for a slow tokenizer."""
    pre = special_prefix(tok) if prefix is None else prefix
    if not getattr(tok, "is_fast", False):
        return prompt_ids(tok, prompt, pre), None
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    return pre + list(enc["input_ids"]), [(0, 0)] * len(pre) + [tuple(o) for o in enc["offset_mapping"]]


_ANCHOR = "x"
"""A one-letter word the answer is tokenised after (see :func:`answer_ids`)."""


def answer_ids(tok: Any, answer: str) -> list[int]:
    """Ids of ``" " + answer`` as they follow a word, without special tokens.

    Taken as ``ids("x " + answer)`` minus ``ids("x")``: this keeps a byte-level tokenizer's lone space token
    (GPT-2's ``"Ġ"`` before a word it has no ``"Ġword"`` merge for; it is a real character) and avoids the doubled
    word-boundary marker a SentencePiece tokenizer puts before a text that starts with a space. If ``ids("x")`` is
    not a prefix of the joint ids, ``" " + answer`` is tokenised alone and a lone leading token that decodes to
    nothing is dropped.
    """
    anchor = list(tok(_ANCHOR, add_special_tokens=False)["input_ids"])
    full = list(tok(_ANCHOR + " " + answer, add_special_tokens=False)["input_ids"])
    if full[: len(anchor)] == anchor and len(full) > len(anchor):
        return full[len(anchor):]
    ids = list(tok(" " + answer, add_special_tokens=False)["input_ids"])
    if len(ids) > 1 and not tok.decode(ids[:1]).strip():
        ids = ids[1:]
    return ids


def pad_id(tok: Any) -> int:
    """The id written at padded positions: ``pad_token_id``, else ``eos_token_id``, else 0."""
    for t in (tok.pad_token_id, tok.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def pad_batch(
    seqs: Sequence[Sequence[int]], pad: int, side: str = "right", device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """Pad id lists into ``(input_ids, attention_mask, position_ids, offsets)``, each tensor (B, T) on ``device``.

    ``offsets[r]`` is where row ``r``'s first token sits (0 with right padding). Position ids count real tokens only.
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    offsets = []
    for r, s in enumerate(seqs):
        o = T - len(s) if side == "left" else 0
        ids[r, o : o + len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[r, o : o + len(s)] = 1
        offsets.append(o)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device), offsets


def prompt_answer_batch(
    tok: Any, prompts: Sequence[str], answers: Sequence[str], device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``prompt ids + answer ids`` rows: ``(input_ids, attention_mask, labels)``, each (B, L); labels
    are -100 except at the answer's tokens (the teacher-forced targets of :func:`answer_nll`)."""
    prefix = special_prefix(tok)
    rows, labels = [], []
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        a_ids = answer_ids(tok, a) if a.strip() else []
        if not a_ids:
            raise ValueError(f"row {i}: answer {a!r} for prompt {p!r} has no tokens")
        p_ids = prompt_ids(tok, p, prefix)
        rows.append(p_ids + a_ids)
        labels.append([-100] * len(p_ids) + a_ids)
    ids, mask, _, _ = pad_batch(rows, pad_id(tok), "right", device)
    lab, _, _, _ = pad_batch(labels, -100, "right", device)
    return ids, mask, lab


def answer_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """(B,) mean NLL of the labelled tokens: position t's logits predict ``labels[:, t + 1]``; -100 = not scored.

    ``logits`` (B, L, V), ``labels`` (B, L) as from :func:`prompt_answer_batch`; computed in float32 or better.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    lab = labels[:, 1:]
    keep = lab != -100
    tok_logp = logp.gather(-1, lab.clamp(min=0)[..., None])[..., 0] * keep
    return -tok_logp.sum(1) / keep.sum(1).clamp(min=1)


def token_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """(B,) teacher-forced accuracy of the labelled tokens (share whose argmax is the label), same layout as
    :func:`answer_nll`."""
    lab = labels[:, 1:]
    keep = lab != -100
    hit = (logits[:, :-1].argmax(-1) == lab) & keep
    return hit.sum(1).float() / keep.sum(1).clamp(min=1)


def prefers(nll_a: Tensor, nll_b: Tensor, magnitude: bool = False) -> Tensor:
    """Per case, "answer a is preferred over answer b": ``1.0`` where NLL(a) < NLL(b), else ``0.0``; with
    ``magnitude`` the probability gap ``exp(−NLL(a)) − exp(−NLL(b))`` instead (the magnitude metrics). float64."""
    nll_a, nll_b = torch.as_tensor(nll_a).double(), torch.as_tensor(nll_b).double()
    if magnitude:
        return torch.exp(-nll_a) - torch.exp(-nll_b)
    return (nll_a < nll_b).double()
