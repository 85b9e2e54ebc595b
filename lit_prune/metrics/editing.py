"""Editing metrics (spec §4) as torchmetrics ``Metric``s with sum-reduced states.

Every score is a mean over cases (edit requests) of a per-case mean over that case's prompts, so each metric keeps
two states, the sum of per-case values and the number of cases, both ``dist_reduce_fx="sum"``: shards of any size
reduce to the single-process value.

CounterFact-style (probability comparison, NLL = length-normalised answer NLL, P = exp(−NLL)):
  efficacy        NLL(new) < NLL(true) on the edit prompt;            magnitude P(new) − P(true)
  generalization  the same on each paraphrase prompt;                 magnitude P(new) − P(true)
  locality        NLL(true) < NLL(new) on each neighbourhood prompt;  magnitude P(true) − P(new)
ZsRE-style (requests without ``target_true``, or with ``neighborhood_answers``):
  efficacy / generalization = teacher-forced token accuracy of ``target_new``;
  locality = token agreement of the argmax predictions on the neighbourhood answer with the pre-edit model's.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from ..requests import EditRequest
from ..text import prefers
from .scoring import score_answers

SCORES = ("efficacy", "generalization", "locality")
KEYS = SCORES + tuple(f"{k}_magnitude" for k in SCORES)

PrePredictions = dict[tuple[str, str], list[int]]


def case_means(values: Tensor, case_index: Tensor | None = None) -> Tensor:
    """Per-case means of prompt-level ``values`` (n,), grouped by ``case_index`` (n,) ints; cases with no value are
    left out. Without ``case_index`` every value is its own case."""
    values = values.detach().double().flatten().cpu()
    if case_index is None:
        return values
    case_index = torch.as_tensor(case_index).flatten().cpu().long()
    if case_index.shape != values.shape:
        raise ValueError(f"case_index has {case_index.numel()} entries for {values.numel()} values")
    if values.numel() == 0:
        return values
    _, idx = torch.unique(case_index, return_inverse=True)
    k = int(idx.max()) + 1
    tot = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, values)
    cnt = torch.bincount(idx, minlength=k).double()
    return tot / cnt


def token_agreement(predictions: Sequence[Tensor], targets: Sequence[Tensor | Sequence[int]]) -> Tensor:
    """Per prompt: the fraction of positions where ``predictions[i]`` equals ``targets[i]`` (same length)."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    out = []
    for i, (p, t) in enumerate(zip(predictions, targets)):
        p, t = torch.as_tensor(p).flatten().cpu(), torch.as_tensor(t).flatten().cpu()
        if p.numel() != t.numel() or p.numel() == 0:
            raise ValueError(f"prompt {i}: {p.numel()} predicted tokens for {t.numel()} target tokens")
        out.append((p == t).double().mean())
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


class CaseMean(Metric):
    """Mean over cases of the per-case mean of prompt-level values. States: ``total`` (sum of per-case means) and
    ``cases``, both sum-reduced. ``compute()`` is NaN when no case was seen."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    total: Tensor
    cases: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("cases", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _accumulate(self, values: Tensor, case_index: Tensor | None) -> None:
        m = case_means(values, case_index).to(self.total.device)
        self.total += m.sum()
        self.cases += m.numel()

    def update(self, values: Tensor, case_index: Tensor | None = None) -> None:
        self._accumulate(values, case_index)

    def compute(self) -> Tensor:
        return self.total / self.cases if self.cases > 0 else torch.tensor(float("nan"), dtype=torch.float64)


class Efficacy(CaseMean):
    """Fraction of cases whose edit prompt prefers the new object: NLL(new) < NLL(true).

    With ``magnitude=True``: mean P(new) − P(true), P = exp(−NLL) of the length-normalised NLL.
    ``update(nll_new, nll_true, case_index=None)`` takes (n,) NLLs of the prompts.
    """

    new_wins = True
    """The preferred answer: the new object (efficacy, generalization) or the true one (:class:`Locality`)."""

    def __init__(self, magnitude: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.magnitude = magnitude

    def update(  # type: ignore[override]
        self, nll_new: Tensor, nll_true: Tensor, case_index: Tensor | None = None
    ) -> None:
        a, b = (nll_new, nll_true) if self.new_wins else (nll_true, nll_new)
        self._accumulate(prefers(a, b, self.magnitude), case_index)


class Generalization(Efficacy):
    """:class:`Efficacy` on paraphrase prompts: mean over each case's paraphrases, then over cases."""


class Locality(Efficacy):
    """Neighbourhood prompts keep the true object: NLL(true) < NLL(new), mean per case then over cases.

    With ``magnitude=True``: mean P(true) − P(new) (the sign of the efficacy magnitude flipped). Same ``update``
    arguments as :class:`Efficacy`.
    """

    new_wins = False


class TokenAccuracy(CaseMean):
    """ZsRE-style teacher-forced token accuracy: per prompt the fraction of answer tokens predicted (argmax) given
    the prompt and the previous answer tokens; mean per case, then over cases.

    ``update(predictions, targets, case_index=None)``: sequences of (|t|,) token-id tensors.
    """

    def update(  # type: ignore[override]
        self, predictions: Sequence[Tensor], targets: Sequence[Tensor], case_index: Tensor | None = None
    ) -> None:
        self._accumulate(token_agreement(predictions, targets), case_index)


class LocalityAgreement(TokenAccuracy):
    """ZsRE-style locality: token agreement of the edited model's argmax predictions on the neighbourhood answer
    positions (teacher-forced) with the pre-edit model's predictions (``targets``)."""


class EditScores(MetricCollection):
    """All editing scores of a set of requests at once (what the callbacks log): a ``MetricCollection`` of one
    :class:`CaseMean` per key of :data:`KEYS` (states ``total`` and ``cases`` each, sum-reduced).

    ``update(case_values)`` takes the per-case values of :func:`request_case_values` (``{key: (cases,)}``) and
    feeds each key's values to its metric as one case each; ``compute()`` returns ``{key: mean}`` for the keys with
    at least one case (on every rank the same keys: each metric computes, and syncs, whatever the shard held).
    ``kwargs`` (e.g. ``sync_on_compute=False``) go to every metric.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__({k: CaseMean(**kwargs) for k in KEYS}, compute_groups=False)

    def update(self, case_values: Mapping[str, Tensor]) -> None:  # type: ignore[override]
        unknown = [k for k in case_values if k not in KEYS]
        if unknown:
            raise KeyError(f"EditScores: unknown score '{unknown[0]}'; known: {', '.join(KEYS)}")
        for k in KEYS:  # every metric is updated (an empty shard of a key adds nothing), so none computes unfed
            self[k].update(torch.as_tensor(case_values.get(k, torch.zeros(0))).double().flatten())

    def compute(self) -> dict[str, Tensor]:
        return {k: v for k, v in super().compute().items() if not torch.isnan(v)}

    def merge_state(self, other: "EditScores") -> None:
        """Add ``other``'s states (another shard's) to these, key by key."""
        for k in KEYS:
            self[k].merge_state(other[k])

    def sums(self, sync: bool = True) -> dict[str, float]:
        """The states as ``{"<key>_total": ..., "<key>_cases": ...}``; with ``sync`` reduced over ranks (a collective
        when distributed: every rank calls it), the local states are kept."""
        out: dict[str, float] = {}
        for k in KEYS:
            m = self[k]
            with m.sync_context(should_sync=sync):
                out[f"{k}_total"], out[f"{k}_cases"] = float(m.total), float(m.cases)
        return out

    def load_sums(self, sums: Mapping[str, float]) -> None:
        """Set the states from :meth:`sums` (keys not given are left as they are)."""
        for k in KEYS:
            m = self[k]
            for state in ("total", "cases"):
                if f"{k}_{state}" in sums:
                    setattr(m, state, torch.tensor(sums[f"{k}_{state}"], dtype=torch.float64, device=m.device))


# -- requests -> per-case values ------------------------------------------------------------------------------------
def neighborhood_predictions(
    model: nn.Module, tok: Any, requests: Sequence[EditRequest], batch_size: int = 32
) -> PrePredictions:
    """The model's argmax predictions at the answer positions of every (neighbourhood prompt, neighbourhood answer)
    pair of the requests that have ``neighborhood_answers`` (teacher-forced). Run it on the pre-edit model; pass the
    result as ``pre_predictions`` when scoring ZsRE-style locality later. Keys: (prompt, answer); values: token ids.
    """
    pairs = sorted({(q, a) for r in requests for q, a in zip(r.neighborhood_prompts, r.neighborhood_answers)})
    if not pairs:
        return {}
    s = score_answers(model, tok, [q for q, _ in pairs], [a for _, a in pairs], batch_size)
    return {pair: p.tolist() for pair, p in zip(pairs, s.predictions)}


def request_case_values(
    model: nn.Module,
    tok: Any,
    requests: Sequence[EditRequest],
    batch_size: int = 32,
    pre_predictions: PrePredictions | None = None,
    padding_side: str = "left",
) -> dict[str, Tensor]:
    """Per-case values of every score in :data:`KEYS` for ``requests`` on the model as it is now (one batched pass).

    Returns ``{key: (cases_with_that_score,) float64}``; a request contributes to a key only if it has the prompts
    for it (e.g. no paraphrases: no generalization value; ZsRE: no magnitudes). Requests with
    ``neighborhood_answers`` need ``pre_predictions`` (from :func:`neighborhood_predictions` on the pre-edit model).
    """
    index: dict[tuple[str, str], int] = {}

    def pair(p: str, a: str) -> int:
        return index.setdefault((p, a), len(index))

    plan = []  # (key, case, kind, args)
    for c, r in enumerate(requests):
        if not isinstance(r, EditRequest):
            raise TypeError(f"request {c}: expected an EditRequest, got {type(r).__name__}")
        for key, prompts in (("efficacy", [r.full_prompt]), ("generalization", r.paraphrase_prompts)):
            for p in prompts:
                if r.target_true is not None:
                    plan.append((key, c, "prefer", (pair(p, r.target_new), pair(p, r.target_true))))
                else:
                    plan.append((key, c, "acc", (pair(p, r.target_new),)))
        if r.neighborhood_answers:
            for q, a in zip(r.neighborhood_prompts, r.neighborhood_answers):
                if pre_predictions is None or (q, a) not in pre_predictions:
                    raise ValueError(
                        f"request {c} (case_id {r.case_id}): locality needs the pre-edit predictions for the "
                        f"neighbourhood prompt {q!r}; compute them with neighborhood_predictions() before editing"
                    )
                plan.append(("locality", c, "agree", (pair(q, a), (q, a))))
        elif r.target_true is not None:
            for q in r.neighborhood_prompts:
                plan.append(("locality", c, "keep", (pair(q, r.target_new), pair(q, r.target_true))))

    keys_pairs = list(index)
    s = score_answers(model, tok, [p for p, _ in keys_pairs], [a for _, a in keys_pairs], batch_size, padding_side)
    vals: dict[str, list[tuple[int, float]]] = {k: [] for k in KEYS}
    for key, c, kind, args in plan:
        if kind == "prefer" or kind == "keep":
            i_new, i_true = args
            a, b = (i_new, i_true) if kind == "prefer" else (i_true, i_new)
            vals[key].append((c, float(prefers(s.nll[a], s.nll[b]))))
            vals[f"{key}_magnitude"].append((c, float(prefers(s.nll[a], s.nll[b], magnitude=True))))
        elif kind == "acc":
            vals[key].append((c, float(s.accuracy[args[0]])))
        else:
            i, q = args
            pre = torch.tensor(pre_predictions[q])  # type: ignore[index]
            vals[key].append((c, float(token_agreement([s.predictions[i]], [pre])[0])))
    out = {}
    for k, lst in vals.items():
        if lst:
            out[k] = case_means(torch.tensor([v for _, v in lst]), torch.tensor([c for c, _ in lst]))
    return out


def score_requests(model: nn.Module, tok: Any, requests: Sequence[EditRequest], **options: Any) -> dict[str, float]:
    """All editing scores of ``requests`` on the model as it is now, in this process: ``{key: value}`` for the keys
    of :data:`KEYS` that apply (rates in [0, 1], magnitudes in [−1, 1]). ``options``: those of
    :func:`request_case_values` (``batch_size``, ``pre_predictions``, ``padding_side``)."""
    m = EditScores(sync_on_compute=False)
    m.update(request_case_values(model, tok, requests, **options))
    return {k: float(v) for k, v in m.compute().items()}
