"""compose.yaml as a first-time user runs it, with podman-compose: onebox and its own RabbitMQ.

This machine cannot use the default bridge network (see ../shared/README.md),
so the test runs the same compose.yaml with compose.host.yaml on top, which
puts both containers on the host's network, the broker on ports and a node
name of this test's own. The images come from variables: RABBITMQ_IMAGE (the
official image by default; .ci/run sets a local stand-in) and BASE_IMAGE for
the Containerfile, as for every container test.

podman runs healthchecks from systemd timers, and podman-compose waits for
`service_healthy` only with podman 4.6 or later; where either is missing the
test runs the broker's healthcheck itself (`podman healthcheck run`), as the
timer would.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import (
    README_COMMANDS,
    ROOT,
    Process,
    copy_checkout,
    countdown_refusal,
    free_port,
    require_tool,
    wait_http,
)

COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
STOP_BUDGET = tomllib.loads((ROOT / "fly.toml").read_text())["kill_timeout"]
OFFICIAL_RABBITMQ = "docker.io/library/rabbitmq:4.0-management"
# The README's first command, `docker compose up --build`: its arguments after `docker compose`,
# run here with podman-compose (no Docker on the test machines), detached.
README_UP = shlex.split(README_COMMANDS[0])[2:]


@dataclass
class Project:
    """One `podman-compose -p NAME` project with the host-network override."""

    name: str
    env: dict[str, str]
    directory: Path = ROOT
    files: tuple[str, ...] = ("compose.yaml", "compose.host.yaml")

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        podman_compose = str(Path(sys.executable).parent / "podman-compose")
        command = [podman_compose, "-p", self.name, *chain(*(("-f", file) for file in self.files))]
        # No registry here: never pull; the build step needs the host's network too.
        command += ["--podman-build-args=--network host --pull=never", "--podman-run-args=--pull=never", *args]
        return subprocess.run(
            command, check=False, cwd=self.directory, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def compose(self, *args: str, timeout: float = 120) -> None:
        result = self.run(*args, timeout=timeout)
        assert result.returncode == 0, f"podman-compose {' '.join(args)}: {result.stdout}\n{result.stderr}"

    def container(self, service: str) -> str:
        return self.podman(
            "ps", "-a", "--format", "{{.Names}}", "--filter", f"label=com.docker.compose.service={service}"
        )

    def podman(self, *args: str) -> str:
        """A podman listing command, limited to this project's objects."""
        command = ["podman", *args, "--filter", f"label=io.podman.compose.project={self.name}"]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()

    def leftovers(self) -> dict[str, str]:
        found = {kind: self.podman(kind, "ls", "-q") for kind in ("container", "volume", "network")}
        pods = ["podman", "pod", "ls", "-q", "--filter", f"name=^pod_{self.name}$"]
        found["pod"] = subprocess.run(pods, check=True, capture_output=True, text=True).stdout.strip()
        return {kind: ids for kind, ids in found.items() if ids}

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.env['ONEBOX_PORT']}{path}"


@pytest.fixture
def project() -> Iterator[Project]:
    require_tool("podman")
    name = f"onebox-test-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ)
    env.setdefault("RABBITMQ_IMAGE", OFFICIAL_RABBITMQ)
    env |= {
        "ONEBOX_PORT": str(free_port()),
        "RABBITMQ_PORT": str(free_port()),
        "RABBITMQ_DIST_PORT": str(free_port()),
        "RABBITMQ_MANAGEMENT_PORT": str(free_port()),
        "RABBITMQ_NODENAME": f"{name}@localhost",
    }
    project = Project(name, env)
    yield project
    project.run("down", "-v", "-t", "0")
    subprocess.run(["podman", "rmi", f"localhost/{name}_onebox"], check=False, capture_output=True)


def wait_healthy(container: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["podman", "healthcheck", "run", container], check=False, capture_output=True).returncode:
        if time.monotonic() > deadline:
            logs = subprocess.run(["podman", "logs", container], check=False, capture_output=True, text=True).stderr
            raise AssertionError(f"{container} not healthy in {timeout} s:\n{logs[-4000:]}")
        time.sleep(1)


def test_the_stop_grace_covers_the_platforms_stop_budget() -> None:
    assert COMPOSE["services"]["onebox"]["stop_grace_period"] == f"{STOP_BUDGET}s"


def test_the_broker_image_is_the_official_one_unless_set() -> None:
    assert COMPOSE["services"]["rabbitmq"]["image"] == f"${{RABBITMQ_IMAGE:-{OFFICIAL_RABBITMQ}}}"


def test_compose_up_runs_a_countdown_and_down_leaves_nothing(project: Project) -> None:
    project.compose(*README_UP, "-d", timeout=600)
    broker, onebox = project.container("rabbitmq"), project.container("onebox")

    wait_healthy(broker)
    wait_http(project.url("/readyz"), timeout=60)
    response = httpx.post(project.url("/tasks"), json={"seconds": 2})
    assert response.status_code == 202, response.text
    task_id = response.json()["id"]
    logs = Process(["podman", "logs", "--follow", onebox], env=dict(os.environ))
    try:
        logs.wait_for(rf"task {task_id} done seconds=2", timeout=30)
    finally:
        logs.stop()
    management = f"http://127.0.0.1:{project.env['RABBITMQ_MANAGEMENT_PORT']}/api/overview"
    assert httpx.get(management, auth=("onebox", "onebox")).status_code == 200

    started = time.monotonic()
    project.compose("down", "-v", timeout=STOP_BUDGET + 60)
    elapsed = time.monotonic() - started

    assert elapsed < STOP_BUDGET
    assert project.leftovers() == {}


def test_the_development_variant_restarts_web_and_worker_on_a_change_of_the_checkout(
    project: Project, tmp_path: Path
) -> None:
    # A copy of the checkout, so that the test can edit it.
    copy_checkout(tmp_path, skip=("tests/", "bench/", "docs/"))
    tmp_path.chmod(0o755)  # the container's user reads the checkout
    project.directory, project.files = tmp_path, (*project.files, "compose.dev.yaml")
    project.compose(*README_UP, "-d", timeout=600)
    wait_http(project.url("/readyz"), timeout=90)
    logs = Process(["podman", "logs", "--follow", project.container("onebox")], env=dict(os.environ))
    try:
        logs.wait_for(r"Worker process is ready for action", timeout=60)
        start = len(logs.lines)
        settings = tmp_path / "settings.toml"
        settings.write_text(settings.read_text().replace("\nmax_seconds = 300\n", "\nmax_seconds = 7\n"))

        deadline = time.monotonic() + 90
        while "<= 7" not in (detail := countdown_refusal(project.url(""), 8)):
            assert time.monotonic() < deadline, f"the web server still says {detail!r}"
            time.sleep(0.5)
        logs.wait_for(r"Sending signal 'SIGHUP' to subprocesses", start=start, timeout=30)
        logs.wait_for(r"Worker process is ready for action", start=start, timeout=60)
    finally:
        logs.stop()
