"""The δ optimisation shared by ROME (``compute_v``: δ on the MLP output of the edited layer) and MEMIT (``compute_z``:
δ on the residual stream after the last edited layer).

For one request, δ (hidden size) is added at the subject's last token of every prompt (one rewriting prompt per
context template, plus the KL prompt ``"{subject} is a"``) and optimised with Adam (lr ``v_lr``)::

    loss = mean_templates NLL(target_new)  +  kl_factor · KL(p_δ ‖ p_0) on the KL prompt
           + v_weight_decay · ‖δ‖ / ‖v‖²

with ``‖δ‖`` clamped to ``clamp_norm_factor · ‖v‖`` after each step and an early stop once the loss is below
``early_stop_loss`` (ROME: 5e-2). ``v`` is the value at δ = 0 at the subject's last token of the first prompt (the
bare prompt). As in ROME's code, the weight-decay term is ‖δ‖/‖v‖² (not squared), the KL is measured at the subject's
last token of the KL prompt, and the last of ``v_num_grad_steps`` iterations only evaluates the loss.

The loss is computed from the log-probabilities that a :class:`~lit_prune.editors.delta_forward.DeltaForward` returns
for a given δ (:mod:`lit_prune.editors.delta_forward`: the plain forward, or the fast one that recomputes only what δ
can change; both give the same loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import nethook
from .delta_forward import DeltaForward
from .hparams import DeltaHParams


@dataclass
class DeltaResult:
    """``v_init`` (hidden,) float32: the value at δ = 0 (subject's last token of the bare prompt); ``delta``: the
    optimised δ (float32); ``target`` = v_init + δ; ``losses``: total loss per evaluated iteration."""

    v_init: Tensor
    delta: Tensor
    losses: list[float] = field(default_factory=list)

    @property
    def target(self) -> Tensor:
        return self.v_init + self.delta


def optimize_delta(forward: DeltaForward, hp: DeltaHParams) -> DeltaResult:
    """Run ROME's δ optimisation (see the module docstring) with ``forward``; returns v_init and δ."""
    p = forward.p
    T = len(p.target)
    hidden = forward.model.get_input_embeddings().embedding_dim
    delta = torch.zeros(hidden, device=forward.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    kl_init: Tensor | None = None
    v_init: Tensor | None = None
    losses: list[float] = []
    with torch.enable_grad(), nethook.frozen(forward.model):
        for it in range(hp.v_num_grad_steps):
            opt.zero_grad()
            logp_t, kl_logp, v0 = forward(delta)
            if kl_init is None:
                kl_init, v_init = kl_logp.detach().clone(), v0.detach().clone()
            nll = -(logp_t.view(p.n_rewrite, T).sum(1) / T).mean()
            kl = hp.kl_factor * F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
            wd = hp.v_weight_decay * (delta.norm() / v_init.norm() ** 2)
            loss = nll + kl + wd
            losses.append(loss.item())
            if not torch.isfinite(loss):
                break
            if loss.item() < hp.early_stop_loss or it == hp.v_num_grad_steps - 1:
                break
            loss.backward()
            opt.step()
            max_norm = hp.clamp_norm_factor * v_init.norm()
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    assert v_init is not None
    return DeltaResult(v_init, delta.detach().clone(), losses)


def optimize_deltas(forward: DeltaForward, hp: DeltaHParams, shrink: float = 0.75) -> list[DeltaResult]:
    """:func:`optimize_delta` for every request of a batched ``forward`` (built on several prompt sets) at once.

    Each request has its own δ and its own Adam state; each step runs ONE batched forward/backward
    (:meth:`DeltaForward.many`). A request stops exactly where the one-request optimisation would (loss below
    ``early_stop_loss``, non-finite loss, last iteration) and its δ stays frozen while the others continue. Once the
    requests still optimising are at most ``shrink`` × those in the forward, the forward is rebuilt on them alone,
    so finished requests stop costing compute (the total work is then about the per-request optimisations' own).
    Rows never interact, so request j's loss and gradient depend on δ_j alone: the result equals one
    :func:`optimize_delta` per request up to float rounding.
    """
    sets = forward.sets
    n = len(sets)
    dev = forward.device
    hidden = forward.model.get_input_embeddings().embedding_dim
    deltas = [torch.zeros(hidden, device=dev, requires_grad=True) for _ in range(n)]
    opts = [torch.optim.Adam([d], lr=hp.v_lr) for d in deltas]
    tgt_len = torch.tensor([float(len(ps.target)) for ps in sets], device=dev)
    n_rw = torch.tensor([float(ps.n_rewrite) for ps in sets], device=dev)
    kl_init: list[Tensor] = []  # per request: its KL rows' log-distribution at δ = 0
    v_init: Tensor | None = None
    losses: list[list[float]] = [[] for _ in range(n)]
    active = list(range(n))
    local = list(range(n))  # the requests in the current forward, in its order
    with torch.enable_grad(), nethook.frozen(forward.model):
        for it in range(hp.v_num_grad_steps):
            if not active:
                break
            if len(active) <= shrink * len(local):
                forward = DeltaForward(forward.model, forward.arch, [sets[j] for j in active], forward.layer,
                                       forward.where, forward.loss_layer, forward.fast, forward.pad_id)
                local = list(active)
            m = len(local)
            t_req, kl_req = forward.t_req, forward.kl_req
            n_kl = torch.bincount(kl_req, minlength=m).clamp_min(1).float()  # per-request batchmean
            idx = torch.tensor(local, device=dev)
            for j in active:
                opts[j].zero_grad()
            logp_t, kl_logp, v0 = forward.many(torch.stack([deltas[j] for j in local]))
            if v_init is None:
                v_init = v0.detach().clone()
                kl_init = [kl_logp[kl_req == j].detach().clone() for j in range(n)]
            kl_ref = torch.cat([kl_init[j] for j in local], 0)
            # per request: nll_j = -mean over its rewriting rows of (sum of its row's target log-probs / T_j)
            nll = -torch.zeros(m, device=dev).index_add(0, t_req, logp_t / tgt_len[idx][t_req]) / n_rw[idx]
            kl_rows = F.kl_div(kl_ref, kl_logp, log_target=True, reduction="none").sum(1)
            kl = hp.kl_factor * torch.zeros(m, device=dev).index_add(0, kl_req, kl_rows) / n_kl
            wd = hp.v_weight_decay * torch.stack([deltas[j].norm() for j in local]) / v_init[idx].norm(dim=1) ** 2
            loss = nll + kl + wd
            values = dict(zip(local, loss.tolist()))
            stepping = []
            for j in active:
                losses[j].append(values[j])
                if not math.isfinite(values[j]) or values[j] < hp.early_stop_loss or it == hp.v_num_grad_steps - 1:
                    continue
                stepping.append(j)
            active = stepping
            if not stepping:
                break
            pos = {j: k for k, j in enumerate(local)}
            loss[[pos[j] for j in stepping]].sum().backward()
            for j in stepping:
                opts[j].step()
                max_norm = hp.clamp_norm_factor * v_init[j].norm()
                with torch.no_grad():
                    if deltas[j].norm() > max_norm:
                        deltas[j].mul_(max_norm / deltas[j].norm())
    assert v_init is not None
    return [DeltaResult(v_init[j].clone(), deltas[j].detach().clone(), losses[j]) for j in range(n)]
