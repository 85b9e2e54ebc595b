"""Second-moment statistics: hooks vs an independent per-text computation, padding, cache, ROME's npz layout,
data-parallel sums."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_prune import stats
from lit_prune.stats import SecondMoment, collect_second_moments, load_npz, save_npz, second_moments

TEXTS = [
    "The Eiffel Tower is located in the city of Paris.",
    "Rome.",
    "Michael Jordan plays the sport of basketball, and the capital of Japan is Tokyo.",
    "Toyota is a company headquartered in Japan.",
    "Apple was founded by Steve Jobs.",
]


def _module(model) -> list[str]:
    return ["transformer.h.1.mlp.c_proj"] if model.config.model_type == "gpt2" else ["model.layers.1.mlp.down_proj"]


def independent_mom2(model, tok, module: str, texts: list[str], max_length: int) -> tuple[torch.Tensor, int]:
    """Σ k kᵀ from one unpadded text at a time (no batching, no masking needed), float64."""
    mod = model.get_submodule(module)
    seen = []
    h = mod.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    total, count = None, 0
    try:
        for t in texts:
            ids = tok(t, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
            seen.clear()
            with torch.no_grad():
                model(input_ids=ids)
            k = seen[0][0].double()
            s = k.T @ k
            total = s if total is None else total + s
            count += k.shape[0]
    finally:
        h.remove()
    return total, count


@pytest.mark.parametrize("max_length", [64, 6])
def test_hooks_match_independent_computation(tiny_model, max_length):
    model, tok = tiny_model
    (module,) = _module(model)
    # a small token budget forces several padded batches of different lengths
    got = collect_second_moments(model, tok, [module], TEXTS, max_length=max_length, batch_tokens=40, progress=False)
    ref, count = independent_mom2(model, tok, module, TEXTS, max_length)
    assert got[module].count == count
    assert count == sum(min(len(tok(t)["input_ids"]), max_length) for t in TEXTS)
    torch.testing.assert_close(got[module].mom2, ref, rtol=1e-5, atol=1e-6)
    C = got[module].moment()
    assert C.dtype == torch.float64 and torch.allclose(C, C.T)


def test_all_layers_in_one_pass_and_early_stop(tiny_gpt2, tiny_tokenizer):
    """Two modules collected together equal each collected alone; the layer above the deepest one never runs."""
    mods = ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    ran = []
    h = tiny_gpt2.transformer.h[2].register_forward_pre_hook(lambda m, a: ran.append(1))
    both = collect_second_moments(tiny_gpt2, tiny_tokenizer, mods, TEXTS, progress=False)
    h.remove()
    assert not ran
    for m in mods:
        alone = collect_second_moments(tiny_gpt2, tiny_tokenizer, [m], TEXTS, progress=False)[m]
        torch.testing.assert_close(both[m].mom2, alone.mom2)


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "texts.txt"
    p.write_text("\n".join(TEXTS * 2))
    return str(p)


def test_cache_round_trip(tiny_llama, tiny_tokenizer, tmp_path, text_file, monkeypatch):
    (module,) = _module(tiny_llama)
    kw = dict(source=text_file, n_samples=8, max_length=32, stats_dir=tmp_path / "stats", model_name="tiny",
              progress=False)
    first = second_moments(tiny_llama, tiny_tokenizer, [module], **kw)[module]
    path = stats.stats_file(tmp_path / "stats", "tiny", text_file, module, "float32", 8, 32)
    assert path.is_file()
    with np.load(path) as d:  # ROME's keys
        assert {"mom2.mom2", "mom2.count", "count", "sample_size"} <= set(d.keys())
        assert int(d["mom2.count"]) == first.count and int(d["sample_size"]) == 8

    def fail(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(stats, "collect_second_moments", fail)
    again = second_moments(tiny_llama, tiny_tokenizer, [module], **kw)[module]
    assert again.count == first.count
    torch.testing.assert_close(again.mom2, first.mom2)
    # a different key (sample count) is not served from that file
    with pytest.raises(AssertionError, match="recomputed"):
        second_moments(tiny_llama, tiny_tokenizer, [module], **{**kw, "n_samples": 4})


def test_rome_npz_drops_in(tiny_gpt2, tiny_tokenizer, tmp_path, monkeypatch):
    """A file in ROME's layout and name (float32 sum, no max length in the name) is used as is."""
    module = "transformer.h.1.mlp.c_proj"
    k_dim = 128
    A = torch.randn(k_dim, k_dim, dtype=torch.float64)
    mom2 = (A @ A.T).float().numpy()
    path = stats.rome_stats_file(tmp_path, "gpt2-rome", "wikipedia", module, "float32", 100000)
    path.parent.mkdir(parents=True)
    np.savez(path, **{"mom2.mom2": mom2, "mom2.count": np.array(12345), "sample_size": np.array(100000),
                      "constructor": np.array("util.runningstats.CombinedStat(mom2=...)")})
    monkeypatch.setattr(stats, "collect_second_moments", lambda *a, **k: pytest.fail("should load ROME's file"))
    monkeypatch.setattr(stats, "load_texts", lambda *a, **k: pytest.fail("should not need texts"))
    got = second_moments(tiny_gpt2, tiny_tokenizer, [module], source="wikipedia", n_samples=100000,
                         stats_dir=tmp_path, model_name="gpt2-rome", progress=False)[module]
    assert got.count == 12345
    torch.testing.assert_close(got.moment(), torch.from_numpy(mom2).double() / 12345)


def test_npz_helpers_and_bad_file(tmp_path):
    st = SecondMoment(torch.eye(3, dtype=torch.float64) * 4, 2)
    save_npz(tmp_path / "a.npz", st, 7)
    back = load_npz(tmp_path / "a.npz")
    assert back.count == 2 and torch.equal(back.moment(), torch.eye(3, dtype=torch.float64) * 2)
    np.savez(tmp_path / "b.npz", other=np.zeros(2))
    with pytest.raises(ValueError, match="mom2.mom2"):
        load_npz(tmp_path / "b.npz")


def test_sample_count_clipped_to_source(tiny_gpt2, tiny_tokenizer, tmp_path, text_file):
    with pytest.warns(UserWarning, match="has 10 texts"):
        out = second_moments(tiny_gpt2, tiny_tokenizer, ["transformer.h.0.mlp.c_proj"], source=text_file,
                             n_samples=50, stats_dir=tmp_path, model_name="t", progress=False)
    assert (tmp_path / "t").exists() and out["transformer.h.0.mlp.c_proj"].count > 0
    assert stats.stats_file(tmp_path, "t", text_file, "transformer.h.0.mlp.c_proj", "float32", 10, 256).is_file()


def test_bad_arguments(tiny_gpt2, tiny_tokenizer):
    with pytest.raises(ValueError, match="n_samples"):
        second_moments(tiny_gpt2, tiny_tokenizer, ["transformer.h.0.mlp.c_proj"], n_samples=0)
    with pytest.raises(ValueError, match="not found"):
        collect_second_moments(tiny_gpt2, tiny_tokenizer, ["transformer.h.9.mlp.c_proj"], TEXTS)


def test_model_key():
    class Cfg:
        name_or_path = "/root/.cache/lit_prune/models/smollm2-135m"

    class M(torch.nn.Module):
        config = Cfg()

    assert stats.model_key(M()) == "smollm2-135m"
    Cfg.name_or_path = "meta-llama/Llama-2-7b-hf"
    assert stats.model_key(M()) == "meta-llama_Llama-2-7b-hf"


_WORKER = r'''
import os, sys, torch
sys.path.insert(0, sys.argv[3])
import torch.distributed as dist
from conftest import make_tokenizer, make_gpt2
from lit_prune.stats import collect_second_moments
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
tok = make_tokenizer(); model = make_gpt2(tok)
texts = sys.argv[4].split("|")
st = collect_second_moments(model, tok, ["transformer.h.1.mlp.c_proj"], texts, progress=False)
torch.save({"mom2": st["transformer.h.1.mlp.c_proj"].mom2, "count": st["transformer.h.1.mlp.c_proj"].count},
           sys.argv[5] + f".{rank}")
dist.destroy_process_group()
'''


def test_data_parallel_sums_match_single_process(tiny_gpt2, tiny_tokenizer, tmp_path):
    import subprocess

    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    tests_dir = str(Path(__file__).parent)
    out = str(tmp_path / "res")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "pg"), tests_dir, "|".join(TEXTS),
                               out], env=env) for r in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    single = collect_second_moments(tiny_gpt2, tiny_tokenizer, ["transformer.h.1.mlp.c_proj"], TEXTS,
                                    progress=False)["transformer.h.1.mlp.c_proj"]
    for r in range(2):
        got = torch.load(out + f".{r}")
        assert got["count"] == single.count
        torch.testing.assert_close(got["mom2"], single.mom2, rtol=1e-5, atol=1e-6)
