"""Shared fixtures: tiny randomly initialised GPT-2 and Llama models with an in-memory byte-level tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CORPUS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The mother tongue of Danielle Darrieux is French.",
    "Michael Jordan plays the sport of basketball.",
    "The capital of Italy is Rome, and the capital of Japan is Tokyo.",
    "Toyota is a company headquartered in Japan. Apple was founded by Steve Jobs.",
    "English, German, Spanish, Islam, Christianity, Manila, Beirut, London, Berlin.",
]


def make_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style: leading spaces are part of tokens), trained in memory."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return tok


def make_gpt2(tok, n_layer: int = 3, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=n_layer, n_head=4,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    return GPT2LMHeadModel(cfg).eval().requires_grad_(False)


def make_llama(tok, n_layer: int = 3, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_llama_dir(tmp_path, tiny_tokenizer) -> str:
    """A saved tiny Llama (``make_llama``) with its tokenizer: a folder any model loader of the project accepts."""
    d = tmp_path / "tiny-llama"
    make_llama(tiny_tokenizer).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return str(d)


@pytest.fixture
def tiny_gpt2(tiny_tokenizer):
    return make_gpt2(tiny_tokenizer)


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    return make_llama(tiny_tokenizer)


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request, tiny_tokenizer):
    """(model, tokenizer) for each tiny architecture."""
    make = make_gpt2 if request.param == "gpt2" else make_llama
    return make(tiny_tokenizer), tiny_tokenizer


def shared_data_dir() -> Path | None:
    """The read-only test data (CounterFact, ZsRE, downstream sets): $LIT_PRUNE_DATA or ../shared/data."""
    p = Path(os.environ.get("LIT_PRUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    return p if p.is_dir() else None


@pytest.fixture(scope="session")
def data_dir():
    d = shared_data_dir()
    if d is None:
        pytest.skip("shared test data not found (set LIT_PRUNE_DATA)")
    return d


@pytest.fixture(scope="session")
def smollm():
    """The real embedded SmolLM2-135M (converted once into the cache). For tests marked slow."""
    from lit_prune.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def one_thread():
    """Tiny matrices: multi-threaded LAPACK only adds overhead (and stalls on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
