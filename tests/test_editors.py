"""ROME / MEMIT / FT on tiny random GPT-2 (Conv1D) and Llama (nn.Linear) models: closed-form properties checked
against independent computations, fast vs plain δ forward, errors; one slow test on the embedded model."""

from __future__ import annotations


import pytest
import torch

from lit_prune.editors import FT, MEMIT, ROME, EditError, LowRankUpdate, apply_updates, presets
from lit_prune.editors.compute_v import optimize_delta
from lit_prune.editors.delta_forward import DeltaForward
from lit_prune.editors.hparams import DeltaHParams
from lit_prune.editors.ft import dense_as_low_rank
from lit_prune.editors.memit import memit_key_solve
from lit_prune.editors.tokens import CONTEXT_TEMPLATES, generate_context_templates, prompt_set
from lit_prune.requests import EditRequest, EditRequestError

TEMPLATES = ["{}", "Hello there. {}", "Japan is a country in Asia, far away. {}"]
REQS = [
    EditRequest(prompt="The Eiffel Tower is located in the city of {}, which is", subject="Paris",
                target_new="Rome Tokyo", target_true="France", case_id=7),
    EditRequest(prompt="{} plays the sport of", subject="Michael Jordan", target_new="basketball", case_id=8),
]
FAST_HP = dict(v_lr=0.05, v_num_grad_steps=6, v_weight_decay=0.01, clamp_norm_factor=4.0)


def rewrite_name(model, layer: int) -> str:
    return f"transformer.h.{layer}.mlp.c_proj" if model.config.model_type == "gpt2" else f"model.layers.{layer}.mlp.down_proj"


def random_spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    return A @ A.T / (3 * n)


def math_W(model, module: str) -> torch.Tensor:
    """(v_dim, k_dim) float64 weight, transposing GPT-2's Conv1D by hand."""
    w = model.get_submodule(module).weight.detach().double()
    return w.T if model.config.model_type == "gpt2" else w


def module_out(model, module: str, k: torch.Tensor) -> torch.Tensor:
    """Output of the edited module for key k, written out per layout (not through EditedMatrix)."""
    mod = model.get_submodule(module)
    w, b = mod.weight.detach().double(), getattr(mod, "bias", None)
    out = k.double() @ w if model.config.model_type == "gpt2" else w @ k.double()
    return out + b.detach().double() if b is not None else out


def independent_key(model, tok, module: str, req: EditRequest, templates: list[str]) -> torch.Tensor:
    """k* by ROME's rule: last token of tok(prefix + subject), one unpadded prompt at a time."""
    mod = model.get_submodule(module)
    keys, seen = [], []
    h = mod.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        for t in templates:
            text = t.replace("{}", req.prompt).format(req.subject)
            idx = len(tok(t.split("{}")[0] + req.prompt.split("{}")[0] + req.subject)["input_ids"]) - 1
            seen.clear()
            with torch.no_grad():
                model(input_ids=tok(text, return_tensors="pt")["input_ids"])
            keys.append(seen[0][0, idx].double())
    finally:
        h.remove()
    return torch.stack(keys).mean(0)


# -- ROME -------------------------------------------------------------------------------------------------------------
def test_rome_maps_key_to_value_in_stored_orientation(tiny_model):
    model, tok = tiny_model
    module = rewrite_name(model, 1)
    ed = ROME(layers=1, context_templates=TEMPLATES, **FAST_HP)
    k_dim = ed.matrices(model)[1].k_dim
    C = random_spd(k_dim)
    ed.set_second_moment(model, 1, C)
    W0 = model.get_submodule(module).weight.detach().clone()
    ups = ed.compute(model, tok, [REQS[0]])
    assert torch.equal(model.get_submodule(module).weight, W0), "compute must not change the weights"
    (name,) = ups
    assert name == f"{module}.weight"
    up = ups[name]
    assert up.shape == tuple(W0.shape) and up.rank == 1 and up.is_finite()
    if model.config.model_type == "gpt2":  # Conv1D stored (in, out): A is over the key (in) dimension
        assert up.A.shape == (k_dim, 1)
    else:
        assert up.B.shape == (k_dim, 1)

    info = ed.last_info[0]
    k_star = independent_key(model, tok, module, REQS[0], TEMPLATES)
    torch.testing.assert_close(info["k_star"].double(), k_star, rtol=1e-4, atol=1e-5)
    v_star = info["v_star"].double()
    # the closed form, computed independently: ΔW = (v* − W k*) (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*)
    u = torch.linalg.solve(C, k_star)
    expected = torch.outer(v_star - module_out(model, module, k_star), u) / (u @ k_star)
    got = up.dense().double()
    got_math = got.T if model.config.model_type == "gpt2" else got
    torch.testing.assert_close(got_math, expected, rtol=2e-4, atol=1e-6)

    apply_updates(model, ups)
    torch.testing.assert_close(module_out(model, module, k_star), v_star, rtol=1e-4, atol=1e-5)


def test_rome_sequential_batch_equals_one_by_one(tiny_llama, tiny_tokenizer):
    model, tok = tiny_llama, tiny_tokenizer
    ed = ROME(layers=1, context_templates=TEMPLATES, **FAST_HP)
    ed.set_second_moment(model, 1, random_spd(ed.matrices(model)[1].k_dim))
    both = ed.compute(model, tok, REQS)
    (name,) = both
    assert both[name].rank == 2
    first = ed.compute(model, tok, REQS[:1])
    apply_updates(model, first)
    second = ed.compute(model, tok, REQS[1:])
    torch.testing.assert_close(both[name].dense(), LowRankUpdate.concat([first[name], second[name]]).dense(),
                               rtol=1e-4, atol=1e-6)


def test_rome_without_mom2_adjustment_uses_key(tiny_gpt2, tiny_tokenizer):
    """mom2_adjustment=False: u = k*, so ΔW k = 0 for every key orthogonal to k* (no statistics needed)."""
    ed = ROME(layers=0, context_templates=TEMPLATES, mom2_adjustment=False, **FAST_HP)
    ups = ed.compute(tiny_gpt2, tiny_tokenizer, REQS[:1])
    d = ups["transformer.h.0.mlp.c_proj.weight"].dense().double()  # (k_dim, v_dim)
    k = ed.last_info[0]["k_star"].double()
    ortho = torch.randn(k.shape[0], dtype=torch.float64)
    ortho -= (ortho @ k) / (k @ k) * k
    assert (ortho @ d).abs().max() < 1e-6 * d.abs().max()


def test_delta_optimisation_computes_no_weight_gradients(tiny_gpt2, tiny_tokenizer):
    """A trainable model (requires_grad=True) is edited without weight gradients: no .grad left, flags restored."""
    tiny_gpt2.requires_grad_(True)
    tiny_gpt2.transformer.wte.weight.requires_grad_(False)
    ed = ROME(layers=0, context_templates=TEMPLATES, mom2_adjustment=False, **FAST_HP)
    ed.compute(tiny_gpt2, tiny_tokenizer, REQS[:1])
    assert ed.last_info[0]["steps"] > 1
    assert all(p.grad is None for p in tiny_gpt2.parameters())
    flags = {n: p.requires_grad for n, p in tiny_gpt2.named_parameters()}
    assert not flags.pop("transformer.wte.weight") and all(flags.values())


@pytest.mark.parametrize("where", ["mlp", "layer"])
@pytest.mark.parametrize("loss_layer", [None, 1])
def test_fast_forward_equals_plain(tiny_model, where, loss_layer):
    model, tok = tiny_model
    arch = presets.arch_templates(model)
    for req in REQS:
        ps = prompt_set(tok, req, TEMPLATES)
        fast = DeltaForward(model, arch, ps, 1, where, loss_layer, True, tok.pad_token_id)
        plain = DeltaForward(model, arch, ps, 1, where, loss_layer, False, tok.pad_token_id)
        grads = []
        for f in (fast, plain):
            d = torch.randn(32, generator=torch.Generator().manual_seed(1)).requires_grad_()
            with torch.enable_grad():
                out = f(d)
                (out[0].sum() + (out[1].exp() * out[1]).sum()).backward()
            grads.append((out, d.grad))
        (a, ga), (b, gb) = grads
        for x, y in zip(a, b):
            torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-4, atol=1e-4)
        # (δ itself is not compared after Adam steps: Adam turns rounding noise in near-zero gradient entries into
        # ±lr steps; the value and its gradient are what the optimisation sees)
        torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-3 * float(gb.abs().max()))


def test_delta_is_clamped_and_lowers_the_loss(tiny_llama, tiny_tokenizer):
    arch = presets.arch_templates(tiny_llama)
    ps = prompt_set(tiny_tokenizer, REQS[1], TEMPLATES)
    fwd = DeltaForward(tiny_llama, arch, ps, 1, "mlp", None, True, tiny_tokenizer.pad_token_id)
    res = optimize_delta(fwd, DeltaHParams(v_num_grad_steps=15, v_lr=0.05, v_weight_decay=0.0,
                                           clamp_norm_factor=0.5))
    assert res.delta.norm() <= 0.5 * res.v_init.norm() * (1 + 1e-5)
    assert res.losses[-1] < res.losses[0]


# -- MEMIT ------------------------------------------------------------------------------------------------------------
def test_memit_key_solve_matches_direct_solve():
    C = random_spd(20, seed=3)
    K = torch.randn(20, 4, dtype=torch.float64)
    lam = 7.0
    L = torch.linalg.cholesky(C)
    got = memit_key_solve(lambda x: torch.cholesky_solve(x, L), K, lam)
    torch.testing.assert_close(got, torch.linalg.solve(lam * C + K @ K.T, K))


def layer_out(model, tok, module: str, reqs) -> torch.Tensor:
    """(hidden, n) output of ``module`` at the subject's last token of each bare prompt (ROME's token rule)."""
    mod = model.get_submodule(module)
    cols = []
    for r in reqs:
        seen = []
        h = mod.register_forward_hook(lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).detach()))
        with torch.no_grad():
            model(input_ids=tok(r.prompt.format(r.subject), return_tensors="pt")["input_ids"])
        h.remove()
        idx = len(tok(r.prompt.split("{}")[0] + r.subject)["input_ids"]) - 1
        cols.append(seen[0][0, idx].double())
    return torch.stack(cols, 1)


def test_memit_update_solves_normal_equations(tiny_model):
    model, tok = tiny_model
    lam = 3.0
    ed = MEMIT(layers=[0, 1], context_templates=TEMPLATES, mom2_update_weight=lam, **FAST_HP)
    Cs = {}
    for layer in (0, 1):
        Cs[layer] = random_spd(ed.matrices(model)[layer].k_dim, seed=layer)
        ed.set_second_moment(model, layer, Cs[layer])
    zs = ed.compute_zs(model, tok, REQS, TEMPLATES)
    ups = ed.compute(model, tok, REQS)
    layer_tmp = "transformer.h.{}" if model.config.model_type == "gpt2" else "model.layers.{}"
    for i, layer in enumerate((0, 1)):
        module = rewrite_name(model, layer)
        up = ups[f"{module}.weight"]
        assert up.rank == len(REQS) and up.is_finite()
        K = torch.stack([independent_key(model, tok, module, r, TEMPLATES) for r in REQS], 1)
        R = (zs - layer_out(model, tok, layer_tmp.format(1), REQS)) / (2 - i)
        D = up.dense().double()
        D = D.T if model.config.model_type == "gpt2" else D
        torch.testing.assert_close(D @ (lam * Cs[layer] + K @ K.T), R @ K.T, rtol=1e-3, atol=1e-5)
        apply_updates(model, {f"{module}.weight": up})  # the next layer's keys and residual see this update


def test_memit_batch_moves_the_hidden_state_to_z(tiny_llama, tiny_tokenizer):
    """With a tiny λ the single-layer update reaches z exactly (KKᵀ dominates λC)."""
    model, tok = tiny_llama, tiny_tokenizer
    ed = MEMIT(layers=[1], context_templates=["{}"], mom2_update_weight=1e-6, **FAST_HP)
    ed.set_second_moment(model, 1, random_spd(64))
    zs = ed.compute_zs(model, tok, REQS, ["{}"])
    apply_updates(model, ed.compute(model, tok, REQS))
    torch.testing.assert_close(layer_out(model, tok, "model.layers.1", REQS), zs, rtol=1e-3, atol=1e-4)


# -- FT ---------------------------------------------------------------------------------------------------------------
def test_ft_is_bounded_exact_and_fits(tiny_model):
    model, tok = tiny_model
    ft = FT(layers=1, num_steps=10, lr=1e-2, norm_constraint=2e-2)
    W0 = model.get_submodule(rewrite_name(model, 1)).weight.detach().clone()
    ups = ft.compute(model, tok, REQS)
    up = ups[f"{rewrite_name(model, 1)}.weight"]
    assert up.rank == min(W0.shape) and up.shape == tuple(W0.shape)
    D = up.dense()
    assert D.abs().max() <= 2e-2 + 1e-7 and D.abs().max() > 1e-3
    assert ft.last_info["losses"][-1] < ft.last_info["losses"][0]
    assert torch.equal(model.get_submodule(rewrite_name(model, 1)).weight, W0)


def test_dense_as_low_rank_is_exact():
    for shape in [(3, 5), (5, 3)]:
        d = torch.randn(shape)
        up = dense_as_low_rank(d)
        assert up.rank == 3 and torch.equal(up.dense(), d)


# -- configuration and errors -----------------------------------------------------------------------------------------
def test_constructors_are_config_friendly():
    """What a config sees (jsonargparse follows ``**kwargs`` to the base constructors): every argument of the chain,
    each with a default; the shared closed-form arguments reach ROME, MEMIT and AlphaEdit."""
    from jsonargparse import ArgumentParser

    from lit_prune.editors import AlphaEdit

    shared = {"v_num_grad_steps", "v_lr", "clamp_norm_factor", "mom2_n_samples", "context_templates", "stats_dir"}
    for cls, own in ((ROME, {"layers", "key_mode", "mom2_adjustment"}), (MEMIT, {"layers", "mom2_update_weight"}),
                     (AlphaEdit, {"nullspace_threshold", "L2", "mom2_update_weight"}), (FT, {"layers", "lr"})):
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "editor")
        names = set(vars(parser.parse_args([]).editor))  # parses without arguments: every one has a default
        assert own <= names and (cls is FT or shared <= names), (cls.__name__, sorted(names))
        cls()  # no required argument, nothing resolved before a model is seen
    with pytest.raises(TypeError, match=r"ROME: unknown hyper-parameter\(s\) \['v_lrr'\]"):
        ROME(v_lrr=0.1)


def test_presets_by_name_and_shape():
    class Cfg:
        model_type, hidden_size, num_hidden_layers, vocab_size, name_or_path = "llama", 576, 30, 49152, "/x/model"

    class M(torch.nn.Module):
        config = Cfg()

    assert presets.preset_name(M()) == "smollm2-135m"
    Cfg.name_or_path, Cfg.hidden_size = "openai-community/gpt2-xl", 1600
    assert presets.preset_name(M()) == "gpt2-xl"
    assert presets.HPARAMS["gpt2-xl"]["rome"]["layers"] == [17]
    assert presets.HPARAMS["gpt2-xl"]["memit"]["layers"] == [13, 14, 15, 16, 17]
    assert presets.HPARAMS["llama-2-7b"]["rome"]["layers"] == [5]
    assert presets.HPARAMS["llama-3-8b"]["rome"]["layers"] == [4]


def test_resolved_hparams_and_overrides(tiny_gpt2):
    hp = ROME(v_lr=0.1).hparams(tiny_gpt2)
    assert hp.v_lr == 0.1 and len(hp.layers) == 1 and hp.mom2_adjustment is True
    arch = presets.arch_templates(tiny_gpt2, rewrite_module_tmp="transformer.h.{}.mlp.c_fc")
    assert arch.rewrite_module_tmp == "transformer.h.{}.mlp.c_fc" and arch.ln_f_module == "transformer.ln_f"
    assert ROME(layers=[2]).edited_parameters(tiny_gpt2) == ["transformer.h.2.mlp.c_proj.weight"]


def test_context_templates(tiny_gpt2, tiny_tokenizer):
    assert ROME().context_templates(tiny_gpt2, tiny_tokenizer) == list(CONTEXT_TEMPLATES)
    gen = generate_context_templates(tiny_gpt2, tiny_tokenizer, [2, 4])
    assert gen[0] == "{}" and len(gen) == 11 and all(t.endswith(". {}") for t in gen[1:])
    assert gen == generate_context_templates(tiny_gpt2, tiny_tokenizer, [2, 4])  # deterministic
    ed = ROME(context_template_lengths=[2])
    assert ed.context_templates(tiny_gpt2, tiny_tokenizer) == gen[:1] + gen[1:6]


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(prompt="no placeholder", subject="Paris", target_new="Rome"), r"request 0.*'prompt'"),
        (dict(prompt="{} is in", subject="Paris", target_new="  "), r"request 0.*'target_new' is empty"),
        (dict(prompt="{} is in {x}", subject="Paris", target_new="Rome"), r"request 0.*'prompt'.*formatted"),
        (dict(prompt="{} is in", subject="", target_new="Rome"), r"request 0.*'subject'"),
    ],
)
def test_bad_requests_are_named(tiny_gpt2, tiny_tokenizer, bad, match):
    ed = ROME(layers=0, context_templates=TEMPLATES, mom2_adjustment=False, **FAST_HP)
    W0 = tiny_gpt2.transformer.h[0].mlp.c_proj.weight.detach().clone()
    with pytest.raises(EditRequestError, match=match):
        ed.apply(tiny_gpt2, tiny_tokenizer, [bad])
    with pytest.raises(EditRequestError, match=r"request 1 \(case_id 3\)"):
        ed.compute(tiny_gpt2, tiny_tokenizer, [REQS[0], {**bad, "case_id": 3}])
    assert torch.equal(tiny_gpt2.transformer.h[0].mlp.c_proj.weight, W0)


def test_bad_configuration(tiny_gpt2, tiny_tokenizer):
    with pytest.raises(EditError, match=r"layers=\[7\].*outside the model \(0..2\)"):
        ROME(layers=7).compute(tiny_gpt2, tiny_tokenizer, REQS)
    with pytest.raises(EditError, match=r"rewrite_module_tmp='transformer.h.\{\}.mlp.nope' matches no module"):
        ROME(rewrite_module_tmp="transformer.h.{}.mlp.nope").compute(tiny_gpt2, tiny_tokenizer, REQS)
    with pytest.raises(EditError, match="v_loss_layer"):
        ROME(layers=2, v_loss_layer=1).compute(tiny_gpt2, tiny_tokenizer, REQS)
    with pytest.raises(ValueError, match="v_lr must be > 0"):
        ROME(v_lr=0)
    with pytest.raises(EditError, match="context_templates"):
        ROME(context_templates=["no placeholder"])
    with pytest.raises(EditError, match=r"\(6, 6\)"):
        ROME(layers=0).set_second_moment(tiny_gpt2, 0, torch.eye(6))


def test_non_finite_update_is_never_written(tiny_llama, tiny_tokenizer):
    ed = ROME(layers=1, context_templates=TEMPLATES, **FAST_HP)
    C = random_spd(64)
    C[0, 0] = float("nan")
    ed.set_second_moment(tiny_llama, 1, C)
    W0 = tiny_llama.model.layers[1].mlp.down_proj.weight.detach().clone()
    with pytest.raises(EditError, match=r"not finite|singular"):
        ed.apply(tiny_llama, tiny_tokenizer, REQS)
    assert torch.equal(tiny_llama.model.layers[1].mlp.down_proj.weight, W0)


def test_unknown_architecture_needs_templates(tiny_gpt2):
    tiny_gpt2.config.model_type = "mystery"
    with pytest.raises(EditError, match="no module-name preset for model_type 'mystery'"):
        ROME().edited_parameters(tiny_gpt2)


# -- the embedded model -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_rome_edits_counterfact_facts_on_smollm(smollm, data_dir):
    """3 CounterFact edits, each on the unedited model: the new object wins on the prompt and the paraphrase for
    most; the neighbourhood prompt barely moves."""
    import json

    from lit_prune.metrics.scoring import score_answers
    from lit_prune.requests import template_from_prompt

    model, tok = smollm
    recs = json.loads((data_dir / "counterfact" / "counterfact-edit.json").read_text())[:3]
    ed = ROME.for_model(model, tok, mom2_n_samples=100, progress=False)
    wins_prompt = wins_para = 0
    shifts = []
    for r in recs:
        req = {"prompt": template_from_prompt(r["prompt"], r["subject"]), "subject": r["subject"],
               "target_new": r["target_new"], "target_true": r["ground_truth"], "case_id": r["case_id"]}
        prompts = [r["prompt"]] * 2 + [r["rephrase_prompt"]] * 2 + [r["locality_prompt"]]
        answers = [r["target_new"], r["ground_truth"]] * 2 + [r["locality_ground_truth"]]
        before = score_answers(model, tok, prompts, answers).nll
        ups = ed.apply(model, tok, [req])
        try:
            after = score_answers(model, tok, prompts, answers).nll
        finally:
            apply_updates(model, ups, sign=-1)
        wins_prompt += int(after[0] < after[1])
        wins_para += int(after[2] < after[3])
        shifts.append(float((after[4] - before[4]).abs()))
    assert wins_prompt >= 2 and wins_para >= 2, (wins_prompt, wins_para)
    assert sum(shifts) / len(shifts) < 0.5, shifts
