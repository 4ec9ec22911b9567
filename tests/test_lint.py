"""The code base stays clean under the ruff configuration in pyproject.toml."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", str(ROOT)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


LAYERS = {"io": 1, "datasets": 1, "pp": 2, "models": 3, "tl": 4, "pl": 5}
"""Imports flow one way: io, datasets -> pp -> models -> tl -> pl (the package's private top-level modules are below all)."""


def test_imports_flow_one_way():
    import ast

    upward = []
    for path in sorted((ROOT / "histocell_sd").rglob("*.py")):
        parts = path.relative_to(ROOT / "histocell_sd").parts
        layer = LAYERS.get(parts[0]) if len(parts) > 1 else None
        if layer is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:  # from ..<subpackage> import ...
                target = (node.module or "").split(".")[0]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("histocell_sd."):
                target = node.module.split(".")[1]
            else:
                continue
            if LAYERS.get(target, 0) > layer:
                upward.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}")
    assert upward == []


def test_bad_input_is_an_invalid_input_error():
    """Public functions report bad input as InvalidInputError, never as a bare ValueError or TypeError."""
    import ast

    bare = []
    for path in sorted((ROOT / "histocell_sd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                if node.exc.func.id in ("ValueError", "TypeError"):
                    bare.append(f"{path.relative_to(ROOT)}:{node.lineno} raises {node.exc.func.id}")
    assert bare == []
