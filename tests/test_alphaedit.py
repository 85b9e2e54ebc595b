"""AlphaEdit on tiny models: the closed form against a direct k_dim × k_dim solve, the P-projected normal equations,
preserved keys untouched, the keys of earlier batches preserved, and its state through undo and checkpoints."""

from __future__ import annotations

import pytest
import torch
from test_editors import FAST_HP, REQS, TEMPLATES, independent_key, layer_out, rewrite_name

from lit_prune.editors import AlphaEdit, apply_updates
from lit_prune.editors.alphaedit import alphaedit_key_solve, null_space_basis
from lit_prune.requests import EditRequest

REQS2 = [EditRequest(prompt="{} was written in the language of", subject="Don Quixote", target_new="Finnish",
                     case_id=9)]


def designed_C(k: int, n_null: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """C = Q diag(λ) Qᵀ with ``n_null`` eigenvalues 1e-4 (the null space) and the rest in [1, 2]; returns (C, Q_null)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.full((n_null,), 1e-4, dtype=torch.float64),
                     1 + torch.rand(k - n_null, generator=g, dtype=torch.float64)])
    return (Q * lam) @ Q.T, Q[:, :n_null]


def test_key_solve_matches_the_dense_closed_form():
    C, Qn = designed_C(24, 10)
    U0 = null_space_basis(C, 2e-2)
    P = U0 @ U0.T
    torch.testing.assert_close(P, Qn @ Qn.T)  # the projector onto the small-eigenvalue directions
    g = torch.Generator().manual_seed(1)
    K, Kp = torch.randn(24, 3, generator=g, dtype=torch.float64), torch.randn(24, 5, generator=g, dtype=torch.float64)
    for prev in (None, Kp):
        A = K @ K.T + (0 if prev is None else prev @ prev.T)
        direct = torch.linalg.solve(P @ A + 10.0 * torch.eye(24, dtype=torch.float64), P @ K)
        torch.testing.assert_close(alphaedit_key_solve(U0, K, prev, 10.0), direct)


def test_update_solves_projected_normal_equations_and_preserves_keys(tiny_model):
    model, tok = tiny_model
    l2 = 0.5
    ed = AlphaEdit(layers=[0, 1], context_templates=TEMPLATES, L2=l2, nullspace_threshold=2e-2, **FAST_HP)
    null = {}
    for layer in (0, 1):
        C, Qn = designed_C(ed.matrices(model)[layer].k_dim, n_null=ed.matrices(model)[layer].k_dim // 2, seed=layer)
        ed.set_second_moment(model, layer, C)
        null[layer] = Qn
    layer_tmp = "transformer.h.{}" if model.config.model_type == "gpt2" else "model.layers.{}"

    def check(reqs, prev_keys):
        zs = ed.compute_zs(model, tok, reqs, TEMPLATES)
        ed.forget(0)
        ups = ed.compute(model, tok, reqs)
        keys = {}
        for i, layer in enumerate((0, 1)):
            module = rewrite_name(model, layer)
            up = ups[f"{module}.weight"]
            K = torch.stack([independent_key(model, tok, module, r, TEMPLATES) for r in reqs], 1)
            R = (zs - layer_out(model, tok, layer_tmp.format(1), reqs)) / (2 - i)
            D = up.dense().double()
            D = D.T if model.config.model_type == "gpt2" else D  # (v_dim, k_dim)
            P = null[layer] @ null[layer].T
            A = K @ K.T + (prev_keys[module] @ prev_keys[module].T if prev_keys else 0)
            eye = torch.eye(P.shape[0], dtype=torch.float64)
            torch.testing.assert_close((P @ A + l2 * eye) @ D.T, P @ K @ R.T, rtol=1e-3, atol=1e-5)
            assert float((D @ (eye - P)).abs().max()) < 1e-6 * max(1.0, float(D.abs().max()))
            assert float(D.abs().max()) > 1e-4  # the update is not trivially zero
            keys[module] = K
            apply_updates(model, {f"{module}.weight": up})
        return keys

    first = check(REQS, None)
    assert len(ed.edited_keys) == 1
    check(REQS2, first)  # the second batch also preserves the first batch's keys
    assert len(ed.edited_keys) == 2
    state = ed.state_dict()
    ed.forget(1)
    assert len(ed.edited_keys) == 1
    ed.load_state_dict(state)
    assert [list(r) for r in ed.edited_keys] == [list(r) for r in state["edited_keys"]]


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="AlphaEdit: L2 must be a finite number > 0"):
        AlphaEdit(L2=0)
    with pytest.raises(ValueError, match="AlphaEdit: nullspace_threshold must be a finite number > 0"):
        AlphaEdit(nullspace_threshold=float("nan"))


def test_alphaedit_with_prune_in_the_module_resumes_and_undoes(tmp_path, tiny_llama_dir):
    """AlphaEdit + PruneCallback in SequentialEditingModule: the editor's keys go through checkpoints (a resumed run
    equals the uninterrupted one) and undo forgets the undone batches' keys."""
    import json

    import lightning as L
    from editing_helpers import toy_requests

    from lit_prune import EditDataModule, SequentialEditingModule
    from lit_prune.callbacks import PruneCallback

    data = tmp_path / "edits.json"
    data.write_text(json.dumps(toy_requests(6)))

    def editor():
        return AlphaEdit(layers=[0, 1], context_templates=TEMPLATES, mom2_n_samples=16, mom2_max_length=32,
                         stats_dir=str(tmp_path / "stats"), progress=False, L2=1.0, **FAST_HP)

    def fit(module, root, ckpt=None, **kw):
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=root,
                            callbacks=[PruneCallback(mode="deferred"), *extra.pop(root, [])], **kw)
        trainer.fit(module, datamodule=EditDataModule(path=str(data), batch_size=2), ckpt_path=ckpt)
        return module

    extra: dict = {}
    full = fit(SequentialEditingModule(model=tiny_llama_dir, editor=editor()), tmp_path / "full")
    assert len(full.editor.edited_keys) == 3 and full.num_edits == 6

    ck = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_top_k=-1,
                                             filename="{step}")
    extra[tmp_path / "part"] = [ck]
    fit(SequentialEditingModule(model=tiny_llama_dir, editor=editor()), tmp_path / "part", max_steps=2,
        enable_checkpointing=True)
    resumed = fit(SequentialEditingModule(model=tiny_llama_dir, editor=editor()), tmp_path / "resumed",
                  ckpt=str(tmp_path / "ck" / "step=2.ckpt"))
    assert len(resumed.editor.edited_keys) == 3
    for name in full.edited_parameters:
        torch.testing.assert_close(resumed.model.get_parameter(name), full.model.get_parameter(name), rtol=0, atol=1e-6)

    full.undo(1)
    assert len(full.editor.edited_keys) == 2 and full.num_edits == 4
