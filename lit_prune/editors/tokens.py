"""Token-level view of an edit: prompt ids, the subject's last token (where keys are read and δ is added), targets.

Context templates (ROME/MEMIT: prefixes that give the subject varied contexts; the key k* and the v* loss average
over them). ROME samples them from the model being edited. Here the default is a FIXED list of generic prefixes,
:data:`CONTEXT_TEMPLATES` (the bare ``"{}"`` first, then 5 short and 5 longer ones): deterministic, identical on
every rank and run, and free to compute. Sampled prefixes are only as good as the model's free generation; the
embedded SmolLM2-135M-Instruct degenerates without a chat template ("The-the-world-is-a-world"). ROME-style
generated templates remain available (``context_template_lengths``): greedy continuations of :data:`CONTEXT_SEEDS`,
made once per editor instance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..requests import EditRequest, EditRequestError
from ..text import answer_ids, prompt_ids, prompt_ids_and_offsets

CONTEXT_TEMPLATES = (
    "{}",
    "The following is true. {}",
    "Here is a fact. {}",
    "I read this today. {}",
    "You should know this. {}",
    "Because of that. {}",
    "The article was published in a local newspaper last week. {}",
    "Therefore, we need to look at the facts again. {}",
    "I have been reading about history for many years. {}",
    "You can find more information on this page. {}",
    "Because it is important, the details are listed below. {}",
)
"""Default context templates (fixed; see the module docstring)."""
CONTEXT_SEEDS = ("The", "Therefore", "Because", "I", "You")
"""Seeds of generated context templates (MEMIT's)."""
_SENTINEL = "\ue000"


def subject_last_token(tok: Any, text: str, subj_end: int) -> tuple[list[int], int]:
    """Prompt ids of ``text`` (:func:`lit_prune.text.prompt_ids`: special prefix + its own tokens) and the index of
    the token holding the subject's last character (``text[subj_end - 1]``)."""
    ids, offsets = prompt_ids_and_offsets(tok, text)
    if offsets is not None:
        idx = max((i for i, (s, e) in enumerate(offsets) if e > s and s < subj_end), default=None)
        if idx is not None:
            return ids, idx
    # slow tokenizers: ROME's rule, the last token of the tokenised text up to the subject's end
    return ids, max(0, len(prompt_ids(tok, text[:subj_end])) - 1)


def fill(template: str, subject: str) -> tuple[str, int]:
    """``template.format(subject)`` and the character index where the subject ends in it."""
    s = template.format(_SENTINEL)
    i = s.index(_SENTINEL)
    return s.replace(_SENTINEL, subject), i + len(subject)


@dataclass
class PromptSet:
    """The prompts of one request for the δ optimisation (ROME ``compute_v`` / MEMIT ``compute_z``).

    ``ids[i]``: token ids; rows ``0..n_rewrite-1`` are ``context_i + prompt(subject) + target[:-1]``, the remaining
    rows the KL ("essence") prompts. ``lookup[i]``: index of the subject's last token in row i. ``target``: the answer
    ids of ``target_new`` (:func:`lit_prune.text.answer_ids`, exactly the tokens the metrics score). ``prompt_len[i]``: length of row i without the appended target tokens.
    """

    ids: list[list[int]]
    lookup: list[int]
    prompt_len: list[int]
    n_rewrite: int
    target: list[int]

    def subset(self, n_rewrite: int) -> "PromptSet":
        """The first ``n_rewrite`` rewriting prompts and all KL prompts."""
        rows = list(range(min(n_rewrite, self.n_rewrite))) + list(range(self.n_rewrite, len(self.ids)))
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        return PromptSet(pick(self.ids), pick(self.lookup), pick(self.prompt_len), min(n_rewrite, self.n_rewrite),
                         self.target)

    def loss_positions(self) -> list[tuple[int, int, int]]:
        """(row, position, target id) of every scored token: the logit at ``position`` must predict ``target id``."""
        return [
            (i, self.prompt_len[i] - 1 + j, t)
            for i in range(self.n_rewrite)
            for j, t in enumerate(self.target)
        ]


def validate_request(req: EditRequest, where: str) -> None:
    """Raise :class:`EditRequestError` (naming ``where`` and the field) for a request that cannot be edited."""
    req.validate(where)
    cid = f" (case_id {req.case_id})" if req.case_id is not None else ""
    try:
        text, end = fill(req.prompt, req.subject)
    except (IndexError, KeyError, ValueError) as e:
        raise EditRequestError(f"{where}{cid}: field 'prompt' {req.prompt!r} cannot be formatted: {e!r}") from None
    if req.subject not in text[: end] or not req.subject.strip():
        raise EditRequestError(f"{where}{cid}: field 'subject' {req.subject!r} not found in the prompt {text!r}")


def prompt_set(
    tok: Any, req: EditRequest, context_templates: Sequence[str], kl_prompts: Sequence[str] = ("{} is a",),
    where: str = "request",
) -> PromptSet:
    """Tokenise the rewriting prompts (one per context template) and the KL prompts of ``req``."""
    tgt = answer_ids(tok, req.target_new) if req.target_new.strip() else []
    if not tgt:
        cid = f" (case_id {req.case_id})" if req.case_id is not None else ""
        raise EditRequestError(f"{where}{cid}: field 'target_new' {req.target_new!r} has no tokens")
    ids, lookup, plen = [], [], []
    for ctx in context_templates:
        text, end = fill(_compose(ctx, req.prompt), req.subject)
        p, idx = subject_last_token(tok, text, end)
        ids.append(p + tgt[:-1])
        lookup.append(idx)
        plen.append(len(p))
    for kl in kl_prompts:
        text, end = fill(kl, req.subject)
        p, idx = subject_last_token(tok, text, end)
        ids.append(p)
        lookup.append(idx)
        plen.append(len(p))
    return PromptSet(ids, lookup, plen, len(context_templates), tgt)


def _compose(context_template: str, prompt: str) -> str:
    """ROME's ``context.format(prompt)``: the context template's ``{}`` replaced by the prompt template."""
    pre, post = context_template.split("{}", 1)
    esc = lambda s: s.replace("{", "{{").replace("}", "}}")  # noqa: E731
    return esc(pre) + prompt + esc(post)


def subject_prompts(
    tok: Any, requests: Sequence[EditRequest], context_templates: Sequence[str]
) -> tuple[list[list[int]], list[int]]:
    """Ids and subject-last-token index of ``context + prompt(subject)`` for every (request, template), request-major."""
    ids, lookup = [], []
    for r in requests:
        for ctx in context_templates:
            text, end = fill(_compose(ctx, r.prompt), r.subject)
            p, idx = subject_last_token(tok, text, end)
            ids.append(p)
            lookup.append(idx)
    return ids, lookup


@torch.no_grad()
def generate_context_templates(
    model: nn.Module, tok: Any, lengths: Sequence[int] = (5, 10), seeds: Sequence[str] = CONTEXT_SEEDS
) -> list[str]:
    """``["{}"]`` + for each length and seed the greedy continuation of the seed (``length`` new tokens) + ``". {}"``.

    Seeds of equal token length are decoded together. Braces are removed from the generated text and whitespace
    collapsed, as ROME does.
    """
    device = next(model.parameters()).device
    out = ["{}"]
    if not lengths:
        return out
    texts: dict[tuple[int, str], str] = {}
    groups: dict[int, list[tuple[str, list[int]]]] = {}
    for seed in seeds:
        ids = list(tok(seed)["input_ids"])
        groups.setdefault(len(ids), []).append((seed, ids))
    eos = tok.eos_token_id
    for n0, group in groups.items():
        x = torch.tensor([ids for _, ids in group], device=device)
        done = torch.zeros(len(group), dtype=torch.bool, device=device)
        for step in range(1, max(lengths) + 1):
            nxt = model(input_ids=x).logits[:, -1].argmax(-1)
            if eos is not None:
                done |= nxt == eos
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            x = torch.cat([x, nxt[:, None]], 1)
            if step in lengths:
                for (seed, _), row in zip(group, x.tolist()):
                    texts[(step, seed)] = tok.decode(row, skip_special_tokens=True)
    for length in lengths:
        for seed in seeds:
            t = re.sub(r"\s+", " ", texts[(length, seed)].replace("{", " ").replace("}", " ")).strip()
            out.append(t + ". {}")
    return out
