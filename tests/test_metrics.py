"""Batched answer scoring and the editing metrics, against one-prompt-at-a-time computations by hand."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_llama

from lit_prune.metrics.editing import (
    KEYS,
    CaseMean,
    EditScores,
    Efficacy,
    Generalization,
    Locality,
    LocalityAgreement,
    TokenAccuracy,
    neighborhood_predictions,
    request_case_values,
    score_requests,
)
from lit_prune.metrics.scoring import score_answers
from lit_prune.text import special_prefix
from lit_prune.requests import EditRequest

PROMPTS = [
    "The Eiffel Tower is located in",
    "Michael Jordan plays",
    "The Eiffel Tower is located in",
    "The capital of Italy is",
    "The Eiffel Tower is located in",
    "A",
    "The Eiffel Tower is located in",
]
# multi-token answers; "the city" is a prefix of "the city of Paris" (shared continuation); the first prompt has
# more continuations than a batch of 1 holds (the cache is copied per chunk)
ANSWERS = ["Paris", "the sport of basketball", "the city of Paris", "Rome", "the city", "Berlin, London", "Rome, Italy"]


def manual_scores(model, tok, prompt, answer, bos=()):
    """NLL, token accuracy and argmax predictions of one pair: one forward, log-softmax written out."""
    p = list(bos) + tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(" " + answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p + a])).logits[0].double()
    logp = logits - torch.log(torch.exp(logits - logits.max(-1, keepdim=True).values).sum(-1, keepdim=True)) \
        - logits.max(-1, keepdim=True).values
    nll, hits, preds = 0.0, 0, []
    for j, t in enumerate(a):
        row = logp[len(p) - 1 + j]
        nll -= float(row[t])
        preds.append(int(row.argmax()))
        hits += preds[-1] == t
    return nll / len(a), hits / len(a), preds


@pytest.mark.parametrize("side", ["left", "right"])
def test_answer_scores_match_manual_loop(tiny_model, side):
    model, tok = tiny_model
    s = score_answers(model, tok, PROMPTS, ANSWERS, batch_size=2, padding_side=side)
    for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS)):
        nll, acc, preds = manual_scores(model, tok, p, a)
        assert math.isclose(float(s.nll[i]), nll, rel_tol=1e-5, abs_tol=1e-5), (i, p, a)
        assert math.isclose(float(s.accuracy[i]), acc)
        assert s.predictions[i].tolist() == preds
        assert s.answer_ids[i].tolist() == tok(" " + a, add_special_tokens=False)["input_ids"]
    assert any(len(x) > 1 for x in s.answer_ids)  # multi-token answers are covered


def test_padding_sides_and_batch_sizes_agree(tiny_model):
    model, tok = tiny_model
    ref = score_answers(model, tok, PROMPTS, ANSWERS, batch_size=1, padding_side="right").nll
    for side in ("left", "right"):
        for bs in (3, 64):
            torch.testing.assert_close(score_answers(model, tok, PROMPTS, ANSWERS, batch_size=bs, padding_side=side).nll,
                                       ref, rtol=0, atol=2e-5)


def test_token_accuracy_on_greedy_answers(tiny_llama, tiny_tokenizer):
    """Answers built from the model's own greedy tokens score accuracy 1 (and the rest as the manual loop says)."""
    model, tok = tiny_llama, tiny_tokenizer
    prompts, answers = [], []
    for p in ["The mother tongue of", "Toyota is a company", "The capital of", "Apple was founded by", "Michael"]:
        ids = tok(p)["input_ids"]
        with torch.no_grad():
            for _ in range(2):
                ids = ids + [int(model(torch.tensor([ids])).logits[0, -1].argmax())]
        text = tok.decode(ids[-2:])
        if text.startswith(" ") and text[1:].strip() and tok(text, add_special_tokens=False)["input_ids"] == ids[-2:]:
            prompts.append(p)
            answers.append(text[1:])
    assert prompts, "no greedy continuation of the tiny model round-trips through the tokenizer"
    s = score_answers(model, tok, prompts + ["The capital of"], answers + ["Rome"], batch_size=4)
    assert s.accuracy[: len(prompts)].tolist() == [1.0] * len(prompts)
    _, acc, _ = manual_scores(model, tok, "The capital of", "Rome")
    assert float(s.accuracy[-1]) == acc


def test_bos_goes_before_the_prompt_only(tiny_tokenizer):
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    base = tiny_tokenizer
    eos = base.eos_token_id
    backend = base.backend_tokenizer.__class__.from_str(base.backend_tokenizer.to_str())
    backend.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", eos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    assert tok("Paris")["input_ids"][0] == eos and special_prefix(tok) == [eos]
    model = make_llama(tok)
    s = score_answers(model, tok, PROMPTS[:4], ANSWERS[:4], batch_size=3)
    for i in range(4):
        nll, _, _ = manual_scores(model, tok, PROMPTS[i], ANSWERS[i], bos=[eos])
        assert math.isclose(float(s.nll[i]), nll, rel_tol=1e-5)


def test_empty_answer_is_rejected(tiny_llama, tiny_tokenizer):
    with pytest.raises(ValueError, match="pair 1: answer ' ' is empty"):
        score_answers(tiny_llama, tiny_tokenizer, ["a", "b"], ["x", " "])


# -- the Metric classes on hand-made numbers ---------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric CaseMean was called before the ``update``")
def test_case_mean_metrics_by_hand():
    nll_new = torch.tensor([1.0, 2.0, 3.0, 0.5])
    nll_true = torch.tensor([2.0, 1.0, 4.0, 0.2])
    case = torch.tensor([0, 0, 1, 2])
    e = Efficacy()
    e.update(nll_new, nll_true, case)
    assert math.isclose(float(e.compute()), (0.5 + 1.0 + 0.0) / 3)
    g = Generalization(magnitude=True)
    g.update(nll_new, nll_true, case)
    pn, pt = torch.exp(-nll_new.double()), torch.exp(-nll_true.double())
    d = pn - pt
    assert math.isclose(float(g.compute()), float(((d[0] + d[1]) / 2 + d[2] + d[3]) / 3), rel_tol=1e-12)
    loc = Locality()
    loc.update(nll_new, nll_true, case)
    assert math.isclose(float(loc.compute()), (0.5 + 0.0 + 1.0) / 3)
    locm = Locality(magnitude=True)
    locm.update(nll_new, nll_true, case)
    assert math.isclose(float(locm.compute()), -float(g.compute()), rel_tol=1e-12)
    acc = TokenAccuracy()
    acc.update([torch.tensor([1, 2, 3]), torch.tensor([5]), torch.tensor([7, 7])],
               [torch.tensor([1, 0, 3]), torch.tensor([5]), torch.tensor([0, 0])], torch.tensor([4, 4, 9]))
    assert math.isclose(float(acc.compute()), ((2 / 3 + 1) / 2 + 0) / 2)
    agree = LocalityAgreement()
    agree.update([torch.tensor([4, 4])], [torch.tensor([4, 5])])
    assert float(agree.compute()) == 0.5
    assert math.isnan(float(CaseMean().compute()))


def test_uneven_shards_merge_to_single_process():
    torch.manual_seed(0)
    values = {k: torch.rand(10) for k in KEYS[:3]} | {"locality_magnitude": torch.rand(4) - 0.5}
    single = EditScores()
    single.update(values)
    a, b = EditScores(), EditScores()
    a.update({k: v[:3] for k, v in values.items()})  # 3 cases on one "rank", 7 (or 1) on the other
    b.update({k: v[3:] for k, v in values.items()})
    a.merge_state(b)
    for k, v in single.compute().items():
        assert math.isclose(float(a.compute()[k]), float(v), rel_tol=1e-12)
    assert set(single.compute()) == set(values)


# -- requests -> scores, against the definitions computed pair by pair -----------------------------------------------
def cf_requests():
    return [
        EditRequest("{} is located in", "The Eiffel Tower", "Rome", "Paris", 0,
                    ["The Eiffel Tower lies in", "Where is the Eiffel Tower? In"], ["The Louvre is located in"]),
        EditRequest("{} plays", "Michael Jordan", "the sport of football", "basketball", 1,
                    ["Michael Jordan is good at"], ["Steve Jobs plays", "Danielle Darrieux plays"]),
        EditRequest("The capital of {} is", "Italy", "Tokyo", "Rome", 2, [], ["The capital of Japan is"]),
    ]


def zsre_requests():
    return [
        EditRequest("What language did {} speak?", "Danielle Darrieux", "English", None, 3,
                    ["Which language did Danielle Darrieux speak?"], ["who founded Apple"], ["Steve Jobs"]),
        EditRequest("Where is {} headquartered?", "Toyota", "Japan, Tokyo", None, 4, [],
                    ["the capital of Japan", "a mother tongue"], ["Tokyo", "French"]),
    ]


def manual_request_scores(model, tok, requests, pre_model):
    nll = lambda p, a: manual_scores(model, tok, p, a)[0]  # noqa: E731
    acc = lambda p, a: manual_scores(model, tok, p, a)[1]  # noqa: E731
    vals = {k: [] for k in KEYS}
    for r in requests:
        for key, prompts in (("efficacy", [r.full_prompt]), ("generalization", r.paraphrase_prompts)):
            if not prompts:
                continue
            if r.target_true is None:
                vals[key].append(sum(acc(p, r.target_new) for p in prompts) / len(prompts))
            else:
                vals[key].append(sum(nll(p, r.target_new) < nll(p, r.target_true) for p in prompts) / len(prompts))
                vals[key + "_magnitude"].append(sum(math.exp(-nll(p, r.target_new)) - math.exp(-nll(p, r.target_true))
                                                    for p in prompts) / len(prompts))
        if r.neighborhood_answers:
            agree = []
            for q, a in zip(r.neighborhood_prompts, r.neighborhood_answers):
                post, pre = manual_scores(model, tok, q, a)[2], manual_scores(pre_model, tok, q, a)[2]
                agree.append(sum(x == y for x, y in zip(post, pre)) / len(pre))
            vals["locality"].append(sum(agree) / len(agree))
        elif r.neighborhood_prompts:
            qs = r.neighborhood_prompts
            vals["locality"].append(sum(nll(q, r.target_true) < nll(q, r.target_new) for q in qs) / len(qs))
            vals["locality_magnitude"].append(sum(math.exp(-nll(q, r.target_true)) - math.exp(-nll(q, r.target_new))
                                                  for q in qs) / len(qs))
    return {k: sum(v) / len(v) for k, v in vals.items() if v}


def test_score_requests_matches_definitions(tiny_tokenizer):
    pre_model = make_llama(tiny_tokenizer, seed=0)
    model = make_llama(tiny_tokenizer, seed=1)  # "edited": different weights, so locality agreement is not trivially 1
    requests = cf_requests() + zsre_requests()
    pre = neighborhood_predictions(pre_model, tiny_tokenizer, requests)
    assert set(pre) == {("who founded Apple", "Steve Jobs"), ("the capital of Japan", "Tokyo"),
                        ("a mother tongue", "French")}
    got = score_requests(model, tiny_tokenizer, requests, batch_size=3, pre_predictions=pre)
    want = manual_request_scores(model, tiny_tokenizer, requests, pre_model)
    assert set(got) == set(want) == set(KEYS)
    for k in want:
        assert math.isclose(got[k], want[k], rel_tol=1e-5, abs_tol=1e-6), k
    # the agreement is computed on the pre-edit model's predictions: scoring the pre-edit model itself gives 1
    assert score_requests(pre_model, tiny_tokenizer, zsre_requests(), pre_predictions=pre)["locality"] == 1.0
    # only CounterFact-style requests: no prompt-less keys, magnitudes present
    cf = score_requests(model, tiny_tokenizer, cf_requests()[2:])
    assert set(cf) == {"efficacy", "efficacy_magnitude", "locality", "locality_magnitude"}


def test_zsre_locality_without_pre_predictions_names_the_case(tiny_llama, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"request 0 \(case_id 3\).*pre-edit predictions"):
        request_case_values(tiny_llama, tiny_tokenizer, zsre_requests())


def test_case_values_shard_to_the_same_scores(tiny_tokenizer):
    model = make_llama(tiny_tokenizer, seed=1)
    requests = cf_requests() + zsre_requests()
    pre = neighborhood_predictions(model, tiny_tokenizer, requests)
    single = EditScores()
    single.update(request_case_values(model, tiny_tokenizer, requests, pre_predictions=pre))
    parts = [EditScores(), EditScores()]
    for r, m in enumerate(parts):
        m.update(request_case_values(model, tiny_tokenizer, requests[r::2], pre_predictions=pre))
    parts[0].merge_state(parts[1])
    for k, v in single.compute().items():
        assert math.isclose(float(parts[0].compute()[k]), float(v), rel_tol=1e-5, abs_tol=1e-7), k


# -- a real two-process reduction (gloo) ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank: int, port: int, shards: list, out_dir: str) -> None:
    import torch.distributed as dist

    from lit_prune.metrics.downstream import GenerationAccuracy, RougeF1, TokenPerplexity

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        scores, acc, rouge, ppl = EditScores(), GenerationAccuracy(), RougeF1(), TokenPerplexity()
        vals, correct, (preds, refs), (nll, n) = shards[rank]
        scores.update(vals)
        acc.update(correct)
        rouge.update(preds, refs)
        ppl.update(nll, n)
        res = {k: float(v) for k, v in scores.compute().items()}
        res["acc"], res["ppl"] = float(acc.compute()), float(ppl.compute())
        res.update({f"rouge_{k}": float(v) for k, v in rouge.compute().items()})
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_reduction_equals_single_process(tmp_path):
    from lit_prune.metrics.downstream import GenerationAccuracy, RougeF1, TokenPerplexity

    torch.manual_seed(0)
    vals = {"efficacy": torch.rand(7), "locality": torch.rand(5), "locality_magnitude": torch.rand(5) - 0.5}
    correct = [True, False, True, True, False, False, True]
    preds = ["a cat sat on the mat", "hello there", "the dog", "x"]
    refs = ["the cat sat on a mat", "hello world there", "a dog barks", "y z"]
    shards = [
        ({k: v[:2] for k, v in vals.items()}, correct[:1], (preds[:1], refs[:1]), (3.0, 2)),
        ({k: v[2:] for k, v in vals.items()}, correct[1:], (preds[1:], refs[1:]), (10.0, 7)),
    ]
    # fork: the children inherit the imported modules, so the test costs a second, not two interpreter start-ups
    mp.start_processes(_two_rank_worker, args=(_free_port(), shards, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    out = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    single = EditScores()
    single.update(vals)
    acc, rouge, ppl = GenerationAccuracy(), RougeF1(), TokenPerplexity()
    acc.update(correct)
    rouge.update(preds, refs)
    ppl.update(13.0, 9)
    want = {k: float(v) for k, v in single.compute().items()}
    want["acc"], want["ppl"] = float(acc.compute()), float(ppl.compute())
    want.update({f"rouge_{k}": float(v) for k, v in rouge.compute().items()})
    assert math.isclose(want["ppl"], math.exp(13 / 9)) and math.isclose(want["acc"], 4 / 7)
    for rank in (0, 1):
        assert set(out[rank]) == set(want)
        for k, v in want.items():
            assert math.isclose(out[rank][k], v, rel_tol=1e-9), (rank, k)


def test_edit_scores_is_a_collection_of_case_means():
    from torchmetrics import MetricCollection

    vals = {"efficacy": torch.tensor([1.0, 0.0, 1.0]), "locality_magnitude": torch.tensor([0.25, -0.5])}
    scores = EditScores()
    scores.update(vals)
    assert isinstance(scores, MetricCollection) and set(scores.keys()) == set(KEYS)
    assert all(type(m) is CaseMean for m in scores.values())
    assert {k: float(v) for k, v in scores.compute().items()} == {"efficacy": 2 / 3, "locality_magnitude": -0.125}
    sums = scores.sums()
    assert sums["efficacy_total"] == 2.0 and sums["efficacy_cases"] == 3.0 and sums["locality_cases"] == 0.0
    restored = EditScores()
    restored.update({})  # nothing: as a resumed run's first batch of an empty shard
    restored.load_sums(sums)
    assert {k: float(v) for k, v in restored.compute().items()} == {k: float(v) for k, v in scores.compute().items()}
    with pytest.raises(KeyError, match="EditScores: unknown score 'fluency'; known: efficacy, generalization"):
        scores.update({"fluency": torch.ones(1)})
