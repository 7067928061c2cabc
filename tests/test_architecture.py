"""The arrows between floors that must never exist (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "loomlens"

# floor (a package, or a module such as run.py) -> floors it must not import
LINE = {"events", "watch", "export"}  # the line's floors: nothing below them may import them
FORBIDDEN = {
    "data": {"model", "run", "infer", "train", "evaluate", "predict", "serve", "config", "cli"} | LINE,
    "model": {"infer", "train", "evaluate", "predict", "serve", "cli"} | LINE,
    "run": {"model", "infer", "train", "evaluate", "predict", "serve", "config", "cli"} | LINE,
    "infer": {"train", "evaluate", "predict", "serve", "cli"} | LINE,
    "evaluate": {"train", "predict", "serve", "cli"} | LINE,
    "predict": {"train", "evaluate", "serve", "cli"} | LINE,
    # the event store: a table of events, read by serve and written by watch; below both
    "events": {"model", "run", "infer", "train", "evaluate", "predict", "serve", "watch", "export", "config", "cli"},
    # the watcher reaches the model only through predict, like serve
    "watch": {"model", "infer", "train", "evaluate", "serve", "export", "cli"},
    # an export is written from a loaded model and checked with infer's detection
    "export": {"train", "evaluate", "predict", "serve", "watch", "events", "cli"},
    # serve reads the watchers' database, never a watcher
    "serve": {"model", "infer", "train", "watch", "export", "cli"},
    "train": {"predict", "serve", "cli"} | LINE,
}


def _absolute(path: Path, node: ast.ImportFrom) -> list[str]:
    """The absolute names a `from` import reads: `from ..train import x` in
    `loomlens/data/convert.py` is `loomlens.train` (and `loomlens.train.x`, a submodule maybe)."""
    if node.level == 0:
        return [node.module] if node.module else []
    package = list(path.relative_to(SRC.parent).with_suffix("").parts)[:-1]  # __init__'s: its own
    base = package[: len(package) - (node.level - 1)]
    module = base + (node.module.split(".") if node.module else [])
    return [".".join(module)] + [".".join([*module, alias.name]) for alias in node.names]


def _loomlens_imports(path: Path) -> set[str]:
    """The loomlens floors a module imports, absolute (`loomlens.X`) or relative (`..X`)."""
    floors = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = _absolute(path, node)
        for name in names:
            parts = name.split(".")
            if parts[0] == "loomlens" and len(parts) > 1:
                floors.add(parts[1])
    return floors


def test_relative_imports_are_read_as_absolute() -> None:
    """The floors test sees `from ..train import x` as well as `from loomlens.train import x`."""
    module = SRC / "data" / "convert.py"
    (node,) = ast.parse("from ..train import recipe").body
    assert _absolute(module, node) == ["loomlens.train", "loomlens.train.recipe"]
    (node,) = ast.parse("from . import voc").body
    assert _absolute(module, node) == ["loomlens.data", "loomlens.data.voc"]
    (node,) = ast.parse("from .. import cli").body
    assert "loomlens.cli" in _absolute(SRC / "data" / "__init__.py", node)


def _modules(floor: str) -> list[Path]:
    """The source files of a floor: a package's modules, or the one module `floor.py`."""
    single = SRC / f"{floor}.py"
    return [single] if single.exists() else sorted((SRC / floor).rglob("*.py"))


@pytest.mark.parametrize("floor", sorted(FORBIDDEN))
def test_floor_imports_only_floors_below(floor: str) -> None:
    modules = _modules(floor)
    assert modules, f"floor {floor} has no modules"
    bad = []
    for path in modules:
        wrong = _loomlens_imports(path) & FORBIDDEN[floor]
        if wrong:
            bad.append(f"{path.relative_to(SRC)} imports {sorted(wrong)}")
    assert not bad, "forbidden arrows:\n" + "\n".join(bad)


def test_nothing_imports_cli() -> None:
    users = [p for p in SRC.rglob("*.py") if p.name != "cli.py" and "cli" in _loomlens_imports(p)]
    assert not users, f"cli is imported by {users}"


def test_data_floor_does_not_need_torch() -> None:
    """A converter works without torch: only dataset.py may import it."""
    offenders = []
    for path in (SRC / "data").rglob("*.py"):
        if path.name == "dataset.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "torch" for a in node.names):
                offenders.append(path.name)
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
                offenders.append(path.name)
    assert not offenders, f"data modules import torch: {offenders}"
