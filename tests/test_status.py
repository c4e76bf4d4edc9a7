"""Task status, live progress and cancellation, with RabbitMQ the only shared state."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest
from conftest import Broker, Process, free_port, stack_env, start_stack, wait_http
from litestar.testing import TestClient
from test_api import RecordingPublisher, caught_up, offline_app

import main
import tasks

# -- The board: what a web process makes of the events it hears ------------------


def event(
    kind: str, remaining: int = 5, attempt: int = 1, at: float | None = None, task_id: str = "t1"
) -> tasks.TaskEvent:
    """A countdown's event, of 5 seconds in all."""
    at = time.time() if at is None else at
    return tasks.TaskEvent(task_id, kind, at, "countdown", attempt, 5 - remaining, 5)  # type: ignore[arg-type]


def board(**changes: Any) -> main.TaskBoard:
    return main.TaskBoard(msgspec.structs.replace(tasks.settings, **changes))


def test_a_task_moves_from_queued_to_running_to_succeeded() -> None:
    tasks_board = board()
    statuses = []
    for kind, remaining in [("queued", 5), ("started", 5), ("progress", 3), ("succeeded", 0)]:
        tasks_board.apply(event(kind, remaining))
        statuses.append((tasks_board.tasks["t1"].status, tasks_board.tasks["t1"].remaining))

    assert statuses == [("queued", 5), ("running", 5), ("running", 3), ("succeeded", 0)]


def test_a_late_queued_event_does_not_turn_a_running_task_back() -> None:
    tasks_board = board()
    tasks_board.apply(event("started"))

    tasks_board.apply(event("queued"))

    assert tasks_board.tasks["t1"].status == "running"
    assert tasks_board.tasks["t1"].queued_at is not None


def test_news_after_the_end_of_an_attempt_is_ignored() -> None:
    tasks_board = board()
    tasks_board.apply(event("cancelled", 3))

    tasks_board.apply(event("progress", 2))

    assert tasks_board.tasks["t1"].status == "cancelled"


def test_a_retry_after_a_failure_runs_again() -> None:
    tasks_board = board()
    tasks_board.apply(event("failed"))

    tasks_board.apply(event("started", attempt=2))

    assert (tasks_board.tasks["t1"].status, tasks_board.tasks["t1"].attempts) == ("running", 2)


def test_a_task_first_heard_of_mid_run_is_running_with_no_queued_time() -> None:
    tasks_board = board()

    tasks_board.apply(event("progress", 2))

    view = tasks_board.tasks["t1"]
    assert (view.status, view.remaining, view.queued_at) == ("running", 2, None)


def test_the_board_forgets_the_oldest_beyond_its_count() -> None:
    tasks_board = board(task_memory_count=2)
    for task_id in ("a", "b", "c"):
        tasks_board.apply(event("queued", task_id=task_id))

    assert list(tasks_board.tasks) == ["b", "c"]


def test_the_board_forgets_tasks_older_than_its_memory() -> None:
    tasks_board = board(task_memory_seconds=60)
    tasks_board.apply(event("queued", at=time.time() - 61, task_id="old"))

    tasks_board.apply(event("queued", task_id="new"))

    assert list(tasks_board.tasks) == ["new"]


def test_finished_tasks_past_the_count_are_forgotten_while_unfinished_ones_stay() -> None:
    tasks_board = board(task_memory_count=2)
    for task_id in ("waiting-1", "waiting-2"):
        tasks_board.apply(event("queued", task_id=task_id))
    for task_id in ("done-1", "done-2", "done-3"):
        tasks_board.apply(event("succeeded", 0, task_id=task_id))

    assert list(tasks_board.tasks) == ["waiting-1", "waiting-2", "done-2", "done-3"]


def test_an_unfinished_task_is_remembered_until_its_due_time_has_passed_the_memory() -> None:
    tasks_board = board(task_memory_seconds=3600)
    queued_long_ago = main.timestamp(time.time() - 7200)
    due_in_a_week = main.timestamp(time.time() + 7 * 86400)
    waiting = [
        main.TaskView(task_id, "countdown", "queued", 1, 0, 5, queued_long_ago, tasks.NO_RESULT, due_at=due)
        for task_id, due in [("due-in-a-week", due_in_a_week), ("not-due", None)]
    ]

    tasks_board.load(waiting, {})

    assert list(tasks_board.tasks) == ["due-in-a-week"]


# -- Board snapshots: a start reads the newest, then the events since its cut --------


def finished_and_waiting_board() -> main.TaskBoard:
    """A board of one failed job, one finished countdown, one running and one queued."""
    tasks_board = board()
    tasks_board.apply(tasks.TaskEvent("tally-1", "queued", time.time(), "tally"))
    error = tasks.TaskError("ValueError", "cannot count 'fail'")
    tasks_board.apply(tasks.TaskEvent("tally-1", "failed", time.time(), "tally", error=error))
    for task_id, kinds in [("done", ["queued", "succeeded"]), ("running", ["queued", "started"]), ("queued", [])]:
        tasks_board.apply(event("queued", task_id=task_id))
        for kind in kinds:
            tasks_board.apply(event(kind, task_id=task_id))
    tasks_board.tasks["done"].result = msgspec.Raw(b'{"counted":5}')
    return tasks_board


def snapshot_of(tasks_board: main.TaskBoard) -> bytes:
    """The board's snapshot as a web process writes it: JSON, compressed."""
    return zlib.compress(main.encode_snapshot(main.Cut("cut-1", time.time(), 41), tasks_board))


def test_a_snapshot_brings_back_every_task_as_it_was_in_the_same_order() -> None:
    before = finished_and_waiting_board()

    snapshot = main.decode_snapshot(snapshot_of(before))
    assert snapshot is not None
    after = board()
    after.load(snapshot.tasks, snapshot.ticks)

    assert msgspec.json.encode(list(after.tasks.values())) == msgspec.json.encode(list(before.tasks.values()))
    assert snapshot.cut.offset == 41
    assert (list(after.finished), list(after.unfinished)) == (["tally-1", "done"], ["running", "queued"])


def test_a_snapshot_the_process_cannot_read_is_ignored() -> None:
    assert main.decode_snapshot(zlib.compress(b'{"cut": "not a cut"}')) is None
    assert main.decode_snapshot(b"not even compressed") is None


def test_a_loaded_snapshot_forgets_what_the_memory_no_longer_holds() -> None:
    old = board()
    old.apply(event("succeeded", 0, at=time.time() - 120, task_id="old"))
    old.apply(event("succeeded", 0, task_id="new"))
    snapshot = main.decode_snapshot(snapshot_of(old))
    assert snapshot is not None

    after = board(task_memory_seconds=60)
    after.load(snapshot.tasks, snapshot.ticks)

    assert list(after.tasks) == ["new"]


def part(snapshot: str, index: int, parts: int) -> tuple[dict[str, Any], bytes]:
    return {"snapshot": snapshot, "part": index, "parts": parts}, f"{snapshot}{index}".encode()


def test_a_snapshot_is_complete_once_all_its_parts_have_come_in_any_order() -> None:
    parts = main.SnapshotParts()
    for headers, body in [part("b", 1, 2), part("a", 0, 2), part("b", 0, 2)]:
        parts.add(headers, body)

    assert parts.newest == b"b0b1"


def test_the_newest_snapshot_is_the_last_one_completed() -> None:
    parts = main.SnapshotParts()
    for headers, body in [part("a", 0, 2), part("b", 0, 1), part("a", 1, 2)]:
        parts.add(headers, body)

    assert parts.newest == b"a0a1"


def test_a_part_with_headers_out_of_bounds_is_ignored() -> None:
    parts = main.SnapshotParts()
    for headers, body in [part("a", 1, 1), part("b", 0, 10_000), ({"snapshot": 3, "part": 0, "parts": 1}, b"")]:
        parts.add(headers, body)

    assert parts.newest is None


def test_a_web_process_writes_a_cut_once_enough_events_have_passed() -> None:
    schedule = main.SnapshotSchedule()
    for _ in range(schedule.threshold - 1):
        schedule.heard(None, None, 0)
    assert not schedule.due()

    schedule.heard(None, None, 0)

    assert schedule.due()
    assert main.SNAPSHOT_EVERY <= schedule.threshold <= main.SNAPSHOT_EVERY * 1.5


def test_a_web_process_that_hears_another_ones_cut_counts_again_from_it() -> None:
    schedule = main.SnapshotSchedule()
    for _ in range(schedule.threshold):
        schedule.heard(None, None, 0)

    schedule.heard(main.CUT, "another-process-cut", 0)

    assert (schedule.since_cut, schedule.due()) == (0, False)


def test_a_web_process_takes_its_snapshot_at_its_own_cut_and_names_its_offset() -> None:
    schedule = main.SnapshotSchedule()
    cut = schedule.new_cut()

    assert schedule.heard(main.CUT, "another-process-cut", 7) is None
    assert schedule.heard(main.CUT, cut.id, 9) == main.Cut(cut.id, cut.at, 9)


def test_cuts_are_a_minute_apart_however_many_events_pass() -> None:
    schedule = main.SnapshotSchedule()
    schedule.heard(main.CUT, "another-process-cut", 0)

    for _ in range(main.SNAPSHOT_EVERY * 2):
        schedule.heard(None, None, 0)

    assert not schedule.due()


# -- The API, in-process ---------------------------------------------------------------


class CancellingPublisher(RecordingPublisher):
    def __init__(self, settings: tasks.Settings = tasks.settings) -> None:
        super().__init__(settings)
        self.cancelled: list[str] = []

    async def cancel(self, task_id: str) -> None:
        if self.failure is not None:
            raise self.failure
        self.cancelled.append(task_id)


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


def post(client: TestClient[Any], seconds: int = 5) -> str:
    response = client.post("/tasks", json={"seconds": seconds})
    assert response.status_code == 202
    return str(response.json()["id"])


def test_an_accepted_task_points_to_its_status(client: TestClient[Any]) -> None:
    response = client.post("/tasks", json={"seconds": 5})

    task_id = response.json()["id"]
    assert response.headers["location"] == f"/tasks/{task_id}"
    status = client.get(response.headers["location"]).json()
    assert status["status"] == "queued"
    assert (status["seconds"], status["remaining"], status["attempts"]) == (5, 5, 1)
    assert status["queued_at"] == response.json()["queued_at"]


def test_an_unknown_task_is_a_404_that_says_how_long_tasks_are_remembered(client: TestClient[Any]) -> None:
    response = client.get("/tasks/no-such-task")

    assert response.status_code == 404
    detail = response.json()["detail"]
    assert detail.startswith("no task no-such-task is known: tasks are remembered for 3600 s after their last news")
    assert "may still be queued, running or done" in detail


def test_recent_tasks_come_newest_first_in_pages(client: TestClient[Any]) -> None:
    ids = [post(client) for _ in range(5)]

    first = client.get("/tasks", params={"limit": 2}).json()
    second = client.get("/tasks", params={"limit": 2, "offset": 2}).json()

    assert [task["id"] for task in first["items"] + second["items"]] == ids[::-1][:4]
    assert (first["total"], first["limit"], second["offset"]) == (5, 2, 2)


@pytest.mark.parametrize("query", [{"limit": 0}, {"limit": 101}, {"offset": -1}, {"limit": "ten"}])
def test_a_bad_page_is_a_400(client: TestClient[Any], query: dict[str, Any]) -> None:
    assert client.get("/tasks", params=query).status_code == 400


def test_cancelling_a_queued_task_records_it_and_marks_it_cancelled(
    client: TestClient[Any], publisher: CancellingPublisher
) -> None:
    task_id = post(client)

    response = client.delete(f"/tasks/{task_id}")

    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    assert publisher.cancelled == [task_id]
    assert client.get(f"/tasks/{task_id}").json()["status"] == "cancelled"


def test_cancelling_a_running_task_waits_for_the_worker(client: TestClient[Any], feed: main.EventsFeed) -> None:
    task_id = post(client)
    feed.board.apply(event("started", task_id=task_id))

    response = client.delete(f"/tasks/{task_id}")

    assert response.json()["status"] == "cancelling"
    feed.board.apply(event("cancelled", 4, task_id=task_id))
    assert client.get(f"/tasks/{task_id}").json()["status"] == "cancelled"


def test_cancelling_a_running_task_again_writes_nothing_new(
    client: TestClient[Any], publisher: CancellingPublisher, feed: main.EventsFeed
) -> None:
    task_id = post(client)
    feed.board.apply(event("started", task_id=task_id))

    answers = [client.delete(f"/tasks/{task_id}") for _ in range(3)]

    assert [answer.status_code for answer in answers] == [202, 202, 202]
    assert [answer.json()["status"] for answer in answers] == ["cancelling"] * 3
    assert publisher.cancelled == [task_id]


def test_cancelling_twice_is_harmless(client: TestClient[Any], publisher: CancellingPublisher) -> None:
    task_id = post(client)
    client.delete(f"/tasks/{task_id}")

    again = client.delete(f"/tasks/{task_id}")

    assert again.status_code == 202
    assert again.json()["status"] == "cancelled"
    assert publisher.cancelled == [task_id]


def test_cancelling_a_finished_task_is_a_409(client: TestClient[Any], feed: main.EventsFeed) -> None:
    task_id = post(client)
    feed.board.apply(event("succeeded", 0, task_id=task_id))

    response = client.delete(f"/tasks/{task_id}")

    assert response.status_code == 409
    assert response.json()["detail"] == f"task {task_id} has succeeded; it cannot be cancelled"


def test_cancelling_an_unknown_task_is_a_404(client: TestClient[Any]) -> None:
    assert client.delete("/tasks/no-such-task").status_code == 404


def test_a_cancellation_the_broker_did_not_take_is_a_503(
    client: TestClient[Any], publisher: CancellingPublisher
) -> None:
    task_id = post(client)
    publisher.failure = main.BrokerUnavailable("cannot reach the broker: TimeoutError")

    response = client.delete(f"/tasks/{task_id}")

    assert response.status_code == 503
    assert client.get(f"/tasks/{task_id}").json()["status"] == "queued"


def test_cancelling_needs_the_api_token_when_one_is_set() -> None:
    publisher = CancellingPublisher(msgspec.structs.replace(tasks.settings, api_token="a-long-enough-test-token"))
    feed = caught_up(publisher)
    with TestClient(offline_app(publisher, feed)) as client:
        feed.board.apply(event("queued"))

        response = client.delete("/tasks/t1")

    assert response.status_code == 401
    assert publisher.cancelled == []


def test_the_event_stream_of_a_finished_task_sends_its_end_and_closes(
    client: TestClient[Any], feed: main.EventsFeed
) -> None:
    task_id = post(client, seconds=2)
    for kind, done in [("started", 0), ("progress", 1), ("succeeded", 2)]:
        feed.board.apply(tasks.TaskEvent(task_id, kind, time.time(), "countdown", done=done, total=2))  # type: ignore[arg-type]

    response = client.get(f"/tasks/{task_id}/events")

    assert response.headers["content-type"].startswith("text/event-stream")
    lines = response.text.splitlines()
    assert [line for line in lines if line.startswith("event: ")] == ["event: succeeded"]
    [data] = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert (data["status"], data["remaining"]) == ("succeeded", 0)


def test_the_event_stream_of_an_unknown_task_is_a_404(client: TestClient[Any]) -> None:
    assert client.get("/tasks/no-such-task/events").status_code == 404


# -- Real processes, real RabbitMQ ----------------------------------------------------


def started(stacks: list[Process], queue_name: str, **settings: str | int) -> tuple[Process, str]:
    port = free_port()
    stack = start_stack(PORT=port, QUEUE_NAME=queue_name, **settings)
    stacks.append(stack)
    wait_http(f"http://127.0.0.1:{port}/readyz")
    stack.wait_for(r"Worker process is ready for action")
    return stack, f"http://127.0.0.1:{port}"


def sse_events(url: str, timeout: float = 30) -> list[dict[str, Any]]:
    """Every data message of a Server-Sent Events stream, until it ends."""
    with httpx.stream("GET", url, timeout=timeout) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def test_a_task_is_followed_live_from_queued_to_succeeded(stacks: list[Process], queue_name: str) -> None:
    _, base = started(stacks, queue_name)
    task_id = httpx.post(f"{base}/tasks", json={"seconds": 2}).json()["id"]

    seen = sse_events(f"{base}/tasks/{task_id}/events")

    assert seen[-1]["status"] == "succeeded"
    assert [view["remaining"] for view in seen if view["status"] == "running"][-1] == 1
    final = httpx.get(f"{base}/tasks/{task_id}").json()
    assert final["started_at"] < final["finished_at"]


def test_a_running_countdown_stops_at_its_next_tick(stacks: list[Process], queue_name: str) -> None:
    stack, base = started(stacks, queue_name)
    task_id = httpx.post(f"{base}/tasks", json={"seconds": 30}).json()["id"]
    stack.wait_for(rf"task {task_id} remaining=29")

    cancelled_at = time.monotonic()
    assert httpx.delete(f"{base}/tasks/{task_id}").status_code == 202
    stack.wait_for(rf"task {task_id} cancelled remaining=")

    assert time.monotonic() - cancelled_at < 2.5
    wait_for_status(base, task_id, "cancelled")
    assert f"task {task_id} done" not in stack.output


def test_a_task_cancelled_while_no_worker_runs_never_starts(
    stacks: list[Process], broker: Broker, broker_queue: str
) -> None:
    queue_name, url = broker_queue, broker.url
    port = free_port()
    web = Process(["python", "tasks.py", "web"], stack_env(PORT=port, QUEUE_NAME=queue_name, CLOUDAMQP_URL=url))
    stacks.append(web)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/readyz")
    task_id = httpx.post(f"{base}/tasks", json={"seconds": 2}).json()["id"]
    assert httpx.delete(f"{base}/tasks/{task_id}").json()["status"] == "cancelled"

    worker = Process(["python", "tasks.py", "worker"], stack_env(QUEUE_NAME=queue_name, CLOUDAMQP_URL=url))
    stacks.append(worker)

    worker.wait_for(rf"task {task_id} cancelled before it started")
    assert f"task {task_id} started" not in worker.output


def test_two_stacks_share_status_streams_and_cancellation(
    stacks: list[Process], broker: Broker, broker_queue: str
) -> None:
    _, first = started(stacks, broker_queue, CLOUDAMQP_URL=broker.url)
    _, second = started(stacks, broker_queue, CLOUDAMQP_URL=broker.url)
    watched = httpx.post(f"{first}/tasks", json={"seconds": 2}).json()["id"]
    doomed = httpx.post(f"{first}/tasks", json={"seconds": 30}).json()["id"]

    assert sse_events(f"{second}/tasks/{watched}/events")[-1]["status"] == "succeeded"
    wait_for_status(second, doomed, "running")
    assert httpx.delete(f"{second}/tasks/{doomed}").status_code == 202
    wait_for_status(first, doomed, "cancelled")
    wait_for_status(second, doomed, "cancelled")


def test_an_open_event_stream_does_not_hold_the_stop(stacks: list[Process], queue_name: str) -> None:
    stack, base = started(stacks, queue_name, STOP_GRACE=2)
    task_id = httpx.post(f"{base}/tasks", json={"seconds": 60}).json()["id"]
    stack.wait_for(rf"task {task_id} started")
    streaming = threading.Thread(target=lambda: sse_events_until_closed(f"{base}/tasks/{task_id}/events"))
    streaming.start()
    time.sleep(0.5)

    stopping = time.monotonic()
    stack.send_signal(signal.SIGTERM)
    code = stack.wait(timeout=40)

    assert code == 0
    assert time.monotonic() - stopping < 2 + 5
    streaming.join(5)
    assert not streaming.is_alive()


def sse_events_until_closed(url: str) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the server going away is the point
        sse_events(url, timeout=60)


def wait_for_status(base: str, task_id: str, status: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (current := httpx.get(f"{base}/tasks/{task_id}").json().get("status")) != status:
        assert time.monotonic() < deadline, f"{task_id} is {current}, not {status}, after {timeout} s"
        time.sleep(0.1)
