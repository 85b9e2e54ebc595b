"""MEND's inputs: the per-token rank-one factors of the fine-tuning gradient of each edited weight.

For a linear map ``y = W x`` applied to the tokens of a batch, the gradient of a loss is a sum of rank-one terms,
``∇_W L = Σ_t δ_t x_tᵀ`` with ``x_t`` the layer input and ``δ_t = ∂L/∂y_t`` the gradient at its output
(Mitchell et al. 2022, "Fast Model Editing at Scale", §3.1). MEND transforms the pairs ``(x_t, δ_t)`` instead of
the (rows × cols) gradient. This module captures them with forward hooks during one forward/backward pass of the
fine-tuning loss "the prompt continues with ``" " + target_new``".
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ...requests import EditRequest
from ...text import answer_nll, prompt_answer_batch
from ..architectures import mlp_pairs
from ..base import EditError, default_num_layers, get_module, get_parameter
from ..weights import Orientation
from ..weights import orientation as weight_orientation

Factors = dict[str, tuple[Tensor, Tensor]]
"""Parameter name -> ``(x, δ)``: (T, in_features) layer inputs and (T, out_features) output gradients, float32."""

def default_mend_parameters(model: nn.Module, n_blocks: int = 3) -> list[str]:
    """The MLP input and output projection weights of the last ``n_blocks`` blocks of ``model`` (MEND edits the last
    three MLP blocks; GPT-2 XL: layers 45-47 c_fc and c_proj), found by name among the layouts of
    :data:`~lit_prune.editors.architectures.ARCHITECTURES`."""
    n = default_num_layers(model)
    names = {name for name, _ in model.named_parameters()}
    layouts = [(f"{i}.weight", f"{o}.weight") for i, o in mlp_pairs()]
    for pattern in layouts:
        if pattern[0].format(n - 1) in names:
            return [p.format(i) for i in range(n - n_blocks, n) for p in pattern]
    raise EditError(
        f"MEND: no known MLP layout in {type(model).__name__}; name the edited weights explicitly "
        f"(known layouts: {[p[0] for p in layouts]})"
    )


def orientation(model: nn.Module, param: str) -> Orientation:
    """``"linear"`` (weight stored out×in, ``y = W x``) or ``"conv1d"`` (GPT-2 ``Conv1D``, stored in×out, ``y = x W``)."""
    if not param.endswith(".weight"):
        raise EditError(f"MEND edits weight matrices; '{param}' is not a '.weight' parameter")
    module = get_module(model, param[: -len(".weight")])
    get_parameter(model, param)
    found = weight_orientation(module)
    if found is not None:
        return found
    raise EditError(f"MEND: '{param}' belongs to a {type(module).__name__}; only nn.Linear and Conv1D are supported")


def factor_dims(model: nn.Module, param: str) -> tuple[int, int]:
    """``(in_features, out_features)`` of the map that ``param`` stores, whatever its orientation."""
    rows, cols = get_parameter(model, param).shape
    return (cols, rows) if orientation(model, param) == "linear" else (rows, cols)


def edit_texts(requests: Sequence[EditRequest]) -> tuple[list[str], list[str]]:
    """Prompts (subject filled in) and new objects of the edit examples."""
    return [r.full_prompt for r in requests], [r.target_new for r in requests]


def gradient_factors(model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], params: Sequence[str]) -> Factors:
    """The rank-one factors of ``∇_W L`` for each weight in ``params`` on the current weights of ``model``.

    ``L`` = mean over requests of the mean NLL of ``" " + target_new`` after the edit prompt (the fine-tuning loss
    MEND conditions on). For each parameter returns ``(x, δ)`` with one row per token whose input and output
    gradient are both non-zero (padding and tokens after the last answer token drop out): the answer-predicting
    positions for a model's last block, every position up to the last answer token for earlier blocks. With
    ``linear`` orientation ``∇_W L = δᵀ x`` (out×in); with ``conv1d`` it is ``xᵀ δ`` (in×out). Rows are float32
    and detached; ``model``'s weights and ``requires_grad`` flags are untouched. Works under ``torch.inference_mode``.
    """
    if not requests:
        raise EditError("MEND: no edit requests")
    device = next(model.parameters()).device
    ids, mask, labels = prompt_answer_batch(tokenizer, *edit_texts(requests), device=device)
    return factors_and_logits(model, ids, mask, labels, params)[0]


def factors_and_logits(
    model: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor, params: Sequence[str]
) -> tuple[Factors, Tensor]:
    """Gradient factors (see :func:`gradient_factors`) of ``L`` = mean over the rows that have answer labels of
    their mean answer NLL, and the (B, L, V) logits of the same forward pass (detached).

    Rows without labels (all -100) add nothing to ``L``, so their tokens have ``δ = 0`` and no factor rows; they
    ride along to get the unedited model's logits from the same pass (MEND training's locality rows).
    """
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}

    def hook(name: str):
        def capture(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            inputs[name] = args[0].detach()
            if not out.requires_grad:  # the first edited module: start the graph here, not at the embeddings
                out = out.detach().requires_grad_(True)
            outputs[name] = out
            return out

        return capture

    if not (labels != -100).any():
        raise EditError("MEND: no answer tokens to take the fine-tuning gradient of")
    handles = [get_module(model, p[: -len(".weight")]).register_forward_hook(hook(p)) for p in params]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            ids, mask, labels = ids.clone(), mask.clone(), labels.clone()  # normal tensors even if made in inference mode
            labelled = (labels != -100).any(1)
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = answer_nll(logits[labelled], labels[labelled]).mean()
            missing = [p for p in params if p not in outputs]
            if missing:
                raise EditError(f"MEND: the modules of {missing} were not called in the forward pass")
            grads = torch.autograd.grad(loss, [outputs[p] for p in params], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    keep = mask.reshape(-1).bool()
    factors: Factors = {}
    for p, g in zip(params, grads):
        if g is None:
            raise EditError(f"MEND: the fine-tuning loss does not depend on '{p}'")
        x = inputs[p].reshape(-1, inputs[p].shape[-1])[keep].float()
        d = g.reshape(-1, g.shape[-1])[keep].float()
        nz = (x != 0).any(-1) & (d != 0).any(-1)
        factors[p] = (x[nz].detach(), d[nz].detach())
    return factors, logits.detach()
