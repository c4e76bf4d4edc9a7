"""The README's test command on a machine with no RabbitMQ of its own: only uv and podman or Docker.

A child run of the README's test command, with the machine's broker out of
reach (the tests' broker port pointed at a port where nothing listens, and no
rabbitmqctl on PATH), runs a part of the suite that needs a broker: the
broker tests of tests/test_broker.py and two whole-stack tests, one of which
drives the broker through its rabbitmqctl. They must run and pass, not skip:
the session starts RabbitMQ in a container, drives it through the
container's own rabbitmqctl, and removes it at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from conftest import README_COMMANDS, ROOT, container_engine, free_port, require_tool

SUBSET = [
    "tests/test_broker.py",
    "tests/test_json_logs.py",
    "tests/test_docs.py::test_the_readme_first_task_answers_as_shown",
]


def path_without_rabbitmq(shadows: Path) -> str:
    """PATH with each folder that holds rabbitmqctl replaced by a copy of it in links, RabbitMQ's tools left out."""
    folders = [Path(folder) for folder in os.environ["PATH"].split(os.pathsep)]
    for index, source in enumerate(folders):
        if (source / "rabbitmqctl").exists():
            shadow = shadows / str(source.resolve()).strip("/").replace("/", "_")
            if not shadow.is_dir():
                shadow.mkdir(parents=True)
                for entry in source.iterdir():
                    if not entry.name.startswith("rabbitmq"):
                        (shadow / entry.name).symlink_to(entry)
            folders[index] = shadow
    return os.pathsep.join(map(str, folders))


def test_the_test_command_runs_its_own_broker_where_the_machine_has_none(tmp_path: Path) -> None:
    require_tool("uv")
    engine = container_engine()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("VIRTUAL_ENV", "UV_", "PYTEST", "CLOUDAMQP_URL", "QUEUE_NAME"))
    }
    env["PATH"] = path_without_rabbitmq(tmp_path / "bin")
    env["ONEBOX_TEST_BROKER_PORT"] = str(free_port())  # nothing listens there
    assert shutil.which("rabbitmqctl", path=env["PATH"]) is None
    report = tmp_path / "report.xml"

    result = subprocess.run(
        [*README_COMMANDS[1].split(), "-p", "no:cacheprovider", f"--junitxml={report}", *SUBSET],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )

    output = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, output
    cases = ET.parse(report).getroot().iter("testcase")
    outcomes = {f"{case.get('classname')}.{case.get('name')}": [child.tag for child in case] for case in cases}
    assert outcomes, output
    assert {name: tags for name, tags in outcomes.items() if set(tags) - {"system-out", "system-err"}} == {}
    names = "\n".join(outcomes)
    assert "tests.test_broker." in names and "tests.test_json_logs." in names and "first_task" in names
    started = re.search(r"this session ran (\S+) as container (\S+) on port (\d+), and removed it", result.stdout)
    assert started is not None, output
    left = subprocess.run(
        [engine, "ps", "-a", "-q", "--filter", f"name=^{started.group(2)}$"], capture_output=True, text=True, check=True
    )
    assert left.stdout.strip() == ""
