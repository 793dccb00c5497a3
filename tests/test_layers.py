"""The house reads floor by floor: imports only go down, and the stages are peers.

Floors, lowest first: storage -> model -> engine.integrations (config, runtime, Label Studio, ML backend, Ray,
simulated annotators, synthetic data) -> stages -> orchestration (the rest of engine: round loop, retraining,
CLI, demo, report). A module may import its own floor and the floors below; no stage imports another stage;
model/ knows nothing of the engine. Project imports sit at the top of modules, except in the CLI (engine/cli/),
which defers them on purpose (start-up time).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("storage", "model", "engine", "stages")
DEFERRING_ALLOWED = {"engine.cli"}


def floor(module: str) -> int:
    if module.startswith("storage"):
        return 0
    if module.startswith("model"):
        return 1
    if module.startswith("engine.integrations"):
        return 2
    if module.startswith("stages"):
        return 3
    return 4  # engine: orchestration


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def project_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import of a project module in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            names = [f"{base}.{a.name}" if base in PACKAGES or base == "engine.integrations" else base
                     for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                out.append((name, node.lineno, id(node) in top))
    return out


def violations(mods: dict[str, Path], root: Path = ROOT) -> list[str]:
    found = []
    for name, path in sorted(mods.items()):
        for imported, line, at_top in project_imports(path):
            where = f"{path.relative_to(root)}:{line}"
            if floor(imported) > floor(name):
                found.append(f"{where}: {name} (floor {floor(name)}) imports {imported} (floor {floor(imported)})")
            if name.startswith("stages.") and imported.startswith("stages.") and \
                    imported.split(".")[1] != name.split(".")[1]:
                found.append(f"{where}: stage {name} imports stage {imported}")
            if not at_top and not any(name == d or name.startswith(d + ".") for d in DEFERRING_ALLOWED):
                found.append(f"{where}: {name} imports {imported} inside a function")
    return found


def test_imports_only_go_down_and_stages_are_peers():
    assert violations(modules()) == []


@pytest.mark.parametrize("source, module, problem", [
    ("from engine.integrations.config import EngineConfig\n", "model.train", "floor 1) imports"),
    ("from stages.semi import calibrate\n", "stages.auto", "imports stage stages.semi"),
    ("from engine.rounds import run_rounds\n", "stages.manual", "floor 3) imports"),
    ("def f():\n    from storage.rle import encode_masks\n", "model.amg", "inside a function"),
])
def test_the_rule_catches_each_kind_of_violation(tmp_path, source, module, problem):
    """The checker itself: an upward import, a stage importing a stage, a deferred project import."""
    path = tmp_path / "m.py"
    path.write_text(source)
    found = violations({module: path}, root=tmp_path)
    assert len(found) == 1 and problem in found[0]
