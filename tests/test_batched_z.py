"""Batched z optimisation (MEMIT ``batch_z``): the requests of a batch optimised together give the same z, losses and
stopping steps as one request at a time (tiny GPT-2 and Llama, requests of different prompt/target lengths, fast and
plain δ forward, requests stopping early at different steps)."""

from __future__ import annotations

import pytest
import torch

from lit_prune.editors import MEMIT, AlphaEdit
from lit_prune.editors.compute_v import optimize_delta, optimize_deltas
from lit_prune.editors.delta_forward import DeltaForward
from lit_prune.editors.hparams import DeltaHParams
from lit_prune.editors.tokens import prompt_set
from lit_prune.text import pad_id
from lit_prune.requests import EditRequest

TEMPLATES = ["{}", "Hello there. {}", "Japan is a country in Asia, far away. {}"]
REQS = [
    EditRequest(prompt="The Eiffel Tower is located in the city of {}, which is", subject="Paris",
                target_new="Rome Tokyo", case_id=1),
    EditRequest(prompt="{} plays the sport of", subject="Michael Jordan", target_new="basketball", case_id=2),
    EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English German Spanish",
                case_id=3),
    EditRequest(prompt="{} was founded by", subject="Apple", target_new="Toyota", case_id=4),
]
HP = dict(v_lr=0.05, v_num_grad_steps=8, v_weight_decay=0.01, clamp_norm_factor=4.0)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.double() - b.double()).abs().max()
    return float(d), float(d / b.double().abs().max())


@pytest.mark.parametrize("fast", [True, False])
def test_batched_z_equals_per_request_z(tiny_model, fast):
    model, tok = tiny_model
    zs = {}
    for batch_z in (False, True):
        ed = MEMIT(layers=[0, 1], context_templates=TEMPLATES, fast=fast, batch_z=batch_z, **HP)
        zs[batch_z] = ed.compute_zs(model, tok, REQS, TEMPLATES)
        info = ed.last_info
        zs[(batch_z, "steps")] = [i["steps"] for i in info]
        zs[(batch_z, "losses")] = [i["losses"] for i in info]
        zs[(batch_z, "h")] = torch.stack([i["h"] for i in info], 1)
    assert zs[True].shape == (model.get_input_embeddings().embedding_dim, len(REQS))
    abs_d, rel_d = _max_diff(zs[True], zs[False])
    assert abs_d < 1e-5, (abs_d, rel_d)
    torch.testing.assert_close(zs[(True, "h")], zs[(False, "h")], rtol=0, atol=1e-5)
    assert zs[(True, "steps")] == zs[(False, "steps")]
    for a, b in zip(zs[(True, "losses")], zs[(False, "losses")]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("fast", [True, False])
def test_requests_stop_early_independently(tiny_model, fast):
    """An early-stop threshold that stops some requests after a few steps and others never: every request stops
    where its own optimisation does, and a stopped request's δ stays frozen while the others continue."""
    model, tok = tiny_model
    arch = MEMIT(layers=[1]).arch(model)
    sets = [prompt_set(tok, r, TEMPLATES) for r in REQS]
    base = DeltaHParams(v_num_grad_steps=10, v_lr=0.05, v_weight_decay=0.01, clamp_norm_factor=4.0,
                        kl_factor=0.0625, early_stop_loss=-1.0)
    free = [optimize_delta(DeltaForward(model, arch, ps, 1, "layer", None, fast, pad_id(tok)), base) for ps in sets]
    # stop the request with the lowest final loss after about three steps; the others run on
    j = min(range(len(REQS)), key=lambda i: free[i].losses[-1])
    thr = free[j].losses[3] + 1e-6
    hp = DeltaHParams(**{**base.__dict__, "early_stop_loss": thr})
    one = [optimize_delta(DeltaForward(model, arch, ps, 1, "layer", None, fast, pad_id(tok)), hp) for ps in sets]
    many = optimize_deltas(DeltaForward(model, arch, sets, 1, "layer", None, fast, pad_id(tok)), hp)
    steps = [len(r.losses) for r in one]
    assert len(set(steps)) > 1, steps  # the requests do stop at different steps
    assert [len(r.losses) for r in many] == steps
    for a, b in zip(many, one):
        torch.testing.assert_close(a.delta, b.delta, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.v_init, b.v_init, rtol=0, atol=1e-5)
    # without rebuilding the forward on the requests still optimising: the same result, more rows computed
    sizes: dict[float, list[int]] = {}
    original = DeltaForward.many
    for shrink in (0.0, 0.75):
        seen = sizes.setdefault(shrink, [])

        def spy(self, deltas, seen=seen):
            seen.append(deltas.shape[0])
            return original(self, deltas)

        DeltaForward.many = spy
        try:
            again = optimize_deltas(DeltaForward(model, arch, sets, 1, "layer", None, fast, pad_id(tok)), hp, shrink)
        finally:
            DeltaForward.many = original
        for a, b in zip(again, many):
            torch.testing.assert_close(a.delta, b.delta, rtol=0, atol=1e-5)
    assert set(sizes[0.0]) == {len(REQS)} and min(sizes[0.75]) < len(REQS)
    assert sum(sizes[0.75]) < sum(sizes[0.0])


def test_single_request_keeps_the_per_request_path(tiny_llama, tiny_tokenizer):
    ed = MEMIT(layers=[1], context_templates=TEMPLATES, **HP)
    z = ed.compute_zs(tiny_llama, tiny_tokenizer, REQS[:1], TEMPLATES)
    assert "batched" not in ed.last_info[0]
    ed2 = MEMIT(layers=[1], context_templates=TEMPLATES, batch_z=False, **HP)
    assert torch.equal(z, ed2.compute_zs(tiny_llama, tiny_tokenizer, REQS[:1], TEMPLATES))


@pytest.mark.parametrize("cls", [MEMIT, AlphaEdit])
def test_batched_updates_equal_per_request_updates(tiny_llama, tiny_tokenizer, cls):
    from test_editors import random_spd

    ups = {}
    for batch_z in (False, True):
        ed = cls(layers=[0, 1], context_templates=TEMPLATES, batch_z=batch_z, **HP)
        for layer in (0, 1):
            ed.set_second_moment(tiny_llama, layer, random_spd(ed.matrices(tiny_llama)[layer].k_dim, seed=layer))
        ups[batch_z] = ed.compute(tiny_llama, tiny_tokenizer, REQS[:3])
    for name in ups[False]:
        a, b = ups[True][name].dense(), ups[False][name].dense()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_z_batch_size_chunks_give_the_same_z(tiny_llama, tiny_tokenizer):
    zs = [MEMIT(layers=[1], context_templates=TEMPLATES, z_batch_size=k, batch_z=True, **HP).compute_zs(
        tiny_llama, tiny_tokenizer, REQS, TEMPLATES) for k in (None, 3, 1)]
    for z in zs[1:]:
        torch.testing.assert_close(z, zs[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="z_batch_size"):
        MEMIT(z_batch_size=0)


def test_auto_batches_z_only_off_the_cpu(tiny_llama, tiny_tokenizer):
    """batch_z="auto" (the default): one request at a time on a CPU (measured cheaper there), together elsewhere."""
    ed = MEMIT(layers=[1], context_templates=TEMPLATES, **HP)
    assert ed.batch_z == "auto" and not ed.batches_z(tiny_llama)
    ed.compute_zs(tiny_llama, tiny_tokenizer, REQS, TEMPLATES)
    assert not any(i.get("batched") for i in ed.last_info)
    meta = type(tiny_llama)(tiny_llama.config).to("meta")
    assert ed.batches_z(meta) and MEMIT(batch_z=True).batches_z(tiny_llama)
    with pytest.raises(ValueError, match="batch_z must be True, False or 'auto', got 'yes'"):
        MEMIT(batch_z="yes")
