"""A client generated from the live schema calls every route and parses every answer it can meet.

As a user would: openapi-python-client (docs/api.md, "Generate a client")
reads /docs/openapi.json from a whole stack (supervisord, granian, the
worker, a real RabbitMQ behind a proxy the tests can cut) run behind
API_TOKEN with a rate limit, and each test drives one route through the
generated code, which raises on any status the schema does not document.
Each test comes from an address of its own (X-Forwarded-For), so that the
rate limit counts each test alone.
"""

from __future__ import annotations

import importlib
import itertools
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from conftest import Process, TcpProxy, delete_queues, free_port, start_stack, wait_http

import tasks

TOKEN = "a-token-for-the-generated-client"
RATE_LIMIT = 5
GENERATOR_CONFIG = "post_hooks: []\n"  # the generated code as generated, not reformatted
ADDRESSES = (f"198.51.100.{n}" for n in itertools.count(1))


@dataclass
class Generated:
    """The generated package, and what the generator said while making it."""

    package: ModuleType
    output: str

    def api(self, name: str) -> Any:
        return importlib.import_module(f"{self.package.__name__}.api.default.{name}")

    @property
    def models(self) -> Any:
        return importlib.import_module(f"{self.package.__name__}.models")


@dataclass
class Stack:
    base: str
    proxy: TcpProxy
    process: Process


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    queue = f"client-{uuid.uuid4().hex[:10]}"
    proxy = TcpProxy()
    port = free_port()
    process = start_stack(
        PORT=port,
        QUEUE_NAME=queue,
        STOP_GRACE=2,
        CLOUDAMQP_URL=proxy.url(),
        API_TOKEN=TOKEN,
        RATE_LIMIT_PER_MINUTE=RATE_LIMIT,
        CLIENT_IP_HEADER="X-Forwarded-For",
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/readyz", timeout=30)
        yield Stack(base, proxy, process)
    finally:
        process.stop()
        proxy.close()
        delete_queues(queue)


@pytest.fixture(scope="module")
def generated(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Generated:
    """The client, generated from the schema the stack serves."""
    workdir = tmp_path_factory.mktemp("generated")
    config = workdir / "config.yaml"
    config.write_text(GENERATOR_CONFIG)
    package = f"onebox_client_{uuid.uuid4().hex[:8]}"
    command = [
        str(Path(sys.executable).with_name("openapi-python-client")),
        "generate",
        f"--url={stack.base}/docs/openapi.json",
        "--meta=none",
        f"--output-path={workdir / package}",
        f"--config={config}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    sys.path.insert(0, str(workdir))
    return Generated(importlib.import_module(package), result.stdout + result.stderr)


@pytest.fixture
def client(generated: Generated, stack: Stack) -> Any:
    """The generated client with the token, from an address of this test's own."""
    return generated.package.AuthenticatedClient(
        base_url=stack.base,
        token=TOKEN,
        raise_on_unexpected_status=True,
        headers={"X-Forwarded-For": next(ADDRESSES)},
    )


def start_countdown(generated: Generated, client: Any, seconds: int = 1) -> Any:
    body = generated.models.TaskRequest(seconds=seconds)
    return generated.api("create_task").sync_detailed(client=client, body=body)


def wait_until(generated: Generated, client: Any, task_id: str, statuses: set[str], timeout: float = 30) -> Any:
    """The task, once its status is one of ``statuses``."""
    deadline = time.monotonic() + timeout
    while True:
        view = generated.api("get_task").sync(task_id, client=client)
        if view.status.value in statuses or time.monotonic() > deadline:
            return view
        time.sleep(0.1)


def events(stream: str) -> list[dict[str, str]]:
    """The events of a text/event-stream body, comments left out."""
    found = []
    for block in stream.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if fields:
            found.append(fields)
    return found


# -- The generator --------------------------------------------------------------------------


def test_the_generator_reads_the_schema_without_a_warning(generated: Generated) -> None:
    assert "warning" not in generated.output.lower(), generated.output


def test_the_client_has_a_call_for_every_route(generated: Generated, stack: Stack) -> None:
    schema = httpx.get(f"{stack.base}/docs/openapi.json").json()
    operation_ids = [op["operationId"] for item in schema["paths"].values() for op in item.values()]

    assert all(callable(generated.api(name).sync_detailed) for name in operation_ids)
    assert {f"start_{name}" for name in tasks.jobs} <= set(operation_ids)


# -- What it is for ----------------------------------------------------------------------------


def test_the_client_starts_a_countdown(generated: Generated, client: Any) -> None:
    response = start_countdown(generated, client)

    assert response.status_code == 202
    assert isinstance(response.parsed, generated.models.TaskAccepted)
    assert response.headers["location"] == f"/tasks/{response.parsed.id}"


# Arguments each job accepts: every job of tasks.py must have one here.
JOB_ARGUMENTS: dict[str, Callable[[Any], Any]] = {
    "countdown": lambda models: models.CountdownArguments(seconds=1),
    "tally": lambda models: models.TallyArguments(title="fruit", words=["apple"]),
}


def test_every_job_has_arguments_to_start_it_with() -> None:
    assert set(JOB_ARGUMENTS) == set(tasks.jobs)


@pytest.mark.parametrize("name", sorted(JOB_ARGUMENTS))
def test_the_client_starts_each_job_with_its_typed_arguments(generated: Generated, client: Any, name: str) -> None:
    body = JOB_ARGUMENTS[name](generated.models)

    response = generated.api(f"start_{name}").sync_detailed(client=client, body=body)

    assert response.status_code == 202
    assert isinstance(response.parsed, generated.models.JobAccepted)
    assert response.parsed.actor == name


def test_the_client_follows_a_job_to_its_result(generated: Generated, client: Any) -> None:
    body = generated.models.TallyArguments(title="fruit", words=["apple"])
    accepted = generated.api("start_tally").sync(client=client, body=body)

    view = wait_until(generated, client, accepted.id, {"succeeded", "failed"})

    assert isinstance(view, generated.models.TaskView)
    assert (view.status.value, view.done, view.total) == ("succeeded", 1, 1)
    assert view.result == {"title": "fruit", "counts": {"apple": 1}}


def test_the_client_lists_tasks(generated: Generated, client: Any) -> None:
    accepted = start_countdown(generated, client).parsed

    page = generated.api("list_tasks").sync(client=client, limit=100)

    assert isinstance(page, generated.models.TaskPage)
    assert accepted.id in [item.id for item in page.items]


def test_the_client_reads_a_task_stream_as_task_changes(generated: Generated, client: Any) -> None:
    task_id = start_countdown(generated, client).parsed.id

    response = generated.api("task_events").sync_detailed(task_id, client=client)

    assert response.status_code == 200
    changes = [generated.models.TaskChange.from_dict(event) for event in events(response.parsed)]
    views = [generated.models.TaskView.from_dict(json.loads(change.data)) for change in changes]
    assert [change.event.value for change in changes] == [view.status.value for view in views]
    assert views[-1].status.value == "succeeded"


def test_the_client_cancels_a_task(generated: Generated, client: Any) -> None:
    task_id = start_countdown(generated, client, seconds=30).parsed.id

    response = generated.api("cancel_task").sync_detailed(task_id, client=client)

    assert response.status_code == 202
    assert response.parsed.status.value in {"cancelling", "cancelled"}


def test_the_client_checks_health(generated: Generated, client: Any) -> None:
    assert generated.api("healthz").sync(client=client).status.value == "ok"
    assert generated.api("readyz").sync(client=client).status.value == "ready"


# -- Problems, parsed -----------------------------------------------------------------------------


def test_the_client_parses_a_400_for_arguments_out_of_range(generated: Generated, client: Any) -> None:
    body = generated.models.CountdownArguments(seconds=0)

    response = generated.api("start_countdown").sync_detailed(client=client, body=body)

    assert response.status_code == 400
    assert response.parsed.detail == "Expected `int` >= 1 - at `$.seconds`"


def test_the_client_parses_a_400_for_a_bad_page(generated: Generated, client: Any) -> None:
    response = generated.api("list_tasks").sync_detailed(client=client, limit=0)

    assert response.status_code == 400
    assert isinstance(response.parsed, generated.models.Problem)
    assert response.parsed.errors[0]["key"] == "limit"


def test_the_client_parses_a_401_without_the_token(generated: Generated, stack: Stack) -> None:
    stranger = generated.package.AuthenticatedClient(
        base_url=stack.base, token="wrong", raise_on_unexpected_status=True
    )

    response = generated.api("get_task").sync_detailed("anything", client=stranger)

    assert response.status_code == 401
    assert response.parsed.detail == "a valid bearer token is required"


def test_the_client_parses_a_404_for_an_unknown_task(generated: Generated, client: Any) -> None:
    response = generated.api("get_task").sync_detailed("no-such-task", client=client)

    assert response.status_code == 404
    assert isinstance(response.parsed, generated.models.Problem)


def test_the_client_parses_a_409_for_a_finished_task(generated: Generated, client: Any) -> None:
    task_id = start_countdown(generated, client).parsed.id
    wait_until(generated, client, task_id, {"succeeded"})

    response = generated.api("cancel_task").sync_detailed(task_id, client=client)

    assert response.status_code == 409
    assert response.parsed.detail == f"task {task_id} has succeeded; it cannot be cancelled"


def test_the_client_parses_a_429_over_the_rate_limit(generated: Generated, client: Any) -> None:
    answers = [start_countdown(generated, client).status_code for _ in range(RATE_LIMIT)]

    response = start_countdown(generated, client)

    assert answers == [202] * RATE_LIMIT
    assert response.status_code == 429
    assert response.parsed.title == "Too Many Requests"
    assert int(response.headers["retry-after"]) > 0


def test_the_client_parses_a_429_when_its_streams_are_all_open(generated: Generated, client: Any, stack: Stack) -> None:
    task_id = start_countdown(generated, client, seconds=30).parsed.id
    url = f"{stack.base}/tasks/{task_id}/events"
    with ExitStack() as streams:
        for _ in range(tasks.settings.max_event_streams_per_client):
            streams.enter_context(httpx.stream("GET", url, headers=client.get_httpx_client().headers, timeout=10))

        response = generated.api("task_events").sync_detailed(task_id, client=client)

    generated.api("cancel_task").sync(task_id, client=client)
    assert response.status_code == 429
    assert response.parsed.detail.startswith(f"this client has {tasks.settings.max_event_streams_per_client} event")


@pytest.fixture
def broker_away(stack: Stack) -> Iterator[None]:
    """The broker out of reach until the test ends; then the stack is ready again."""
    stack.proxy.cut()
    try:
        deadline = time.monotonic() + 30
        # First "the broker connection was lost", then, its reconnects refused, "cannot reach the broker".
        while not httpx.get(f"{stack.base}/readyz").json().get("detail", "").startswith("cannot reach"):
            assert time.monotonic() < deadline, "the stack did not notice that the broker is away"
            time.sleep(0.1)
        yield
    finally:
        stack.proxy.restore()
        wait_http(f"{stack.base}/readyz", timeout=30)


@pytest.mark.usefixtures("broker_away")
def test_the_client_parses_a_503_while_the_broker_is_away(generated: Generated, client: Any) -> None:
    response = start_countdown(generated, client)

    assert response.status_code == 503
    assert response.parsed.detail.startswith("cannot reach the broker at ")
    assert response.headers["retry-after"] == "1"


@pytest.mark.usefixtures("broker_away")
def test_the_client_parses_readyz_503_while_the_broker_is_away(generated: Generated, client: Any) -> None:
    response = generated.api("readyz").sync_detailed(client=client)

    assert response.status_code == 503
    assert response.parsed.detail.startswith("cannot reach the broker at ")
