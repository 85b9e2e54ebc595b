"""Reproduce the paper's findings on the embedded model: sequential editing with and without PRUNE.

    python benchmarks/reproduce.py run --editor rome --n 200          # one editor, all restraint set-ups
    python benchmarks/reproduce.py run --editor rome --label rome_original --editor-args '{"key_mode": "original"}' \
        --order seed:1 --n 200                                        # a row = one command: label, editor, order
    python benchmarks/reproduce.py downstream --label rome            # the four tasks at N = 0, 100, 200 (paper counts)
    python benchmarks/reproduce.py report                             # docs/results.md + docs/figures/*.png

Per editor two edit streams are run (batch size 1, the first N CounterFact edits of counterfact-edit.json):
  - ``stream``: edits accumulate UNRESTRAINED. Deferred PRUNE (the reference protocol) is a view over this stream
    (W₀ + restrained ΔW), so one stream evaluates ``none``, ``deferred_e`` (α = e) and ``deferred_1.2`` (α = 1.2)
    side by side at the same checkpoints (spec §2).
  - ``online``: PRUNE α = e applied after every edit and written back; later edits build on it.
Both restrain through the shipped code, :class:`lit_prune.restraint.AccumulatedUpdate`, used as ``PruneCallback`` uses
it (``tests/test_reproduce.py`` checks the rows against ``train.py``-style runs with the callback).
Recorded against N: κ(W) and σ_max(ΔW) of every edited matrix and the immediate scores of the edit just made (every
edit), perplexity on ``--ppl-texts`` held-out bundled wiki texts (every ``--ppl-every`` edits), retention
efficacy/generalization/locality of all edits so far (every ``--eval-every``), each with a 95 % interval (Wilson for
rates of 0/1 values, a seeded bootstrap otherwise; ``benchmarks/intervals.py``). The paper's four downstream tasks
are a separate, resumable pass over state snapshots kept at ``--snapshot-at`` (``reproduce.py downstream``: the
paper's example counts 358/149/261/299 by default, Wilson intervals), so the edit streams never wait for them.
A view whose edited weights equal, bit for bit, those of a view already evaluated at the same point (a deferred
PRUNE view while σ_max(ΔW) ≤ τ is the unrestrained model; an online run whose restraint never acted is the stream)
is not evaluated again: its rows are that view's, marked ``same_weights_as`` (``Stream.weights_key``: a SHA-256 of
the edited matrices). The downstream rows carry the key (``weights``), so later passes of the label reuse them too.

Resumable: the restraint state (``<editor>_<run>.pt``: each matrix's ``AccumulatedUpdate.state_dict()``) and every metric row (``<editor>_<run>.jsonl``)
are written to ``--out`` after each edit; a crashed sweep continues where it stopped. The ``.pt`` state stays local
(gitignored: up to 64 MB per run); the committed rows are what ``report`` reads. Without the state file a run starts
again from N = 0 and rewrites its rows. The snapshots the downstream pass reads are local too:
``run ... --snapshots-only`` (the run's own arguments) recreates them on a fresh checkout from the edits alone, checked
after every edit against σ_max(ΔW) in the committed rows, without evaluating or rewriting anything (for ROME, about
the edit time: 100 edits in ~15 min). ``--device cuda --model gpt2-xl`` runs the same sweep on a GPU (any model name
the resolver knows, with hub access for hub ids).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_prune.data.formats import load_requests  # noqa: E402
from lit_prune.editors.base import LowRankUpdate, apply_updates, check_updates  # noqa: E402
from lit_prune.metrics.downstream import new_task_metric, task_values, text_nll, update_task_metric  # noqa: E402
from lit_prune.metrics.editing import request_case_values  # noqa: E402
from lit_prune.metrics.tasks import load_examples  # noqa: E402
from lit_prune.models import load_model, load_texts  # noqa: E402
from lit_prune.restraint import AccumulatedUpdate, condition_number, sigma_max  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from intervals import bootstrap, mean_interval, perplexity_interval, wilson  # noqa: E402

DATA = Path(os.environ.get("LIT_PRUNE_DATA", ROOT.parent / "shared" / "data"))
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "reproduce"
TASK_FILES = {
    "reasoning": "test-reasoning.jsonl",
    "summarization": "test-summarization.json",
    "qa": "test-OpenDomainQA.jsonl",
    "nli": "test-NLI.tsv",
}
VIEWS = {"none": None, "deferred_e": math.e, "deferred_1.2": 1.2}
# A restraint: ("prune", α) or ("rect", fraction); a view: None (unrestrained), a restraint, or a float α (PRUNE).
RECT_VIEW = {"deferred_rect": ("rect", 0.4)}
RUNS = {  # run -> (restraints committed after every edit, in order; the views evaluated)
    "stream": ([], VIEWS),
    "online": ([("prune", math.e)], {"online_e": None}),
    "rect_online": ([("rect", 0.4)], {"rect_online": None}),
    "rect_prune_online": ([("rect", 0.4), ("prune", math.e)], {"rect_prune_online": None}),
}
PAPER_COUNTS = {"reasoning": 358, "summarization": 149, "qa": 261, "nli": 299}


def hparams_dict(hp) -> dict:
    """An editor's resolved hyper-parameters as a plain dict (the typed dataclass's fields), for setup.json."""
    return dataclasses.asdict(hp) if dataclasses.is_dataclass(hp) else dict(hp)


def make_editor(name: str, model, tok, args):
    from lit_prune import editors

    cls = {"rome": editors.ROME, "memit": editors.MEMIT, "alphaedit": editors.AlphaEdit, "ft": editors.FT}.get(name)
    if name == "mend":
        from lit_prune.editors.mend import MEND

        return MEND(args.mend_checkpoint or "smollm2-135m")
    if cls is None:
        raise SystemExit(f"unknown editor '{name}' (rome, memit, alphaedit, ft, mend)")
    return cls.for_model(model, tok, **args.editor_args)


class Stream:
    """An edit stream on one model, restrained by the shipped code: one :class:`lit_prune.restraint.AccumulatedUpdate`
    per edited parameter (W₀, τ, ΔW as factors), used exactly as ``PruneCallback`` uses it.

    :meth:`add` writes each update into the weights (``apply_updates``, as ``SequentialEditingModule`` does) and adds it
    to ΔW; then each of ``online`` (``("prune", α)``: W₀ + F(ΔW), ``PruneCallback(mode="online")``; ``("rect", k)``:
    W₀ + ΔW ⊙ M, ``RectCallback(mode="online")``) is committed in order, as the callbacks listed in that order do.
    :meth:`show` writes a deferred view (``mode="deferred"``) and :meth:`hide` puts the unrestrained weights back.
    ``tau``: τ = σ_max(W₀) per edited parameter (computed once per sweep by the caller).
    """

    def __init__(self, model, names: list[str], online: list | float | None, tau: dict[str, float]):
        if online is None or isinstance(online, (int, float)):
            online = [] if online is None else [("prune", float(online))]
        self.model, self.names, self.online = model, names, list(online)
        params = dict(model.named_parameters())
        self.params = {n: params[n] for n in names}
        self.acc = {n: AccumulatedUpdate(p.detach(), tau=tau[n]) for n, p in self.params.items()}
        self.kept: dict[str, torch.Tensor] = {}  # unrestrained weights while a deferred view is shown
        self.sigma: dict[str, float] = {}  # σ_max of the ΔW currently in the weights, per parameter

    def add(self, updates) -> None:
        apply_updates(self.model, updates)
        for n, u in updates.items():
            self.acc[n].add(u.A, u.B)
        for n in self.names:
            for restraint in self.online:
                self._write(n, restraint, commit=True)
            svd = self.acc[n].svd()  # of the (restrained, when online) accumulated update
            self.sigma[n] = float(svd.sigma[0]) if svd is not None else 0.0

    def _write(self, n: str, restraint, commit: bool, keep=None):
        """One restraint of ``n`` written into the weights; returns the restraint's result."""
        kind, value = ("prune", restraint) if isinstance(restraint, (int, float)) else restraint
        p = self.params[n].data
        if kind == "prune":
            return self.acc[n].write_restrained(p, value, commit=commit, keep=keep)
        return self.acc[n].write_sparsified(p, value, commit=commit, keep=keep)

    @torch.no_grad()
    def show(self, view) -> None:
        """Write a deferred view: a PRUNE α (W₀ + F_α(ΔW)), a restraint tuple, or None (leave W₀ + ΔW); :meth:`hide`
        undoes it."""
        self.hide()
        for n, p in self.params.items():
            if view is None:
                svd = self.acc[n].svd()
                self.sigma[n] = float(svd.sigma[0]) if svd is not None else 0.0
                continue
            keep = torch.empty_like(p)
            res = self._write(n, view, commit=False, keep=keep)
            if res is None:
                self.sigma[n] = 0.0
            elif hasattr(res, "values"):  # PRUNE: F is monotone, so σ_max of the view is F(σ̂₁)
                self.sigma[n] = float(res.values.max())
            else:
                self.sigma[n] = sigma_max(p.detach() - self.acc[n].W0.to(p.device, p.dtype))
            if res is not None and res.changed:
                self.kept[n] = keep

    @torch.no_grad()
    def hide(self) -> None:
        for n, keep in self.kept.items():
            self.params[n].copy_(keep)
        self.kept = {}

    def weights_key(self) -> str:
        """A digest of the edited weights as they are now (the view's, after :meth:`show`): two views with the same key
        are the same model bit for bit, so they score the same and one evaluation serves both."""
        h = hashlib.sha256()
        for n in self.names:
            h.update(self.params[n].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:20]

    def spectrum(self) -> dict[str, float]:
        """κ(W) of the weights as written and σ_max of their ΔW (the view's, after :meth:`show`), per parameter."""
        out = {}
        for n in self.names:
            out[f"{n}/condition_number"] = condition_number(self.params[n].detach())
            out[f"{n}/delta_sigma_max"] = self.sigma.get(n, 0.0)
        return out

    def state(self) -> dict:
        """The restraint state of every matrix and the weights as they are (unrestrained, or online-restrained)."""
        self.hide()
        return {"matrices": {n: acc.state_dict() for n, acc in self.acc.items()},
                "weights": {n: p.detach().cpu().clone() for n, p in self.params.items()}}

    @torch.no_grad()
    def load(self, state: dict) -> None:
        """Continue from :meth:`state`: bit-identical to a run that never stopped."""
        for n, st in state["matrices"].items():
            self.acc[n].load_state_dict(st)
            self.params[n].copy_(state["weights"][n])
        self.show(None)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the unedited model (for the next run)."""
        self.hide()
        for n, p in self.params.items():
            p.copy_(self.acc[n].W0.to(p.device, p.dtype))


def per_text_nll(model, tok, texts, max_length: int = 256) -> tuple[list[float], list[int]]:
    """Σ −log p and the token count of each text (``text_nll`` one text at a time, for the bootstrap over texts)."""
    sums, counts = [], []
    for t in texts:
        s_, c = text_nll(model, tok, [t], batch_size=1, max_length=max_length)
        sums.append(s_)
        counts.append(c)
    return sums, counts


def row(run: str, view: str, n: int, metric: str, value: float, ci=None, count: int | None = None) -> dict:
    r = {"run": run, "view": view, "n": n, "metric": metric, "value": float(value)}
    if ci is not None and not any(math.isnan(x) for x in ci):
        r["lo"], r["hi"] = float(ci[0]), float(ci[1])
    if count is not None:
        r["count"] = int(count)
    return r


def score_rows(run: str, view: str, n: int, prefix: str, values: dict, with_ci: bool = True) -> list[dict]:
    """Rows ``<prefix>/<key>`` from per-request values (``request_case_values``): mean and 95 % interval."""
    out = []
    for k, v in values.items():
        m, lo, hi = mean_interval(v.tolist()) if with_ci else (float(v.mean()), math.nan, math.nan)
        out.append(row(run, view, n, f"{prefix}/{k}", m, (lo, hi), len(v)))
    return out


def task_rows(run: str, view: str, n: int, task: str, metric, n_examples: int) -> list[dict]:
    """Rows of one downstream task: its values; on the reference score a 95 % interval: Wilson for accuracies, the
    seeded bootstrap over examples for summarization (each example's mean ROUGE-1/2/L F1)."""
    out = []
    for k, v in task_values(task, metric.compute()).items():
        if task == "summarization":
            ci = bootstrap(metric.per_example().numpy())
        else:
            ci = wilson(float(v) * n_examples, n_examples) if 0 <= float(v) <= 1 else None
        out.append(row(run, view, n, f"downstream/{k}", v, ci if k == task else None, n_examples))
    return out


class Evaluator:
    """What is measured at N edits, with the data it needs (requests, held-out texts, downstream examples)."""

    def __init__(self, model, tok, requests, texts, tasks: dict, args) -> None:
        self.model, self.tok, self.requests, self.texts, self.tasks, self.args = model, tok, requests, texts, tasks, args

    def __call__(self, stream: Stream, views: dict, n: int, run: str, batch: int = 1) -> list[dict]:
        """Rows {run, view, n, metric, value[, lo, hi, count]} for each view of ``stream`` at N = ``n`` edits.

        At N = 0 every view is the unedited model: it is evaluated once and its rows are repeated under each view.
        ``immediate/*``: the request of edit ``n`` scored right after it (one value per edit; the report averages
        them); ``retention/*``: all ``n`` requests re-scored; both with 95 % intervals over requests.
        """
        a = self.args
        do_ret = n > 0 and (n % a.eval_every == 0 or n == a.n)
        do_ppl = n % a.ppl_every == 0 or n == a.n
        do_down = n in a.downstream_at and self.tasks
        rows, seen = [], {}  # weights key -> (view, its rows)
        for view, alpha in list(views.items())[: 1 if n == 0 else None]:
            stream.show(alpha)
            key = stream.weights_key()
            if key in seen:  # e.g. a deferred PRUNE view while σ_max(ΔW) ≤ τ: the unrestrained model itself
                src, src_rows = seen[key]
                rows += [{**r, "view": view, "same_weights_as": src} for r in src_rows]
                continue
            first = len(rows)
            rows += [row(run, view, n, f"spectrum/{k}", v) for k, v in stream.spectrum().items()]
            if n > 0:  # each request of the batch just edited, scored in one pass
                rows += self.immediate_rows(run, view, list(range(max(0, n - batch), n)))
            if do_ppl:
                sums, counts = per_text_nll(self.model, self.tok, self.texts)
                ppl, lo, hi = perplexity_interval(sums, counts)
                rows.append(row(run, view, n, "downstream/perplexity", ppl, (lo, hi), len(sums)))
            if do_ret:
                vals = request_case_values(self.model, self.tok, self.requests[:n], batch_size=a.batch_size)
                rows += score_rows(run, view, n, "retention", vals)
            if do_down:
                for task, exs in self.tasks.items():
                    m = new_task_metric(task, sync_on_compute=False)
                    update_task_metric(m, task, self.model, self.tok, exs, batch_size=a.batch_size, max_length=1024)
                    rows += task_rows(run, view, n, task, m, len(exs))
            seen[key] = (view, rows[first:])
        stream.hide()
        if n == 0:
            rows += [{**r, "view": v} for v in list(views)[1:] for r in rows]
        return rows


    def immediate_rows(self, run: str, view: str, idx: list[int]) -> list[dict]:
        """``immediate/*`` rows of requests ``idx`` (one per request, at its own N = j + 1), scored in one batched
        pass; per request when some request lacks a score (then the per-case values cannot be told apart)."""
        bs = self.args.batch_size
        vals = request_case_values(self.model, self.tok, [self.requests[j] for j in idx], batch_size=bs)
        if all(len(v) == len(idx) for v in vals.values()):
            return [r for k, j in enumerate(idx)
                    for r in score_rows(run, view, j + 1, "immediate", {m: v[k : k + 1] for m, v in vals.items()},
                                        with_ci=False)]
        rows = []
        for j in idx:
            one = request_case_values(self.model, self.tok, [self.requests[j]], batch_size=bs)
            rows += score_rows(run, view, j + 1, "immediate", one, with_ci=False)
        return rows


def ordered(requests: list, order: str) -> list:
    """``paper``: the file's order; ``seed:K``: the same requests permuted with ``random.Random(K)``."""
    if order == "paper":
        return list(requests)
    if not order.startswith("seed:") or not order[5:].isdigit():
        raise SystemExit(f"--order must be 'paper' or 'seed:<integer>', got {order!r}")
    out = list(requests)
    random.Random(int(order[5:])).shuffle(out)
    return out


def load_tasks(n_examples: dict[str, int]) -> dict:
    tasks = {}
    for t, f in TASK_FILES.items():
        if n_examples.get(t, 0) > 0 and (DATA / "downstream" / f).is_file():
            tasks[t] = load_examples(t, DATA / "downstream" / f, n=n_examples[t])
    return tasks


def idle_prune_rows(out: Path, label: str, run_name: str, view: str, n_edits: int, tau: dict[str, float],
                    batch: int = 1, margin: float = 1e-3) -> tuple[list[dict], float] | None:
    """The rows of a PRUNE-only online run derived from the label's finished stream, when they are its rows.

    PRUNE changes ΔW only where σ ≥ τ. If the stream, edited in the same batches of ``batch`` requests, recorded
    σ_max(ΔW) < (1 − ``margin``)·τ after every one of its first ``n_edits`` edits, for every matrix, the online
    restraint never acts: by induction every edit is computed
    on the same weights (and, for AlphaEdit, the same kept keys), so the online run is the stream bit for bit
    (``margin`` covers the last bits in which the two runs' factorizations of the same ΔW differ: the σ_max rows are
    the stream's, equal to a real online run's to ~1e-7 relative; every score is equal). Returns the
    stream's ``none`` rows relabelled (``same_weights_as``; ``time/restraint_s`` left out: no restraint ran) and the
    largest σ_max(ΔW)/τ; None when the stream is not there to N or the restraint would have acted."""
    rows_file = out / f"{label}_stream.jsonl"
    if not rows_file.is_file():
        return None
    rows = [r for r in map(json.loads, rows_file.read_text().splitlines()) if r["n"] <= n_edits]
    steps = [min(i + batch, n_edits) for i in range(0, n_edits, batch)]  # N after each edit of the online run
    if sorted({r["n"] for r in rows if r["metric"] == "time/edit_s"}) != steps:
        return None  # the stream is not there to N, or it was edited in other batches
    sig = {(r["metric"], r["n"]): r["value"] for r in rows if r["view"] == "none"}
    ratios = [sig.get((f"spectrum/{m}/delta_sigma_max", k), math.inf) / t for m, t in tau.items() for k in steps]
    if not ratios or max(ratios) >= 1 - margin:
        return None
    tag, src = f"{label}/{run_name}", f"{label}/stream:none"
    derived = [{**r, "run": tag, "view": view if r["view"] == "none" else r["view"], "same_weights_as": src}
               for r in rows if r["view"] in ("none", "-") and r["metric"] != "time/restraint_s"]
    return derived, max(ratios)


def snapshot_path(out: Path, label: str, run_name: str, n: int) -> Path:
    """The state snapshot of ``label``'s run ``run_name`` at N = ``n`` (what ``downstream`` reads)."""
    return out / f"{label}_{run_name}_n{n}.pt"


def copy_stream_snapshots(out: Path, label: str, run_name: str, at: list[int]) -> None:
    """The stream's snapshots at the N in ``at`` that exist, as ``run_name``'s (a derived run: the same weights)."""
    for k in at:
        if snapshot_path(out, label, "stream", k).is_file():
            shutil.copyfile(snapshot_path(out, label, "stream", k), snapshot_path(out, label, run_name, k))


def write_derived_run(out: Path, label: str, run_name: str, rows: list[dict], ratio: float,
                      snapshot_at: list[int], n_edits: int) -> None:
    """Writes an online run derived by :func:`idle_prune_rows`: its rows, the stream's state snapshots as its own
    (for the downstream pass), the stream's end state as its checkpoint (a later, longer run continues from N) and
    the setup.json entry that says so."""
    rows_file, ckpt = out / f"{label}_{run_name}.jsonl", out / f"{label}_{run_name}.pt"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    copy_stream_snapshots(out, label, run_name, [k for k in snapshot_at if k <= n_edits])
    end = snapshot_path(out, label, "stream", n_edits)
    if not end.is_file() and (out / f"{label}_stream.pt").is_file() and torch.load(
            out / f"{label}_stream.pt", weights_only=False)["next"] == n_edits:
        end = out / f"{label}_stream.pt"
    if end.is_file():
        shutil.copyfile(end, ckpt)
    elif ckpt.is_file():
        ckpt.unlink()
    setup_file = out / "setup.json"
    setup = json.loads(setup_file.read_text()) if setup_file.is_file() else {}
    setup[f"{label} {run_name}"] = (
        f"derived from {label}/stream: σ_max(ΔW) < τ after each of its edits to N = {n_edits} (largest σ_max(ΔW)/τ "
        f"{ratio:.2f}), so PRUNE never acts and the online run is the stream bit for bit (rows marked "
        "same_weights_as; --no-derive-idle runs it)")
    setup_file.write_text(json.dumps(setup, indent=1))
    print(f"[{label}/{run_name}] = {label}/stream: PRUNE never acts (σ_max(ΔW)/τ ≤ {ratio:.2f} after every edit); "
          f"{len(rows)} rows derived, not re-run")


def compute_updates(editor, model, tok, batch: list, i: int) -> dict[str, LowRankUpdate]:
    """The editor's updates for the requests ``batch`` (edits ``i``..), as float32 CPU factors, checked (shapes,
    finite values) before anything is written."""
    updates = editor.compute(model, tok, batch)
    updates = {k: LowRankUpdate(u.A.detach().float().cpu(), u.B.detach().float().cpu()) for k, u in updates.items()}
    check_updates(model, updates, where=f"edits {i}..{i + len(batch) - 1} (case_ids {[r.case_id for r in batch]})")
    return updates


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, device=args.device)
    requests = ordered(load_requests(Path(args.data), n=args.n), args.order)
    texts = load_texts("wiki-offline", n=args.ppl_texts, offset=len(load_texts("wiki-offline")) - args.ppl_texts)
    tasks = load_tasks({t: args.downstream_n for t in TASK_FILES})
    editor = make_editor(args.editor, model, tok, args)
    label = args.label or args.editor
    evaluate = Evaluator(model, tok, requests, texts, tasks, args)
    names = editor.edited_parameters(model)
    params = dict(model.named_parameters())
    tau = {n: sigma_max(params[n].detach()) for n in names}
    setup_file = out / "setup.json"
    setup = json.loads(setup_file.read_text()) if setup_file.is_file() else {}
    setup_before = dict(setup)
    setup.update({
        "model": args.model, "device": args.device, "torch": torch.__version__,
        "data": f"the first N records of {Path(args.data).name} (CounterFact, EasyEdit format), batch size 1; "
                "N per run in the tables; the order per row below",
        f"{label} editor": f"{type(editor).__name__}, edited parameters {names}; " + (
            f"hyper-parameters {hparams_dict(editor.hparams(model))}" if hasattr(editor, "hparams")
            else f"hypernetwork {args.mend_checkpoint or 'smollm2-135m (bundled: lit_prune/data/mend-smollm2-135m.pt)'}")
            + (f"; constructor arguments {args.editor_args}" if args.editor_args else ""),
        f"{label} order": "the file's order (the paper's)" if args.order == "paper" else
                          f"the same {args.n} records permuted with random.Random({args.order[5:]})",
        f"{label} τ = σ_max(W₀)": {n: round(t, 2) for n, t in tau.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch thread(s) per "
                   "process (the editors' sweeps may run as parallel processes; time/* rows are wall-clock)",
        "perplexity": f"{args.ppl_texts} last bundled wiki summaries (held out from the statistics), ≤256 tokens, every "
                      f"{args.ppl_every} edits; 95 % interval: bootstrap over texts",
        "retention": f"every {args.eval_every} edits and at N; immediate: each edit's request right after it; 95 % "
                     "intervals: Wilson for rates of 0/1 values, bootstrap over requests otherwise",
        "seed": args.seed,
    })
    if not args.snapshots_only:  # --snapshots-only changes nothing but the snapshots
        setup_file.write_text(json.dumps(setup, indent=1))
    elif setup_before and _run_identity(setup_before, label) not in (None, _run_identity(setup, label)):
        raise SystemExit(f"--snapshots-only: {label}'s editor, constructor arguments or order differ from those in "
                         f"{setup_file} (the run being recreated); use the run's own arguments")
    for run_name in args.runs:
        online, views = RUNS[run_name]
        if run_name == "stream" and args.rect_view:
            views = {**views, **RECT_VIEW}
        if run_name == "stream" and args.views:
            unknown = sorted(set(args.views) - set(views))
            if unknown:
                raise SystemExit(f"--views: unknown view(s) {unknown}; the stream has {sorted(views)}")
            views = {v: views[v] for v in views if v in args.views}
        tag = f"{label}/{run_name}"
        ckpt, rows_file = out / f"{label}_{run_name}.pt", out / f"{label}_{run_name}.jsonl"
        derived = None
        if run_name != "stream" and online and all(k == "prune" for k, _ in online) and args.derive_idle:
            derived = idle_prune_rows(out, label, run_name, next(iter(views)), args.n, tau, args.edit_batch)
        if derived and args.snapshots_only:  # the stream's weights bit for bit: its snapshots are this run's
            copy_stream_snapshots(out, label, run_name, args.snapshot_at)
            continue
        if derived:
            write_derived_run(out, label, run_name, *derived, args.snapshot_at, args.n)
            continue
        stream = Stream(model, names, online, tau)
        if args.snapshots_only:
            recreate_snapshots(out, label, run_name, stream, views, editor, model, tok, requests, args)
            stream.reset()
            continue
        start = 0
        if ckpt.is_file():
            st = torch.load(ckpt, weights_only=False)
            stream.load(st)
            start = st["next"]
            print(f"[{tag}] resuming at edit {start}/{args.n}")
        else:
            rows_file.write_text("")
        if start == 0:
            rows = []
            stream_rows = out / f"{label}_stream.jsonl"
            if run_name != "stream" and stream_rows.is_file():  # N = 0 is the unedited model, already evaluated
                for line in stream_rows.read_text().splitlines():
                    r = json.loads(line)
                    if r["n"] == 0 and r["view"] == "none":
                        rows.append({**r, "run": tag, "view": next(iter(views))})
            if not rows:
                rows = evaluate(stream, views, 0, tag)
            with rows_file.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        t_edit, t0 = [], time.time()
        if hasattr(editor, "load_state_dict"):  # AlphaEdit: the keys of the batches edited so far
            editor.load_state_dict(torch.load(ckpt, weights_only=False).get("editor", {}) if start else {})
        B = args.edit_batch
        for i in range(start, args.n, B):
            batch = requests[i : i + B]
            t = time.perf_counter()
            updates = compute_updates(editor, model, tok, batch, i)
            t_r = time.perf_counter()
            stream.add(updates)
            t_edit.append((time.perf_counter() - t) / len(batch))
            n = i + len(batch)
            rows = [{"run": tag, "view": "-", "n": n, "metric": "time/edit_s", "value": (t_r - t) / len(batch)},
                    {"run": tag, "view": "-", "n": n, "metric": "time/restraint_s", "value": time.perf_counter() - t_r}]
            rows += evaluate(stream, views, n, tag, batch=len(batch))
            with rows_file.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            state = {**stream.state(), "next": n, "editor": editor.state_dict()}
            torch.save(state, ckpt)
            if n in args.snapshot_at:  # for the downstream pass (``reproduce.py downstream``)
                torch.save(state, snapshot_path(out, label, run_name, n))
            eta = (time.time() - t0) / (n - start) * (args.n - n)
            print(f"[{tag}] edit {n}/{args.n}  {t_edit[-1]:.1f} s/edit  ETA {eta / 60:.1f} min", flush=True)
        stream.reset()  # back to the unedited model for the next run


def _run_identity(setup: dict, label: str) -> tuple | None:
    """What must match for ``--snapshots-only`` to recreate a label's run, from its setup.json entries: the editor
    class, its constructor arguments and the order (the hyper-parameter listing is left out: its key order changed
    between versions; the σ_max(ΔW) check after every edit catches any real difference). None if not recorded."""
    editor, order = setup.get(f"{label} editor"), setup.get(f"{label} order")
    if editor is None:
        return None
    return editor.split(",", 1)[0], editor.partition("; constructor arguments ")[2], order


def recreate_snapshots(out: Path, label: str, run_name: str, stream: Stream, views: dict, editor, model, tok,
                       requests: list, args) -> None:
    """``run --snapshots-only``: the run's edits (and its online restraints) again up to the largest N of
    ``--snapshot-at``, writing only the state snapshots ``<label>_<run>_n<N>.pt`` that ``downstream`` reads (local
    files: a fresh checkout has the committed rows, not the snapshots). Nothing is evaluated; the rows, the
    checkpoint and setup.json stay as they are. After every edit, σ_max(ΔW) of each edited matrix in the run's first
    view is checked against the row the run recorded at that N, so a snapshot is only written for the stream the
    committed rows describe (same editor, order, N and batches); a mismatch stops with the edit and the matrix. The
    tolerance is 1 % relative: the recreated stream is not bit for bit the evaluated one (measured on the paper's ROME
    and on MEND: σ_max(ΔW) within 6e-4 relative over 100 edits, through ROME's collapse at case 173), while another
    stream differs from the first edit on by far more."""
    tag, rows_file = f"{label}/{run_name}", out / f"{label}_{run_name}.jsonl"
    if not rows_file.is_file():
        raise SystemExit(f"[{tag}] --snapshots-only: no rows {rows_file} to check the snapshots against; run it first")
    first = next(iter(views))
    recorded = {(r["metric"], r["n"]): r["value"] for r in map(json.loads, rows_file.read_text().splitlines())
                if r["view"] == first and r["metric"].endswith("/delta_sigma_max")}
    end = max(args.snapshot_at)
    if not any(n == end for _, n in recorded):
        raise SystemExit(f"[{tag}] --snapshots-only: the rows in {rows_file.name} do not reach N = {end}")
    B, t0 = args.edit_batch, time.time()
    for i in range(0, end, B):
        batch = requests[i : i + B]
        updates = compute_updates(editor, model, tok, batch, i)
        stream.add(updates)
        n = i + len(batch)
        if views[first] is not None:  # (None: σ_max of the weights as written is already known from add)
            stream.show(views[first])
        for name, got in stream.sigma.items():
            want = recorded.get((f"spectrum/{name}/delta_sigma_max", n))
            if want is None or abs(got - want) > 1e-2 * max(abs(want), 1e-6):  # see the docstring
                stream.hide()
                raise SystemExit(f"[{tag}] --snapshots-only: after edit {n} (case_ids {[r.case_id for r in batch]}) "
                                 f"σ_max(ΔW) of {name} is {got:.6g}, the rows recorded {want}: not the stream of "
                                 f"{rows_file.name} (other --editor-args, --order, --n or --edit-batch?); no snapshot "
                                 "at or after this N written")
        stream.hide()
        if n in args.snapshot_at:
            snap = snapshot_path(out, label, run_name, n)
            torch.save({**stream.state(), "next": n, "editor": editor.state_dict()}, snap)
            print(f"[{tag}] snapshot at N = {n} written ({snap.name})", flush=True)
        eta = (time.time() - t0) / n * (end - n)
        print(f"[{tag}] edit {n}/{end} (snapshots only)  ETA {eta / 60:.1f} min", flush=True)


def _task_of(metric: str) -> str | None:
    """The task of a ``downstream/<task>[_<value>]`` row (``downstream/qa_gold_nll`` -> qa), else None."""
    name = metric.split("/", 1)[1] if metric.startswith("downstream/") else ""
    return next((t for t in TASK_FILES if name == t or name.startswith(t + "_")), None)


def unedited_rows(out: Path, label: str, tasks: dict) -> list[dict]:
    """The downstream rows of an N = 0 pass already in ``out`` on the same examples (the label's own stream first,
    then any other label's: every label edits the same unedited model of ``out``), or [] when there is none."""
    want = {f"downstream/{t}": len(exs) for t, exs in tasks.items()}
    files = [out / f"{label}_stream_downstream.jsonl"] + sorted(out.glob("*_downstream.jsonl"))
    for f in dict.fromkeys(x for x in files if x.is_file()):
        rows = [r for r in map(json.loads, f.read_text().splitlines()) if r["n"] == 0]
        first = [r for r in rows if r["view"] == rows[0]["view"]] if rows else []
        if {r["metric"]: r.get("count") for r in first if r["metric"] in want} == want:
            return first
    return []


def downstream(args) -> None:
    """The paper's four tasks on the snapshots of finished runs (``<label>_<run>_n<N>.pt``) and on the unedited model
    (N = 0), every view (``--views``: only these views of the stream, ``deferred_rect`` among them), resumable: rows go
    to ``<label>_<run>_downstream.jsonl``; a (view, N) already there is skipped. ``--tasks``: only these tasks;
    ``--rescore``: the (view, N) already there are evaluated again on those tasks and their rows replaced (e.g. to
    add the summarization interval to rows written before it existed); nothing else is evaluated."""
    known = {**VIEWS, **RECT_VIEW}
    unknown = sorted(set(args.views or []) - set(known))
    if unknown:  # before the model loads or anything is written
        raise SystemExit(f"--views: unknown view(s) {unknown} of the stream (known: {sorted(known)})")
    if args.tasks and not args.rescore:
        raise SystemExit("--tasks needs --rescore: a new pass on some tasks only would count as done for the others")
    stream_views = {v: known[v] for v in args.views or []}
    out = Path(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device=args.device)
    counts = dict(PAPER_COUNTS) if args.examples == "paper" else {t: int(args.examples) for t in TASK_FILES}
    tasks = {t: exs for t, exs in load_tasks(counts).items() if not args.tasks or t in args.tasks}
    if not tasks:
        raise SystemExit(f"no downstream test sets under {DATA / 'downstream'}")
    runs = {name: views for name, (_, views) in RUNS.items()}
    if args.views:
        runs["stream"] = stream_views
    seen: dict[str, list[dict]] = {}  # weights key -> the rows of a pass on those weights (any run of this label)
    for f in [] if args.rescore else sorted(out.glob(f"{args.label}_*_downstream.jsonl")):
        for r in map(json.loads, f.read_text().splitlines()):
            if "weights" in r and "same_weights_as" not in r:
                seen.setdefault(r["weights"], []).append(r)
    for run_name in args.runs:
        tag, rows_file = f"{args.label}/{run_name}", out / f"{args.label}_{run_name}_downstream.jsonl"
        done = {(r["view"], r["n"]) for r in map(json.loads, rows_file.read_text().splitlines())} if rows_file.is_file() else set()
        for n in args.at:
            snap = snapshot_path(out, args.label, run_name, n)
            if n > 0 and not snap.is_file():
                print(f"[{tag}] no snapshot at N = {n} ({snap.name}): a finished run recreates it with `reproduce.py "
                      f"run <its arguments> --runs {run_name} --snapshot-at {n} --snapshots-only` (an unfinished one: "
                      "run it to N)")
                continue
            state = torch.load(snap, weights_only=False) if n > 0 else None
            names = list(state["matrices"]) if state else []
            stream = Stream(model, names, None, {k: v["tau"] for k, v in state["matrices"].items()} if state else {})
            if state:
                stream.load(state)
            views = list(runs[run_name].items())
            if n == 0 and not args.rescore and (views[0][0], 0) not in done and (
                    same := unedited_rows(out, args.label, tasks)):
                with rows_file.open("a") as f:  # the unedited model was evaluated already (this label or another)
                    f.writelines(json.dumps({**r, "run": tag, "view": v}) + "\n" for v, _ in views for r in same)
                done |= {(v, 0) for v, _ in views}
                print(f"[{tag}] downstream at N = 0: the unedited model's rows of {same[0]['run']}")
            for view, alpha in (views if n > 0 else views[:1]):  # N = 0: the unedited model, once
                if ((view, n) in done) != args.rescore:  # a pass not yet made / (--rescore) one to make again
                    continue
                t0 = time.time()
                stream.show(alpha)
                key = stream.weights_key()
                if key in seen:  # the same model bit for bit: its scores are those of that pass
                    src = seen[key][0]
                    rows = [{**r, "run": tag, "view": view, "n": n, "same_weights_as": f"{src['run']}:{src['view']}:"
                             f"{src['n']}"} for r in seen[key]]
                else:
                    rows = []
                    for task, exs in tasks.items():
                        m = new_task_metric(task, sync_on_compute=False)
                        update_task_metric(m, task, model, tok, exs, batch_size=args.batch_size, max_length=1024)
                        rows += [{**r, "weights": key} for r in task_rows(tag, view, n, task, m, len(exs))]
                    seen[key] = rows
                stream.hide()
                if n == 0:  # (--rescore: only the views that have rows at N = 0)
                    rows += [{**r, "view": v} for v, _ in views[1:] if not args.rescore or (v, 0) in done
                             for r in rows]
                if args.rescore:  # the rows of these tasks at these (view, N) are replaced, the others kept
                    at = {(r["view"], n) for r in rows}
                    old = [r for r in map(json.loads, rows_file.read_text().splitlines())
                           if not ((r["view"], r["n"]) in at and _task_of(r["metric"]) in tasks)]
                    rows_file.write_text("".join(json.dumps(r) + "\n" for r in old + rows))
                else:
                    with rows_file.open("a") as f:
                        f.writelines(json.dumps(r) + "\n" for r in rows)
                how = f"the weights of {rows[0]['same_weights_as']}, rows copied" if "same_weights_as" in rows[0] \
                    else f"{time.time() - t0:.0f} s"
                print(f"[{tag}] downstream at N = {n}, {view}: {how}", flush=True)
            stream.reset()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--editor", default="rome", choices=["rome", "memit", "alphaedit", "ft", "mend"])
    r.add_argument("--mend-checkpoint", default=None)
    r.add_argument("--editor-args", type=json.loads, default={},
                   help='editor constructor arguments as JSON, e.g. \'{"mom2_update_weight": 5000}\'')
    r.add_argument("--label", default=None, help="the row's name in files and tables (default: the editor's)")
    r.add_argument("--order", default="paper", help="'paper' (the file's order) or 'seed:K' (the same records permuted)")
    r.add_argument("--runs", nargs="+", default=["stream", "online"], choices=list(RUNS),
                   help="stream (no restraint + deferred PRUNE views), online (PRUNE α=e), rect_online (RECT k=0.4), "
                        "rect_prune_online (RECT then PRUNE, both online)")
    r.add_argument("--no-derive-idle", dest="derive_idle", action="store_false",
                   help="run a PRUNE online run even when the finished stream shows PRUNE never acts (by default its "
                        "rows are then the stream's, marked same_weights_as)")
    r.add_argument("--rect-view", action="store_true", help="also show the deferred RECT view (k=0.4) of the stream")
    r.add_argument("--edit-batch", type=int, default=1, help="requests per edit (batch-sequential editing)")
    r.add_argument("--snapshots-only", action="store_true",
                   help="recreate the state snapshots (--snapshot-at) of finished runs for `downstream`, checked "
                        "against their committed rows; nothing else is evaluated or written")
    r.add_argument("--views", nargs="+", default=None,
                   help="evaluate only these views of the stream (default: all; 'none' is the unrestrained model)")
    r.add_argument("--n", type=int, default=200)
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-edit.json"))
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # evaluation schedule sized for 2 CPU cores (one ROME edit is ~10 s there; see docs/results.md)
    r.add_argument("--eval-every", type=int, default=50)
    r.add_argument("--ppl-every", type=int, default=25)
    r.add_argument("--ppl-texts", type=int, default=100)
    r.add_argument("--downstream-at", type=lambda s: [int(x) for x in s.split(",")], default=[0, 100, 200],
                   help="N at which the run itself evaluates the tasks when --downstream-n > 0")
    r.add_argument("--downstream-n", type=int, default=0,
                   help="examples per task evaluated during the run (0: none; use the downstream pass instead)")
    r.add_argument("--snapshot-at", type=lambda s: [int(x) for x in s.split(",")], default=[100, 200],
                   help="N at which the state is kept for `reproduce.py downstream`")
    r.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default=str(DEFAULT_OUT))
    d = sub.add_parser("downstream", help="the four tasks on the snapshots of a run (resumable)")
    d.add_argument("--label", required=True)
    d.add_argument("--runs", nargs="+", default=["stream", "online"], choices=list(RUNS))
    d.add_argument("--at", type=lambda s: [int(x) for x in s.split(",")], default=[0, 100, 200])
    d.add_argument("--views", nargs="+", default=None,
                   help="only these views of the stream (default: none and the deferred PRUNE views; add "
                        "'deferred_rect' for a run made with --rect-view)")
    d.add_argument("--examples", default="paper", help="'paper' (358/149/261/299) or a number per task")
    d.add_argument("--tasks", nargs="+", choices=list(TASK_FILES), default=None, help="only these tasks")
    d.add_argument("--rescore", action="store_true",
                   help="evaluate the (view, N) already done again on --tasks and replace their rows")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--out", default=str(DEFAULT_OUT))
    rep = sub.add_parser("report")
    rep.add_argument("--out", default=str(DEFAULT_OUT))
    rep.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    args = ap.parse_args()
    if args.cmd == "run":
        run(args)
    elif args.cmd == "downstream":
        downstream(args)
    else:
        from report_reproduce import report

        report(Path(args.out), Path(args.doc))


if __name__ == "__main__":
    main()
