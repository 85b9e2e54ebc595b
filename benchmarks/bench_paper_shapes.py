"""Per-edit and per-restraint cost of the reproduction sweep on models of the paper's shapes (GPT-2 XL, Llama-3-8B)
built from their configs with RANDOM weights: honest for speed, meaningless for quality. For a GPU with no hub
access (the weights cannot be downloaded); the same code times the real models when they are at hand
(``benchmarks/reproduce.py run --device cuda --model gpt2-xl``).

    python benchmarks/bench_paper_shapes.py --device cuda                 # both shapes, the paper's ROME/MEMIT presets
    python benchmarks/bench_paper_shapes.py --device cpu --models gpt2-xl --n-layers 4 --layers 1   # smoke test

What is timed, per model: ``ROME.compute`` and ``MEMIT.compute`` (batch of one request, the paper's layers and
optimisation settings from the presets) on the first CounterFact records, each edit applied before the next; and the
PRUNE restraint of the accumulated update of one edited matrix (``restrain`` with low-rank factors) at ranks 1, 10,
100 and 200, as the sweep does after each edit. The second-moment statistics C are replaced by the second moment of
random Gaussian keys (``set_second_moment``): computing real ones needs the real weights and the paper's 100,000
texts. The tokenizer is the embedded SmolLM2 one (its ids fit both vocabularies). Results:
``benchmarks/results/paper_shapes.{json,md}``, naming the device.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from common import RESULTS, counterfact_file

SHAPES = {
    "gpt2-xl": dict(model_type="gpt2", n_embd=1600, n_layer=48, n_head=25, n_positions=1024, vocab_size=50257),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                       max_position_embeddings=8192, tie_word_embeddings=False),
}


def build(name: str, n_layers: int | None, dtype: torch.dtype, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(SHAPES[name])
    mt = kw.pop("model_type")
    if n_layers:
        kw["n_layer" if mt == "gpt2" else "num_hidden_layers"] = n_layers
    cfg = AutoConfig.for_model(mt, **kw)
    cfg._name_or_path = name  # selects the paper's presets (lit_prune.editors.presets)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_second_moment(k_dim: int, device: str) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(0)
    K = torch.randn(4 * k_dim, k_dim, generator=g, dtype=torch.float64)
    return (K.T @ K / K.shape[0]).to(device)


def time_editor(cls, model, tok, reqs, overrides: dict, device: str) -> dict:
    from lit_prune.editors import apply_updates
    from lit_prune.editors.weights import EditedMatrix

    ed = cls(progress=False, **overrides)  # not for_model: that would compute C from texts on random weights
    hp = ed.hparams(model)
    for layer in hp.layers:
        mod = ed.arch(model).rewrite_module_tmp.format(layer)
        ed.set_second_moment(model, layer, random_second_moment(EditedMatrix(model, mod).k_dim, device))
    secs = []
    for r in reqs:
        sync(device)
        t0 = time.perf_counter()
        ups = ed.compute(model, tok, [r])
        sync(device)
        secs.append(time.perf_counter() - t0)
        apply_updates(model, ups)
    return {"layers": hp.layers, "steps": getattr(hp, "v_num_grad_steps", None), "s_per_edit": secs,
            "median_after_first": statistics.median(secs[1:]) if len(secs) > 1 else secs[0]}


def time_restraint(model, param: str, ranks: list[int], device: str) -> dict:
    from lit_prune.restraint import restrain, sigma_max

    W0 = model.get_parameter(param).detach().float()
    t0 = time.perf_counter()
    tau = sigma_max(W0)
    sync(device)
    out = {"shape": list(W0.shape), "sigma_max_W0_s": time.perf_counter() - t0, "per_rank_s": {}}
    g = torch.Generator(device="cpu").manual_seed(1)
    for r in ranks:
        A = torch.randn(W0.shape[0], r, generator=g).to(device)
        B = torch.randn(W0.shape[1], r, generator=g).to(device)
        restrain(W0, factors=(A, B), tau=tau)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        res = restrain(W0, factors=(A, B), tau=tau)
        W = W0 + res.delta()
        sync(device)
        out["per_rank_s"][r] = time.perf_counter() - t0
        del W
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--n-edits", type=int, default=3)
    ap.add_argument("--n-layers", type=int, default=None, help="fewer blocks (smoke tests on a CPU)")
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="edited layer(s), overriding the presets")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 10, 100, 200])
    ap.add_argument("--out", default=str(RESULTS / "paper_shapes"))
    args = ap.parse_args()

    from lit_prune.data.formats import load_requests
    from lit_prune.editors import MEMIT, ROME
    from lit_prune.models import load_model

    _, tok = load_model("smollm2-135m", device="cpu")
    reqs = load_requests(counterfact_file("edit"), n=args.n_edits)
    dev_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else (platform.processor() or "CPU")
    res = {"device": dev_name, "torch": torch.__version__, "dtype": args.dtype, "n_layers": args.n_layers,
           "models": {}}
    for name in args.models:
        model = build(name, args.n_layers, getattr(torch, args.dtype), args.device)
        over = {} if args.layers is None else {"layers": args.layers}
        if args.n_layers:
            over["v_loss_layer"] = args.n_layers - 1
        r: dict = {}
        for label, cls in (("ROME", ROME), ("MEMIT", MEMIT)):
            r[label] = time_editor(cls, model, tok, reqs, dict(over), args.device)
            print(name, label, r[label], flush=True)
        param = ROME(**over).edited_parameters(model)[0]
        r["restraint"] = {param: time_restraint(model, param, args.ranks, args.device)}
        print(name, "restraint", r["restraint"], flush=True)
        res["models"][name] = r
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    L = [f"# Sweep cost at the paper's shapes, random weights ({dev_name}, torch {torch.__version__}, {args.dtype})", "",
         "`python benchmarks/bench_paper_shapes.py " + " ".join(sys.argv[1:]) + "`: random weights (speed only); "
         "C = second moment of random keys; CounterFact edits applied sequentially." +
         (f" **Only {args.n_layers} blocks per model** (smoke run)." if args.n_layers else ""), "",
         "| model | editor | layers | s/edit (median after the first) | all edits (s) |", "|---|---|---|---|---|"]
    for name, r in res["models"].items():
        for label in ("ROME", "MEMIT"):
            e = r[label]
            L.append(f"| {name} | {label} | {e['layers']} | {e['median_after_first']:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in e['s_per_edit'])} |")
    L += ["", "| model | matrix | shape | τ = σ_max(W₀) once (s) | " + " | ".join(f"restraint at rank {k} (s)" for k in args.ranks) + " |",
          "|---|---|---|---|" + "---|" * len(args.ranks)]
    for name, r in res["models"].items():
        for p, t in r["restraint"].items():
            L.append(f"| {name} | `{p}` | {t['shape'][0]}×{t['shape'][1]} | {t['sigma_max_W0_s']:.2f} | "
                     + " | ".join(f"{t['per_rank_s'][k]:.4f}" for k in args.ranks) + " |")
    out.with_suffix(".md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main()
