"""A small deterministic editor for module/callback tests: its update depends on the current weights and the request."""

from __future__ import annotations

import zlib

import torch

from lit_prune.editors.base import Editor, LowRankUpdate
from lit_prune.requests import EditRequest


class ToyEditor(Editor):
    """Adds ``scale · (W b) bᵀ`` to one MLP output matrix, ``b`` a unit vector seeded by the request's subject.

    Depends on the current weight, so replaying edits on the wrong weights gives different results.
    """

    def __init__(self, param: str = "model.layers.1.mlp.down_proj.weight", scale: float = 0.5) -> None:
        self.param, self.scale = param, scale

    def edited_parameters(self, model):
        return [self.param]

    def compute(self, model, tokenizer, requests: list[EditRequest]):
        W = dict(model.named_parameters())[self.param].detach().float()
        ups = []
        for r in requests:
            g = torch.Generator().manual_seed(zlib.crc32(r.subject.encode()))
            b = torch.randn(W.shape[1], generator=g)
            b = b / b.norm()
            ups.append(LowRankUpdate(self.scale * (W @ b), b))
            W = W + ups[-1].dense()
        return {self.param: LowRankUpdate.concat(ups)}


def toy_requests(n: int) -> list[dict]:
    """``n`` records in this project's own format."""
    subj = ["Paris", "Rome", "Tokyo", "Berlin", "Madrid", "Lisbon", "Vienna", "Oslo", "Cairo", "Lima", "Quito", "Dakar"]
    return [
        {
            "case_id": i,
            "prompt": "The city of {} is in",
            "subject": f"{subj[i % len(subj)]}{i}",
            "target_new": "Japan",
            "target_true": "France",
            "paraphrase_prompts": [f"{subj[i % len(subj)]}{i} lies in"],
            "neighborhood_prompts": ["Lyon is in"],
        }
        for i in range(n)
    ]
