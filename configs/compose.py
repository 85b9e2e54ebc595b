"""The shipped run configs (``configs/<name>.yaml``) are compositions of fragments; this script writes them.

A run config is a base, a model, the edits, an editor, a restraint (or none) and an evaluation, each a fragment in
the folder of that name:

    base/        the trainer block every run shares (run.yaml)
    models/      the language model (and what it needs: dtype, precision)
    data/        the edit stream
    editors/     model.editor
    restraints/  the restraining callbacks (PruneCallback, RectCallback), appended with ``callbacks+``
    evaluation/  the metric callbacks and the checkpoint, appended after the restraints

LightningCLI takes several ``--config`` files, later ones overriding earlier ones and ``callbacks+`` appending to the
list, so any composition runs without this script (restraints before evaluation: the metric callbacks read the
restrained weights)::

    python train.py --config configs/base/run.yaml --config configs/models/smollm2.yaml \\
        --config configs/data/demo.yaml --config configs/editors/memit.yaml \\
        --config configs/restraints/prune_deferred.yaml --config configs/evaluation/demo.yaml \\
        --trainer.logger.init_args.name my_run

The shipped names stay single complete files (``python train.py --config configs/default.yaml``, readable and
copyable on their own): :data:`COMPOSITIONS` says which fragments each is made of, plus its own settings (the logger
name, always; anything else it alone sets), and this script writes them with the fragments' comments::

    python configs/compose.py            # rewrite configs/<name>.yaml from the fragments
    python configs/compose.py --check    # exit 1 (naming the files) if a committed file differs

``tests/test_configs.py`` checks both: the committed files are what this script writes, and each parses to the same
resolved config as its fragments given as several ``--config`` to ``train.py``. The YAML the fragments may use is
block mappings, block sequences of callbacks, and scalars or flow collections as values (what the files here use);
merging is by key (later fragments override, ``key+`` appends to a list), as LightningCLI merges them.
"""

from __future__ import annotations

import argparse
import re
import textwrap
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIGS = Path(__file__).resolve().parent
KINDS = ("base", "models", "data", "editors", "restraints", "evaluation")


@dataclass(frozen=True)
class Composition:
    """A shipped config: its header comment (one paragraph, wrapped when written), its fragments (paths under ``configs/``, applied in order) and its
    own settings (YAML, applied last; the logger name is added from the config's name)."""

    about: str
    fragments: tuple[str, ...]
    own: str = ""


def _smollm2(editor: str, restraint: str | None, evaluation: str = "evaluation/demo.yaml") -> tuple[str, ...]:
    return ("base/run.yaml", "models/smollm2.yaml", "data/demo.yaml", f"editors/{editor}.yaml",
            *((f"restraints/{restraint}.yaml",) if restraint else ()), evaluation)


def _paper(model: str, editor: str) -> tuple[str, ...]:
    return ("base/run.yaml", f"models/{model}.yaml", "data/counterfact.yaml", f"editors/{editor}.yaml",
            "restraints/prune_deferred.yaml", "evaluation/paper.yaml")


COMPOSITIONS: dict[str, Composition] = {
    "default": Composition(
        "The embedded default: SmolLM2-135M-Instruct (offline), ROME, PRUNE (online, alpha = e), editing metrics and\n"
        "held-out perplexity, on the bundled demo edit set, with the TensorBoard extras (singular-value histograms,\n"
        "text samples, hparams; README \"Reading a run in TensorBoard\"). `make run` runs this: about 5 min on 2\n"
        "CPU cores.",
        _smollm2("rome", "prune_online", "evaluation/default.yaml"),
        "data:\n"
        "  n_edits: 10   # of the 40 demo edits: `make run` on a fresh clone takes ~5 min on 2 CPU cores\n"
        "                # (287 s measured; conversion and the statistics of 3,000 texts ~3 min of it);\n"
        "                # pass --data.n_edits 40 for all\n",
    ),
    "smollm2_rome": Composition("SmolLM2-135M + ROME, no restraint (the baseline PRUNE is compared with).",
                                _smollm2("rome", None)),
    "smollm2_rome_prune": Composition(
        "SmolLM2-135M + ROME + PRUNE deferred (alpha = e): the paper's reference protocol. Edits accumulate\n"
        "unrestrained; every evaluation and the exported model see W0 + restrained dW.",
        _smollm2("rome", "prune_deferred")),
    "smollm2_rome_rect_prune": Composition(
        "SmolLM2-135M + ROME with RECT then PRUNE on the same matrix, both online: after every edit the accumulated\n"
        "update dW becomes F(RECT(dW)) (RECT keeps the 40 % of entries with the largest relative change, PRUNE\n"
        "restrains its singular values above sigma_max(W0)); callbacks compose in list order, and only online (a\n"
        "deferred restraint combined with another on the same matrix is refused at start).",
        _smollm2("rome", "rect_prune_online")),
    "smollm2_memit": Composition("SmolLM2-135M + MEMIT (layers from the preset), no restraint.",
                                 _smollm2("memit", None)),
    "smollm2_memit_prune": Composition("SmolLM2-135M + MEMIT + PRUNE deferred (alpha = e), the paper's protocol.",
                                       _smollm2("memit", "prune_deferred")),
    "smollm2_alphaedit_prune": Composition(
        "SmolLM2-135M + AlphaEdit (MEMIT projected onto the null space of the preserved keys), batch-sequential: the\n"
        "40 demo edits in 4 batches of 10, + PRUNE deferred (alpha = e) on top (an editor and a callback compose\n"
        "freely).",
        _smollm2("alphaedit", "prune_deferred", "evaluation/demo_batched.yaml"),
        "data:\n  batch_size: 10\n"),
    "smollm2_ft": Composition(
        "SmolLM2-135M + constrained fine-tuning (FT) of one MLP matrix: the naive baseline, with PRUNE online.",
        _smollm2("ft", "prune_online")),
    "smollm2_mend": Composition(
        "SmolLM2-135M + MEND (the bundled hypernetwork, trained on CounterFact for layers 27-29 up_proj/down_proj;\n"
        "benchmarks/results/mend.md), no restraint: the paper's unrestrained MEND baseline.",
        _smollm2("mend_smollm2", None)),
    "smollm2_mend_prune": Composition(
        "SmolLM2-135M + MEND + PRUNE deferred (alpha = e): edits accumulate unrestrained; every evaluation and the\n"
        "exported model see W0 + restrained dW (the paper's protocol).",
        _smollm2("mend_smollm2", "prune_deferred")),
    "gpt2xl_rome_prune": Composition(
        "The paper's set-up: GPT-2 XL + ROME (layer 17, preset) + PRUNE deferred (alpha = e), CounterFact, 1000\n"
        "sequential edits. Needs hub access and a GPU: python train.py --config configs/gpt2xl_rome_prune.yaml",
        _paper("gpt2xl", "rome_original")),
    "gpt2xl_memit_prune": Composition(
        "The paper's set-up: GPT-2 XL + MEMIT (layers 13-17, lambda 20000, preset: the paper's value, d_k/lambda =\n"
        "0.32) + PRUNE deferred (alpha = e).",
        _paper("gpt2xl", "memit")),
    "llama3_8b_rome_prune": Composition(
        "The paper's set-up: Llama-3-8B + ROME (layer 4 down_proj, preset) + PRUNE deferred (alpha = e), bf16 weights\n"
        "(editors and the restraint compute in float32). Needs hub access (gated model) and a GPU.",
        _paper("llama3_8b", "rome_original")),
}


# -- a small block-YAML reader that keeps comments ------------------------------------------------------------------
class FragmentError(ValueError):
    """A fragment uses YAML this script does not compose, or two fragments cannot merge; names the file and line."""


@dataclass
class Node:
    """One mapping entry: its line (without indentation), the comment lines above it, and its value: nested
    ``children`` (a block mapping), ``items`` (a block sequence: each item its lines, indented relative to its
    ``-``), or neither (a scalar or flow value on the line itself)."""

    key: str
    line: str
    comments: list[str] = field(default_factory=list)
    children: dict[str, "Node"] | None = None
    items: list[list[str]] | None = None
    trailer: list[str] = field(default_factory=list)  # comment lines continuing the line's comment, indented


_KEY = re.compile(r"^(?P<key>[A-Za-z_][\w.+-]*):(?:\s+(?P<value>.*))?$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _value_part(rest: str | None) -> str:
    """The value on a ``key:`` line without its trailing comment ('' for a block value)."""
    if not rest:
        return ""
    return "" if rest.lstrip().startswith("#") else rest


def parse_fragment(text: str, where: str) -> dict[str, Node]:
    """The top-level mapping of a fragment (its leading comment block, the fragment's description, left out),
    comments attached to the entry below them."""
    lines = [ln.rstrip() for ln in text.splitlines()]
    if any("\t" in ln[: _indent(ln) + 1] for ln in lines):
        raise FragmentError(f"{where}: tabs in indentation")
    pos = 0

    def skip_blank() -> None:
        nonlocal pos
        while pos < len(lines) and not lines[pos].strip():
            pos += 1

    def peek() -> tuple[str, int] | None:
        """The next non-blank line and its indentation; None at the end."""
        skip_blank()
        return (lines[pos], _indent(lines[pos])) if pos < len(lines) else None

    def mapping(indent: int) -> dict[str, Node]:
        nonlocal pos
        out: dict[str, Node] = {}
        comments: list[str] = []
        while (line := peek()) is not None:
            ln, ind = line
            if ind < indent:
                break
            if ln.strip().startswith("#"):
                comments.append(ln.strip())
                pos += 1
                continue
            if ind > indent:
                raise FragmentError(f"{where}: line {pos + 1}: unexpected indentation")
            m = _KEY.match(ln.strip())
            if not m:
                raise FragmentError(f"{where}: line {pos + 1}: expected 'key: value', got {ln.strip()!r}")
            key = m.group("key")
            if key in out:
                raise FragmentError(f"{where}: line {pos + 1}: key '{key}' given twice")
            node = Node(key, ln.strip(), comments)
            comments = []
            pos += 1
            if _value_part(m.group("value")):
                while pos < len(lines) and lines[pos].strip().startswith("#") and _indent(lines[pos]) > indent:
                    node.trailer.append(lines[pos][indent:])
                    pos += 1
            else:
                skip_blank()
                nxt = lines[pos] if pos < len(lines) else ""
                if nxt.strip().startswith("- ") and _indent(nxt) >= indent:
                    node.items = sequence(_indent(nxt))
                elif nxt and _indent(nxt) > indent:
                    node.children = mapping(_indent(nxt))
            out[key] = node
        if comments:
            raise FragmentError(f"{where}: line {pos}: a comment that belongs to no key (put it above one)")
        return out

    def sequence(indent: int) -> list[list[str]]:
        nonlocal pos
        items: list[list[str]] = []
        pending: list[str] = []
        while (line := peek()) is not None:
            ln, ind = line
            if ln.strip().startswith("#") and ind >= indent:
                pending.append(" " * (ind - indent) + ln.strip())
                pos += 1
                continue
            if ind != indent or not ln.strip().startswith("- "):
                break
            item = pending + [ln[indent:]]
            pending = []
            pos += 1
            while pos < len(lines) and (not lines[pos].strip() or _indent(lines[pos]) > indent):
                if lines[pos].strip():
                    item.append(lines[pos][indent:])
                pos += 1
            items.append(item)
        if pending:
            raise FragmentError(f"{where}: line {pos}: a comment after the last list item")
        return items

    while pos < len(lines) and (lines[pos].startswith("#") or not lines[pos].strip()):
        pos += 1  # the fragment's own description, not the config's
    top = mapping(0)
    if pos < len(lines):
        raise FragmentError(f"{where}: line {pos + 1}: cannot read {lines[pos].strip()!r}")
    return top


def merge_nodes(into: dict[str, Node], new: dict[str, Node], where: str) -> None:
    """LightningCLI's merge of a later config: mappings merge by key, ``key+`` appends to a list, anything else
    replaces (keeping the key's place)."""
    for key, node in new.items():
        append = key.endswith("+")
        name = key[:-1] if append else key
        if append:
            if node.items is None:
                raise FragmentError(f"{where}: '{key}' must be a block list")
            old = into.get(name)
            if old is not None and old.items is None:
                raise FragmentError(f"{where}: '{key}' appends to '{name}', which is not a list")
            if old is None:
                into[name] = Node(name, node.line.replace(key, name, 1), list(node.comments), None, list(node.items))
            else:
                old.items = old.items + node.items
        elif name in into and into[name].children is not None and node.children is not None:
            merge_nodes(into[name].children, node.children, where)
        else:
            into[name] = node


def render(nodes: dict[str, Node], indent: int = 0) -> list[str]:
    """The YAML lines of ``nodes`` at ``indent``; list items two spaces deeper than their key."""
    pad = " " * indent
    out: list[str] = []
    for node in nodes.values():
        out += [pad + c for c in node.comments]
        out.append(pad + node.line)
        out += [pad + ln for ln in node.trailer]
        if node.children is not None:
            out += render(node.children, indent + 2)
        if node.items is not None:
            out += [pad + "  " + ln for item in node.items for ln in item]
    return out


def merge_data(into: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The same merge on parsed YAML (``yaml.safe_load`` of each fragment): what the written file must load as."""
    for key, value in new.items():
        if key.endswith("+"):
            into[key[:-1]] = list(into.get(key[:-1]) or []) + list(value)
        elif isinstance(into.get(key), dict) and isinstance(value, dict):
            merge_data(into[key], value)
        else:
            into[key] = value
    return into


# -- compositions ---------------------------------------------------------------------------------------------------
def own_settings(name: str) -> str:
    """The YAML of ``name``'s own settings: its logger name, then :attr:`Composition.own`."""
    return f"trainer:\n  logger:\n    init_args:\n      name: {name}\n" + COMPOSITIONS[name].own


def cli_args(name: str, own_file: str | Path) -> list[str]:
    """``train.py`` arguments that run ``name`` from its fragments (``own_file``: where :func:`own_settings` was
    written)."""
    args = []
    for f in COMPOSITIONS[name].fragments:
        args += ["--config", str(CONFIGS / f)]
    return args + ["--config", str(own_file)]


def compose(name: str) -> str:
    """The text of ``configs/<name>.yaml``."""
    comp = COMPOSITIONS[name]
    nodes: dict[str, Node] = {}
    data: dict[str, Any] = {}
    parts = [(f, (CONFIGS / f).read_text(encoding="utf-8")) for f in comp.fragments]
    parts.append((f"COMPOSITIONS['{name}'] (own settings)", own_settings(name)))
    kinds = [f.split("/", 1)[0] for f in comp.fragments]
    if any(k not in KINDS for k in kinds) or kinds != sorted(kinds, key=KINDS.index):
        raise FragmentError(f"{name}: fragments {list(comp.fragments)} must come from {', '.join(KINDS)}, in that "
                            "order (restraints before evaluation: the metric callbacks read the restrained weights)")
    for where, text in parts:
        merge_nodes(nodes, parse_fragment(text, where), where)
        merge_data(data, yaml.safe_load(text) or {})
    sources = " + ".join(comp.fragments) + " + its own settings in COMPOSITIONS"
    header = ["# " + ln for ln in textwrap.wrap(" ".join(comp.about.split()), 115, break_on_hyphens=False)]
    header += ["#"] + ["# " + ln for ln in textwrap.wrap(
        f"Written by `python configs/compose.py` (edit what it names, not this file) from {sources}.", 115,
        subsequent_indent="  ")]
    text = "\n".join(header + render(nodes)) + "\n"
    if yaml.safe_load(text) != data:
        raise FragmentError(f"{name}: the written YAML does not load as the merged fragments (a YAML construct "
                            "this script does not compose?)")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if a committed file differs")
    args = ap.parse_args(argv)
    stale = []
    for name in COMPOSITIONS:
        path = CONFIGS / f"{name}.yaml"
        text = compose(name)
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path.name)
        if not args.check:
            path.write_text(text, encoding="utf-8")
    if args.check and stale:
        print(f"out of date (run python configs/compose.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    print(f"{'stale' if args.check else 'written'}: {', '.join(stale) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
