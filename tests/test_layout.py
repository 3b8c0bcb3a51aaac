"""The package's layout: imports flow one way (config and registry at the bottom, the CLI at
the top), and the torch-free layers stay torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "peftkit"
# a subpackage may import from its own rank and below, never above
RANK = {
    "errors": 0, "paths": 0,
    "config": 1, "registry": 1, "metrics": 1,
    "models": 2, "data": 2,
    "adapters": 3,
    "training": 4, "prompting": 4,
    "serving": 5,
    "run": 6,
    "cli": 7,
}  # fmt: skip


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "peftkit" and len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every peftkit module ``path`` imports, at the top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [(n, m) for n, m in found if m.startswith("peftkit.")]


def test_every_module_belongs_to_a_ranked_part():
    tops = {p.stem if p.is_file() else p.name for p in PKG.iterdir()}
    tops -= {"__init__", "__pycache__", "py", "library"}
    assert tops <= set(RANK), sorted(tops - set(RANK))


def test_imports_flow_one_way():
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("").as_posix().replace("/", ".")
        mine = _part(rel)
        if mine is None or mine not in RANK:
            continue
        for line, module in _imports(path):
            theirs = _part(module)
            if theirs in RANK and RANK[theirs] > RANK[mine]:
                wrong.append(f"{rel}:{line} imports {module} ({mine} < {theirs})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    "modules",
    [
        "peftkit.config.recipes, peftkit.config.presets, peftkit.config.training",
        "peftkit.registry, peftkit.registry.store",
        "peftkit.data.load",
        "peftkit.cli",
    ],
)
def test_the_torch_free_layers_do_not_import_torch(modules):
    code = f"import sys, {modules}; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stderr
