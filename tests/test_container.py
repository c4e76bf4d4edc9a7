"""The image as users and platforms run it: podman, against the local RabbitMQ.

The image is built once per session from the Containerfile, on BASE_IMAGE
(.ci/run sets it to a local stand-in for python:3.13-slim; without it, on a
laptop, the Containerfile's own default is pulled). Every container runs with
host networking and a PORT and QUEUE_NAME of its own.
"""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import IN_CI, RABBIT_URL, ROOT, Broker, Process, free_port, require_tool, wait_http

FLY = tomllib.loads((ROOT / "fly.toml").read_text())
RENDER = yaml.safe_load((ROOT / "render.yaml").read_text())["services"][0]
SETTINGS = tomllib.loads((ROOT / "settings.toml").read_text())
CONTAINERFILE = (ROOT / "Containerfile").read_text()

# What a platform waits for after its stop signal before it kills the container.
STOP_BUDGET = min(FLY["kill_timeout"], RENDER["maxShutdownDelaySeconds"])
# Outlasts stop_grace plus the time a signal takes to arrive, so that a stop
# always interrupts it.
INTERRUPTED_SECONDS = SETTINGS["stop_grace"] + 6


def podman(*args: str, timeout: float = 60) -> str:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


@dataclass
class Container:
    name: str
    port: int
    logs: Process  # `podman logs --follow`

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def exit_code(self, timeout: float) -> int:
        return int(podman("wait", self.name, timeout=timeout))

    def processes(self) -> list[tuple[str, str, str]]:
        """(user in the container, user on the host, command line) of each process."""
        rows = podman("top", self.name, "user", "huser", "args").splitlines()[1:]
        return [(user, huser, args) for user, huser, args in (row.split(maxsplit=2) for row in rows)]

    def commands(self) -> str:
        return "\n".join(args for _, _, args in self.processes())


class Containers:
    """Containers a test runs; all are removed afterwards, whatever happened."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.names: list[str] = []
        self.followers: list[Process] = []

    def run(
        self, queue: str, *command: str, read_only: bool = False, broker: str = RABBIT_URL, **settings: str | int
    ) -> Container:
        name = f"onebox-test-{uuid.uuid4().hex[:10]}"
        port = free_port()
        self.names.append(name)
        env = {"PORT": port, "QUEUE_NAME": queue, "CLOUDAMQP_URL": broker, **settings}
        podman(
            "run",
            "--detach",
            "--pull=never",
            "--network=host",
            f"--name={name}",
            *(["--read-only"] if read_only else []),
            *(f"--env={key}={value}" for key, value in env.items()),
            self.image,
            *command,
        )
        logs = Process(["podman", "logs", "--follow", name], dict(os.environ))
        self.followers.append(logs)
        return Container(name, port, logs)

    def remove_all(self) -> None:
        for name in self.names:
            subprocess.run(["podman", "rm", "--force", "--time=0", name], capture_output=True, check=False)
        for logs in self.followers:
            logs.stop()


@pytest.fixture(scope="session")
def image() -> Iterator[str]:
    require_tool("podman")
    base = os.environ.get("BASE_IMAGE")
    if base is None and IN_CI:
        pytest.fail("BASE_IMAGE is not set (.ci/run sets it with ../shared/container/podman-setup.sh)")
    # A tag of this session's own: sessions running at once do not share one.
    tag = f"localhost/onebox-test:{uuid.uuid4().hex[:10]}"
    base_options = ["--pull=never", f"--build-arg=BASE_IMAGE={base}"] if base else []
    podman("build", "--network=host", *base_options, f"--tag={tag}", str(ROOT), timeout=600)
    yield tag
    subprocess.run(["podman", "rmi", "--force", tag], capture_output=True, check=False)


@pytest.fixture
def containers(image: str, queue_name: str) -> Iterator[Containers]:
    # Taking queue_name makes its queues outlive the containers: a container
    # still running when they are deleted would declare them again.
    started = Containers(image)
    yield started
    started.remove_all()


def post_countdown(container: Container, seconds: int) -> str:
    response = httpx.post(container.url("/tasks"), json={"seconds": seconds}, timeout=10)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def ready(container: Container) -> Container:
    """The container, once its web server and its worker both serve."""
    wait_http(container.url("/readyz"), timeout=30)
    container.logs.wait_for(r"Worker process is ready for action")
    return container


def inspect(image: str, template: str) -> str:
    return podman("image", "inspect", f"--format={template}", image).strip()


# -- The image ------------------------------------------------------------------


def test_the_image_adds_little_to_its_base(image: str) -> None:
    base = inspect(image, '{{index .Labels "org.opencontainers.image.base.name"}}')

    added = int(inspect(image, "{{.Size}}")) - int(inspect(base, "{{.Size}}"))

    # The locked runtime dependencies take about 105 MB; build tools (uv, pip's
    # and apt's caches, the dev and bench groups) would push it past this.
    assert added < 130_000_000, f"{added / 1e6:.0f} MB on top of {base}"


def test_the_image_is_labelled_exposes_the_settings_port_and_bakes_in_no_port_or_broker(image: str) -> None:
    labels = inspect(image, "{{json .Labels}}")
    exposed = inspect(image, "{{json .Config.ExposedPorts}}")
    env = inspect(image, "{{json .Config.Env}}")

    for label in ("title", "description", "version", "base.name"):
        assert f'"org.opencontainers.image.{label}"' in labels
    assert f'"{SETTINGS["port"]}/tcp"' in exposed
    # settings.toml holds the one default port; the broker URL is a run-time secret.
    assert '"PORT=' not in env
    assert "CLOUDAMQP_URL" not in env


# -- The whole box --------------------------------------------------------------


def test_a_posted_countdown_runs_to_completion_in_the_container(
    containers: Containers, broker: Broker, broker_queue: str
) -> None:
    box = ready(containers.run(broker_queue, broker=broker.url))

    task_id = post_countdown(box, 2)

    box.logs.wait_for(rf"task {task_id} started seconds=2 attempt=1 redelivered=no")
    box.logs.wait_for(rf"task {task_id} done seconds=2")


def test_every_process_in_the_container_runs_as_the_non_root_user(containers: Containers, queue_name: str) -> None:
    box = ready(containers.run(queue_name))

    processes = box.processes()

    assert {(user, huser) for user, huser, _ in processes} == {("onebox", "10001")}, processes
    for program in ("tini", "supervise.py", "tasks.py web", "tasks.py worker"):
        assert program in box.commands()


def test_the_box_runs_tasks_on_a_read_only_root_filesystem(containers: Containers, queue_name: str) -> None:
    box = ready(containers.run(queue_name, read_only=True))

    task_id = post_countdown(box, 1)

    box.logs.wait_for(rf"task {task_id} done seconds=1")
    write = subprocess.run(["podman", "exec", box.name, "touch", "/app/probe"], capture_output=True, check=False)
    assert write.returncode != 0, "the root filesystem is writable"


@pytest.mark.parametrize(
    "stop",
    [
        pytest.param(["stop", f"--time={STOP_BUDGET}"], id="podman-stop-SIGTERM"),
        pytest.param(["kill", "--signal=SIGINT"], id="SIGINT"),
    ],
)
def test_a_stop_mid_countdown_exits_0_within_the_budget_and_the_task_runs_again(
    containers: Containers, queue_name: str, stop: list[str]
) -> None:
    box = ready(containers.run(queue_name, read_only=True))
    task_id = post_countdown(box, INTERRUPTED_SECONDS)
    box.logs.wait_for(rf"task {task_id} started")

    stopping = time.monotonic()
    podman(*stop, box.name, timeout=STOP_BUDGET + 10)
    code = box.exit_code(timeout=STOP_BUDGET + 10)
    took = time.monotonic() - stopping

    # `podman stop --time` kills at the budget, as the platforms do: that is 137.
    assert code == 0, box.logs.tail
    assert took < STOP_BUDGET
    assert f"task {task_id} done" not in box.logs.output
    successor = containers.run(queue_name, read_only=True)
    successor.logs.wait_for(rf"task {task_id} started seconds={INTERRUPTED_SECONDS} attempt=1 redelivered=yes", 30)
    successor.logs.wait_for(rf"task {task_id} done seconds={INTERRUPTED_SECONDS}", INTERRUPTED_SECONDS + 10)


def test_with_the_broker_unreachable_health_checks_pass_and_readiness_and_posts_answer_503(
    containers: Containers, queue_name: str
) -> None:
    nothing_listens = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    box = containers.run(queue_name, read_only=True, broker=nothing_listens)

    for path in {FLY["http_service"]["checks"][0]["path"], RENDER["healthCheckPath"]}:
        wait_http(box.url(path), timeout=30)
    wait_http(box.url("/readyz"), status=503)
    response = httpx.post(box.url("/tasks"), json={"seconds": 1}, timeout=10)
    assert response.status_code == 503
    assert "cannot reach the broker" in response.json()["detail"]


def test_a_program_that_keeps_crashing_ends_the_container_with_a_failure(
    containers: Containers, queue_name: str
) -> None:
    # The settings refuse port 0: `python tasks.py web` exits 1 at every start.
    box = containers.run(queue_name, read_only=True, PORT=0)

    code = box.exit_code(timeout=90)

    assert code != 0
    box.logs.wait_for(r"gave up: \w+ entered FATAL state")


# -- One role per container ------------------------------------------------------


def test_web_only_and_worker_only_containers_split_the_work(containers: Containers, queue_name: str) -> None:
    web = containers.run(queue_name, "python", "tasks.py", "web", read_only=True)
    worker = containers.run(queue_name, "python", "tasks.py", "worker", read_only=True)
    wait_http(web.url("/readyz"), timeout=30)

    task_id = post_countdown(web, 1)

    worker.logs.wait_for(rf"task {task_id} done seconds=1")
    assert "tasks.py web" in web.commands() and "tasks.py worker" not in web.commands()
    assert "tasks.py worker" in worker.commands() and "tasks.py web" not in worker.commands()
    assert "supervise.py" not in web.commands() + worker.commands()


@pytest.mark.parametrize("role", ["web", "worker"])
def test_a_single_role_container_stops_with_0_on_sigterm(containers: Containers, queue_name: str, role: str) -> None:
    box = containers.run(queue_name, "python", "tasks.py", role, read_only=True)
    box.logs.wait_for(r"Started worker-1|Worker process is ready for action", timeout=30)

    podman("stop", f"--time={STOP_BUDGET}", box.name, timeout=STOP_BUDGET + 10)

    assert box.exit_code(timeout=10) == 0, box.logs.tail


# -- The platforms -------------------------------------------------------------------


def test_fly_and_render_agree_with_the_container_on_port_health_signal_and_stop_budget() -> None:
    supervisor = configparser.ConfigParser(interpolation=None)
    supervisor.read(ROOT / "supervisord.conf")
    hard_stop = max(int(supervisor[f"program:{name}"]["stopwaitsecs"]) for name in ("web", "worker"))
    exposed = re.findall(r"^EXPOSE (\d+)$", CONTAINERFILE, re.MULTILINE)
    service = FLY["http_service"]

    assert exposed == [str(SETTINGS["port"])]
    assert service["internal_port"] == SETTINGS["port"]
    assert FLY["build"]["dockerfile"] == "Containerfile" == Path(RENDER["dockerfilePath"]).name
    assert RENDER["runtime"] == "docker"
    assert [check["path"] for check in service["checks"]] == [RENDER["healthCheckPath"]] == ["/healthz"]
    # supervisord stops everything on either; the stop tests send both.
    assert FLY["kill_signal"] in {"SIGTERM", "SIGINT"}
    # Each platform must wait out supervisord's hard stop, within its own limit.
    assert hard_stop < FLY["kill_timeout"] <= 300
    assert hard_stop < RENDER["maxShutdownDelaySeconds"] <= 300


def test_no_platform_stops_an_idle_box_by_default() -> None:
    service = FLY["http_service"]

    assert service["auto_stop_machines"] == "off"
    assert service["min_machines_running"] >= 1
    assert RENDER["plan"] != "free"


def test_the_broker_url_is_a_secret_not_part_of_any_config() -> None:
    render_env = {variable["key"]: variable for variable in RENDER["envVars"]}

    assert render_env["CLOUDAMQP_URL"] == {"key": "CLOUDAMQP_URL", "sync": False}
    assert "CLOUDAMQP_URL" not in FLY.get("env", {})


def test_public_deploys_put_the_tasks_routes_behind_a_token() -> None:
    render_env = {variable["key"]: variable for variable in RENDER["envVars"]}
    deploy_steps = (ROOT / "docs" / "deploy.md").read_text()

    assert render_env["API_TOKEN"] == {"key": "API_TOKEN", "generateValue": True}
    assert 'fly secrets set API_TOKEN="$TOKEN"' in deploy_steps
    assert "API_TOKEN" not in FLY.get("env", {})  # a secret, never in the file
    assert SETTINGS["api_token"] == ""  # the local quick start stays open


def test_fly_sends_a_machine_no_more_connections_than_it_holds_streams_for() -> None:
    concurrency = FLY["http_service"]["concurrency"]

    assert concurrency["type"] == "connections"
    assert SETTINGS["max_event_streams"] < concurrency["hard_limit"] <= SETTINGS["max_event_streams"] + 100
    assert concurrency["soft_limit"] < concurrency["hard_limit"]
