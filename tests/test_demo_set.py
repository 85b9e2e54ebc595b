"""The bundled demo edit set: well-formed CounterFact-style records about facts the embedded model knows."""

from __future__ import annotations

import json

import pytest
import torch

from lit_prune.data.formats import demo_path, load_requests


@pytest.fixture(scope="module")
def demo():
    return load_requests("demo")


def test_demo_set_loads_and_is_well_formed(demo):
    raw = json.loads(demo_path().read_text(encoding="utf-8"))
    assert len(demo) == len(raw)
    assert 30 <= len(demo) <= 50
    ids = [r.case_id for r in demo]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids)
    assert len({(r.subject, r.prompt) for r in demo}) == len(demo), "duplicate (subject, relation) pair"
    for r in demo:
        where = f"case {r.case_id} ({r.subject})"
        assert r.prompt.count("{}") == 1 and r.subject in r.full_prompt, where
        assert r.target_true and r.target_new, where
        assert r.target_true.strip().lower() != r.target_new.strip().lower(), where
        assert r.target_true == r.target_true.strip() and r.target_new == r.target_new.strip(), where
        # prompts end right before the object: no trailing space or punctuation
        for p in [r.full_prompt, *r.paraphrase_prompts, *r.neighborhood_prompts]:
            assert p == p.strip() and p[-1].isalnum(), f"{where}: {p!r}"
        assert 1 <= len(r.paraphrase_prompts) <= 2, where
        assert all(r.subject in p for p in r.paraphrase_prompts), where
        assert r.full_prompt not in r.paraphrase_prompts, where
        assert 2 <= len(r.neighborhood_prompts) <= 3 and not r.neighborhood_answers, where
        assert all(r.subject.lower() not in p.lower() for p in r.neighborhood_prompts), where


def _answer_nll(model, tok, prompt: str, answers: list[str]) -> torch.Tensor:
    """Mean NLL of the tokens of ``" " + answer`` after ``prompt``, one forward pass per answer; ``[len(answers)]``."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    out = []
    for a in answers:
        t = tok(" " + a, add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([p + t])).logits[0].float()
        out.append(torch.nn.functional.cross_entropy(logits[len(p) - 1:-1], torch.tensor(t)))
    return torch.stack(out)


@pytest.mark.slow
@torch.no_grad()
def test_embedded_model_knows_most_true_objects(smollm, demo):
    model, tok = smollm
    model.eval()
    known = []
    for r in demo:
        nll_true, nll_new = _answer_nll(model, tok, r.full_prompt, [r.target_true, r.target_new])
        if nll_true < nll_new:
            known.append(r.case_id)
    assert len(known) >= 0.75 * len(demo), f"model prefers the true object on only {len(known)}/{len(demo)} records"
