"""The code stays ruff- and mypy --strict-clean, and the two modules easy to walk
into: each opens with a list of its sections, and no function runs long. CI
runs these with the tests."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

BIN = Path(sys.executable).parent


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, timeout=300)


def test_ruff_finds_nothing() -> None:
    result = run(str(BIN / "ruff"), "check", ".")

    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_changes_nothing() -> None:
    result = run(str(BIN / "ruff"), "format", "--check", ".")

    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_finds_nothing() -> None:
    result = run(str(BIN / "mypy"), "--strict", "main.py", "tasks.py", "supervise.py", "bench", "tests")

    assert result.returncode == 0, result.stdout + result.stderr


MODULES = ["main.py", "tasks.py"]
# About a screen: longer, and a reader cannot see what a function does at once.
LONGEST_FUNCTION = 60


def sections(source: str) -> list[str]:
    return re.findall(r"(?m)^# -- (.+?) -+$", source)


def listed_sections(source: str) -> list[str]:
    """The names that the module's docstring lists, one ``- <name>: ...`` each."""
    return re.findall(r"(?m)^- ([^:\n]+):", ast.get_docstring(ast.parse(source)) or "")


@pytest.mark.parametrize("module", MODULES)
def test_a_modules_docstring_lists_its_sections_in_order(module: str) -> None:
    source = (ROOT / module).read_text()

    assert listed_sections(source) == sections(source)


@pytest.mark.parametrize("module", MODULES)
def test_no_function_is_longer_than_a_screen(module: str) -> None:
    tree = ast.parse((ROOT / module).read_text())
    lengths = {
        f"{node.name} (line {node.lineno})": (node.end_lineno or node.lineno) - node.lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }

    assert {name: lines for name, lines in lengths.items() if lines > LONGEST_FUNCTION} == {}
