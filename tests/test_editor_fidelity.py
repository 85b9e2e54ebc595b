"""The paper's editors, faithfully: ROME's two key choices (averaged / original) and MEMIT's λ, on tiny random GPT-2
(Conv1D) and Llama (nn.Linear) models. Every check reads the editor's returned factors and the keys of the public
helpers, against keys, u and ρ computed independently here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from test_editors import FAST_HP, independent_key, random_spd, rewrite_name

from lit_prune.editors import MEMIT, ROME, presets
from lit_prune.editors.compute_ks import compute_k0, compute_ks
from lit_prune.requests import EditRequest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ["{}", "Hello there. {}", "Japan is a country in Asia, far away. {}"]
# subject at position 0: the bare prompt's key k₀ has no context and is far from the template average k̄
REQ = EditRequest(prompt="{} plays the sport of", subject="Michael Jordan", target_new="basketball", case_id=8)
def module_out(model, module: str, k: torch.Tensor) -> torch.Tensor:
    """W k (+ bias) of the edited module, written out per layout."""
    mod = model.get_submodule(module)
    w, b = mod.weight.detach().double(), getattr(mod, "bias", None)
    out = k.double() @ w if model.config.model_type == "gpt2" else w @ k.double()
    return out + b.detach().double() if b is not None else out


def delta_times(model, up, k: torch.Tensor) -> torch.Tensor:
    """ΔW k in the math orientation from the returned (stored-orientation) factors."""
    d = up.dense().double()
    return k.double() @ d if model.config.model_type == "gpt2" else d @ k.double()


def rome_edit(model, tok, key_mode: str, templates=TEMPLATES, C=None):
    ed = ROME(layers=1, context_templates=templates, key_mode=key_mode, **FAST_HP)
    C = random_spd(ed.matrices(model)[1].k_dim) if C is None else C
    ed.set_second_moment(model, 1, C)
    ups = ed.compute(model, tok, [REQ])
    return ed, ups[f"{rewrite_name(model, 1)}.weight"], C


def test_public_keys_match_independent_ones(tiny_model):
    model, tok = tiny_model
    module = rewrite_name(model, 1)
    torch.testing.assert_close(compute_k0(model, tok, REQ, module).double(),
                               independent_key(model, tok, module, REQ, ["{}"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compute_ks(model, tok, [REQ], TEMPLATES, module)[0].double(),
                               independent_key(model, tok, module, REQ, TEMPLATES), rtol=1e-4, atol=1e-5)


def test_original_keys_write_v_star_at_k0_and_overshoot_by_one_over_rho(tiny_model):
    model, tok = tiny_model
    module = rewrite_name(model, 1)
    k0 = independent_key(model, tok, module, REQ, ["{}"])
    kbar = independent_key(model, tok, module, REQ, TEMPLATES)
    ed, up, C = rome_edit(model, tok, "original")
    info = ed.last_info[0]
    assert up.rank == 1 and info["key_mode"] == "original" and ed.hparams(model).key_mode == "original"
    v_star = info["v_star"].double()
    u = torch.linalg.solve(C, kbar)
    rho = (u @ k0) / (u @ kbar)
    assert abs(info["rho"] - float(rho)) < 1e-4 * max(1.0, abs(float(rho)))
    need = v_star - module_out(model, module, k0)  # v* − W k₀
    torch.testing.assert_close(delta_times(model, up, k0), need, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(delta_times(model, up, kbar), need / rho, rtol=1e-4, atol=1e-5)
    # and only along u: ΔW k = 0 for every k with uᵀk = 0
    g = torch.Generator().manual_seed(1)
    ortho = torch.randn(k0.shape[0], generator=g, dtype=torch.float64)
    ortho -= (u @ ortho) / (u @ u) * u
    assert delta_times(model, up, ortho).abs().max() < 1e-5 * need.abs().max()


def test_averaged_keys_write_v_star_at_kbar(tiny_model):
    model, tok = tiny_model
    module = rewrite_name(model, 1)
    kbar = independent_key(model, tok, module, REQ, TEMPLATES)
    ed, up, _ = rome_edit(model, tok, "averaged")
    assert ed.last_info[0]["key_mode"] == "averaged" and ROME().hparams(model).key_mode == "averaged"
    v_star = ed.last_info[0]["v_star"].double()
    torch.testing.assert_close(delta_times(model, up, kbar), v_star - module_out(model, module, kbar),
                               rtol=1e-4, atol=1e-5)


def test_key_modes_differ_exactly_when_the_keys_differ(tiny_model):
    model, tok = tiny_model
    module = rewrite_name(model, 1)
    k0 = independent_key(model, tok, module, REQ, ["{}"])
    kbar = independent_key(model, tok, module, REQ, TEMPLATES)
    assert (k0 - kbar).norm() > 1e-2 * kbar.norm()
    ea, ua, C = rome_edit(model, tok, "averaged")
    eo, uo, _ = rome_edit(model, tok, "original", C=C)
    torch.testing.assert_close(ea.last_info[0]["v_star"], eo.last_info[0]["v_star"])  # same δ optimisation
    assert (ua.dense() - uo.dense()).norm() > 1e-3 * ua.dense().norm()
    # the bare prompt as the only template: k̄ = k₀ and both choices give the same update
    ea, ua, _ = rome_edit(model, tok, "averaged", templates=["{}"], C=C)
    eo, uo, _ = rome_edit(model, tok, "original", templates=["{}"], C=C)
    assert ea.last_info[0]["rho"] == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close(uo.dense(), ua.dense(), rtol=0, atol=0)


def test_bad_key_mode_is_named():
    with pytest.raises(ValueError, match=r"key_mode.*'r-rome'"):
        ROME(key_mode="r-rome")


def test_memit_single_layer_writes_s_over_one_plus_s(tiny_llama, tiny_tokenizer):
    """The d_k/λ rule of the presets: one request, one layer: ΔW k̄ = R · s/(1+s) with s = k̄ᵀC⁻¹k̄ / λ."""
    model, tok = tiny_llama, tiny_tokenizer
    module = rewrite_name(model, 1)
    kbar = independent_key(model, tok, module, REQ, TEMPLATES)
    C = random_spd(64, seed=2)
    for lam in (0.5, 5.0, 50.0):
        ed = MEMIT(layers=[1], context_templates=TEMPLATES, mom2_update_weight=lam, **FAST_HP)
        ed.set_second_moment(model, 1, C)
        up = ed.compute(model, tok, [REQ])[f"{module}.weight"]
        info = ed.last_info[0]
        R = (info["z"] - info["h"]).double()
        s = float(kbar @ torch.linalg.solve(C, kbar)) / lam
        torch.testing.assert_close(delta_times(model, up, kbar), R * s / (1 + s), rtol=1e-3, atol=1e-5)


def test_paper_configs_use_original_keys_and_presets_keep_paper_lambdas():
    for name in ("gpt2xl_rome_prune.yaml", "llama3_8b_rome_prune.yaml"):
        editor = yaml.safe_load((ROOT / "configs" / name).read_text())["model"]["editor"]
        assert editor["class_path"] == "lit_prune.editors.ROME"
        assert editor["init_args"]["key_mode"] == "original", name
        ROME(**editor["init_args"])
    assert presets.HPARAMS["gpt2-xl"]["memit"]["mom2_update_weight"] == 20000.0
    assert presets.HPARAMS["llama-2-7b"]["memit"]["mom2_update_weight"] == 15000.0
    assert presets.HPARAMS["llama-3-8b"]["memit"]["mom2_update_weight"] == 15000.0


@pytest.mark.parametrize("config, key_mode", [("default.yaml", "averaged"), ("gpt2xl_rome_prune.yaml", "original"),
                                              ("llama3_8b_rome_prune.yaml", "original")])
def test_run_config_records_the_key_mode(config, key_mode, capsys):
    import sys

    sys.path.insert(0, str(ROOT))
    from train import main

    with pytest.raises(SystemExit):
        main(["--config", str(ROOT / "configs" / config), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["editor"]["init_args"]["key_mode"] == key_mode


def test_memit_lambda_follows_the_key_dimension(tiny_model):
    """The embedded preset's λ (chosen by benchmarks/bench_memit_lambda.py) ≈ its d_k; a model without a preset gets
    the same d_k/λ."""
    model, _ = tiny_model
    assert presets.HPARAMS["smollm2-135m"]["memit"]["mom2_update_weight"] == 1500.0
    d_k = model.config.intermediate_size if model.config.model_type == "llama" else 4 * model.config.n_embd
    assert presets.mlp_dim(model) == d_k
    with pytest.warns(UserWarning, match="no hyper-parameter preset"):
        lam = MEMIT().hparams(model).mom2_update_weight
    assert lam == pytest.approx(1500.0 * d_k / 1536)
