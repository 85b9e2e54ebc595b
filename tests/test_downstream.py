"""Downstream tasks: scorers on hand-made cases, ROUGE vs torchmetrics, perplexity and generation vs manual loops."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torchmetrics.text.rouge import ROUGEScore

from lit_prune.metrics.downstream import (
    GenerationAccuracy,
    NLIAccuracy,
    QAAccuracy,
    RougeF1,
    TokenPerplexity,
    fit_prompt,
    generate,
    gold_answer_nll,
    new_task_metric,
    task_values,
    text_nll,
    update_task_metric,
)
from lit_prune.metrics.tasks import (
    DEFAULT_N,
    DownstreamDataError,
    gsm8k_answer,
    load_examples,
    make_example,
    normalize_answer,
    parse_true_false,
    qa_exact_match,
    reasoning_correct,
    score_generations,
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
    # per example: the mean of the three F1s of torchmetrics on that example alone, in update order
    one = [sum(float(ROUGEScore(rouge_keys=("rouge1", "rouge2", "rougeL"))([p], [r])[f"{k}_fmeasure"])
               for k in ("rouge1", "rouge2", "rougeL")) / 3 for p, r in zip(preds, refs)]
    assert ours.per_example().tolist() == pytest.approx(one, rel=1e-6)
    assert float(ours.per_example().mean()) == pytest.approx(mean, rel=1e-6)
    empty = RougeF1()
    empty.update([], [])
    assert empty.per_example().shape == (0,) and int(empty.compute()["n"]) == 0


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


# -- NLI and QA: parseable answers and likelihood scores beside the reference score --------------------------------
def manual_answer_nll(model, tok, prompt, answer):
    """Length-normalised NLL of " " + answer after the prompt: one forward over prompt + answer, log-softmax by hand."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(" " + answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p + a])).logits[0].double()
    rows = logits[len(p) - 1 : len(p) - 1 + len(a)]
    logz = torch.log(torch.exp(rows - rows.max(-1, keepdim=True).values).sum(-1)) + rows.max(-1).values
    return float((logz - rows[torch.arange(len(a)), torch.tensor(a)]).mean())


NLI_RECORDS = [("The tower is in Paris.", "The tower is in France.", "entailment"),
               ("Michael Jordan plays basketball.", "Jordan plays football.", "not_entailment"),
               ("Toyota is a company headquartered in Japan.", "Toyota is Japanese.", "entailment"),
               ("The capital of Italy is Rome.", "Rome is in Japan.", "not_entailment"),
               ("Apple was founded by Steve Jobs.", "Steve Jobs founded Apple.", "entailment")]


def test_nli_values_match_an_independent_computation(tiny_model):
    model, tok = tiny_model
    exs = [make_example("nli", {"sentence1": a, "sentence2": b, "label": lab}, "t") for a, b, lab in NLI_RECORDS]
    m = new_task_metric("nli")
    update_task_metric(m, "nli", model, tok, exs[:2], batch_size=2)  # two shards, one metric: states add up
    update_task_metric(m, "nli", model, tok, exs[2:], batch_size=2)
    got = task_values("nli", m.compute())

    gens = generate(model, tok, [e.prompt for e in exs], max_new_tokens=1)
    answers = [parse_true_false(g) for g in gens]
    correct = [a is e.target for a, e in zip(answers, exs)]
    likelier_true = [manual_answer_nll(model, tok, e.prompt, "True") < manual_answer_nll(model, tok, e.prompt, "False")
                     for e in exs]
    assert list(got)[0] == "nli" and got["nli"] == pytest.approx(sum(correct) / 5)
    assert got["nli_n"] == 5 and got["nli_correct"] == sum(correct)
    assert got["nli_parseable"] == sum(a is not None for a in answers)
    assert got["nli_likelihood"] == pytest.approx(sum(t == e.target for t, e in zip(likelier_true, exs)) / 5)
    assert ("nli_accuracy_parseable" in got) == (got["nli_parseable"] > 0)


def test_qa_values_match_an_independent_computation(tiny_model):
    model, tok = tiny_model
    recs = [("Where is the Eiffel Tower?", ["Paris", "the city of Paris"], "The Eiffel Tower is in Paris."),
            ("Who founded Apple?", ["Steve Jobs"], "Apple was founded by Steve Jobs."),
            ("What does Jordan play?", ["basketball", " "], "Michael Jordan plays the sport of basketball.")]
    exs = [make_example("qa", {"question": q, "answer": a, "output": [p]}, "t") for q, a, p in recs]
    m = new_task_metric("qa")
    update_task_metric(m, "qa", model, tok, exs, batch_size=2)
    got = task_values("qa", m.compute())

    gens = generate(model, tok, [e.prompt for e in exs], max_new_tokens=20)
    gold = [min(manual_answer_nll(model, tok, e.prompt, a) for a in e.target if a.strip()) for e in exs]
    assert got["qa_n"] == 3 and got["qa"] == pytest.approx(sum(qa_exact_match(g, e.target) for g, e in zip(gens, exs))
                                                           / 3)
    assert got["qa_parseable"] == sum(bool(normalize_answer(g)) for g in gens)
    assert got["qa_gold_nll"] == pytest.approx(sum(gold) / 3, rel=1e-5)


def test_gold_nll_cuts_long_prompts_from_the_left(tiny_llama, tiny_tokenizer):
    """A prompt longer than the budget is scored on its last tokens, as generation sees it."""
    model, tok = tiny_llama, tiny_tokenizer
    ex = make_example("qa", {"question": "Who founded Apple?", "answer": ["Steve Jobs"],
                             "output": [" ".join(["The Eiffel Tower is located in the city of Paris."] * 6)]}, "t")
    n_answer = len(tok(" Steve Jobs", add_special_tokens=False)["input_ids"])
    cut = fit_prompt(tok, ex.prompt, 40 - n_answer)
    assert len(tok(cut, add_special_tokens=False)["input_ids"]) <= 40 - n_answer + 1 and ex.prompt.endswith(cut[-30:])
    assert float(gold_answer_nll(model, tok, [ex], max_length=40)[0]) == pytest.approx(
        manual_answer_nll(model, tok, cut, "Steve Jobs"), rel=1e-5)


def test_nli_and_qa_metrics_by_hand_and_across_shards():
    nli = NLIAccuracy()
    nli.update([True, False, False, False], [True, True, False, False], [True, True, False, True])
    assert task_values("nli", nli.compute()) == {"nli": 0.25, "nli_correct": 1.0, "nli_n": 4.0, "nli_parseable": 2.0,
                                                 "nli_accuracy_parseable": 0.5, "nli_likelihood": 0.75}
    a, b = NLIAccuracy(), NLIAccuracy()
    a.update([True], [True], [True])
    b.update([False, False, False], [True, False, False], [True, False, True])
    a.merge_state(b)  # the states' reduce functions, as a multi-rank sync applies them
    assert task_values("nli", a.compute()) == task_values("nli", nli.compute())

    qa = QAAccuracy()
    qa.update([True, False, False], [True, True, False], [0.5, float("nan"), 2.5])
    assert task_values("qa", qa.compute()) == {"qa": pytest.approx(1 / 3), "qa_correct": 1.0, "qa_n": 3.0,
                                               "qa_parseable": 2.0, "qa_accuracy_parseable": 0.5, "qa_gold_nll": 1.5}
    none = NLIAccuracy()
    none.update([False], [False], [True])
    assert "nli_accuracy_parseable" not in task_values("nli", none.compute())  # nothing parsed: no such rate
    with pytest.raises(ValueError, match="NLIAccuracy: 1 parsed flags for 2 examples"):
        NLIAccuracy().update([True, False], [True], [True, True])
    with pytest.raises(ValueError, match="QAAccuracy: 1 gold-answer NLLs for 2 examples"):
        QAAccuracy().update([True, False], [True, True], [0.1])


def test_every_task_reports_its_count(tiny_llama, tiny_tokenizer):
    model, tok = tiny_llama, tiny_tokenizer
    data = {"reasoning": [make_example("reasoning", {"question": "q", "answer": "1 + 1 #### 2"}, "t")] * 3,
            "summarization": [make_example("summarization", {"dialogue": "A: hi", "summary": "A greets."}, "t")] * 2,
            "perplexity": ["The capital of Italy is Rome.", "Apple was founded by Steve Jobs.", "Rome."]}
    for task, exs in data.items():
        m = new_task_metric(task)
        update_task_metric(m, task, model, tok, exs, max_new_tokens=2)
        got = task_values(task, m.compute())
        assert list(got)[0] == task and got[f"{task}_n"] == len(exs), task
    s, n = text_nll(model, tok, data["perplexity"])
    assert got["perplexity"] == pytest.approx(math.exp(s / n)) and got["perplexity_tokens"] == n


def _nli_qa_rank(rank: int, port: int, shards: list, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        nli, qa = NLIAccuracy(), QAAccuracy()
        nli.update(*shards[rank][0])
        qa.update(*shards[rank][1])
        torch.save({**task_values("nli", nli.compute()), **task_values("qa", qa.compute())},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_nli_and_qa_reduce_over_two_processes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    nli = ([True, False, True, False, False], [True, True, True, False, False], [True, False, True, True, False])
    qa = ([True, False, False], [True, True, False], [0.5, float("nan"), 2.0])
    shards = [([x[:1] for x in nli], [x[:2] for x in qa]), ([x[1:] for x in nli], [x[2:] for x in qa])]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_nli_qa_rank, args=(port, shards, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    single_nli, single_qa = NLIAccuracy(), QAAccuracy()
    single_nli.update(*nli)
    single_qa.update(*qa)
    want = {**task_values("nli", single_nli.compute()), **task_values("qa", single_qa.compute())}
    assert want["nli_parseable"] == 3 and want["qa_gold_nll"] == 1.25
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rank{rank}.pt") == pytest.approx(want)
