"""What ROME, MEMIT, AlphaEdit and FT share: the constructors (:class:`LocateEditor`, :class:`ClosedFormEditor`), the resolved hyper-parameters
(:mod:`~lit_prune.editors.hparams`) and module templates, request checks, context templates, the per-instance
second-moment statistics (:class:`~lit_prune.stats.SecondMomentCache`), the fast-path check and weight restore."""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..requests import EditRequest
from ..stats import SecondMomentCache, model_key, second_moments
from .base import EditError, Editor, LowRankUpdate, Updates
from .delta_forward import fast_path_matches
from .hparams import HParams
from .architectures import ArchTemplates, arch_templates
from .presets import resolve_hparams
from ..text import pad_id
from .tokens import CONTEXT_TEMPLATES, PromptSet, generate_context_templates, validate_request
from .weights import EditedMatrix


class LocateEditor(Editor):
    """Base of the editors that rewrite MLP output matrices (ROME, MEMIT, AlphaEdit, FT). Not used directly.

    Hyper-parameters given as None take the preset of the model being edited (:mod:`lit_prune.editors.presets`);
    module templates given as None take the architecture's. Everything cached (context templates, statistics,
    Cholesky factors, the fast-path check) lives on the instance, keyed by the model's cache name.

    A subclass names its method (``method``: the preset key) and its hyper-parameter class (``hparams_class``,
    :mod:`lit_prune.editors.hparams`), declares its own arguments and passes the rest on with ``**kwargs``
    (jsonargparse follows ``super().__init__(..., **kwargs)``, so configs and ``--print_config`` see every argument
    of the chain, each declared once).
    """

    method = ""
    hparams_class: type[HParams] = HParams

    def __init__(
        self,
        *,
        rewrite_module_tmp: str | None = None,
        mlp_module_tmp: str | None = None,
        layer_module_tmp: str | None = None,
        layers_module: str | None = None,
        ln_f_module: str | None = None,
        lm_head_module: str | None = None,
        context_templates: list[str] | None = None,
        mom2_dataset: str = "wiki-offline",
        stats_dir: str | None = None,
        fast: bool = True,
        progress: bool = True,
        **hparams: Any,
    ) -> None:
        """``hparams``: this method's hyper-parameters (fields of ``hparams_class``; None = the model's preset),
        checked here (``ValueError`` naming the argument); the other arguments as in :class:`ROME`."""
        unknown = sorted(set(hparams) - set(self.hparams_class.field_names()))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown hyper-parameter(s) {unknown}")
        self.hparams_class.check(type(self).__name__, hparams)
        self._given = dict(hparams)
        self._arch_overrides = dict(
            rewrite_module_tmp=rewrite_module_tmp, mlp_module_tmp=mlp_module_tmp, layer_module_tmp=layer_module_tmp,
            layers_module=layers_module, ln_f_module=ln_f_module, lm_head_module=lm_head_module,
        )
        if context_templates is not None:
            bad = [t for t in context_templates if not isinstance(t, str) or t.count("{}") != 1 or not t.endswith("{}")]
            if bad or not context_templates:
                raise EditError(f"{type(self).__name__}: context_templates must be strings ending in one '{{}}', got {bad or context_templates}")
        self.context_templates_given = context_templates
        self.mom2_dataset, self.stats_dir, self.fast, self.progress = mom2_dataset, stats_dir, fast, progress
        self._hparams: dict[str, HParams] = {}
        self._templates: dict[str, list[str]] = {}
        self._moments = SecondMomentCache()
        self._fast_ok: dict[tuple, bool] = {}

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer: Any, **overrides: Any) -> "LocateEditor":
        """An editor with this model's presets (``overrides`` = constructor arguments), statistics ready."""
        editor = cls(**overrides)
        editor.prepare(model, tokenizer)
        return editor

    # -- configuration -------------------------------------------------------------------------------------------
    def hparams(self, model: nn.Module) -> HParams:
        """The resolved hyper-parameters for ``model`` (an instance of ``hparams_class``: defaults <- preset <-
        constructor arguments), resolved once per model."""
        key = model_key(model)
        if key not in self._hparams:
            self._hparams[key] = resolve_hparams(model, self.method, self._given, self.hparams_class)
        return self._hparams[key]

    def arch(self, model: nn.Module) -> ArchTemplates:
        return arch_templates(model, **self._arch_overrides)

    def modules(self, model: nn.Module) -> list[str]:
        """Names of the edited modules (MLP output projections), ascending layer."""
        arch, hp = self.arch(model), self.hparams(model)
        return [arch.rewrite_module_tmp.format(layer) for layer in sorted(hp.layers)]

    def edited_parameters(self, model: nn.Module) -> list[str]:
        return [f"{m}.weight" for m in self.modules(model)]

    def matrices(self, model: nn.Module) -> dict[int, EditedMatrix]:
        arch, hp = self.arch(model), self.hparams(model)
        return {layer: EditedMatrix(model, arch.rewrite_module_tmp.format(layer)) for layer in sorted(hp.layers)}

    # -- requests --------------------------------------------------------------------------------------------------
    @staticmethod
    def check_requests(requests: Sequence[EditRequest | Mapping[str, Any]]) -> list[EditRequest]:
        """Validated requests (dicts are coerced); raises EditRequestError naming the request index and field."""
        if not requests:
            raise EditError("no edit requests given")
        out = [EditRequest.coerce(r, f"request {i}") for i, r in enumerate(requests)]
        for i, r in enumerate(out):
            validate_request(r, f"request {i}")
        return out

    @staticmethod
    def where(i: int, r: EditRequest) -> str:
        return f"request {i}" + (f" (case_id {r.case_id})" if r.case_id is not None else "")

    # -- context templates -------------------------------------------------------------------------------------------
    def context_templates(self, model: nn.Module, tok: Any) -> list[str]:
        """The given templates; else, with ``context_template_lengths``, ``["{}"]`` + greedy generations (made once
        per model for this instance); else the fixed :data:`~lit_prune.editors.tokens.CONTEXT_TEMPLATES`."""
        if self.context_templates_given is not None:
            return list(self.context_templates_given)
        lengths = self.hparams(model).context_template_lengths
        if not lengths:
            return list(CONTEXT_TEMPLATES)
        key = model_key(model)
        if key not in self._templates:
            self._templates[key] = generate_context_templates(model, tok, lengths)
        return self._templates[key]

    # -- statistics ----------------------------------------------------------------------------------------------
    def _stats_key(self, model: nn.Module, module: str) -> tuple:
        hp = self.hparams(model)
        return (model_key(model), module, self.mom2_dataset, hp.mom2_n_samples, hp.mom2_max_length)

    def set_second_moment(self, model: nn.Module, layer: int, C: Tensor) -> None:
        """Use ``C`` (k_dim × k_dim, E[k kᵀ]) for ``layer`` of ``model`` instead of computed/cached statistics."""
        module = self.arch(model).rewrite_module_tmp.format(layer)
        k_dim = EditedMatrix(model, module).k_dim
        if tuple(C.shape) != (k_dim, k_dim):
            raise EditError(f"set_second_moment: '{module}' needs a ({k_dim}, {k_dim}) matrix, got {tuple(C.shape)}")
        key = self._stats_key(model, module)
        self._moments[key] = C.detach().to(device=next(model.parameters()).device, dtype=torch.float64)

    def load_stats(self, model: nn.Module, tok: Any) -> None:
        """Load (or compute in one pass, then cache on disk) C for every edited layer not yet held."""
        hp = self.hparams(model)
        need = [m for m in self.modules(model) if self._stats_key(model, m) not in self._moments]
        if not need:
            return
        stats = second_moments(
            model, tok, need, source=self.mom2_dataset, n_samples=hp.mom2_n_samples,
            max_length=hp.mom2_max_length, stats_dir=self.stats_dir, progress=self.progress,
        )
        device = next(model.parameters()).device
        for m, st in stats.items():
            k_dim = EditedMatrix(model, m).k_dim
            if tuple(st.mom2.shape) != (k_dim, k_dim):
                raise EditError(f"statistics for '{m}' have shape {tuple(st.mom2.shape)}, expected ({k_dim}, {k_dim})")
            self._moments[self._stats_key(model, m)] = st.moment().to(device)

    def second_moment(self, model: nn.Module, tok: Any, module: str) -> Tensor:
        """C = E[k kᵀ] of ``module``'s input, float64 on the model's device."""
        key = self._stats_key(model, module)
        if key not in self._moments:
            self.load_stats(model, tok)
        return self._moments[key]

    def solve_C(self, model: nn.Module, tok: Any, module: str, rhs: Tensor) -> Tensor:
        """C⁻¹ rhs in float64 (rhs: (k_dim, n)), from a Cholesky factor of C cached on this instance (LU if C is not
        numerically positive definite; :class:`~lit_prune.stats.SecondMomentCache`)."""
        self.second_moment(model, tok, module)  # loaded or computed if not held yet
        return self._moments.solve(self._stats_key(model, module), rhs)

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, tokenizer: Any) -> None:
        """Resolve presets and templates (errors surface here), generate context templates, load/compute statistics."""
        self.matrices(model)
        self.context_templates(model, tokenizer)

    def use_fast(self, model: nn.Module, tok: Any, prompts: PromptSet, layer: int, where: str, loss_layer: int | None) -> bool:
        """Whether the fast δ forward is on and matches the plain one on this model (checked once per model/site)."""
        if not self.fast:
            return False
        key = (model_key(model), where)
        if key not in self._fast_ok:
            ok, why = fast_path_matches(model, self.arch(model), prompts.subset(2), layer, where, loss_layer,
                                        pad_id(tok))
            if not ok:
                warnings.warn(f"{type(self).__name__}: the fast forward does not match the plain one on this model "
                              f"({why}); using the plain forward (slower, same result)", stacklevel=3)
            self._fast_ok[key] = ok
        return self._fast_ok[key]

    @staticmethod
    def finite_update(up: LowRankUpdate, what: str) -> LowRankUpdate:
        if not up.is_finite():
            raise EditError(f"{what} is not finite (NaN/inf); nothing was written")
        return up


class ClosedFormEditor(LocateEditor):
    """Base of the closed-form editors (ROME, MEMIT, AlphaEdit): the arguments they share, declared once.

    Every hyper-parameter left as None takes the preset of the edited model (:mod:`lit_prune.editors.presets`):
    ``v_num_grad_steps``, ``v_lr``, ``v_loss_layer`` (the layer whose output is read by the loss; default the last),
    ``v_weight_decay``, ``clamp_norm_factor``, ``kl_factor`` and ``early_stop_loss`` of the δ optimisation
    (:mod:`~lit_prune.editors.compute_v`); ``mom2_n_samples`` / ``mom2_max_length`` (texts and tokens per text for
    the key statistics C, from ``mom2_dataset``). Context templates: the fixed
    :data:`~lit_prune.editors.tokens.CONTEXT_TEMPLATES` unless ``context_templates`` (strings ending in ``"{}"``)
    or ``context_template_lengths`` (ROME-style: greedy generations of that many new tokens from 5 seeds per length)
    are given. Module templates default to the architecture's. ``fast=False`` runs the plain full forward at every
    optimisation step (same result, slower). ``stats_dir`` defaults to ``cache_dir()/stats``.
    """

    def __init__(
        self,
        *,
        v_num_grad_steps: int | None = None,
        v_lr: float | None = None,
        v_loss_layer: int | None = None,
        v_weight_decay: float | None = None,
        clamp_norm_factor: float | None = None,
        kl_factor: float | None = None,
        early_stop_loss: float | None = None,
        mom2_n_samples: int | None = None,
        mom2_max_length: int | None = None,
        context_template_lengths: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            v_num_grad_steps=v_num_grad_steps, v_lr=v_lr, v_loss_layer=v_loss_layer, v_weight_decay=v_weight_decay,
            clamp_norm_factor=clamp_norm_factor, kl_factor=kl_factor, early_stop_loss=early_stop_loss,
            mom2_n_samples=mom2_n_samples, mom2_max_length=mom2_max_length,
            context_template_lengths=context_template_lengths, **kwargs,
        )


class restored_weights:
    """Context manager: snapshot the given matrices' weights and copy them back exactly on exit (sequential edits
    inside one ``compute`` call are applied temporarily, the caller's weights are left untouched)."""

    def __init__(self, matrices: Sequence[EditedMatrix]) -> None:
        self.matrices = list(matrices)

    def __enter__(self) -> "restored_weights":
        self.saved = [m.weight.detach().clone() for m in self.matrices]
        return self

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for m, w in zip(self.matrices, self.saved):
                m.weight.copy_(w)


def concat_updates(parts: Mapping[str, list[LowRankUpdate]]) -> Updates:
    return {name: LowRankUpdate.concat(ups) for name, ups in parts.items() if ups}
