"""Downstream tasks: scorers on hand-made cases, ROUGE vs torchmetrics, perplexity and generation vs manual loops."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torchmetrics.text.rouge import ROUGEScore

from lit_prune.metrics.downstream import (
    DEFAULT_N,
    DownstreamDataError,
    GenerationAccuracy,
    RougeF1,
    TokenPerplexity,
    generate,
    gsm8k_answer,
    load_examples,
    make_example,
    normalize_answer,
    parse_true_false,
    qa_exact_match,
    reasoning_correct,
    score_generations,
    text_nll,
)


def test_normalize_answer():
    assert normalize_answer("  The  Eiffel-Tower, in PARIS!  ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("Wilhelm Conrad Röntgen.") == "wilhelm conrad röntgen"
    assert normalize_answer("the") == ""


def test_qa_exact_match_spans():
    assert qa_exact_match("It was awarded to Wilhelm Conrad Röntgen in 1901.", ["Wilhelm Conrad Röntgen"])
    assert qa_exact_match("the answer is: MFSK", ["Olivia", "MFSK"])
    assert not qa_exact_match("Wilhelm Röntgen", ["Wilhelm Conrad Röntgen"])  # a span, not a bag of words
    assert not qa_exact_match("Parisian art", ["Paris"])  # whole words only
    assert qa_exact_match("in the city of Paris", ["The City of Paris"])  # articles and case normalised
    assert not qa_exact_match("anything at all", ["The"])  # a gold answer normalising to nothing never matches
    assert not qa_exact_match("", ["Paris"])


def test_qa_counts_each_example_once_and_resets_between_examples():
    """The two reference bugs: several matching answers/spans counted several times, and a match flag carried over
    to the next examples. Here: example 0 matches through two answers and two spans, example 1 matches nothing."""
    gens = ["Dai Yongge owns it; Dai Yongge and Dai Xiuli", "a football club in Reading"]
    golds = [["Yongge Dai", "Dai Yongge", "Dai Xiuli"], ["Cyrus"]]
    exs = [make_example("qa", {"question": "q", "answer": g, "output": ["p"]}, "t") for g in golds]
    assert score_generations("qa", gens, exs) == [True, False]
    m = GenerationAccuracy()
    m.update(score_generations("qa", gens, exs))
    assert float(m.compute()) == 0.5


def test_nli_parser_and_accuracy():
    assert parse_true_false("True") is True
    assert parse_true_false(" false.") is False
    assert parse_true_false("FALSE, because") is False
    assert parse_true_false("true or false") is True  # the first one given
    assert parse_true_false("garbage") is None
    assert parse_true_false("") is None
    exs = [make_example("nli", {"sentence1": "a", "sentence2": "b", "label": lab}, "t")
           for lab in ("entailment", "not_entailment", "entailment", 1)]
    assert [e.target for e in exs] == [True, False, True, False]
    assert exs[0].prompt == "a entails the b. True or False? answer:"
    assert score_generations("nli", [" True", " false.", " maybe", " True"], exs) == [True, True, False, False]


def test_reasoning_prompt_and_criterion():
    rec = {"question": "How many?", "answer": "2 + 3 = <<2+3=5>>5 apples\nSo 65,960 in all.\n#### 65,960"}
    ex = make_example("reasoning", rec, "t")
    assert ex.target == "65960" == gsm8k_answer(rec["answer"])
    assert ex.prompt == ("Q: How many? A:Let's think step by step. 2 + 3 = <<2+3=5>>5 apples\nSo 65,960 in all. "
                         "Therefore, the answer (arabic numerals) is:")
    assert reasoning_correct(" 65,960.", "65960") and reasoning_correct("65960", "65960")
    assert not reasoning_correct(" 6596", "65960")
    with pytest.raises(DownstreamDataError, match="record 3.*'####'"):
        make_example("reasoning", {"question": "q", "answer": "no marker"}, "record 3")


def test_rouge_matches_torchmetrics():
    preds = ["the cat sat on the mat", "hello there general kenobi", "", "a b c d"]
    refs = ["a cat was sitting on the mat", "hello there", "something", "d c b a"]
    ours = RougeF1()
    ours.update(preds[:1], refs[:1])
    ours.update(preds[1:], refs[1:])
    theirs = ROUGEScore(rouge_keys=("rouge1", "rouge2", "rougeL"))(preds, refs)
    got = ours.compute()
    for k in ("rouge1", "rouge2", "rougeL"):
        assert math.isclose(float(got[k]), float(theirs[f"{k}_fmeasure"]), rel_tol=1e-6), k
    mean = sum(float(theirs[f"{k}_fmeasure"]) for k in ("rouge1", "rouge2", "rougeL")) / 3
    assert math.isclose(float(got["mean"]), mean, rel_tol=1e-6)


def manual_nll(model, tok, text, max_length):
    ids = tok(text)["input_ids"][:max_length]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    total = 0.0
    for t in range(1, len(ids)):
        row = logits[t - 1]
        total += float(torch.log(torch.exp(row - row.max()).sum()) + row.max() - row[ids[t]])
    return total, len(ids) - 1


def test_perplexity_matches_manual(tiny_model):
    model, tok = tiny_model
    texts = ["The Eiffel Tower is located in the city of Paris.", "Rome.", "Michael Jordan plays the sport of "
             "basketball, and the capital of Japan is Tokyo.", "Apple was founded by Steve Jobs."]
    for max_length in (1024, 12):
        s, n = text_nll(model, tok, texts, batch_size=3, max_length=max_length)
        parts = [manual_nll(model, tok, t, max_length) for t in texts]
        assert n == sum(c for _, c in parts)
        assert math.isclose(s, sum(x for x, _ in parts), rel_tol=1e-5)
        m = TokenPerplexity()
        m.update(s, n)
        assert math.isclose(float(m.compute()), math.exp(sum(x for x, _ in parts) / n), rel_tol=1e-5)


def manual_greedy(model, tok, prompt, n):
    ids = tok(prompt)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
    return tok.decode([t for t in out if t != tok.eos_token_id])


def test_batched_generation_matches_one_at_a_time(tiny_model):
    model, tok = tiny_model
    model.generation_config.eos_token_id = None  # random weights: keep generating the full length
    prompts = ["The mother tongue of Danielle Darrieux is", "Rome", "Toyota is a company headquartered in Japan. Apple",
               "The capital of"]
    got = generate(model, tok, prompts, max_new_tokens=4, batch_size=3)
    assert got == [manual_greedy(model, tok, p, 4) for p in prompts]


# -- data files -----------------------------------------------------------------------------------------------------
def test_reference_files_load(data_dir):
    d = data_dir / "downstream"
    r = load_examples("reasoning", d / "test-reasoning.jsonl", 3)
    assert r[0].target == "18" and r[0].prompt.startswith("Q: Janet") and "####" not in r[0].prompt
    s = load_examples("summarization", d / "test-summarization.json", 2)
    assert s[0].prompt.endswith("\nTL;DR:") and s[0].target.startswith("A will go to the animal shelter")
    q = load_examples("qa", d / "test-OpenDomainQA.jsonl", 2)
    assert q[0].target == ["Wilhelm Conrad Röntgen"]
    assert q[0].prompt.startswith("Refer to the passage below and answer the following question. Passage: The first")
    assert q[0].prompt.endswith("Question: who got the first nobel prize in physics?. Answer:")
    n = load_examples("nli", d / "test-NLI.tsv", DEFAULT_N["nli"])
    assert len(n) == 299 and [e.target for e in n[:3]] == [False, True, True]
    for task, name in (("reasoning", "test-reasoning.jsonl"), ("summarization", "test-summarization.json"),
                       ("qa", "test-OpenDomainQA.jsonl")):
        assert len(load_examples(task, d / name, DEFAULT_N[task])) == DEFAULT_N[task]


def test_missing_or_short_data_is_named(tmp_path):
    with pytest.raises(DownstreamDataError, match="task 'qa': data file not found: '.*nope.jsonl'"):
        load_examples("qa", tmp_path / "nope.jsonl")
    p = tmp_path / "two.jsonl"
    p.write_text("\n".join(json.dumps({"question": "q", "answer": "x #### 1"}) for _ in range(2)))
    with pytest.raises(DownstreamDataError, match="has 2 examples, asked for 5"):
        load_examples("reasoning", p, 5)


def test_hub_style_records_adapt():
    rte = make_example("nli", {"premise": "p", "hypothesis": "h", "label": 0}, "hf")
    assert rte.target is True and rte.prompt.startswith("p entails the h.")
    squad = make_example("qa", {"question": "q", "answers": {"text": ["x"]}, "context": " ctx "}, "hf")
    assert squad.target == ["x"] and "Passage: ctx Question: q. Answer:" in squad.prompt
    with pytest.raises(DownstreamDataError, match="hf: none of the fields \\['output', 'passage', 'context'\\]"):
        make_example("qa", {"question": "q", "answer": ["x"]}, "hf")
