"""LOG_FORMAT=json: a whole-stack run as a log drain reads it, one JSON object per line."""

from __future__ import annotations

import json
import re
import signal
import uuid
from collections.abc import Iterator

import httpx
import pytest
from conftest import BROKER_PORT, Process, free_port, machine_ctl, start_stack, wait_http

# supervisord's own lines have a fixed format of its own (no setting changes it).
SUPERVISORD_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (CRIT|ERRO|WARN|INFO|DEBG) ")
MILLISECONDS_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")


@pytest.fixture
def broker_user() -> Iterator[tuple[str, str]]:
    """A RabbitMQ user of this test's own, with a password to look for."""
    user, password = f"test-{uuid.uuid4().hex[:8]}", f"Pw-{uuid.uuid4().hex}"
    machine_ctl("-q", "add_user", user, password)
    machine_ctl("-q", "set_permissions", "-p", "/", user, ".*", ".*", ".*")
    yield user, password
    machine_ctl("-q", "delete_user", user)


def test_every_line_of_a_json_run_is_one_json_object_with_task_fields_and_no_secret(
    stacks: list[Process], queue_name: str, broker_user: tuple[str, str]
) -> None:
    user, password = broker_user
    token = f"token-{uuid.uuid4().hex}"
    port = free_port()
    stack = start_stack(
        PORT=port,
        QUEUE_NAME=queue_name,
        LOG_FORMAT="json",
        API_TOKEN=token,
        CLOUDAMQP_URL=f"amqp://{user}:{password}@127.0.0.1:{BROKER_PORT}/",
    )
    stacks.append(stack)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/readyz")
    auth = {"Authorization": f"Bearer {token}"}
    done = httpx.post(f"{base}/tasks", json={"seconds": 2}, headers=auth).json()["id"]
    cancelled = httpx.post(f"{base}/tasks", json={"seconds": 30}, headers=auth).json()["id"]
    stack.wait_for(rf'"message":"task {cancelled} remaining=28"')
    assert httpx.delete(f"{base}/tasks/{cancelled}", headers=auth).status_code == 202
    assert httpx.post(f"{base}/tasks", json={"seconds": 1}).status_code == 401
    stack.wait_for(rf'"message":"task {done} done seconds=2"')
    stack.wait_for(rf'"message":"task {cancelled} cancelled remaining=\d+"')
    stack.send_signal(signal.SIGTERM)
    assert stack.wait(timeout=40) == 0

    records = [json.loads(line) for line in stack.lines if not SUPERVISORD_LINE.match(line)]

    assert all(isinstance(record, dict) for record in records)
    assert all(MILLISECONDS_UTC.match(record["time"]) for record in records)
    assert {record["process"] for record in records} == {"web", "worker"}
    assert all({"level", "pid", "logger", "message"} <= record.keys() for record in records)
    loggers = {record["logger"] for record in records}
    # granian, Litestar's app and the actor, Dramatiq's worker.
    assert {"_granian", "onebox", "dramatiq.worker.Worker"} <= loggers
    task_lines = [record for record in records if record["message"].startswith("task ")]
    ticks = [record for record in task_lines if record["message"].startswith(f"task {done} ")]
    assert [record["remaining"] for record in ticks] == [2, 1, 0, 0]
    assert all(record["task_id"] == done and record["attempt"] == 1 for record in ticks)
    stopped = [record for record in task_lines if " cancelled remaining=" in record["message"]]
    assert stopped[0]["task_id"] == cancelled
    assert stopped[0]["remaining"] == int(stopped[0]["message"].rsplit("=", 1)[1])
    assert password not in stack.output
    assert token not in stack.output
