"""Keys and values at the subject's last token (ROME ``compute_u``'s k*, MEMIT ``compute_ks`` / current z).

k* (k̄) of a request at layer l = mean over the context templates of the input of the edited matrix at the subject's
last token of ``context + prompt(subject)`` (ROME/MEMIT ``subject_last`` fact token). All requests × templates run
in one batch; the forward stops at the module that is read. k₀ = the same key for the bare prompt alone (template
``"{}"``): the key original ROME uses in its residual and denominator (kmeng01/rome ``compute_v``'s ``cur_input``).
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn

from .. import nethook
from ..requests import EditRequest
from ..text import pad_batch, pad_id
from .tokens import subject_prompts


@torch.no_grad()
def reprs_at_subject(
    model: nn.Module, tok: Any, requests: Sequence[EditRequest], context_templates: Sequence[str], module: str,
    track: Literal["in", "out"] = "in",
) -> Tensor:
    """(n_requests, n_templates, dim) float32: the module's input (``track="in"``) or output at the subject's last
    token of every (request, template) prompt."""
    ids, lookup = subject_prompts(tok, requests, context_templates)
    device = next(model.parameters()).device
    x, mask, _, _ = pad_batch(ids, pad_id(tok), "right", device)
    m = {module: model.get_submodule(module)}
    capture = nethook.capture_inputs if track == "in" else nethook.capture_outputs
    with capture(m, stop_after=module) as got:
        model(input_ids=x, attention_mask=mask, use_cache=False)
    h = got[module][torch.arange(len(ids), device=device), torch.tensor(lookup, device=device)].float()
    return h.view(len(requests), len(context_templates), -1)


def compute_ks(
    model: nn.Module, tok: Any, requests: Sequence[EditRequest], context_templates: Sequence[str], module: str
) -> Tensor:
    """(n_requests, k_dim) float32: k* = mean over templates of the key entering ``module`` at the subject's last
    token."""
    return reprs_at_subject(model, tok, requests, context_templates, module, "in").mean(1)


def compute_k0(model: nn.Module, tok: Any, request: EditRequest, module: str) -> Tensor:
    """(k_dim,) float32: k₀, the key entering ``module`` at the subject's last token of the bare prompt
    ``prompt(subject)`` (no context template; the tokenizer's special tokens as it adds them)."""
    return reprs_at_subject(model, tok, [request], ["{}"], module, "in")[0, 0]
