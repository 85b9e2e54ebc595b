"""Rank-shared editing work: with two CPU processes (gloo) each rank optimises the z of its share of a MEMIT batch,
the shares are all-gathered and both ranks solve the same update. The final weights equal each other and a
one-process run of the same stream; the (sharded) statistics equal one-process statistics."""

from __future__ import annotations

import json
import subprocess
import sys

import lightning as L
import torch
from editing_helpers import toy_requests

from lit_prune import EditDataModule, SequentialEditingModule

TEMPLATES = ["{}", "Hello there. {}"]
EDITOR = dict(layers=[0, 1], context_templates=TEMPLATES, v_lr=0.05, v_num_grad_steps=6, v_weight_decay=0.01,
              clamp_norm_factor=4.0, mom2_n_samples=16, mom2_max_length=32, mom2_update_weight=5.0, progress=False)
PARAMS = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]

TWO_RANKS = r"""
import sys, torch, lightning as L
from lit_prune import EditDataModule, SequentialEditingModule, LockstepStrategy
from lit_prune.editors import MEMIT
m = SequentialEditingModule(model={model!r}, editor=MEMIT(stats_dir={stats!r}, **{editor!r}))
t = L.Trainer(accelerator="cpu", devices=2, strategy=LockstepStrategy(process_group_backend="gloo"), max_epochs=1,
              logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
t.fit(m, datamodule=EditDataModule(path={data!r}, batch_size=3))
torch.save({{"w": {{p: m.model.get_parameter(p).detach().clone() for p in {params!r}}}, "edits": m.num_edits,
            "ids": [r.case_id for r in m.applied_requests], "share": len(m.editor.last_info)}},
           {out!r} + f"/rank{{t.global_rank}}.pt")
"""


def test_two_processes_share_the_work_and_match_one_process(tmp_path, tiny_llama_dir):
    from lit_prune.editors import MEMIT

    data = tmp_path / "edits.json"
    data.write_text(json.dumps(toy_requests(9)))  # 3 batches of 3: rank 0 takes 2 requests, rank 1 one
    stats = str(tmp_path / "stats")
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(model=tiny_llama_dir, stats=stats, editor=EDITOR, data=str(data),
                                       params=PARAMS, out=str(tmp_path)))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert a["edits"] == b["edits"] == 9 and a["ids"] == b["ids"] == list(range(9))
    assert (a["share"], b["share"]) == (2, 1)  # each rank optimised only its share of the last batch
    for p in PARAMS:
        assert torch.equal(a["w"][p], b["w"][p])

    # one process, same stream, statistics from the cache the two ranks wrote
    single = SequentialEditingModule(model=tiny_llama_dir, editor=MEMIT(stats_dir=stats, **EDITOR))
    L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path).fit(
        single, datamodule=EditDataModule(path=str(data), batch_size=3))
    assert single.num_edits == 9 and len(single.editor.last_info) == 3
    w0 = SequentialEditingModule(model=tiny_llama_dir)
    w0.configure_model()
    for p in PARAMS:
        w = single.model.get_parameter(p).detach()
        assert not torch.equal(w, w0.model.get_parameter(p))  # the stream did edit
        torch.testing.assert_close(a["w"][p], w, rtol=0, atol=1e-6)

    # the statistics the two ranks computed (sharded, all-reduced) equal one process's
    fresh = MEMIT(stats_dir=str(tmp_path / "stats1"), **EDITOR)
    for layer, p in enumerate(PARAMS):
        module = p.rsplit(".", 1)[0]
        C2 = single.editor.second_moment(single.model, single.tokenizer, module)
        C1 = fresh.second_moment(w0.model, w0.tokenizer, module)
        torch.testing.assert_close(C2, C1, rtol=1e-6, atol=1e-9)
