"""Where the editors edit: ONE table of module names per architecture (``model.config.model_type``), for every editor.

Module templates take the layer index through ``"{}"``. The edited matrix is the MLP output projection; its input is
the key ``k`` and its output the value ``v`` (spec §3):

- ``gpt2``: ``transformer.h.{}.mlp.c_proj``, a ``Conv1D`` stored (k_dim, v_dim), computing ``k @ W + b``;
- ``gptj``: ``transformer.h.{}.mlp.fc_out`` (``nn.Linear``, stored (v_dim, k_dim), computing ``W k + b``);
- ``gpt_neox``: ``gpt_neox.layers.{}.mlp.dense_4h_to_h`` (``nn.Linear``);
- ``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``phi3``, ``olmo``, ``olmo2`` (SmolLM2 is ``llama``):
  ``model.layers.{}.mlp.down_proj`` (``nn.Linear``, no bias).

MEND edits the MLP input projection too (``mlp_in_module_tmp``: ``c_fc``, ``fc_in``, ``dense_h_to_4h``,
``up_proj``). How a weight is stored (``nn.Linear`` out×in or ``Conv1D`` in×out) is read from the module, never
guessed from a shape: :func:`lit_prune.editors.weights.orientation`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from .base import EditError


@dataclass(frozen=True)
class ArchTemplates:
    """Module names of one architecture (``"{}"`` = layer index)."""

    rewrite_module_tmp: str
    """The edited matrix: the MLP output projection (its input is the key k, its output the value v)."""
    mlp_module_tmp: str
    """The MLP block; ROME adds δ to its output (spec §3)."""
    layer_module_tmp: str
    """The decoder block; its output is the residual stream where MEMIT adds δ (the z of the last edited layer)."""
    layers_module: str
    """The ``nn.ModuleList`` holding the decoder blocks, in order."""
    ln_f_module: str
    """The final norm (before the LM head)."""
    lm_head_module: str
    """The LM head (hidden -> vocabulary logits)."""
    mlp_in_module_tmp: str | None = None
    """The MLP input projection (in front of the activation): MEND edits it with ``rewrite_module_tmp``. Not one of
    the editors' module-template arguments (:data:`EDITOR_TEMPLATES`)."""


EDITOR_TEMPLATES = ("rewrite_module_tmp", "mlp_module_tmp", "layer_module_tmp", "layers_module", "ln_f_module",
                    "lm_head_module")
"""The fields of :class:`ArchTemplates` that ROME/MEMIT/FT take as constructor arguments (and check on the model)."""


# Llama's gate_proj has the shape of up_proj and is left alone by MEND: one up/down pair per block mirrors GPT-2's
# c_fc/c_proj pair. phi3 fuses gate and up (gate_up_proj): no MLP input projection for MEND.
_LLAMA_LIKE = ArchTemplates(
    "model.layers.{}.mlp.down_proj", "model.layers.{}.mlp", "model.layers.{}", "model.layers", "model.norm", "lm_head",
    mlp_in_module_tmp="model.layers.{}.mlp.up_proj",
)
ARCHITECTURES: dict[str, ArchTemplates] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2")},
    "phi3": replace(_LLAMA_LIKE, mlp_in_module_tmp=None),
    "gpt2": ArchTemplates(
        "transformer.h.{}.mlp.c_proj", "transformer.h.{}.mlp", "transformer.h.{}", "transformer.h", "transformer.ln_f",
        "lm_head", mlp_in_module_tmp="transformer.h.{}.mlp.c_fc",
    ),
    "gptj": ArchTemplates(
        "transformer.h.{}.mlp.fc_out", "transformer.h.{}.mlp", "transformer.h.{}", "transformer.h", "transformer.ln_f",
        "lm_head", mlp_in_module_tmp="transformer.h.{}.mlp.fc_in",
    ),
    "gpt_neox": ArchTemplates(
        "gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.layers.{}.mlp", "gpt_neox.layers.{}", "gpt_neox.layers",
        "gpt_neox.final_layer_norm", "embed_out", mlp_in_module_tmp="gpt_neox.layers.{}.mlp.dense_h_to_4h",
    ),
}
"""``model.config.model_type`` -> module names, for every editor (ROME/MEMIT/AlphaEdit/FT: :func:`arch_templates`;
MEND: :func:`mlp_pairs`)."""


def mlp_pairs() -> list[tuple[str, str]]:
    """The distinct (MLP input projection, MLP output projection) module templates of the table, in table order
    (MEND's edited weights)."""
    out: list[tuple[str, str]] = []
    for arch in ARCHITECTURES.values():
        pair = (arch.mlp_in_module_tmp, arch.rewrite_module_tmp)
        if arch.mlp_in_module_tmp is not None and pair not in out:
            out.append(pair)
    return out


def arch_templates(model: nn.Module, **overrides: str | None) -> ArchTemplates:
    """The templates for ``model.config.model_type``, with any non-None field of ``overrides`` replacing the default.

    An unknown architecture needs every field in ``overrides``; each template is checked against the model (it must
    name a module for layer 0), so a typo fails here with the names that do exist.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - set(EDITOR_TEMPLATES)
    if unknown:
        raise EditError(f"unknown module template argument(s) {sorted(unknown)}")
    base = ARCHITECTURES.get(model_type)
    if base is None:
        missing = [f for f in EDITOR_TEMPLATES if f not in given]
        if missing:
            raise EditError(
                f"no module-name preset for model_type {model_type!r} (known: {sorted(ARCHITECTURES)}); "
                f"pass {missing} (e.g. rewrite_module_tmp='model.layers.{{}}.mlp.down_proj')"
            )
        arch = ArchTemplates(**given)
    else:
        arch = replace(base, **given)
    names = dict(model.named_modules())
    for f in EDITOR_TEMPLATES:
        tmp = getattr(arch, f)
        name = tmp.format(0) if "{}" in tmp else tmp
        if name not in names:
            stem = name.split(".")[0]
            near = [n for n in names if n.startswith(stem) and n.count(".") <= name.count(".")][:8]
            raise EditError(
                f"module template {f}={tmp!r} matches no module of {type(model).__name__} "
                f"(looked for '{name}'); modules near it: {near}"
            )
    return arch
