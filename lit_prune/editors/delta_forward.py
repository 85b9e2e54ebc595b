"""The forward pass of the δ optimisation (:mod:`lit_prune.editors.compute_v`): log-probabilities of the targets
and the KL distribution for a given δ added at the subject's last token.

Two forward implementations compute exactly the same loss:

* plain (``fast=False``): the whole model on the padded prompts every step, logits over every position;
* fast (default): nothing that δ cannot change is recomputed. The prompts are split at the subject's last token:
  the PREFIX (tokens before it) is run once through the whole model and kept as a key/value cache; the hidden
  state entering the first layer that δ affects is computed once for the SUFFIX tokens; each step then runs only
  the suffix tokens through the layers from the edited one up to ``v_loss_layer`` (lower layers are skipped), and
  the LM head only at the positions the loss reads. Attention uses an explicit 4-D additive mask and explicit
  position ids, so padding and the split never change what a token sees.
  :func:`fast_path_matches` compares both on a request; editors run it once per model and fall back to the plain
  path (with a warning) if the model does not support the fast one.

Several requests at once: ``DeltaForward(model, arch, [ps_0, ps_1, ...], ...)`` stacks the rows of every request's
prompt set into one batch (padding and the split handled as above, since rows never see each other) and
:meth:`DeltaForward.many` takes one δ per request, (n, hidden), adding δ_j to the rows of request j only. The
single-request call ``forward(delta)`` is unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nethook
from .architectures import ArchTemplates
from ..text import pad_batch
from .tokens import PromptSet

Where = Literal["mlp", "layer"]
"""Where δ is added: the MLP output of the edited layer (ROME) or the residual stream after it (MEMIT)."""


def _base_model(model: nn.Module) -> nn.Module:
    prefix = getattr(model, "base_model_prefix", None)
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, nn.Module):
        raise RuntimeError(f"cannot find the base (decoder) model of {type(model).__name__}")
    return base


def _cache_kwarg(base: nn.Module) -> str:
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class DeltaForward:
    """``forward(delta) -> (target_logp, kl_logp, v0)`` for one :class:`PromptSet`.

    ``target_logp``: (M,) float32 log-probabilities of the scored target tokens (:meth:`PromptSet.loss_positions`
    order); ``kl_logp``: (n_kl, vocab) float32 log-distribution at the subject's last token of each KL prompt;
    ``v0``: (hidden,) the value δ is added to at row 0 (without δ), detached float32.

    ``where="mlp"``: δ is added to the output of ``mlp_module_tmp.format(layer)``; ``where="layer"``: to the output of
    ``layer_module_tmp.format(layer)`` (the residual stream). The loss reads the logits after ``loss_layer``.
    """

    def __init__(
        self, model: nn.Module, arch: ArchTemplates, prompts: PromptSet | Sequence[PromptSet], layer: int, where: Where,
        loss_layer: int | None = None, fast: bool = True, pad_id: int = 0,
    ) -> None:
        self.model, self.arch, self.p, self.layer, self.where, self.fast = model, arch, prompts, layer, where, fast
        self.layers = model.get_submodule(arch.layers_module)
        n = len(self.layers)
        self.loss_layer = n - 1 if loss_layer is None else loss_layer
        self.base = _base_model(model)
        self.lm_head = model.get_submodule(arch.lm_head_module)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.pad_id = pad_id
        self.batched = not isinstance(prompts, PromptSet)
        self.sets: list[PromptSet] = list(prompts) if self.batched else [prompts]  # type: ignore[arg-type]
        if not self.sets:
            raise ValueError("DeltaForward: no prompt sets given")
        self.p = self.sets[0]
        self.all_ids: list[list[int]] = []
        self.all_lookup: list[int] = []
        rows, tpos, tids, treq, klrows, klreq, rowreq, self.first_rows = [], [], [], [], [], [], [], []
        for j, ps in enumerate(self.sets):
            off = len(self.all_ids)
            self.first_rows.append(off)
            for r, c, t in ps.loss_positions():
                rows.append(off + r), tpos.append(c), tids.append(t), treq.append(j)
            klrows += [off + r for r in range(ps.n_rewrite, len(ps.ids))]
            klreq += [j] * (len(ps.ids) - ps.n_rewrite)
            rowreq += [j] * len(ps.ids)
            self.all_ids += [list(x) for x in ps.ids]
            self.all_lookup += list(ps.lookup)
        dev = self.device
        self.t_rows = torch.tensor(rows, device=dev)
        self.t_pos = torch.tensor(tpos, device=dev)
        self.t_ids = torch.tensor(tids, device=dev)
        self.t_req = torch.tensor(treq, device=dev)
        """(M,) the request of each scored target token."""
        self.kl_rows = torch.tensor(klrows, dtype=torch.long, device=dev)
        self.kl_req = torch.tensor(klreq, dtype=torch.long, device=dev)
        """(n_kl,) the request of each KL row."""
        self.row_req = torch.tensor(rowreq, device=dev)
        """(B,) the request of each row."""
        self.first_rows_t = torch.tensor(self.first_rows, device=dev)
        self.lookup = torch.tensor(self.all_lookup, device=dev)
        self.B = len(self.all_ids)
        self.upper = list(self.layers)[self.loss_layer + 1:]  # layers above the loss layer never matter
        self.tuple_output = False
        if fast:
            self._prepare_fast()
        else:
            self.ids, self.mask, _, _ = pad_batch(self.all_ids, pad_id, "right", self.device)

    # -- plain ------------------------------------------------------------------------------------------------------
    def _plain(self, delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``delta``: (hidden,) for the single-request call, (n, hidden) from :meth:`many` (row i gets
        ``delta[row_req[i]]``); v0: (hidden,) resp. (n, hidden)."""
        rows = torch.arange(self.B, device=self.device)
        v0: list[Tensor] = []
        many = delta.dim() == 2

        def add(y: Tensor) -> Tensor:
            if many:
                v0.append(y[self.first_rows_t, self.lookup[self.first_rows_t]].detach().float())
            else:
                v0.append(y[0, self.lookup[0]].detach().float())
            bump = torch.zeros_like(y)
            bump[rows, self.lookup] = (delta[self.row_req] if many else delta).to(y.dtype)
            return y + bump

        module = self.model.get_submodule(self._inject_name())
        with nethook.skip_modules(self.upper, self.tuple_output), nethook.edit_output(module, add):
            if self.upper:
                h = self.base(input_ids=self.ids, attention_mask=self.mask, use_cache=False).last_hidden_state
                logits = self.lm_head(h)
            else:
                logits = self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False).logits
        logp_t = F.log_softmax(logits[self.t_rows, self.t_pos].float(), -1).gather(1, self.t_ids[:, None])[:, 0]
        kl = F.log_softmax(logits[self.kl_rows, self.lookup[self.kl_rows]].float(), -1)
        return logp_t, kl, v0[0]

    def _inject_name(self) -> str:
        tmp = self.arch.mlp_module_tmp if self.where == "mlp" else self.arch.layer_module_tmp
        return tmp.format(self.layer)

    # -- fast -------------------------------------------------------------------------------------------------------
    def _mask(self, q_pos: Tensor, k_pos: Tensor, k_valid: Tensor, q_is_k: Tensor) -> Tensor:
        """(B, 1, Q, K) additive mask: key visible iff valid and not after the query; each query sees itself."""
        ok = (k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])) | q_is_k
        m = torch.zeros(ok.shape, dtype=self.dtype, device=self.device)
        m.masked_fill_(~ok, torch.finfo(self.dtype).min)
        return m[:, None]

    @torch.no_grad()
    def _prepare_fast(self) -> None:
        ids, dev = self.all_ids, self.device
        cut = self.all_lookup  # prefix = tokens before the subject's last token
        lens = [len(s) for s in ids]
        P, S = max(cut), max(n - c for n, c in zip(lens, cut))
        self.cache_kw = _cache_kwarg(self.base)
        c = torch.tensor(cut, device=dev)
        ln = torch.tensor(lens, device=dev)
        # prefix: rows right-padded to P; position ids = token index
        pre_ids = torch.full((self.B, P), self.pad_id, dtype=torch.long, device=dev)
        for i, s in enumerate(ids):
            if cut[i]:
                pre_ids[i, : cut[i]] = torch.tensor(s[: cut[i]], device=dev)
        pre_pos = torch.arange(P, device=dev).expand(self.B, P)
        pre_valid = pre_pos < c[:, None]
        eyeP = torch.eye(P, dtype=torch.bool, device=dev)[None]
        # suffix: the subject's last token onwards, right-padded to S; positions continue the prefix
        suf_ids = torch.full((self.B, S), self.pad_id, dtype=torch.long, device=dev)
        for i, s in enumerate(ids):
            suf_ids[i, : lens[i] - cut[i]] = torch.tensor(s[cut[i]:], device=dev)
        suf_pos = c[:, None] + torch.arange(S, device=dev)[None]
        suf_valid = suf_pos < ln[:, None]
        eyeS = torch.cat([torch.zeros(1, S, P, dtype=torch.bool, device=dev),
                          torch.eye(S, dtype=torch.bool, device=dev)[None].expand(1, S, S)], 2)
        self.suf_ids, self.suf_pos = suf_ids, suf_pos
        self.suf_mask = self._mask(suf_pos, torch.cat([pre_pos, suf_pos], 1), torch.cat([pre_valid, suf_valid], 1),
                                   eyeS)
        tuple_seen: list[bool] = []
        probe = lambda m, a, o: tuple_seen.append(isinstance(o, tuple))  # noqa: E731
        h0 = self.layers[0].register_forward_hook(probe)
        try:
            self.cache = None
            if P:
                out = self.base(input_ids=pre_ids, attention_mask=self._mask(pre_pos, pre_pos, pre_valid, eyeP),
                                position_ids=pre_pos, use_cache=True)
                self.cache = getattr(out, "cache", None)
                if self.cache is None:
                    self.cache = getattr(out, "past_key_values", None)
                if self.cache is None:
                    raise RuntimeError("the model returned no key/value cache")
            n = len(self.layers)
            self.start = self.layer if self.where == "mlp" else self.layer + 1
            self.first = self.layers[self.start] if self.start < n else self.model.get_submodule(self.arch.ln_f_module)
            with nethook.capture_inputs({"h": self.first}, stop_after="h") as got:
                self._run_suffix()
        finally:
            h0.remove()
        self.tuple_output = bool(tuple_seen and tuple_seen[0])
        self.h_in = got["h"]  # (B, S, hidden): input of the first module δ can change
        self.lower = list(self.layers)[: self.start]
        if self.where == "mlp":
            self.inject = self.model.get_submodule(self._inject_name())
        # the suffix's scored positions, in suffix coordinates
        self.t_spos = self.t_pos - c[self.t_rows]

    def _run_suffix(self) -> Tensor:
        kw = {self.cache_kw: copy.deepcopy(self.cache), "use_cache": True} if self.cache is not None else {"use_cache": False}
        return self.base(input_ids=self.suf_ids, attention_mask=self.suf_mask, position_ids=self.suf_pos,
                         **kw).last_hidden_state

    def _fast(self, delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        v0: list[Tensor] = []
        many = delta.dim() == 2
        if self.where == "mlp":
            def add(y: Tensor) -> Tensor:
                v0.append((y[self.first_rows_t, 0] if many else y[0, 0]).detach().float())
                bump = torch.zeros_like(y)
                bump[:, 0] = (delta[self.row_req] if many else delta).to(y.dtype)
                return y + bump

            h_in = self.h_in
            ctx = nethook.edit_output(self.inject, add)
        elif many:
            v0.append(self.h_in[self.first_rows_t, 0].float())
            bump = torch.zeros_like(self.h_in)
            bump[:, 0] = delta[self.row_req].to(self.h_in.dtype)
            h_in = self.h_in + bump
            ctx = contextlib.nullcontext()
        else:
            v0.append(self.h_in[0, 0].float())
            bump = torch.zeros_like(self.h_in)
            bump[:, 0] = 1.0
            h_in = self.h_in + bump * delta.to(self.h_in.dtype)
            ctx = contextlib.nullcontext()
        with nethook.skip_modules(self.lower + self.upper, self.tuple_output), \
                nethook.replace_input(self.first, h_in), ctx:
            h = self._run_suffix()
        sel = torch.cat([h[self.t_rows, self.t_spos], h[self.kl_rows, 0]], 0)
        logits = self.lm_head(sel).float()
        M = len(self.t_rows)
        logp_t = F.log_softmax(logits[:M], -1).gather(1, self.t_ids[:, None])[:, 0]
        kl = F.log_softmax(logits[M:], -1)
        return logp_t, kl, v0[0]

    def __call__(self, delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One request's forward (``delta``: (hidden,)); with several prompt sets, δ is added to every row."""
        return self._fast(delta) if self.fast else self._plain(delta)

    def many(self, deltas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """All requests' forward in one batch: ``deltas`` (n, hidden), δ_j added to request j's rows. Returns
        ``target_logp`` (M,) in request order (``t_req`` names each entry's request), ``kl_logp`` (n_kl, vocab)
        (``kl_req``) and ``v0`` (n, hidden)."""
        if deltas.dim() != 2 or deltas.shape[0] != len(self.sets):
            raise ValueError(f"DeltaForward.many: expected ({len(self.sets)}, hidden) deltas, got {tuple(deltas.shape)}")
        return self._fast(deltas) if self.fast else self._plain(deltas)


def fast_path_matches(
    model: nn.Module, arch: ArchTemplates, prompts: PromptSet, layer: int, where: Where, loss_layer: int | None,
    pad_id: int, rtol: float | None = None,
) -> tuple[bool, str]:
    """Whether the fast forward gives the plain forward's log-probabilities and v (at a random δ) on this model;
    returns (ok, reason). Tolerance: 1e-3 relative to the spread of the values (float32), 3e-2 (16-bit)."""
    dtype = next(model.parameters()).dtype
    tol = rtol if rtol is not None else (1e-3 if dtype in (torch.float32, torch.float64) else 3e-2)
    try:
        with torch.no_grad():
            fast = DeltaForward(model, arch, prompts, layer, where, loss_layer, True, pad_id)
            plain = DeltaForward(model, arch, prompts, layer, where, loss_layer, False, pad_id)
            hidden = model.get_input_embeddings().embedding_dim
            g = torch.Generator().manual_seed(0)
            for scale in (1.0,):
                d = (torch.randn(hidden, generator=g) * scale).to(fast.device)
                a, b = fast(d), plain(d)
                for x, y, what in ((a[0], b[0], "target log-probs"), (a[1], b[1], "KL log-probs"), (a[2], b[2], "v")):
                    ref = y.abs().max().clamp_min(1.0)
                    err = (x - y).abs().max() / ref
                    if not torch.isfinite(err) or err > tol:
                        return False, f"{what} differ by {float(err):.2e} (relative) at δ scale {scale}"
    except Exception as e:  # noqa: BLE001 - any failure means: use the plain path
        return False, f"{type(e).__name__}: {e}"
    return True, ""
