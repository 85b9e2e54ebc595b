"""configs/compose.py: the shipped run configs are the compositions of their fragments, and the fragments given as
several --config to train.py resolve to the same run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train import main  # noqa: E402

_spec = importlib.util.spec_from_file_location("compose", ROOT / "configs" / "compose.py")
compose = importlib.util.module_from_spec(_spec)
sys.modules["compose"] = compose  # dataclasses look their module up while the class is built
_spec.loader.exec_module(compose)


def printed(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([*args, "--print_config"])
    assert e.value.code in (0, None)
    return capsys.readouterr().out


def test_committed_configs_are_what_compose_writes():
    shipped = {p.stem for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("mend_train")}
    assert shipped == set(compose.COMPOSITIONS)
    for name in compose.COMPOSITIONS:
        assert (ROOT / "configs" / f"{name}.yaml").read_text(encoding="utf-8") == compose.compose(name), name
    assert compose.main(["--check"]) == 0


def test_every_fragment_is_used():
    used = {f for c in compose.COMPOSITIONS.values() for f in c.fragments}
    files = {str(p.relative_to(ROOT / "configs")) for k in compose.KINDS for p in (ROOT / "configs" / k).glob("*.yaml")}
    assert files == used


@pytest.mark.parametrize("name", sorted(compose.COMPOSITIONS))
def test_fragments_as_several_configs_resolve_to_the_shipped_config(name, tmp_path, capsys):
    own = tmp_path / "own.yaml"
    own.write_text(compose.own_settings(name))
    from_fragments = printed(compose.cli_args(name, own), capsys)
    shipped = printed(["--config", str(ROOT / "configs" / f"{name}.yaml")], capsys)
    assert from_fragments == shipped
    cfg = yaml.safe_load(shipped)
    assert cfg["trainer"]["logger"]["init_args"]["name"] == name
    kinds = [c["class_path"].rsplit(".", 1)[-1] for c in cfg["trainer"]["callbacks"]]
    restraints = [i for i, k in enumerate(kinds) if k in ("PruneCallback", "RectCallback")]
    assert all(i < kinds.index("EditMetricsCallback") for i in restraints), kinds  # restraints first


def test_bad_fragments_are_named(tmp_path, monkeypatch):
    with pytest.raises(compose.FragmentError, match=r"x.yaml: line 3: expected 'key: value', got '\[1, 2\]'"):
        compose.parse_fragment("trainer:\n  devices: 1\n  [1, 2]\n", "x.yaml")
    with pytest.raises(compose.FragmentError, match="z.yaml: line 5: unexpected indentation"):  # header counted
        compose.parse_fragment("# what it is\n\nmodel:\n      model: x\n  dtype: y\n", "z.yaml")
    with pytest.raises(compose.FragmentError, match="y.yaml: 'callbacks\\+' must be a block list"):
        compose.merge_nodes({}, compose.parse_fragment("callbacks+: 3\n", "y.yaml"), "y.yaml")
    monkeypatch.setitem(compose.COMPOSITIONS, "bad", compose.Composition(
        "x", ("base/run.yaml", "evaluation/demo.yaml", "restraints/prune_online.yaml")))
    with pytest.raises(compose.FragmentError, match="bad: fragments .* in that order \\(restraints before evaluation"):
        compose.compose("bad")
