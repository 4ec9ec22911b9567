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
    # own case bare_value_error
    """Public functions report bad input as InvalidInputError, never as a bare ValueError or TypeError."""
    import ast

    bare = []
    for path in sorted((ROOT / "histocell_sd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                if node.exc.func.id in ("ValueError", "TypeError"):
                    bare.append(f"{path.relative_to(ROOT)}:{node.lineno} raises {node.exc.func.id}")
    assert bare == []


def test_every_reliability_case_names_an_existing_test_that_carries_its_id():
    """Each row of tests/RELIABILITY.md names tests that exist, and ``grep -rn <id> tests/`` finds the case."""
    import re

    sources = {path.name: path.read_text() for path in (ROOT / "tests").glob("test_*.py")}
    rows = [line for line in (ROOT / "tests" / "RELIABILITY.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| case", "|---"))]
    assert len(rows) >= 100
    problems, previous = [], []
    for row in rows:
        case = row.split("|")[1].strip()
        refs = re.findall(r"`(test_\w+\.py)::(test_\w+)", row) or (previous if "| same test" in row else [])
        previous = refs
        if not refs:
            problems.append(f"{case}: names no test")
        for file, test in refs:
            if not re.search(rf"^def {test}\(", sources.get(file, ""), re.M):
                problems.append(f"{case}: {file}::{test} does not exist")
        if not any(re.search(rf"\b{re.escape(case)}\b", text) for text in sources.values()):
            problems.append(f"{case}: no test carries the id")
    assert not problems, problems
