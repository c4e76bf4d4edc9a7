"""Task status that survives deploys, restarts and reconnects, kept by RabbitMQ
alone; and live streams that hold under hostile load.

Real processes, real brokers: every web process rebuilds its board from the
task events stream, and follows it on after a reconnect.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
from conftest import Broker, Process, TcpProxy, delete_queues, free_port, stack_env, start_stack, wait_http

TOKEN = "a-token-of-16-chars-or-more"


def started(stacks: list[Process], queue: str, **settings: str | int) -> tuple[Process, str]:
    port = free_port()
    stack = start_stack(PORT=port, QUEUE_NAME=queue, **settings)
    stacks.append(stack)
    wait_http(f"http://127.0.0.1:{port}/readyz", timeout=40)
    return stack, f"http://127.0.0.1:{port}"


def status_of(base: str, task_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{base}/tasks/{task_id}", timeout=5).json())


def wait_for_status(base: str, task_id: str, status: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (view := status_of(base, task_id)).get("status") != status:
        assert time.monotonic() < deadline, f"{task_id} is {view}, not {status}, after {timeout} s"
        time.sleep(0.1)
    return view


def granian(stack: Process) -> psutil.Process:
    for child in psutil.Process(stack.popen.pid).children():
        if "granian" in " ".join(child.cmdline()):
            return child
    raise AssertionError("supervisord runs no granian")


# -- Restarts and reconnects -------------------------------------------------------------


def test_a_web_process_killed_mid_countdown_knows_the_task_when_it_is_back(
    stacks: list[Process], broker: Broker, broker_queue: str
) -> None:
    stack, base = started(stacks, broker_queue, CLOUDAMQP_URL=broker.url)
    task_id = httpx.post(f"{base}/tasks", json={"seconds": 20}).json()["id"]
    stack.wait_for(rf"task {task_id} remaining=18")
    web = granian(stack)

    web.send_signal(signal.SIGKILL)
    web.wait(10)
    mark = len(stack.lines)
    wait_http(f"{base}/readyz", timeout=40)

    view = status_of(base, task_id)
    ticks = [int(line.rsplit("=", 1)[1]) for line in stack.lines if f"task {task_id} remaining=" in line]
    assert view["status"] == "running", view
    assert view["remaining"] in (ticks[-1], ticks[-1] + 1), (view, ticks[-1])
    assert any("task board rebuilt" in line for line in stack.lines[mark:])
    wait_for_status(base, task_id, "succeeded", timeout=30)


def test_a_task_known_before_a_restart_can_be_cancelled_after_it(stacks: list[Process], queue_name: str) -> None:
    stack, base = started(stacks, queue_name)
    task_id = httpx.post(f"{base}/tasks", json={"seconds": 30}).json()["id"]
    stack.wait_for(rf"task {task_id} remaining=28")
    granian(stack).send_signal(signal.SIGKILL)
    time.sleep(0.5)
    wait_http(f"{base}/readyz", timeout=40)

    assert httpx.delete(f"{base}/tasks/{task_id}").status_code == 202

    stack.wait_for(rf"task {task_id} cancelled remaining=")
    wait_for_status(base, task_id, "cancelled")


def sse_statuses(url: str, seen: list[str], timeout: float = 60) -> None:
    with httpx.stream("GET", url, timeout=timeout) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:])["status"])


def test_a_web_process_cut_off_while_a_task_ends_reports_the_end_and_its_stream_closes(
    stacks: list[Process], broker: Broker, broker_queue: str, proxy: TcpProxy
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    web = Process(
        ["python", "tasks.py", "web"],
        stack_env(PORT=port, QUEUE_NAME=broker_queue, CLOUDAMQP_URL=proxy.url(), HEARTBEAT=2),
    )
    worker = Process(["python", "tasks.py", "worker"], stack_env(QUEUE_NAME=broker_queue, CLOUDAMQP_URL=broker.url))
    stacks.extend([web, worker])
    wait_http(f"{base}/readyz", timeout=40)
    worker.wait_for(r"cancellations read")
    task_id = httpx.post(f"{base}/tasks", json={"seconds": 3}).json()["id"]
    wait_for_status(base, task_id, "running")
    seen: list[str] = []
    watcher = threading.Thread(target=sse_statuses, args=(f"{base}/tasks/{task_id}/events", seen))
    watcher.start()

    proxy.cut()
    worker.wait_for(rf"task {task_id} done")
    time.sleep(1)
    assert status_of(base, task_id)["status"] == "running"  # it cannot know yet
    proxy.restore()

    watcher.join(20)
    assert not watcher.is_alive(), f"the stream did not close: {seen}"
    assert seen[-1] == "succeeded"
    assert status_of(base, task_id)["status"] == "succeeded"


def test_a_task_that_ended_while_no_web_process_ran_is_reported_when_one_starts(
    stacks: list[Process], broker: Broker, broker_queue: str
) -> None:
    first, base = started(stacks, broker_queue, CLOUDAMQP_URL=broker.url, STOP_GRACE=1)
    task_id = httpx.post(f"{base}/tasks", json={"seconds": 6}).json()["id"]
    first.wait_for(rf"task {task_id} started")
    first.send_signal(signal.SIGTERM)
    assert first.wait(40) == 0  # the countdown is handed back, unfinished

    second = Process(["python", "tasks.py", "worker"], stack_env(QUEUE_NAME=broker_queue, CLOUDAMQP_URL=broker.url))
    stacks.append(second)
    second.wait_for(rf"task {task_id} done", timeout=30)
    second.stop()
    _, base = started(stacks, broker_queue, CLOUDAMQP_URL=broker.url)

    view = status_of(base, task_id)
    assert view["status"] == "succeeded"
    assert view["attempts"] == 1
    assert httpx.get(f"{base}/tasks").json()["items"][0]["id"] == task_id


def test_a_task_outside_the_memory_window_is_a_404_that_says_so(stacks: list[Process], queue_name: str) -> None:
    stack, base = started(stacks, queue_name, TASK_MEMORY_SECONDS=2)
    task_id = httpx.post(f"{base}/tasks", json={"seconds": 1}).json()["id"]
    stack.wait_for(rf"task {task_id} done")
    time.sleep(3)
    granian(stack).send_signal(signal.SIGKILL)
    time.sleep(0.5)
    wait_http(f"{base}/readyz", timeout=40)

    response = httpx.get(f"{base}/tasks/{task_id}")

    assert response.status_code == 404
    assert "remembered for 2 s" in response.json()["detail"]


# -- Live streams under hostile load -------------------------------------------------------


class RawClient:
    """Requests on real sockets, each from the address it claims (X-Forwarded-For)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sockets: list[socket.socket] = []

    def open_stream(self, task_id: str, address: str) -> int:
        """Ask for the task's event stream; the status code, the socket left open."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.sockets.append(sock)
        sock.sendall(
            f"GET /tasks/{task_id}/events HTTP/1.1\r\nHost: onebox\r\nX-Forwarded-For: {address}\r\n\r\n".encode()
        )
        return int(sock.recv(64).split(b" ", 2)[1])

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


@pytest.fixture
def hostile(stacks: list[Process], queue_name: str) -> Iterator[tuple[str, str, RawClient]]:
    """A stack sized small for streams, and a long countdown to watch."""
    _, base = started(
        stacks,
        queue_name,
        CLIENT_IP_HEADER="X-Forwarded-For",
        MAX_EVENT_STREAMS=40,
        MAX_EVENT_STREAMS_PER_CLIENT=4,
    )
    task_id = httpx.post(f"{base}/tasks", json={"seconds": 120}).json()["id"]
    client = RawClient(int(base.rsplit(":", 1)[1]))
    yield base, task_id, client
    client.close()


def test_one_address_with_a_thousand_streams_gets_its_four_and_429s_while_the_service_answers(
    hostile: tuple[str, str, RawClient],
) -> None:
    base, task_id, client = hostile

    codes = [client.open_stream(task_id, "203.0.113.7") for _ in range(1000)]

    assert codes[:4] == [200] * 4
    assert set(codes[4:]) == {429}
    started = time.monotonic()
    assert httpx.get(f"{base}/healthz", timeout=2).status_code == 200
    assert httpx.post(f"{base}/tasks", json={"seconds": 1}, timeout=2).status_code == 202
    assert time.monotonic() - started < 1


def test_past_the_servers_streams_a_stream_is_a_503(hostile: tuple[str, str, RawClient]) -> None:
    base, task_id, client = hostile

    codes = [client.open_stream(task_id, f"198.51.100.{number}") for number in range(60)]

    assert codes.count(200) == 40
    assert set(codes[40:]) == {503}
    assert httpx.get(f"{base}/tasks/{task_id}", timeout=2).status_code == 200


def test_streams_are_given_back_when_their_clients_leave(hostile: tuple[str, str, RawClient]) -> None:
    _, task_id, client = hostile
    assert [client.open_stream(task_id, "192.0.2.1") for _ in range(5)][-1] == 429

    client.close()
    time.sleep(1)

    assert [client.open_stream(task_id, "192.0.2.1") for _ in range(4)] == [200] * 4


# -- Who may see and cancel ------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded() -> Iterator[tuple[str, str]]:
    """One stack with API_TOKEN set for the token's tests, and a countdown running on it."""
    queue = f"test-{uuid.uuid4().hex[:10]}"
    port = free_port()
    stack = start_stack(PORT=port, QUEUE_NAME=queue, API_TOKEN=TOKEN)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/readyz", timeout=40)
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        yield base, httpx.post(f"{base}/tasks", json={"seconds": 60}, headers=bearer).json()["id"]
    finally:
        stack.stop()
        delete_queues(queue)


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/tasks"), ("GET", "/tasks/{id}"), ("GET", "/tasks/{id}/events"), ("DELETE", "/tasks/{id}")],
)
def test_with_a_token_every_tasks_route_needs_it(guarded: tuple[str, str], method: str, path: str) -> None:
    base, task_id = guarded
    url = base + path.format(id=task_id)

    refused = httpx.request(method, url, timeout=5)
    with httpx.stream(method, url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5) as allowed:
        allowed_status = allowed.status_code

    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert allowed_status in (200, 202)


def test_with_a_token_starting_a_job_needs_it(guarded: tuple[str, str]) -> None:
    base, _ = guarded

    refused = httpx.post(f"{base}/jobs/tally", json={"title": "t", "words": ["a"]}, timeout=5)

    assert refused.status_code == 401


def test_with_a_token_the_page_docs_and_health_checks_stay_open(guarded: tuple[str, str]) -> None:
    base, _ = guarded

    assert [httpx.get(f"{base}{path}").status_code for path in ("/", "/healthz", "/readyz", "/docs")] == [200] * 4
