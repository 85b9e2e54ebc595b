"""The one text layer (lit_prune.text): the tokens ROME, MEMIT and MEND optimise are the tokens the metrics score.

Three tokenizer styles, built in memory: GPT-2 (byte-level BPE, no BOS), Llama-2 (SentencePiece-style BPE with a
word-boundary marker and BOS) and Llama-3 (byte-level BPE with BOS). The check is independent of the helpers: the
editor's own optimisation row is run through the model and its NLL at the editor's loss positions must equal the
metric's score of the same (prompt, answer); the row must decode to the prompt, with BOS exactly once for the
tokenizers that add it.
"""

from __future__ import annotations

import pytest
import torch

from conftest import CORPUS, make_gpt2, make_llama, make_tokenizer
from lit_prune.editors import MEMIT, ROME
from lit_prune.metrics.scoring import score_answers
from lit_prune.requests import EditRequest
from lit_prune.text import answer_ids, answer_nll, pad_batch, prefers, prompt_answer_batch, special_prefix, token_accuracy
from test_editors import FAST_HP, random_spd

TEMPLATES = ["{}", "Hello there. {}", "Japan is a country in Asia, far away. {}"]
# multi-token answers (at least two tokens with every tokenizer here); one subject at the prompt's start
REQS = [
    EditRequest(prompt="The capital of {} is", subject="Italy", target_new="Rome and Tokyo", target_true="Rome"),
    EditRequest(prompt="{} plays the sport of", subject="Michael Jordan", target_new="German basketball",
                target_true="basketball"),
    # "English" never follows a space in the corpus: the byte-level tokenizers give a lone space token "Ġ" first
    EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English",
                target_true="French"),
]


def _with_bos(tokenizer, bos: str):
    from tokenizers import processors

    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return tokenizer


def llama2_style():
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(CORPUS * 4, vocab_size=300, min_frequency=1, special_tokens=["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=_with_bos(sp._tokenizer, "<s>"), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", pad_token="</s>")


def llama3_style():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=400, min_frequency=1,
                            special_tokens=["<|begin_of_text|>", "<|end_of_text|>"])
    return PreTrainedTokenizerFast(tokenizer_object=_with_bos(bpe._tokenizer, "<|begin_of_text|>"),
                                   bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


STYLES = {"gpt2": (make_tokenizer, make_gpt2, False), "llama2": (llama2_style, make_llama, True),
          "llama3": (llama3_style, make_llama, True)}


@pytest.fixture(scope="module", params=sorted(STYLES))
def world(request):
    make_tok, make_model, has_bos = STYLES[request.param]
    tok = make_tok()
    return make_model(tok), tok, has_bos


def row_nll(model, row: list[int], positions: list[tuple[int, int]]) -> float:
    """Mean −log P(target | row) at (position, target) pairs, from one plain forward of ``row``."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([row])).logits[0].double(), -1)
    return float(-sum(logp[p, t] for p, t in positions) / len(positions))


def test_bos_rule(world):
    model, tok, has_bos = world
    assert (special_prefix(tok) == [tok.bos_token_id]) == has_bos
    assert special_prefix(tok) == ([] if not has_bos else [tok.bos_token_id])


@pytest.mark.parametrize("editor", ["rome", "memit"])
def test_tokens_optimised_are_tokens_scored(world, editor):
    model, tok, has_bos = world
    ed = (ROME(layers=1, context_templates=TEMPLATES, mom2_adjustment=False, **FAST_HP) if editor == "rome"
          else MEMIT(layers=[1], context_templates=TEMPLATES, batch_z=False, **FAST_HP))
    if editor == "memit":
        ed.set_second_moment(model, 1, random_spd(ed.matrices(model)[1].k_dim))
    ed.compute(model, tok, REQS)
    assert len(ed.last_info) == len(REQS)
    for info, r in zip(ed.last_info, REQS):
        ps = info["prompts"]
        scored = score_answers(model, tok, [r.full_prompt], [r.target_new])
        target = scored.answer_ids[0].tolist()
        assert ps.target == target and len(target) >= 2, "multi-token answers are optimised token for token"
        for row in range(ps.n_rewrite):
            ids, plen = ps.ids[row], ps.prompt_len[row]
            assert ids[plen:] == target[:-1]
            assert tok.decode(ids[:plen], skip_special_tokens=True).strip().endswith(r.full_prompt)
            bos = [i for i in ids if i == tok.bos_token_id] if has_bos else []
            assert ids[: len(bos)] == bos and len(bos) == int(has_bos), "BOS exactly once, first"
        # the bare-prompt row is the metric's (prompt, answer): same NLL from the editor's own row and positions
        positions = [(p, t) for row, p, t in ps.loss_positions() if row == 0]
        assert [t for _, t in positions] == target
        full_row = ps.ids[0] + target[-1:]
        assert row_nll(model, full_row, positions) == pytest.approx(float(scored.nll[0]), rel=1e-5, abs=1e-6)


def test_mend_rows_are_the_scored_tokens(world):
    """MEND trains on and differentiates prompt_answer_batch rows: labels = the scored answer ids, NLL equal."""
    model, tok, _ = world
    prompts = [r.full_prompt for r in REQS] + ["Rome"]
    answers = [r.target_new for r in REQS] + ["is the capital of Italy"]
    ids, mask, labels = prompt_answer_batch(tok, prompts, answers)
    scored = score_answers(model, tok, prompts, answers)
    for i in range(len(prompts)):
        assert labels[i][labels[i] != -100].tolist() == scored.answer_ids[i].tolist()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(answer_nll(logits, labels), scored.nll, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(token_accuracy(logits, labels), scored.accuracy)


def test_padding_sides_give_the_same_positions():
    ids, mask, pos, off = pad_batch([[5, 6, 7], [8]], pad=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and off == [0, 2]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask, pos, off = pad_batch([[5, 6, 7], [8]], pad=9, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and off == [0, 0] and pos[1, 0] == 0
    with pytest.raises(ValueError, match="padding side must be 'left' or 'right', got 'top'"):
        pad_batch([[1]], 0, "top")


def test_answer_ids_keep_real_spaces_and_drop_artefacts(world):
    """Byte-level: a lone "Ġ" before a word is a real character and is kept; SentencePiece: one boundary marker."""
    _, tok, _ = world
    ids = answer_ids(tok, "English")
    pieces = tok.convert_ids_to_tokens(ids)
    if pieces[0].startswith("▁"):
        assert pieces[0] != "▁" and tok.decode(ids).strip() == "English"
    else:
        assert tok.decode(ids) == " English"
    # the prompt's own tokens followed by the answer's are what the model sees for "prompt answer"
    joint = tok("is English", add_special_tokens=False)["input_ids"]
    assert joint[-len(ids):] == ids


def test_empty_answer_is_named():
    tok = make_tokenizer()
    with pytest.raises(ValueError, match=r"row 1: answer ' ' for prompt 'b' has no tokens"):
        prompt_answer_batch(tok, ["a", "b"], ["x", " "])
    assert answer_ids(tok, "Rome") == tok(" Rome", add_special_tokens=False)["input_ids"]


def test_prefers_against_probabilities():
    a, b = torch.tensor([0.1, 2.0, 1.0]), torch.tensor([0.5, 1.0, 1.0])
    assert prefers(a, b).tolist() == [1.0, 0.0, 0.0]
    torch.testing.assert_close(prefers(a, b, magnitude=True), (torch.exp(-a) - torch.exp(-b)).double())
