"""The house rules of docs/architecture.md, checked: small files, short functions, imports one way."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
PACKAGES = ("mmpl", "mmil", "prunelimit")


def _modules():
    return sorted(p for pkg in PACKAGES for p in (SRC / pkg).rglob("*.py"))


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_source_tree_is_found():
    assert len(_modules()) > 40  # guards the checks below against an empty walk


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_file_and_function_lengths(path: Path):
    text = path.read_text()
    assert text.count("\n") <= MAX_FILE_LINES, f"{path}: {text.count(chr(10))} lines; split it along a seam"
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_run_one_way(path: Path):
    """prunelimit never imports mmil; mmil imports prunelimit only in its one adapter; the foundation imports neither."""
    imported = _imports(ast.parse(path.read_text()))
    package = path.relative_to(SRC).parts[0]
    if package == "mmpl":
        assert not imported & {"mmil", "prunelimit"}, path
    elif package == "prunelimit":
        assert "mmil" not in imported, path
    elif path.relative_to(SRC / "mmil").as_posix() != "pruning.py":
        assert "prunelimit" not in imported, f"{path}: only mmil/pruning.py may import prunelimit"
