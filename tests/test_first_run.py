"""The README's first two commands, as a newcomer runs them on a fresh machine.

The first (compose) is run by tests/test_compose.py. The second, the test
command, is run here from a fresh copy of the project with a Python whose pip
is externally managed (PEP 668), such as Debian's /usr/bin/python3: it collects
every test instead of running the suite a second time.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import IN_CI, README_COMMANDS, ROOT, copy_checkout, require_tool

README = (ROOT / "README.md").read_text()
# A Python that PEP 668 marks as managed by the system's package manager.
SYSTEM_PYTHON = Path("/usr/bin/python3")


def test_the_readme_starts_with_the_compose_command() -> None:
    assert README_COMMANDS[0] == "docker compose up --build"
    assert README.index(README_COMMANDS[0]) < README.index("## A first task")


def test_the_readme_second_command_runs_the_tests_and_ci_runs_exactly_it() -> None:
    ci_commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and line[0] != "#"]

    assert README_COMMANDS[1] == "uv run pytest"
    assert ci_commands[-1] == README_COMMANDS[1]


def externally_managed(python: Path) -> bool:
    """Whether pip refuses to install into ``python`` (its stdlib holds the PEP 668 marker)."""
    code = (
        "import os, sysconfig; print(os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))"
    )
    result = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True)
    return result.stdout.strip() == "True"


def test_the_test_command_works_with_an_externally_managed_python(tmp_path: Path) -> None:
    require_tool("uv")
    if not (SYSTEM_PYTHON.exists() and externally_managed(SYSTEM_PYTHON)):
        message = f"{SYSTEM_PYTHON} is not an externally managed Python (PEP 668)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    checkout = tmp_path / "onebox"
    copy_checkout(checkout)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("VIRTUAL_ENV", "UV_", "PYTEST"))}
    env["UV_PYTHON"] = str(SYSTEM_PYTHON)

    result = subprocess.run(
        [*README_COMMANDS[1].split(), "--collect-only", "-q"],
        cwd=checkout,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert re.search(r"^\d+(/\d+)? tests collected", result.stdout, re.MULTILINE), result.stdout[-2000:]
    venv = (checkout / ".venv" / "pyvenv.cfg").read_text()
    assert f"home = {SYSTEM_PYTHON.parent}" in venv
