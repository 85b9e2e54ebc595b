"""MEND: gradient factors, the transform, its training module and the editor (tiny models; one slow real-model test)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import make_gpt2, make_llama
from editing_helpers import toy_requests

from lit_prune.editors.base import EditError, apply_updates
from lit_prune.editors.mend import MEND, model_info, save_hypernetwork
from lit_prune.editors.mend.factors import default_mend_parameters, factor_dims, gradient_factors, orientation
from lit_prune.editors.mend.hypernet import MENDHypernetwork
from lit_prune.editors.mend.training import MENDDataModule, MENDTrainingModule, main, pair_locality
from lit_prune.requests import EditRequest
from lit_prune.restraint import prune_delta, sigma_max

REQUESTS = [
    EditRequest("The city of {} is in", "Paris", "Japan", "France", paraphrase_prompts=["Paris lies in"],
                neighborhood_prompts=["Lyon is in"]),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French",
                paraphrase_prompts=["Danielle Darrieux speaks"], neighborhood_prompts=["Michael Jordan speaks"]),
]


def hypernet_for(model, params=None, **kw) -> MENDHypernetwork:
    params = params or default_mend_parameters(model, 2)
    return MENDHypernetwork(params, {p: factor_dims(model, p) for p in params},
                            {p: orientation(model, p) for p in params}, model_info=model_info(model, "tiny"), **kw)


def reference_gradient(model, tok, requests, param):
    """∇_W of the mean over requests of the mean answer-token NLL, one unpadded forward per request."""
    W = model.get_parameter(param)
    W.requires_grad_(True)
    try:
        losses = []
        for r in requests:
            p = tok(r.full_prompt)["input_ids"]
            a = tok(" " + r.target_new, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + a])).logits[0], -1)
            losses.append(-torch.stack([logp[len(p) - 1 + j, t] for j, t in enumerate(a)]).mean())
        (g,) = torch.autograd.grad(torch.stack(losses).mean(), W)
    finally:
        W.requires_grad_(False)
    return g


def test_default_parameters_and_orientation(tiny_gpt2, tiny_llama):
    assert default_mend_parameters(tiny_llama, 2) == [
        "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight",
        "model.layers.2.mlp.up_proj.weight", "model.layers.2.mlp.down_proj.weight"]
    assert default_mend_parameters(tiny_gpt2, 1) == ["transformer.h.2.mlp.c_fc.weight", "transformer.h.2.mlp.c_proj.weight"]
    assert orientation(tiny_gpt2, "transformer.h.2.mlp.c_fc.weight") == "conv1d"
    assert factor_dims(tiny_gpt2, "transformer.h.2.mlp.c_fc.weight") == (32, 128)  # stored in×out = 32×128
    assert factor_dims(tiny_llama, "model.layers.2.mlp.down_proj.weight") == (64, 32)  # stored out×in = 32×64


def test_factors_sum_to_the_gradient(tiny_model):
    """Σ_t δ_t x_tᵀ of the captured factors is the autograd gradient of the fine-tuning loss (padding included)."""
    model, tok = tiny_model
    params = default_mend_parameters(model, 2)
    factors = gradient_factors(model, tok, REQUESTS, params)
    for p in params:
        x, d = factors[p]
        g = d.T @ x if orientation(model, p) == "linear" else x.T @ d
        torch.testing.assert_close(g, reference_gradient(model, tok, REQUESTS, p), rtol=1e-4, atol=1e-7)
    # the last block's MLP only sees the answer-predicting positions: one row per answer token
    n_answer = sum(len(tok(" " + r.target_new, add_special_tokens=False)["input_ids"]) for r in REQUESTS)
    assert factors[params[-1]][0].shape[0] == n_answer
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("trained_moments", [False, True])
def test_untrained_transform_is_a_scaled_gradient_step(tiny_model, trained_moments):
    model, tok = tiny_model
    eta = 0.37
    hn = hypernet_for(model, edit_lr=eta)
    if trained_moments:  # non-trivial normalisation: it must still be undone exactly
        hn.train()
        hn(gradient_factors(model, tok, REQUESTS, hn.params))
        assert all(int(m.count) > 1 for m in hn.x_moments.values())
    hn.eval()
    updates = hn(gradient_factors(model, tok, REQUESTS, hn.params))
    for p in hn.params:
        expected = -eta * reference_gradient(model, tok, REQUESTS, p)
        assert updates[p].shape == tuple(model.get_parameter(p).shape)
        torch.testing.assert_close(updates[p].dense(), expected, rtol=1e-3, atol=1e-6)


def test_transform_output_has_the_stated_rank(tiny_model):
    """r = factor rows = tokens with a gradient; the (perturbed, non-identity) transform's ΔW has exactly rank r."""
    model, tok = tiny_model
    torch.manual_seed(1)
    hn = hypernet_for(model, rank=16, n_blocks=2).eval()
    with torch.no_grad():
        for block in (b for net in hn.nets.values() for b in net.blocks):
            block.U.normal_(0, 0.3)
    factors = gradient_factors(model, tok, REQUESTS[:1], hn.params)
    updates = hn(factors)
    for p, up in updates.items():
        r = factors[p][0].shape[0]
        assert 0 < r < min(up.shape)
        assert up.rank == r
        assert int(torch.linalg.matrix_rank(up.A.double() @ up.B.double().T)) == r


def test_transform_is_shared_by_shape_with_per_layer_modes(tiny_llama):
    hn = hypernet_for(tiny_llama)
    assert sorted(hn.nets) == ["x32_d64", "x64_d32"]  # up_proj: 32 -> 64, down_proj: 64 -> 32
    assert [hn.mode[p] for p in hn.params] == [0, 0, 1, 1]
    assert hn.nets["x32_d64"].blocks[0].mode_scale.shape == (2, 96)


def fixed_batch():
    return pair_locality(list(REQUESTS))


def test_one_training_step_reduces_the_loss(tiny_llama, tiny_tokenizer):
    torch.manual_seed(0)
    module = MENDTrainingModule(model="tiny", n_edit_blocks=2, rank=16, edit_lr=0.05, lr=1e-3, lr_lr=1e-2, c_edit=1.0)
    module.set_model(tiny_llama, tiny_tokenizer)
    batch = fixed_batch()
    module.hypernet.train()
    with torch.no_grad():
        module.losses(batch)  # first pass initialises the running moments
    module.hypernet.eval()  # freeze them so both losses see the same normalisation
    opt = module.configure_optimizers()
    before = module.losses(batch)
    before["loss"].backward()
    assert all(p.grad is None for p in tiny_llama.parameters())
    assert module.hypernet.log_lr.grad is not None and module.hypernet.log_lr.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        after = module.losses(batch)
    assert after["loss"] < before["loss"]
    assert before["loc_kl"] > 0


@pytest.mark.parametrize("loc_positions", ["all", "answer"])
def test_kl_and_loss_by_hand(tiny_llama, tiny_tokenizer, loc_positions):
    """The training loss equals c_edit·NLL + c_loc·KL recomputed with an edited copy of the model."""
    import copy

    module = MENDTrainingModule(model="tiny", n_edit_blocks=1, rank=8, edit_lr=0.5, c_edit=0.3, c_loc=2.0,
                                loc_positions=loc_positions)
    module.set_model(tiny_llama, tiny_tokenizer)
    module.hypernet.eval()
    ex = fixed_batch()[:1]
    with torch.no_grad():
        got = module.losses(ex)
        edited = copy.deepcopy(tiny_llama)
        apply_updates(edited, module.edit_updates([ex[0].request]))
    tok = tiny_tokenizer
    r, nll = ex[0].request, []
    for prompt in (r.full_prompt, r.paraphrase_prompts[0]):
        p, a = tok(prompt)["input_ids"], tok(" " + r.target_new, add_special_tokens=False)["input_ids"]
        logp = torch.log_softmax(edited(input_ids=torch.tensor([p + a])).logits[0], -1)
        nll.append(-sum(logp[len(p) - 1 + j, t] for j, t in enumerate(a)) / len(a))
    lp, la = tok(ex[0].loc_prompt)["input_ids"], tok(" " + ex[0].loc_answer, add_special_tokens=False)["input_ids"]
    loc = torch.tensor([lp + la])
    pre = torch.log_softmax(tiny_llama(input_ids=loc).logits[0], -1)
    post = torch.log_softmax(edited(input_ids=loc).logits[0], -1)
    kl_t = (pre.exp() * (pre - post)).sum(-1)
    kl = kl_t.mean() if loc_positions == "all" else kl_t[len(lp) - 1 : len(lp) + len(la) - 1].mean()
    torch.testing.assert_close(got["loss"], 0.3 * sum(nll) / 2 + 2.0 * kl, rtol=1e-4, atol=1e-6)


# -- editor and checkpoints -----------------------------------------------------------------------------------------
@pytest.fixture
def saved_hypernet(tmp_path, tiny_llama, tiny_tokenizer):
    torch.manual_seed(0)
    hn = hypernet_for(tiny_llama, edit_lr=0.5)
    hn.train()
    hn(gradient_factors(tiny_llama, tiny_tokenizer, REQUESTS, hn.params))  # moments in the state dict
    with torch.no_grad():
        for net in hn.nets.values():
            net.blocks[0].U.normal_(0, 0.1)
    return hn.eval(), save_hypernetwork(hn, tmp_path / "mend.pt")


def test_save_load_roundtrip_and_sequential_edits(saved_hypernet, tiny_llama, tiny_tokenizer):
    hn, path = saved_hypernet
    editor = MEND(str(path))
    assert editor.edited_parameters(tiny_llama) == hn.params
    for k, v in hn.state_dict().items():
        torch.testing.assert_close(editor.hypernet.state_dict()[k], v)
    w0 = {p: tiny_llama.get_parameter(p).detach().clone() for p in hn.params}
    with torch.inference_mode():  # e.g. called from an evaluation loop
        first = editor.compute(tiny_llama, tiny_tokenizer, REQUESTS[:1])
    assert all(torch.equal(tiny_llama.get_parameter(p), w0[p]) for p in hn.params)  # compute never writes
    with torch.no_grad():
        expected = hn(gradient_factors(tiny_llama, tiny_tokenizer, REQUESTS[:1], hn.params))
    for p in hn.params:
        torch.testing.assert_close(first[p].dense(), expected[p].dense())
    applied = editor.apply(tiny_llama, tiny_tokenizer, [REQUESTS[0].to_dict()])
    second = editor.apply(tiny_llama, tiny_tokenizer, REQUESTS[1:])  # computed on the edited weights
    on_original = editor.compute(make_llama(tiny_tokenizer), tiny_tokenizer, REQUESTS[1:])
    for p in hn.params:
        torch.testing.assert_close(tiny_llama.get_parameter(p), w0[p] + applied[p].dense() + second[p].dense())
        assert not torch.allclose(second[p].dense(), on_original[p].dense())


def test_checkpoint_for_another_model_or_layers_fails_naming_both(saved_hypernet, tiny_tokenizer, tmp_path):
    hn, path = saved_hypernet
    editor = MEND(str(path))
    with pytest.raises(EditError, match=r"trained for model 'tiny' \(llama, 3 layers.*model being edited is .*\(gpt2, 3"):
        editor.compute(make_gpt2(tiny_tokenizer), tiny_tokenizer, REQUESTS[:1])
    other = make_llama(tiny_tokenizer)
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(1.1)  # same architecture, other weights
    with pytest.raises(EditError, match="embedding norm"):
        MEND(str(path)).edited_parameters(other)
    with pytest.raises(EditError, match=r"trained for the weights \['model.layers.1.mlp.up_proj.weight'.*asked to edit \['model.layers.0"):
        MEND(str(path), params=["model.layers.0.mlp.down_proj.weight"])
    with pytest.raises(EditError, match="MEND checkpoint not found"):
        MEND(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(EditError, match="junk.pt"):
        MEND(str(tmp_path / "junk.pt"))


# -- the Lightning run ----------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_model_dir(tiny_llama_dir):
    return tiny_llama_dir


def test_fit_checkpoints_hold_only_the_hypernetwork(tmp_path, tiny_model_dir):
    data = tmp_path / "edits.json"
    data.write_text(json.dumps(toy_requests(12)))
    dm = MENDDataModule(str(data), n_val=2, batch_size=2, seed=0)
    assert len(dm.train_examples) == 10 and {e.request.case_id for e in dm.val_examples}.isdisjoint(
        e.request.case_id for e in dm.train_examples)
    module = MENDTrainingModule(model=tiny_model_dir, n_edit_blocks=2, rank=8, export_path=str(tmp_path / "hn.pt"))
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/edit_success", mode="max")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, val_check_interval=3, enable_progress_bar=False,
                        enable_model_summary=False, logger=False, callbacks=[ckpt_cb], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert {"val/edit_success", "val/locality_drawdown", "val/loc_kl"} <= set(trainer.callback_metrics)
    ckpt = torch.load(ckpt_cb.best_model_path, map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith("hypernet.") for k in ckpt["state_dict"])
    assert ckpt["mend_config"]["params"] == module.hypernet.params
    assert all(int(m.count) > 0 for m in module.hypernet.x_moments.values())
    # both the Lightning checkpoint and the exported file load in the editor and give the same updates
    model = module.model
    a = MEND(ckpt_cb.best_model_path).compute(model, module.tokenizer, REQUESTS[:1])
    b = MEND(str(tmp_path / "hn.pt")).compute(model, module.tokenizer, REQUESTS[:1])
    for p in a:
        torch.testing.assert_close(a[p].dense(), b[p].dense())
    # the run resumes from its checkpoint (hypernetwork rebuilt before the state is restored)
    module2 = MENDTrainingModule(model=tiny_model_dir, n_edit_blocks=2, rank=8, export_path=None)
    trainer2 = L.Trainer(accelerator="cpu", devices=1, max_steps=4, val_check_interval=3, enable_progress_bar=False,
                         enable_model_summary=False, logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer2.fit(module2, datamodule=dm, ckpt_path=ckpt_cb.best_model_path)
    assert trainer2.global_step == 4


@pytest.mark.parametrize("name", ["mend_train_smollm2.yaml", "mend_train_gpt2xl.yaml"])
def test_configs_parse(name, data_dir, monkeypatch, tmp_path):
    """Each shipped MEND config builds its trainer, module and data module (the model loads lazily)."""
    import lit_prune.editors.mend.training as mt

    built = {}
    monkeypatch.setattr(mt.L.Trainer, "fit", lambda self, model, datamodule=None, ckpt_path=None: built.update(m=model, d=datamodule))
    config = Path(__file__).resolve().parents[1] / "configs" / name
    main(["--config", str(config), "--data.path", str(data_dir / "counterfact" / "counterfact-train.json"),
          "--validate_first", "false", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)])
    assert isinstance(built["m"], MENDTrainingModule) and built["m"].hypernet is None
    cfg = yaml.safe_load(config.read_text())
    assert len(built["d"].val_examples) == cfg["data"]["n_val"]
    assert built["m"].hparams.model == cfg["model"]["model"]
    if "gpt2xl" in name:
        assert built["m"].hparams.params == [f"transformer.h.{i}.mlp.{m}.weight" for i in (45, 46, 47) for m in ("c_fc", "c_proj")]


@pytest.mark.slow
def test_trained_hypernetwork_edits_the_embedded_model(smollm, data_dir):
    """The bundled hypernetwork (trained by configs/mend_train_smollm2.yaml) edits held-out CounterFact records."""
    model, tok = smollm
    editor = MEND()  # default: the bundled "smollm2-135m" hypernetwork
    assert Path(editor.checkpoint).name == "mend-smollm2-135m.pt" and Path(editor.checkpoint).is_file()
    dm = MENDDataModule(str(data_dir / "counterfact" / "counterfact-train.json"), n_val=50, n_train=1, seed=0)
    module = MENDTrainingModule(export_path=None)
    module.set_model(model, tok)
    module.hypernet = editor.hypernet
    wins = [module.score_edit(ex, editor.compute(model, tok, [ex.request]))["edit_success"] for ex in dm.val_examples[:10]]
    assert sum(wins) >= 6


def test_sequential_mend_editing_with_prune_from_train_py(tmp_path, tiny_tokenizer, saved_hypernet, tiny_model_dir):
    """train.py runs sequential MEND editing (class_path lit_prune.editors.mend.MEND) with a deferred PruneCallback."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from train import main as train_main

    _, ckpt = saved_hypernet  # trained for make_llama(tiny_tokenizer), the model saved in tiny_model_dir
    data = tmp_path / "edits.json"
    data.write_text(json.dumps(toy_requests(4)))
    cfg = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False,
                    "logger": False, "enable_checkpointing": False, "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "lit_prune.callbacks.PruneCallback",
                                   "init_args": {"mode": "deferred", "alpha": 1.2}}]},
        "model": {"model": tiny_model_dir,
                  "editor": {"class_path": "lit_prune.editors.mend.MEND", "init_args": {"checkpoint": str(ckpt)}},
                  "export_dir": str(tmp_path / "edited")},
        "data": {"path": str(data), "batch_size": 1},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    train_main(["--config", str(tmp_path / "cfg.yaml")])
    from transformers import AutoModelForCausalLM

    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    original = make_llama(tiny_tokenizer)
    changed = [p for p, w in original.named_parameters() if not torch.equal(w, edited.get_parameter(p))]
    assert changed and set(changed) <= set(saved_hypernet[0].params)
    # PRUNE acted: the exported weights are W0 + F(ΔW) of the unrestrained ΔW of the same edits (replayed without
    # PRUNE), and F changed it, i.e. some σ(ΔW) reached τ = σ_max(W0)
    replay, editor = make_llama(tiny_tokenizer), MEND(str(ckpt))
    for r in toy_requests(4):
        editor.apply(replay, tiny_tokenizer, [r])
    restrained = []
    for p in saved_hypernet[0].params:
        W0 = original.get_parameter(p).detach()
        dW = replay.get_parameter(p).detach() - W0
        F_dW = prune_delta(dW, sigma_max(W0), alpha=1.2)
        # (the callback restrains by the low-rank path, prune_delta densely: float32 rounding of a ΔW up to 1e4)
        assert float((edited.get_parameter(p).detach() - W0 - F_dW).norm() / F_dW.norm()) < 1e-4, p
        if not torch.allclose(F_dW, dW, rtol=1e-3, atol=1e-5):
            restrained.append(p)
    assert restrained, "no edited matrix reached τ: the test would pass without PRUNE"
