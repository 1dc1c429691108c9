"""The layering of docs/architecture.md, checked by import-linter on every test run.

Front doors -> engine -> trainer -> tasks/modes -> building blocks -> config/errors: a lower layer
never imports a higher one (the contract is `.importlinter` at the repository root). Imports inside
functions count too, so a late import cannot hide a cycle.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c",
               "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
               str(root / ".importlinter"), "--no-cache"]
    environment = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(command, cwd=root, env=environment, capture_output=True, text=True, timeout=300)


def test_the_layers_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_lower_layer_importing_a_higher_one_breaks_the_contract(tmp_path):
    # The contract is only worth running if it can fail: plant the import the layering forbids
    # most plainly (the schema reaching up to the loop) in a copy of the package.
    shutil.copytree(REPO / "difftrain", tmp_path / "difftrain", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    config = tmp_path / "difftrain" / "config.py"
    config.write_text(config.read_text(encoding="utf-8") + "\n\ndef _late():\n    import difftrain.trainer\n",
                      encoding="utf-8")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "difftrain.config is not allowed to import difftrain.trainer" in result.stdout


def test_every_module_has_a_layer():
    # import-linter leaves a module out of the layering when no layer names it: a new module must
    # be placed, or it could import anything.
    layers = (REPO / ".importlinter").read_text(encoding="utf-8").split("layers =", 1)[1].split("\n\n", 1)[0]
    placed = {name.strip().removeprefix("difftrain.") for line in layers.splitlines()
              for name in line.replace("|", ":").split(":") if name.strip()}
    package = REPO / "difftrain"
    modules = {path.stem for path in package.glob("*.py") if path.stem not in ("__init__", "tiny")}
    modules |= {path.name for path in package.iterdir() if (path / "__init__.py").is_file()}
    assert modules - placed == set(), "place these in .importlinter's layers"


def test_no_class_over_250_lines_and_no_function_over_80():
    # Issue 16's size limits: a class or function past them is doing several jobs and reads as such.
    import ast

    oversized = []
    for path in sorted((REPO / "difftrain").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            limit = 250 if isinstance(node, ast.ClassDef) else \
                80 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            if limit and node.end_lineno - node.lineno + 1 > limit:
                oversized.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} "
                                 f"({node.end_lineno - node.lineno + 1} lines, limit {limit})")
    assert oversized == []
