"""MEMIT (Meng et al., 2023): a batch of edits spread over several MLP output matrices.

With edited layers l_0 < … < l_{L-1} and the batch's requests as columns::

    z_j  = h_j + δ_j   residual stream after the LAST edited layer at request j's subject last token, δ_j optimised
                       as in ROME (compute_v.py, ``where="layer"``), on the unedited model
    for i, l in enumerate(layers):                      (each layer sees the updates of the layers before it)
        K   = [k*_j]        (k_dim, n) keys at layer l, averaged over context templates     (compute_ks.py)
        R   = z − h_cur     (hidden, n) what is still missing at the last edited layer, bare prompts
        Δ_l = (R / (L − i)) Kᵀ (λ C_l + K Kᵀ)⁻¹       λ = mom2_update_weight, solved in float64

(λC + KKᵀ)⁻¹K comes from the cached Cholesky factor of C and the Woodbury identity,
(λC + KKᵀ)⁻¹K = X (I + KᵀX)⁻¹ with X = (λC)⁻¹K, so only an n × n system is solved per batch. Δ_l is returned as
factors V = R/(L − i) and K' = (λC + KKᵀ)⁻¹K (rank ≤ n) in the stored orientation. Weights are restored on return.
"""

from __future__ import annotations

import time
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..requests import EditRequest
from .base import EditError, Updates
from .compute_ks import compute_ks, reprs_at_subject
from .compute_v import optimize_delta, optimize_deltas
from .delta_forward import DeltaForward
from .hparams import MEMITHParams
from .locate import ClosedFormEditor, concat_updates, restored_weights
from ..text import pad_id
from .tokens import prompt_set


def memit_key_solve(solve_C: Any, K: Tensor, lam: float) -> Tensor:
    """(λC + KKᵀ)⁻¹ K in float64 for K (k_dim, n), given ``solve_C``: rhs ↦ C⁻¹ rhs (Woodbury identity)."""
    K = K.double()
    X = solve_C(K) / lam  # (λC)⁻¹ K
    n = K.shape[1]
    S = torch.eye(n, dtype=torch.float64, device=X.device) + K.to(X.device).T @ X  # symmetric positive definite
    return torch.linalg.solve(S, X.T).T


class MEMIT(ClosedFormEditor):
    """Mass-Editing Memory in a Transformer. ``MEMIT.for_model(model, tok)`` then ``editor.apply(model, tok, reqs)``.

    ``layers`` lists the edited layers (None: the model's preset); δ is optimised on the residual stream after the
    last of them and clamped to ``clamp_norm_factor`` × its norm. ``mom2_update_weight`` (λ; None: the preset). The
    shared arguments are :class:`~lit_prune.editors.locate.ClosedFormEditor`'s. ``batch_z``: True: the z of a
    batch's requests are optimised together, each with its own δ and early stop (same result as one at a time up to
    float rounding); False: one request at a time; ``"auto"`` (default): together on an accelerator, one at a time
    on a CPU. Decision: on a CPU the stacked rows are padded to the longest prompt and each request's optimisation
    is already compute-bound, so batching costs more than it saves (``benchmarks/results/scaling.md``: 6.0 s per
    edit alone, 7.5 one at a time and 8.1 batched in a batch of 10, 9.4 batched in a batch of 50). ``z_batch_size``
    caps the requests optimised together (memory; None: all).
    """

    method = "memit"
    hparams_class: type[MEMITHParams] = MEMITHParams

    def __init__(
        self,
        layers: list[int] | None = None,
        mom2_update_weight: float | None = None,
        batch_z: bool | Literal["auto"] = "auto",
        z_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if batch_z not in (True, False, "auto"):
            raise ValueError(f"{type(self).__name__}: batch_z must be True, False or 'auto', got {batch_z!r}")
        self.batch_z = batch_z
        """Optimise the z of a batch's requests together (one batched forward/backward per step, identical result up
        to float rounding; :func:`~lit_prune.editors.compute_v.optimize_deltas`); False: one request at a time;
        ``"auto"``: together unless the model is on a CPU (:meth:`batches_z`)."""
        self.z_batch_size = z_batch_size
        """At most this many requests per batched z optimisation (memory; None: the whole batch)."""
        if self.z_batch_size is not None and int(self.z_batch_size) < 1:
            raise ValueError(f"{type(self).__name__}: z_batch_size must be >= 1 or None, got {self.z_batch_size}")
        super().__init__(layers=layers, mom2_update_weight=mom2_update_weight, **kwargs)
        self.last_keys: dict[str, Tensor] = {}
        """Edited module -> the keys K (k_dim, n), float64, of the latest :meth:`compute`'s batch."""
        self.last_info: list[dict[str, Any]] = []
        """One record per request of the latest :meth:`compute` (z optimisation: losses, steps, seconds; ``h``: the
        residual stream after the last edited layer at the subject's last token of the bare prompt before the edit,
        ``z`` = h + δ its target, both (hidden,) float32; ``prompts``: the
        :class:`~lit_prune.editors.tokens.PromptSet` whose tokens z was optimised on)."""

    def prepare(self, model: nn.Module, tokenizer: Any) -> None:
        super().prepare(model, tokenizer)
        self.load_stats(model, tokenizer)

    def batches_z(self, model: nn.Module) -> bool:
        """Whether a batch's z are optimised together on ``model`` (``batch_z``; ``"auto"``: not on a CPU)."""
        if self.batch_z == "auto":
            return next(model.parameters()).device.type != "cpu"
        return bool(self.batch_z)

    def compute_zs(self, model: nn.Module, tok: Any, requests: list[EditRequest], templates: list[str]) -> Tensor:
        """(hidden, n) float64 target residuals z at the last edited layer (records in ``last_info``). With
        ``batch_z`` and several requests the δ of all requests are optimised together (:meth:`compute_zs_batched`)."""
        if self.batches_z(model) and len(requests) > 1:
            return self.compute_zs_batched(model, tok, requests, templates)
        hp, arch = self.hparams(model), self.arch(model)
        z_layer = max(hp.layers)
        zs = []
        self.last_info = []
        for i, r in enumerate(requests):
            t0 = time.perf_counter()
            ps = prompt_set(tok, r, templates, where=self.where(i, r))
            fast = self.use_fast(model, tok, ps, z_layer, "layer", hp.v_loss_layer)
            forward = DeltaForward(model, arch, ps, z_layer, "layer", hp.v_loss_layer, fast, pad_id(tok))
            res = optimize_delta(forward, hp.delta())
            zs.append(res.target.double())
            self.last_info.append({"request": i, "losses": res.losses, "steps": len(res.losses), "fast": fast,
                                   "h": res.v_init, "z": res.target, "seconds": time.perf_counter() - t0,
                                   "prompts": ps})
        return torch.stack(zs, 1)

    def compute_zs_batched(self, model: nn.Module, tok: Any, requests: list[EditRequest],
                           templates: list[str]) -> Tensor:
        """:meth:`compute_zs` with every request's δ optimised in one batched forward/backward per step
        (:func:`~lit_prune.editors.compute_v.optimize_deltas`); ``seconds`` in ``last_info`` is the batch's time
        divided by the number of requests."""
        hp, arch = self.hparams(model), self.arch(model)
        z_layer = max(hp.layers)
        t0 = time.perf_counter()
        sets = [prompt_set(tok, r, templates, where=self.where(i, r)) for i, r in enumerate(requests)]
        fast = self.use_fast(model, tok, sets[0], z_layer, "layer", hp.v_loss_layer)
        chunk = len(sets) if self.z_batch_size is None else int(self.z_batch_size)
        results = []
        for a in range(0, len(sets), chunk):
            part = sets[a: a + chunk]
            forward = DeltaForward(model, arch, part if len(part) > 1 else part[0], z_layer, "layer",
                                   hp.v_loss_layer, fast, pad_id(tok))
            results += optimize_deltas(forward, hp.delta()) if len(part) > 1 else [optimize_delta(forward, hp.delta())]
        seconds = (time.perf_counter() - t0) / len(requests)
        self.last_info = [{"request": i, "losses": res.losses, "steps": len(res.losses), "fast": fast,
                           "h": res.v_init, "z": res.target, "seconds": seconds, "batched": True,
                           "prompts": sets[i]} for i, res in enumerate(results)]
        return torch.stack([res.target.double() for res in results], 1)

    # -- the batch's targets and the closed-form update, separately (rank-shared work: SequentialEditingModule) ----
    shares_targets = True
    """:meth:`compute` = :meth:`compute_from_targets` (:meth:`compute_targets`): the per-request targets are
    independent of each other, so several processes may compute shares of a batch's targets and all solve the same
    update (``SequentialEditingModule.training_step`` with ``world_size > 1``)."""

    def _checked(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest | Mapping[str, Any]]
                 ) -> tuple[list[EditRequest], list[str]]:
        """Validated requests and the context templates; raises EditRequestError/EditError naming the request
        before anything is computed."""
        reqs = self.check_requests(requests)
        self.matrices(model)
        templates = self.context_templates(model, tokenizer)
        for i, r in enumerate(reqs):  # tokenisation errors (empty target) before any work
            prompt_set(tokenizer, r, templates[:1], where=self.where(i, r))
        return reqs, templates

    def compute_targets(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest | Mapping[str, Any]],
                        indices: Sequence[int] | None = None) -> Tensor:
        """(hidden, len(indices)) float64 targets z of ``requests[i]`` for i in ``indices`` (default: all),
        computed on the current weights. Every request of ``requests`` is validated first (same errors as
        :meth:`compute`, whatever the indices), so processes sharing a batch fail or succeed together."""
        reqs, templates = self._checked(model, tokenizer, requests)
        idx = range(len(reqs)) if indices is None else list(indices)
        if not idx:
            hidden = model.get_input_embeddings().embedding_dim
            return torch.zeros(hidden, 0, dtype=torch.float64, device=next(model.parameters()).device)
        return self.compute_zs(model, tokenizer, [reqs[i] for i in idx], templates)

    def compute(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest | Mapping[str, Any]]) -> Updates:
        """Updates of every edited layer for the batch ``requests``, computed on the current weights (left as they
        were). Raises EditRequestError/EditError naming the request before anything is computed."""
        reqs, templates = self._checked(model, tokenizer, requests)
        self.load_stats(model, tokenizer)
        zs = self.compute_zs(model, tokenizer, reqs, templates)
        return self.compute_from_targets(model, tokenizer, reqs, zs, _checked=(reqs, templates))

    def compute_from_targets(self, model: nn.Module, tokenizer: Any,
                             requests: Sequence[EditRequest | Mapping[str, Any]], targets: Tensor,
                             _checked: tuple[list[EditRequest], list[str]] | None = None) -> Updates:
        """The updates of :meth:`compute` for the batch ``requests`` given their targets z (hidden, n) (from
        :meth:`compute_targets`, possibly gathered from several processes), on the current weights (left as they
        were)."""
        reqs, templates = _checked if _checked is not None else self._checked(model, tokenizer, requests)
        hp, arch, mats = self.hparams(model), self.arch(model), self.matrices(model)
        hidden = model.get_input_embeddings().embedding_dim
        if tuple(targets.shape) != (hidden, len(reqs)):
            raise EditError(f"{type(self).__name__}.compute_from_targets: targets must be ({hidden}, {len(reqs)}), "
                            f"got {tuple(targets.shape)}")
        self.load_stats(model, tokenizer)
        layers = sorted(mats)
        z_module = arch.layer_module_tmp.format(layers[-1])
        zs = targets.double()
        lam = float(hp.mom2_update_weight)
        parts: dict[str, list] = {m.param_name: [] for m in mats.values()}
        with restored_weights(list(mats.values())):
            for i, layer in enumerate(layers):
                mat = mats[layer]
                K = compute_ks(model, tokenizer, reqs, templates, mat.name).T.double()  # (k_dim, n)
                cur = reprs_at_subject(model, tokenizer, reqs, ["{}"], z_module, "out")[:, 0].T.double()  # (hidden, n)
                R = zs.to(cur.device) - cur
                resid = R / (len(layers) - i)
                adj = self.key_solve(model, tokenizer, mat.name, K, lam)  # (k_dim, n)
                up = self.finite_update(
                    mat.update(V=resid.to(adj.device), K=adj),
                    f"MEMIT update of '{mat.param_name}' for requests {[self.where(j, r) for j, r in enumerate(reqs)]}",
                )
                parts[mat.param_name].append(up)
                self.last_keys[mat.name] = K
                if i < len(layers) - 1:
                    mat.add_(up)
        return concat_updates(parts)

    def key_solve(self, model: nn.Module, tok: Any, module: str, K: Tensor, lam: float) -> Tensor:
        """K' (k_dim, n), float64, with Δ = R K'ᵀ: MEMIT's (λC + KKᵀ)⁻¹ K (subclasses change the update here)."""
        return memit_key_solve(lambda x: self.solve_C(model, tok, module, x), K, lam)
