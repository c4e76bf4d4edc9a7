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
from typing import Any, cast

import httpx
import msgspec
import pika
import psutil
import pytest
from conftest import (
    MACHINE_BROKER,
    Broker,
    Process,
    TcpProxy,
    delete_queues,
    free_port,
    program_process,
    stack_env,
    start_stack,
    wait_http,
)

import tasks

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
    return program_process(stack, "web")


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
    assert view["attempts"] == 2  # handed back unfinished, then run again from the start
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


# -- Board snapshots ------------------------------------------------------------------------
#
# A start reads the newest snapshot and the events written since its cut.
# History is written straight to the events stream, as web processes and
# workers write it: 13 events to a message, as under load.


def write_history(url: str, queue: str, finished: int, waiting: int) -> list[str]:
    """``finished`` countdowns' events and ``waiting`` queued tasks' to the events stream; the waiting ids."""
    now, events = time.time(), []
    for number in range(finished):
        task_id, at = str(uuid.uuid4()), now - 600 + number * 0.01
        events += [tasks.TaskEvent(task_id, "queued", at, "countdown", total=10)]
        events += [tasks.TaskEvent(task_id, "started", at, "countdown", total=10)]
        events += [
            tasks.TaskEvent(task_id, "progress", at + tick, "countdown", done=tick, total=10) for tick in range(9)
        ]
        events += [tasks.TaskEvent(task_id, "succeeded", at + 10, "countdown", done=10, total=10)]
    waiting_ids = [str(uuid.uuid4()) for _ in range(waiting)]
    events += [tasks.TaskEvent(task_id, "queued", now, "countdown", total=10) for task_id in waiting_ids]
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.queue_declare(f"{queue}.events", durable=True, arguments=tasks.EVENTS_ARGUMENTS)
        channel.confirm_delivery()
        for start in range(0, len(events), 13):
            channel.basic_publish("", f"{queue}.events", msgspec.json.encode(events[start : start + 13]))
    finally:
        connection.close()
    return waiting_ids


def web_process(url: str, queue: str, **settings: str | int) -> tuple[Process, str]:
    port = free_port()
    web = Process(["python", "tasks.py", "web"], stack_env(PORT=port, QUEUE_NAME=queue, CLOUDAMQP_URL=url, **settings))
    return web, f"http://127.0.0.1:{port}"


def snapshot_written(url: str, queue: str, stacks: list[Process]) -> int:
    """A web process that starts on the queue's events and writes its snapshot, then stops; the parts it wrote."""
    web, _ = web_process(url, queue)
    stacks.append(web)
    written = web.wait_for(r"board snapshot written: \d+ tasks, [\d,]+ bytes in (\d+) messages", timeout=60)
    web.stop()
    return int(written[1])


class CountingSocket:
    """The broker's side of a proxied connection, counting the messages it delivers (basic.deliver frames)."""

    def __init__(self, sock: socket.socket, proxy: DeliveryCounter) -> None:
        self.sock, self.proxy, self.frames = sock, proxy, bytearray()

    def recv(self, size: int) -> bytes:
        data = self.sock.recv(size)
        self.frames += data
        # A frame: type (1 byte), channel (2), size (4), payload, end (1); basic.deliver is method 60 of class 60.
        while len(self.frames) >= 7 and len(self.frames) >= (end := 8 + int.from_bytes(self.frames[3:7], "big")):
            if self.frames[0] == 1 and self.frames[7:11] == b"\x00\x3c\x00\x3c":
                self.proxy.delivered += 1
            del self.frames[:end]
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class DeliveryCounter(TcpProxy):
    """A proxy to the broker that counts the messages it delivers to its clients."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.delivered = 0

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            from_broker = source.getpeername()[1] == self.target[1]
        except OSError:  # closed before this thread began
            return
        super()._pump(cast(socket.socket, CountingSocket(source, self)) if from_broker else source, sink)


def test_a_web_start_reads_the_snapshot_and_the_events_since_its_cut_and_knows_every_waiting_task(
    stacks: list[Process], broker: Broker, broker_queue: str
) -> None:
    waiting = write_history(broker.url, broker_queue, finished=2000, waiting=1000)
    parts = snapshot_written(broker.url, broker_queue, stacks)
    counter = DeliveryCounter(broker.port)
    try:
        web, base = web_process(counter.url(), broker_queue)
        stacks.append(web)
        rebuilt = web.wait_for(r"task board rebuilt: (\d+) tasks", timeout=30)
        delivered = counter.delivered
        wait_http(f"{base}/readyz")
        listed = every_task(base)
    finally:
        counter.close()

    # The snapshot's parts; markers in the snapshots stream: the first start's
    # two (it found none, looking back 10 minutes, then in all) and its own; in
    # the events stream, the cut and its own marker.
    assert delivered <= parts + 2 + 1 + 2, f"{delivered} messages delivered, {parts} parts:\n{web.output}"
    assert int(rebuilt[1]) == len(listed) == 3000
    assert set(waiting) <= {task["id"] for task in listed if task["status"] == "queued"}


def every_task(base: str) -> list[dict[str, Any]]:
    """GET /tasks, page after page."""
    found: list[dict[str, Any]] = []
    with httpx.Client(base_url=base, timeout=5) as client:
        while page := client.get("/tasks", params={"limit": 100, "offset": len(found)}).json()["items"]:
            found += page
    return found


@pytest.mark.parametrize("messages", [1, 20], ids=["cut-offset-past-the-end", "another-message-at-the-cut-offset"])
def test_a_start_whose_snapshot_cut_is_gone_reads_the_events_since_its_time(
    stacks: list[Process], queue_name: str, messages: int
) -> None:
    # RabbitMQ 3.10 and 4.0.5 alike wait for an offset past a stream's end; LavinMQ starts at the end.
    url = MACHINE_BROKER.url
    [before] = write_history(url, queue_name, finished=1, waiting=1)
    snapshot_written(url, queue_name, stacks)
    connection = pika.BlockingConnection(pika.URLParameters(url))
    connection.channel().queue_delete(f"{queue_name}.events")
    connection.close()
    after = write_history(url, queue_name, finished=0, waiting=messages * 13)

    web, base = web_process(url, queue_name)
    stacks.append(web)
    web.wait_for(r"the board snapshot's cut is not in the events stream", timeout=30)
    web.wait_for(r"task board rebuilt: \d+ tasks", timeout=30)
    wait_http(f"{base}/readyz")

    assert {before, *after} <= {task["id"] for task in every_task(base) if task["status"] == "queued"}


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
