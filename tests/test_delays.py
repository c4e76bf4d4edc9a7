"""Tasks that start later: the delay levels on real brokers, the API's start
parameters, and what the status says while a task waits.

The levels (tasks.py, "Delays") are plain AMQP: topic exchanges, exchange-to-
exchange bindings, one TTL per queue and dead-lettering, the features
RabbitMQ and LavinMQ share. These tests run them on RabbitMQ 3.10 and 4.0.5.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import dramatiq
import httpx
import msgspec
import pika
import pika.exceptions
import pytest
from conftest import (
    BROKER_PORT,
    MATRIX,
    RABBIT_URL,
    Broker,
    Clock,
    Process,
    container_engine,
    delete_queues,
    free_port,
    program_process,
    rabbit_connection,
    require_tool,
    stack_env,
    start_stack,
    wait_http,
)
from dramatiq.broker import MessageProxy
from dramatiq.common import dq_name
from dramatiq.middleware import Retries
from litestar.testing import TestClient
from rabbit_node import RabbitContainer, RabbitNode
from test_api import caught_up, offline_app
from test_jobs import published
from test_stack import amqp_connections_by_program
from test_status import CancellingPublisher

import main
import tasks

# -- The levels, on each broker -----------------------------------------------------


@pytest.fixture(params=["classic", "quorum"])
def levels(request: pytest.FixtureRequest, broker: Broker) -> Iterator[tasks.Settings]:
    """The whole table declared on ``broker`` for a queue of this test's own, of each queue type."""
    settings = msgspec.structs.replace(
        tasks.settings, queue_name=f"test-{uuid.uuid4().hex[:10]}", queue_type=request.param
    )
    connection = rabbit_connection(broker.url)
    try:
        tasks.declare(connection.channel(), settings)
    finally:
        connection.close()
    yield settings
    delete_queues(settings.queue_name, broker.url)


def publish_delayed(url: str, settings: tasks.Settings, delays_ms: list[int]) -> dict[str, float]:
    """Publish one message per delay through the levels, confirmed; when each is due (epoch seconds)."""
    connection = rabbit_connection(url)
    due = {}
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for delay_ms in delays_ms:
            route = tasks.delayed(settings, delay_ms)
            body = f"{delay_ms}-{uuid.uuid4().hex}"
            due[body] = time.time() + delay_ms / 1000
            properties = pika.BasicProperties(delivery_mode=2)
            channel.basic_publish(route.exchange, route.routing_key, body.encode(), properties, mandatory=True)
    finally:
        connection.close()
    return due


def arrivals(url: str, queue: str, count: int, timeout: float) -> dict[str, float]:
    """When each of ``count`` messages reached ``queue`` (epoch seconds, as it is read)."""
    connection = rabbit_connection(url)
    seen: dict[str, float] = {}
    try:
        channel = connection.channel()
        deadline = time.monotonic() + timeout
        for method, _, body in channel.consume(queue, inactivity_timeout=0.05):
            if method is not None:
                seen[body.decode()] = time.time()
                channel.basic_ack(method.delivery_tag)
            if len(seen) == count or time.monotonic() > deadline:
                break
    finally:
        connection.close()
    return seen


def test_each_delay_arrives_in_the_task_queue_once_never_early_and_within_a_unit_of_its_due_time(
    broker: Broker, levels: tasks.Settings
) -> None:
    # Every combination of the three lowest bits, and a unit boundary either side.
    delays_ms = [500, 1000, 1500, 2000, 2500, 3000, 3500, 499, 501]

    due = publish_delayed(broker.url, levels, delays_ms)
    seen = arrivals(broker.url, levels.queue_name, len(delays_ms), timeout=10)

    assert sorted(seen) == sorted(due)
    lateness = {body: seen[body] - due[body] for body in due}
    assert min(lateness.values()) >= 0, lateness
    # A unit of rounding, and room for a busy machine.
    assert max(lateness.values()) < tasks.DELAY_UNIT_MS / 1000 + 1, lateness


def test_a_long_delay_waits_in_the_level_of_its_highest_bit_and_nowhere_else(
    broker: Broker, levels: tasks.Settings
) -> None:
    highest = tasks.DELAY_LEVELS - 1
    longest = tasks.LONGEST_DELAY_MS

    publish_delayed(broker.url, levels, [longest])

    connection = rabbit_connection(broker.url)
    try:
        counts = [
            connection.channel().queue_declare(tasks.delay_level(levels, level), passive=True).method.message_count
            for level in range(tasks.DELAY_LEVELS)
        ]
    finally:
        connection.close()
    assert counts == [0] * highest + [1]


def test_a_delay_past_the_longest_or_below_one_millisecond_has_no_route() -> None:
    for delay_ms in (0, tasks.LONGEST_DELAY_MS + 1):
        with pytest.raises(ValueError, match="a delay must be from 1 ms"):
            tasks.delayed(tasks.settings, delay_ms)


def test_delays_are_rounded_up_to_whole_units() -> None:
    def units(delay_ms: int) -> int:
        return int(tasks.delayed(tasks.settings, delay_ms).routing_key.replace(".", ""), 2)

    assert [units(delay_ms) for delay_ms in (1, 500, 501, 1000, 7 * 86400 * 1000)] == [1, 1, 2, 2, 1_209_600]


# -- Starting later: the API, in-process ------------------------------------------------


@pytest.fixture
def publisher() -> CancellingPublisher:
    return CancellingPublisher()


@pytest.fixture
def feed(publisher: CancellingPublisher) -> main.EventsFeed:
    return caught_up(publisher)


@pytest.fixture
def client(publisher: CancellingPublisher, feed: main.EventsFeed) -> Iterator[TestClient[Any]]:
    with TestClient(offline_app(publisher, feed)) as client:
        yield client


def in_seconds(seconds: float, offset_hours: int = 0) -> str:
    """An RFC 3339 instant ``seconds`` from now, written with a UTC offset of ``offset_hours``."""
    zone = timezone(timedelta(hours=offset_hours))
    return datetime.fromtimestamp(time.time() + seconds, zone).isoformat()


def test_a_delay_schedules_the_task_to_start_that_many_seconds_later(
    client: TestClient[Any], publisher: CancellingPublisher
) -> None:
    before = time.time()
    response = client.post("/tasks", params={"delay": 90}, json={"seconds": 3})

    assert response.status_code == 202
    accepted = response.json()
    assert accepted["status"] == "scheduled"
    [due] = publisher.dues
    assert due is not None and before + 90 <= due <= time.time() + 90
    assert datetime.fromisoformat(accepted["due_at"]).timestamp() == pytest.approx(due, abs=0.001)
    view = client.get(response.headers["location"]).json()
    assert (view["status"], view["due_at"]) == ("scheduled", accepted["due_at"])


def test_an_instant_with_its_offset_schedules_the_task_for_that_instant(
    client: TestClient[Any], publisher: CancellingPublisher
) -> None:
    at = in_seconds(3600, offset_hours=2)

    response = client.post("/tasks", params={"at": at}, json={"seconds": 3})

    assert response.status_code == 202
    assert publisher.dues == [datetime.fromisoformat(at).timestamp()]


def test_a_job_is_scheduled_like_a_countdown_and_listed_with_its_due_time(
    client: TestClient[Any], publisher: CancellingPublisher
) -> None:
    response = client.post("/jobs/tally", params={"delay": 60}, json={"title": "later", "words": ["a"]})

    assert response.status_code == 202
    assert response.json()["status"] == "scheduled"
    [listed] = client.get("/tasks").json()["items"]
    assert (listed["actor"], listed["status"]) == ("tally", "scheduled")
    assert listed["due_at"] == response.json()["due_at"]


def test_a_task_may_start_seven_days_ahead(client: TestClient[Any]) -> None:
    by_delay = client.post("/tasks", params={"delay": 7 * 86400}, json={"seconds": 3})
    by_instant = client.post("/tasks", params={"at": in_seconds(7 * 86400 - 60)}, json={"seconds": 3})

    assert (by_delay.status_code, by_instant.status_code) == (202, 202)


@pytest.mark.parametrize(
    ("start", "detail"),
    [
        ({"delay": 0}, "Expected `int` >= 1"),
        ({"delay": 7 * 86400 + 1}, "Expected `int` <= 604800"),
        ({"delay": "soon"}, "Expected `int | null`, got `str`"),
        ({"at": "2020-01-01T00:00:00Z"}, "at 2020-01-01T00:00:00Z is in the past"),
        ({"at": "2999-01-01T00:00:00Z"}, "is more than 7 days ahead"),
        ({"at": "2999-01-01T00:00:00"}, "has no offset"),
        ({"at": "next tuesday"}, "at must be an RFC 3339 instant with its UTC offset"),
        ({"at": "2999-01-01T00:00:00 02:00"}, "in a URL a + reads as a space: write it %2B"),
        ({"at": "x" * 65}, "Expected `str` of length <= 64"),
        ({"delay": 60, "at": "2999-01-01T00:00:00Z"}, "give delay or at, not both"),
    ],
    ids=["0", "past 7 days", "not a number", "past", "too far", "no offset", "malformed", "+ as space", "long", "both"],
)
def test_a_start_that_is_not_valid_is_a_400_and_nothing_is_queued(
    client: TestClient[Any], publisher: CancellingPublisher, start: dict[str, Any], detail: str
) -> None:
    for path, body in (("/tasks", {"seconds": 3}), ("/jobs/tally", {"title": "t", "words": []})):
        response = client.post(path, params=start, json=body)

        assert response.status_code == 400
        assert response.headers["content-type"] == "application/problem+json"
        assert detail in response.text
    assert publisher.messages == []


def test_a_task_without_a_start_is_queued_with_no_due_time(client: TestClient[Any]) -> None:
    accepted = client.post("/tasks", json={"seconds": 3}).json()

    assert accepted["status"] == "queued"
    assert "due_at" not in accepted
    assert client.get(f"/tasks/{accepted['id']}").json()["due_at"] is None


def test_cancelling_a_scheduled_task_ends_it_at_once(client: TestClient[Any], publisher: CancellingPublisher) -> None:
    task_id = client.post("/tasks", params={"delay": 60}, json={"seconds": 3}).json()["id"]

    response = client.delete(f"/tasks/{task_id}")

    assert (response.status_code, response.json()["status"]) == (202, "cancelled")
    assert publisher.cancelled == [task_id]


def test_the_schema_documents_delay_and_at_on_every_start_route(client: TestClient[Any]) -> None:
    paths = client.get("/docs/openapi.json").json()["paths"]

    for path in ("/tasks", *(f"/jobs/{name}" for name in tasks.jobs)):
        parameters = {parameter["name"]: parameter for parameter in paths[path]["post"]["parameters"]}
        delay = parameters["delay"]["schema"]
        assert (delay["minimum"], delay["maximum"]) == (1, 604800)
        assert parameters["at"]["in"] == "query"
        assert "RFC 3339" in parameters["at"]["description"]


# -- The board: what a web process makes of a task that starts later ---------------------


def news(kind: str, at: float, attempt: int = 1, done: int = 0, due: float = 0) -> tasks.TaskEvent:
    """A 20-second countdown's event."""
    return tasks.TaskEvent("t1", kind, at, "countdown", attempt, done, 20, due=due)  # type: ignore[arg-type]


def follow(events: list[tasks.TaskEvent]) -> list[main.TaskView]:
    """The task's view after each event, as one web process sees it."""
    board = main.TaskBoard(tasks.settings)
    views = []
    for event in events:
        board.apply(event)
        views.append(msgspec.structs.replace(board.tasks["t1"]))
    return views


def test_a_scheduled_task_starts_then_succeeds_and_keeps_its_due_time() -> None:
    now = time.time()
    views = follow(
        [news("scheduled", now, due=now + 60), news("started", now + 60.2, due=now + 60), news("succeeded", now + 80)]
    )

    assert [view.status for view in views] == ["scheduled", "running", "succeeded"]
    assert {view.due_at for view in views} == {main.timestamp(now + 60)}


def test_a_failed_attempt_is_retrying_until_its_next_attempt_is_due() -> None:
    now = time.time()
    views = follow(
        [news("started", now), news("retrying", now + 1, due=now + 61), news("started", now + 61, attempt=2)]
    )

    assert [(view.status, view.attempts) for view in views] == [("running", 1), ("retrying", 1), ("running", 2)]
    assert views[1].due_at == main.timestamp(now + 61)


def test_a_task_handed_back_by_a_stopping_worker_says_so_then_starts_again_as_a_new_attempt() -> None:
    now = time.time()
    stopped = [news("started", now), news("progress", now + 5, done=5), news("handed_back", now + 6, done=5)]
    views = follow([*stopped, news("started", now + 8)])

    assert [(view.status, view.attempts, view.remaining) for view in views[2:]] == [
        ("handed_back", 1, 15),
        ("running", 2, 20),
    ]
    assert views[-1].started_at == main.timestamp(now + 8)


def test_a_countdown_rerun_after_its_worker_died_is_a_new_attempt_started_again() -> None:
    now = time.time()
    views = follow([news("started", now), news("progress", now + 5, done=5), news("started", now + 30)])

    assert [(view.status, view.attempts, view.remaining) for view in views] == [
        ("running", 1, 20),
        ("running", 1, 15),
        ("running", 2, 20),
    ]


def test_the_same_start_heard_twice_is_one_attempt() -> None:
    now = time.time()
    views = follow([news("started", now), news("started", now)])

    assert views[-1].attempts == 1


def test_a_scheduled_task_is_remembered_until_it_is_due_past_the_memory_window() -> None:
    board = main.TaskBoard(msgspec.structs.replace(tasks.settings, task_memory_seconds=60))
    now = time.time()
    board.apply(news("scheduled", now - 120, due=now + 3600))

    board.apply(tasks.TaskEvent("t2", "queued", now, "countdown"))

    assert list(board.tasks) == ["t1", "t2"]


# -- The worker: retries, early arrivals and hand-backs, driven by hand ---------------------


class FakeChannel:
    """A channel in confirm mode that takes every publish, or refuses as told."""

    def __init__(self) -> None:
        self.published: list[tuple[str, str, bytes]] = []
        self.refusal: Exception | None = None
        self.is_open = True

    def basic_publish(self, exchange: str, routing_key: str, body: bytes, *_: Any, **__: Any) -> None:
        if self.refusal is not None:
            raise self.refusal
        self.published.append((exchange, routing_key, body))


class FakeConnection:
    """Open; callbacks handed to it wait: the events stay in the outbox, for published()."""

    is_open = True

    def add_callback_threadsafe(self, callback: Any) -> None:
        pass


@pytest.fixture
def worker(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> FakeChannel:
    """tasks.worker_link attached as in a worker, on fake channels, in the consumer thread."""
    channel = FakeChannel()
    monkeypatch.setattr(tasks.worker_link, "connection", FakeConnection())
    monkeypatch.setattr(tasks.worker_link, "thread", threading.get_ident())
    monkeypatch.setattr(tasks.worker_link, "confirming", channel)
    monkeypatch.setattr(tasks.worker_link, "channel", channel)
    monkeypatch.setattr(tasks.task_runs, "given_back", set())
    monkeypatch.setattr(tasks.task_runs, "active", {})
    return channel


def fail_once(message: dramatiq.Message[Any]) -> MessageProxy:
    """One failed attempt of ``message``, as Dramatiq's worker runs it with its Retries."""
    proxy = MessageProxy(message)
    tasks.task_runs.before_process_message(tasks.broker, proxy)
    error = ValueError("not yet")
    Retries().after_process_message(tasks.broker, proxy, exception=error)  # type: ignore[no-untyped-call]
    tasks.task_runs.after_process_message(tasks.broker, proxy, exception=error)
    return proxy


def test_a_retry_goes_through_the_delay_levels_and_its_event_says_when_it_is_due(
    clock: Clock, worker: FakeChannel
) -> None:
    # A backoff far past what a worker could hold unacknowledged.
    message = tasks.tally.message_with_options(kwargs={"title": "t", "words": []}, min_backoff=3_600_000)

    fail_once(message)

    [(exchange, routing_key, body)] = [sent for sent in worker.published if sent[0]]
    retry = dramatiq.Message.decode(body)
    backoff = retry.options["due"] - clock.now
    assert 1800 <= backoff <= 3600  # past the job's maximum (MAX_BACKOFF), Dramatiq draws from half of it to all
    assert exchange == tasks.delay_level(tasks.settings, tasks.DELAY_LEVELS - 1)
    assert int(routing_key.replace(".", ""), 2) == math.ceil(backoff * 2)
    assert (retry.message_id, retry.options["retries"]) == (message.message_id, 1)
    [event] = [event for event in published() if event.event == "retrying"]
    assert event.due == retry.options["due"]


def test_a_retry_rabbitmq_did_not_confirm_hands_the_task_back_instead_of_acknowledging_it(
    clock: Clock, worker: FakeChannel
) -> None:
    worker.refusal = pika.exceptions.UnroutableError([])
    message = tasks.tally.message_with_options(kwargs={"title": "t", "words": []})

    proxy = fail_once(message)

    assert [event.event for event in published()] == ["started", "handed_back"]
    assert tasks.task_runs.takes_back(proxy)


def test_a_task_that_arrives_before_it_is_due_waits_for_its_time(clock: Clock, worker: FakeChannel) -> None:
    due = clock.now + 0.3
    message = tasks.countdown.message_with_options(args=(1,), due=due)
    proxy = MessageProxy(message)

    tasks.task_runs.before_process_message(tasks.broker, proxy)

    assert clock.now >= due
    [event] = published()
    assert (event.event, event.due) == ("started", due)


def test_a_stopping_worker_hands_back_the_jobs_still_running_and_reports_nothing_more_of_them(
    clock: Clock, worker: FakeChannel
) -> None:
    message = tasks.countdown.message(20)
    proxy = MessageProxy(message)
    tasks.task_runs.before_process_message(tasks.broker, proxy)
    published()

    tasks.task_runs.before_consumer_thread_shutdown(tasks.broker, SimpleNamespace(queue_name=tasks.settings.queue_name))
    tasks.task_runs.emit(tasks.TaskEvent(message.message_id, "progress", clock.now, "countdown", done=3, total=20))

    [(_, _, batch)] = worker.published
    assert [event.event for event in msgspec.json.decode(batch, type=list[tasks.TaskEvent])] == ["handed_back"]
    assert list(tasks.worker_link.outbox) == []
    assert tasks.task_runs.takes_back(proxy)


# -- Whole stacks ---------------------------------------------------------------------


def started(stacks: list[Process], queue: str, url: str, **settings: str | int) -> tuple[Process, str]:
    """A stack (web and worker under supervisord) on ``url``, once both serve.

    A short STOP_GRACE: a web process waits all of it when it stops.
    """
    port = free_port()
    stack = start_stack(PORT=port, QUEUE_NAME=queue, CLOUDAMQP_URL=url, **({"STOP_GRACE": 1} | settings))
    stacks.append(stack)
    wait_http(f"http://127.0.0.1:{port}/readyz", timeout=40)
    stack.wait_for(r"cancellations read", timeout=40)
    return stack, f"http://127.0.0.1:{port}"


def schedule(base: str, path: str = "/tasks", body: Any = None, **start: str | int) -> dict[str, Any]:
    response = httpx.post(f"{base}{path}", params=start, json={"seconds": 1} if body is None else body, timeout=10)
    assert response.status_code == 202, response.text
    return dict(response.json())


def status_of(base: str, task_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{base}/tasks/{task_id}", timeout=5).json())


def wait_for_status(base: str, task_id: str, status: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (view := status_of(base, task_id)).get("status") != status:
        assert time.monotonic() < deadline, f"{task_id} is {view}, not {status}, after {timeout} s"
        time.sleep(0.1)
    return view


@pytest.fixture(scope="module", params=MATRIX)
def impatient(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """A private broker whose consumer_timeout is 10 s, checked every second."""
    node: RabbitNode | RabbitContainer
    if request.param == "3.10":
        require_tool("rabbitmq-server")
        node = RabbitNode(consumer_timeout=CONSUMER_TIMEOUT)
    else:
        node = RabbitContainer(container_engine(), consumer_timeout=CONSUMER_TIMEOUT)
    try:
        node.start()
        yield Broker(request.param, node.port, node.ctl)
    finally:
        node.stop()


CONSUMER_TIMEOUT = 10


def test_a_delay_longer_than_the_consumer_timeout_fires_and_no_channel_is_closed(
    stacks: list[Process], impatient: Broker
) -> None:
    queue = f"test-{uuid.uuid4().hex[:10]}"
    stack, base = started(stacks, queue, impatient.url)
    delay = CONSUMER_TIMEOUT + 4
    task = schedule(base, delay=delay)
    # The same wait as Dramatiq's own delay queue makes it: the worker holds the message until its eta.
    held = tasks.countdown.message_with_options(args=(1,), eta=int((time.time() + delay) * 1000))
    publish_raw(impatient.url, dq_name(queue), held.copy(queue_name=dq_name(queue)).encode())

    stack.wait_for(rf"task {task['id']} done", timeout=delay + 20)
    # The test can see a channel closed for an ack timeout: the one that held Dramatiq's message.
    stack.wait_for(rf"ConsumerThread\({re.escape(dq_name(queue))}\).*timed out", timeout=20)

    timeouts = [line for line in stack.lines if "timed out" in line]
    assert all(f"ConsumerThread({dq_name(queue)})" in line for line in timeouts), timeouts
    view = wait_for_status(base, task["id"], "succeeded", timeout=5)
    assert view["started_at"] >= view["due_at"]
    assert view["attempts"] == 1


def publish_raw(url: str, queue: str, body: bytes) -> None:
    connection = rabbit_connection(url)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True)
    finally:
        connection.close()


def sse_statuses(url: str, timeout: float = 30) -> list[dict[str, Any]]:
    """Every view a Server-Sent Events stream sends, until it ends."""
    with httpx.stream("GET", url, timeout=timeout) as response:
        return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def test_a_scheduled_countdown_is_followed_live_from_scheduled_to_succeeded(
    stacks: list[Process], queue_name: str
) -> None:
    _, base = started(stacks, queue_name, RABBIT_URL)
    task = schedule(base, delay=2)

    views = sse_statuses(f"{base}/tasks/{task['id']}/events")

    assert views[0]["status"] == "scheduled"
    assert views[-1]["status"] == "succeeded"
    assert views[-1]["due_at"] == task["due_at"]
    assert task["due_at"] <= views[-1]["started_at"]


def test_a_scheduled_task_cancelled_while_no_worker_runs_never_runs(
    stacks: list[Process], broker: Broker, broker_queue: str
) -> None:
    port = free_port()
    web = Process(
        ["python", "tasks.py", "web"],
        stack_env(PORT=port, QUEUE_NAME=broker_queue, CLOUDAMQP_URL=broker.url, STOP_GRACE=1),
    )
    stacks.append(web)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/readyz")
    task = schedule(base, delay=2)
    assert httpx.delete(f"{base}/tasks/{task['id']}").json()["status"] == "cancelled"
    time.sleep(2.5)  # due, and waiting in the task queue

    worker = Process(["python", "tasks.py", "worker"], stack_env(QUEUE_NAME=broker_queue, CLOUDAMQP_URL=broker.url))
    stacks.append(worker)

    worker.wait_for(rf"task {task['id']} cancelled before it started")
    assert f"task {task['id']} started" not in worker.output


def test_a_countdown_whose_worker_was_killed_starts_again_as_a_new_attempt(
    stacks: list[Process], queue_name: str
) -> None:
    stack, base = started(stacks, queue_name, RABBIT_URL)
    task_id = httpx.post(f"{base}/tasks", json={"seconds": 20}).json()["id"]
    stack.wait_for(rf"task {task_id} remaining=17", timeout=20)
    first = status_of(base, task_id)

    program_process(stack, "worker").kill()

    stack.wait_for(rf"task {task_id} started seconds=20 attempt=1 redelivered=yes", timeout=60)
    view = wait_for_status(base, task_id, "running", timeout=5)
    assert view["attempts"] == 2
    assert view["started_at"] > first["started_at"]
    assert view["remaining"] >= 18  # from the start again, not on from 17


def test_a_retry_is_sent_on_the_worker_s_own_connections_and_shows_when_it_is_due(
    stacks: list[Process], queue_name: str
) -> None:
    stack, base = started(stacks, queue_name, RABBIT_URL, MAX_RETRIES=1)
    before = amqp_connections_by_program(stack, BROKER_PORT)["worker"]

    task = schedule(base, "/jobs/tally", {"title": "oops", "words": ["fail"]}, delay=1)
    retrying = wait_for_status(base, task["id"], "retrying", timeout=20)
    final = wait_for_status(base, task["id"], "failed", timeout=20)

    # Dramatiq's broker would open a connection in the worker thread that sent the retry.
    assert amqp_connections_by_program(stack, BROKER_PORT)["worker"] == before == 2
    assert retrying["due_at"] > retrying["updated_at"]
    assert final["attempts"] == 2


def test_a_task_a_stopping_worker_hands_back_says_so_and_the_next_worker_runs_it_as_a_new_attempt(
    stacks: list[Process], queue_name: str
) -> None:
    port = free_port()
    web = Process(["python", "tasks.py", "web"], stack_env(PORT=port, QUEUE_NAME=queue_name, STOP_GRACE=1))
    stacks.append(web)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/readyz")
    first = Process(["python", "tasks.py", "worker"], stack_env(QUEUE_NAME=queue_name, STOP_GRACE=1))
    stacks.append(first)
    task_id = httpx.post(f"{base}/tasks", json={"seconds": 30}).json()["id"]
    first.wait_for(rf"task {task_id} remaining=28", timeout=30)

    first.send_signal(signal.SIGTERM)

    assert first.wait(30) == 0
    assert f"task {task_id} handed back" in first.output
    assert wait_for_status(base, task_id, "handed_back", timeout=5)["attempts"] == 1
    second = Process(["python", "tasks.py", "worker"], stack_env(QUEUE_NAME=queue_name, STOP_GRACE=1))
    stacks.append(second)
    second.wait_for(rf"task {task_id} started seconds=30 attempt=1 redelivered=yes", timeout=30)
    assert wait_for_status(base, task_id, "running", timeout=5)["attempts"] == 2


# -- Delay levels nobody consumes are kept ---------------------------------------------------


def test_a_worker_keeps_the_delay_levels_and_their_tasks_from_an_expiry_policy(
    broker4: Broker, vhost: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CloudAMQP deletes a queue unused for 28 days: here, a policy deletes one unused for 3 s."""
    queue = f"test-{uuid.uuid4().hex[:10]}"
    broker4.ctl("set_policy", "-p", vhost, "unused", rf"^{queue}\.delay\.", '{"expires": 3000}', "--apply-to", "queues")
    url = f"amqp://guest:guest@127.0.0.1:{broker4.port}/{vhost}"
    settings = msgspec.structs.replace(tasks.settings, queue_name=queue, cloudamqp_url=url)
    monkeypatch.setattr(tasks, "FIRST_RENEWAL", 1.0)
    monkeypatch.setattr(tasks, "RENEW_EVERY", 1.0)
    connection = pika.BlockingConnection(tasks.connection_parameters(settings))
    try:
        tasks.WorkerLink(settings, tasks.CancellationsFeed(settings)).attach(connection)
        # A task days ahead: it waits in the top level, and would go with it.
        publish_delayed(url, settings, [tasks.LONGEST_DELAY_MS])
        connection.sleep(7)  # more than twice the policy's expiry
        waiting = top_level_depth(url, settings)
    finally:
        connection.close()
    time.sleep(5)

    assert waiting == 1
    assert levels_declared(broker4, vhost, queue) == 0  # what nobody asks after, the policy does delete


def top_level_depth(url: str, settings: tasks.Settings) -> int:
    connection = rabbit_connection(url)
    try:
        top = tasks.delay_level(settings, tasks.DELAY_LEVELS - 1)
        return int(connection.channel().queue_declare(top, passive=True).method.message_count)
    finally:
        connection.close()


def levels_declared(broker: Broker, vhost: str, queue: str) -> int:
    names = broker.ctl("-q", "list_queues", "-p", vhost, "name", "--no-table-headers").split()
    return sum(name.startswith(f"{queue}.delay.") for name in names)


# -- Pending tasks across restarts and redeploys ------------------------------------------------


def unacked_total(metrics_port: int) -> int:
    """Deliveries unacknowledged on every channel of the broker, from its own counters."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics/per-object", timeout=10).text
    counted = re.compile(r"^rabbitmq_channel_messages_unacked\{[^}]*\} (\d+)", re.MULTILINE)
    return sum(int(value) for value in counted.findall(text))


class UnackedPeak:
    """The most deliveries held unacknowledged at once, sampled while the block runs."""

    def __init__(self, metrics_port: int) -> None:
        self.metrics_port = metrics_port
        self.peak = 0
        self.samples = 0
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def __enter__(self) -> UnackedPeak:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.running = False
        self.thread.join(15)

    def sample(self) -> None:
        while self.running:
            with contextlib.suppress(httpx.HTTPError):  # the broker restarting
                self.peak = max(self.peak, unacked_total(self.metrics_port))
                self.samples += 1
            time.sleep(0.2)


async def post_all(base: str, requests: list[tuple[str, dict[str, Any]]], at: str) -> list[str]:
    """Each (path, body) POSTed to start ``at``, 32 at once; the ids, in order."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        gate = asyncio.Semaphore(32)

        async def one(path: str, body: dict[str, Any]) -> str:
            async with gate:
                response = await client.post(path, params={"at": at}, json=body)
            assert response.status_code == 202, response.text
            return str(response.json()["id"])

        return list(await asyncio.gather(*(one(path, body) for path, body in requests)))


def task_events(url: str, queue: str, ids: set[str], deadline: float) -> dict[str, list[str]]:
    """Each task's events from the events stream, read from its start until every task has ended."""
    seen: dict[str, list[str]] = {task_id: [] for task_id in ids}
    ended: set[str] = set()
    connection = rabbit_connection(url)
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=100)
        stream = channel.consume(f"{queue}.events", arguments={"x-stream-offset": "first"}, inactivity_timeout=1)
        for method, properties, body in stream:
            if method is not None:
                channel.basic_ack(method.delivery_tag)
                if properties.type != tasks.SYNC:
                    for event in msgspec.json.decode(body, type=list[tasks.TaskEvent]):
                        if event.id in seen:
                            seen[event.id].append(event.event)
                            ended.update([event.id] if event.event in main.FINISHED else [])
            if ended == ids or time.time() > deadline:
                break
    finally:
        connection.close()
    return seen


@pytest.mark.parametrize(
    ("version", "count", "due_in"),
    [
        pytest.param("3.10", 5000, 150, marks=pytest.mark.slow),
        pytest.param("4.0.5", 5000, 150, marks=pytest.mark.slow),
        ("4.0.5", 200, 60),
    ],
    ids=["3.10-5000", "4.0.5-5000", "4.0.5-200"],
)
def test_pending_scheduled_tasks_hold_nothing_unacked_and_run_once_across_restarts_and_a_redeploy(
    stacks: list[Process], version: str, count: int, due_in: float
) -> None:
    node: RabbitNode | RabbitContainer
    if version == "3.10":
        require_tool("rabbitmq-server")
        node = RabbitNode(metrics=True)
    else:
        node = RabbitContainer(container_engine())
    node.start()
    try:
        assert node.metrics_port is not None
        queue, url = f"test-{uuid.uuid4().hex[:10]}", node.url
        box = {"STOP_GRACE": 1, "RATE_LIMIT_PER_MINUTE": 0}
        with UnackedPeak(node.metrics_port) as unacked:
            first, base = started(stacks, queue, url, **box)
            due = time.time() + due_in
            # Jobs that end at once, and countdowns that keep the worker's window full a while.
            requests: list[tuple[str, dict[str, Any]]] = [
                ("/jobs/tally", {"title": str(number), "words": []}) for number in range(count - 24)
            ]
            requests += [("/tasks", {"seconds": 3})] * 24
            ids = asyncio.run(post_all(base, requests, datetime.fromtimestamp(due, UTC).isoformat()))
            posted = time.time()
            first.stop()  # the container restarts
            again, again_base = started(stacks, queue, url, **box)
            node.stop_app()  # the broker restarts
            node.start_app()
            wait_http(f"{again_base}/readyz", timeout=60)
            redeployed, _ = started(stacks, queue, url, **box)  # a new stack, the same broker
            again.stop()
            restarted = time.time()
            events = task_events(url, queue, set(ids), deadline=due + 120)
        depth = queue_depths(url, queue)
    finally:
        node.stop()

    print(
        f"\nRabbitMQ {version}: {count} tasks posted in {posted - (due - due_in):.1f} s, due {due_in} s ahead; "
        f"restarts done {due - restarted:.1f} s before they were due; peak unacked {unacked.peak} "
        f"({unacked.samples} samples)"
    )
    assert restarted < due, "the restarts took longer than the tasks waited"
    # Something held, as the countdowns ran (the sampler sees it), and never more than the windows.
    assert 0 < unacked.peak <= tasks.settings.queue_prefetch + 2 * tasks.STREAM_PREFETCH
    runs = {task_id: kinds.count("started") for task_id, kinds in events.items()}
    assert set(runs.values()) == {1}, {task_id: kinds for task_id, kinds in events.items() if runs[task_id] != 1}
    assert all(kinds[-1] == "succeeded" for kinds in events.values())
    assert depth == 0
    assert redeployed.popen.poll() is None


def queue_depths(url: str, queue: str) -> int:
    """Messages left in the task queue and the delay levels."""
    settings = msgspec.structs.replace(tasks.settings, queue_name=queue)
    names = [queue, *(tasks.delay_level(settings, level) for level in range(tasks.DELAY_LEVELS))]
    connection = rabbit_connection(url)
    try:
        return sum(connection.channel().queue_declare(name, passive=True).method.message_count for name in names)
    finally:
        connection.close()
