"""Jobs: any @job actor's status, progress, result and error, for every web process.

The unit tests drive tasks.TaskRuns by hand, as Dramatiq's worker does
(before, the actor, after), on a clock of their own, and hand the events it
publishes to a web process's EventsFeed as one batch. The others run the
README's example job on real stacks against the real RabbitMQ.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import httpx
import msgspec
import pytest
from conftest import ROOT, Clock, Process, delete_queues, free_port, start_stack, wait_http
from dramatiq.broker import MessageProxy
from dramatiq.middleware import CurrentMessage, SkipMessage, TimeLimitExceeded
from litestar.testing import TestClient
from test_api import RecordingPublisher, caught_up, offline_app

import main
import tasks

# -- A worker by hand -----------------------------------------------------------------


def work(
    actor: dramatiq.Actor[..., None],
    arguments: dict[str, Any],
    last: bool = True,
    message: dramatiq.Message[None] | None = None,
) -> dramatiq.Message[None]:
    """Run one attempt of a new task (or of ``message`` again) as Dramatiq's
    worker does; ``last``: if it fails, Retries gives up, as it does after
    the last attempt or for an exception in the actor's ``throws``."""
    message = message or actor.message_with_options(kwargs=arguments)
    proxy = MessageProxy(message)
    tasks.task_runs.before_process_message(tasks.broker, proxy)
    CurrentMessage().before_process_message(tasks.broker, proxy)  # type: ignore[no-untyped-call]
    try:
        actor(**arguments)
    except BaseException as error:  # noqa: BLE001 - what the worker does: time limits are BaseExceptions
        if last:
            proxy.fail()
        tasks.task_runs.after_process_message(tasks.broker, proxy, exception=error)
    else:
        tasks.task_runs.after_process_message(tasks.broker, proxy)
    # What Dramatiq's Retries does to a message it will run again.
    message.options["retries"] = message.options.get("retries", 0) + 1
    return message


def published() -> list[tasks.TaskEvent]:
    """The events the worker has handed over since the last call, as one batch."""
    events = list(tasks.worker_link.outbox)
    tasks.worker_link.outbox.clear()
    return events


def hear(feed: main.EventsFeed, body: bytes) -> None:
    """A message of the task events stream, as the web process applies it."""
    feed.apply_batch(body)


def board_after(events: list[tasks.TaskEvent]) -> main.TaskView:
    """The one task these events are about, as a web process sees it after hearing them."""
    feed = caught_up(RecordingPublisher())
    hear(feed, msgspec.json.encode(events))
    [view] = feed.board.tasks.values()
    return view


COUNTDOWN = (tasks.countdown, {"seconds": 3})
TALLY = (tasks.tally, {"title": "fruit", "words": ["apple", "pear", "apple"]})
TWO_JOBS = pytest.mark.parametrize(
    ("actor", "arguments"), [COUNTDOWN, TALLY], ids=["countdown(int)", "tally(str, list)"]
)


# -- Events of every status, for two jobs with different arguments --------------------


@TWO_JOBS
def test_a_job_that_returns_is_started_then_progresses_then_succeeds(
    clock: Clock, actor: dramatiq.Actor[..., None], arguments: dict[str, Any]
) -> None:
    work(actor, arguments)

    events = published()
    assert [event.event for event in events] == ["started", "progress", "progress", "succeeded"]
    assert [(event.done, event.total) for event in events] == [(0, 0), (1, 3), (2, 3), (3, 3)]
    assert {event.actor for event in events} == {actor.actor_name}
    view = board_after(events)
    assert (view.status, view.done, view.total, view.attempts) == ("succeeded", 3, 3, 1)


def test_a_tally_succeeds_with_its_result_and_last_message(clock: Clock) -> None:
    actor, arguments = TALLY
    work(actor, arguments)

    view = board_after(published())

    assert msgspec.json.decode(view.result) == {"title": "fruit", "counts": {"apple": 2, "pear": 1}}
    assert view.message == "counting 'apple'"


def test_a_countdown_keeps_its_seconds_and_remaining(clock: Clock) -> None:
    actor, arguments = COUNTDOWN
    work(actor, arguments)
    events = published()

    running = board_after(events[:2])
    finished = board_after(events)

    assert (running.seconds, running.remaining) == (3, 2)
    assert (finished.seconds, finished.remaining) == (3, 0)


@TWO_JOBS
def test_a_job_cancelled_while_it_runs_stops_at_its_next_report(
    clock: Clock, actor: dramatiq.Actor[..., None], arguments: dict[str, Any]
) -> None:
    message = actor.message_with_options(kwargs=arguments)
    clock.after(1.5, lambda: tasks.cancellations.cancelled.__setitem__(message.message_id, clock.now))

    work(actor, arguments, message=message)

    events = published()
    assert [event.event for event in events] == ["started", "progress", "cancelled"]
    view = board_after(events)
    assert (view.status, view.done, view.total) == ("cancelled", 1, 3)


@TWO_JOBS
def test_a_job_cancelled_before_it_starts_never_runs(
    clock: Clock, actor: dramatiq.Actor[..., None], arguments: dict[str, Any]
) -> None:
    message = actor.message_with_options(kwargs=arguments)
    tasks.cancellations.cancelled[message.message_id] = clock.now
    CurrentMessage().before_process_message(tasks.broker, MessageProxy(message))  # type: ignore[no-untyped-call]

    with pytest.raises(SkipMessage):
        tasks.task_runs.before_process_message(tasks.broker, MessageProxy(message))

    [event] = published()
    assert (event.event, event.actor, event.id) == ("cancelled", actor.actor_name, message.message_id)


@TWO_JOBS
def test_a_failed_attempt_is_retrying_and_the_last_one_failed(
    clock: Clock, actor: dramatiq.Actor[..., None], arguments: dict[str, Any]
) -> None:
    failing = failing_attempt(clock, actor, arguments)
    message = work(actor, failing, last=False)
    retrying = published()
    failing = failing_attempt(clock, actor, arguments)
    work(actor, failing, message=message)
    failed = published()

    assert [event.event for event in retrying] == ["started", "progress", "retrying"]
    waiting = board_after(retrying)
    assert (waiting.status, waiting.attempts) == ("retrying", 1)
    assert waiting.error is not None
    final = board_after(retrying + failed)
    assert (final.status, final.attempts, final.error) == ("failed", 2, waiting.error)


def failing_attempt(clock: Clock, actor: dramatiq.Actor[..., None], arguments: dict[str, Any]) -> dict[str, Any]:
    """Arguments whose attempt fails after one progress event."""
    if actor is tasks.tally:
        return {**arguments, "words": ["apple", "fail"]}

    # The countdown cannot fail by itself: Dramatiq's time limit interrupts it, as here.
    def time_out() -> None:
        raise TimeLimitExceeded

    clock.after(1.5, time_out)
    return arguments


def test_a_failed_attempt_keeps_its_exception_type_and_message(clock: Clock) -> None:
    work(tasks.tally, {"title": "oops", "words": ["fail"]})

    view = board_after(published())

    assert view.error == tasks.TaskError("ValueError", "oops: cannot count 'fail'")


def test_an_error_message_carrying_the_broker_password_or_the_token_is_redacted(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    password, token = "s3cret-p@ss", "a-long-enough-test-token"
    monkeypatch.setattr(
        tasks.task_runs,
        "settings",
        msgspec.structs.replace(tasks.settings, cloudamqp_url="amqp://app:s3cret-p%40ss@rabbit/", api_token=token),
    )

    work(tasks.tally, {"title": f"login app:{password} with {token}", "words": ["fail"]})

    body = msgspec.json.encode(published())
    assert password.encode() not in body
    assert token.encode() not in body
    assert b"login app:*** with ***: cannot count 'fail'" in body


# -- Results and their size limit -------------------------------------------------------

RESULT = {"title": "fruit", "counts": {"apple": 2, "pear": 1}}


def test_a_result_of_exactly_result_max_bytes_is_kept(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = len(msgspec.json.encode(RESULT))
    monkeypatch.setattr(tasks, "settings", msgspec.structs.replace(tasks.settings, result_max_bytes=limit))

    work(*TALLY)

    view = board_after(published())
    assert view.status == "succeeded"
    assert msgspec.json.decode(view.result) == RESULT


def test_a_result_past_result_max_bytes_fails_the_task_without_a_retry(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = len(msgspec.json.encode(RESULT)) - 1
    monkeypatch.setattr(tasks, "settings", msgspec.structs.replace(tasks.settings, result_max_bytes=limit))

    work(*TALLY)

    view = board_after(published())
    assert view.status == "failed"
    assert view.error == tasks.TaskError(
        "ResultRefused", f"the result is {limit + 1} bytes of JSON; RESULT_MAX_BYTES allows {limit}"
    )
    assert issubclass(tasks.ResultRefused, tasks.tally.options["throws"])
    assert msgspec.json.decode(view.result) is None


def test_a_result_that_is_not_json_fails_the_task(clock: Clock) -> None:
    with pytest.raises(tasks.ResultRefused, match="the result is not JSON"):
        tasks.encode_result({1j})


# -- A batch with an event this process cannot read ---------------------------------------


def test_one_undecodable_event_in_a_batch_is_dropped_alone_counted_and_logged(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    good = msgspec.json.encode(tasks.TaskEvent("a", "started", clock.now, "countdown", total=5)).decode()
    other = msgspec.json.encode(tasks.TaskEvent("c", "progress", clock.now, "tally", done=1, total=2)).decode()
    bad = json.dumps({"id": "b", "event": "started", "at": clock.now, "actor": "report", "done": "half"})
    feed = caught_up(RecordingPublisher())

    hear(feed, f"[{good},{bad},{other}]".encode())

    assert {task_id: view.status for task_id, view in feed.board.tasks.items()} == {"a": "running", "c": "running"}
    assert feed.dropped_events == 1
    [warning] = [record.getMessage() for record in caplog.records if "ignored" in record.getMessage()]
    assert warning.startswith("ignored a task event of task 'b' that this process cannot read (1 so far): ")
    assert "$.done" in warning


def test_a_message_that_is_no_batch_at_all_is_dropped_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    feed = caught_up(RecordingPublisher())

    hear(feed, b"not json")

    assert (feed.board.tasks, feed.dropped_events) == ({}, 1)
    assert "ignored a batch of task events that this process cannot read (1 so far)" in caplog.text


# -- POST /jobs/{name}, in-process ---------------------------------------------------------


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def client(publisher: RecordingPublisher) -> Iterator[TestClient[Any]]:
    with TestClient(offline_app(publisher)) as client:
        yield client


def test_a_job_is_queued_with_its_arguments_and_points_to_its_status(
    client: TestClient[Any], publisher: RecordingPublisher
) -> None:
    response = client.post("/jobs/tally", json={"title": "fruit", "words": ["apple"]})

    assert response.status_code == 202
    accepted = response.json()
    assert (accepted["actor"], accepted["status"]) == ("tally", "queued")
    [message] = publisher.messages
    assert (message.actor_name, message.kwargs, message.message_id) == ("tally", TALLY_ONE, accepted["id"])
    view = client.get(response.headers["location"]).json()
    assert (view["actor"], view["status"], view["seconds"]) == ("tally", "queued", None)


TALLY_ONE = {"title": "fruit", "words": ["apple"]}


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"title": 5, "words": []}', "Expected `str`, got `int` - at `$.title`"),
        (b'{"title": "t", "words": "apple"}', "Expected `array`, got `str` - at `$.words`"),
        (b'{"title": "t"}', "Object missing required field `words`"),
        (b'{"title": "t", "words": [], "extra": 1}', "Object contains unknown field `extra`"),
        (b"[]", "Expected `object`, got `array`"),
        (b"{", "Input data was truncated"),
        (b"", "the body is empty; expected an object of the job's arguments"),
    ],
    ids=["wrong type", "not a list", "missing", "unknown field", "not an object", "malformed", "empty"],
)
def test_job_arguments_that_do_not_fit_its_function_are_a_400(
    client: TestClient[Any], publisher: RecordingPublisher, body: bytes, detail: str
) -> None:
    response = client.post("/jobs/tally", content=body, headers={"Content-Type": "application/json"})

    assert response.status_code == 400
    assert response.json()["detail"] == detail
    assert publisher.messages == []


def test_the_countdown_is_a_job_whose_arguments_keep_their_bounds(client: TestClient[Any]) -> None:
    assert client.post("/jobs/countdown", json={"seconds": 3}).status_code == 202
    assert (
        client.post("/jobs/countdown", json={"seconds": 0}).json()["detail"] == "Expected `int` >= 1 - at `$.seconds`"
    )


def test_an_unknown_job_is_a_404_that_lists_the_jobs(client: TestClient[Any]) -> None:
    response = client.post("/jobs/send_report", json={})

    assert response.status_code == 404
    assert response.json()["detail"] == "no job 'send_report'; the jobs are countdown, tally"


# -- The README's example, as written -------------------------------------------------------

README = (ROOT / "README.md").read_text()
SECTION = README.split("## Add your own job", 1)[1]


def readme_example() -> str:
    match = re.search(r"```python\n(.*?)```", SECTION, re.DOTALL)
    assert match is not None, "the section has no Python block"
    return match.group(1)


def readme_request() -> tuple[str, dict[str, Any], Any]:
    """The README's first POST: its path, its body, and the result it says the task ends with."""
    post = re.search(r"curl -s -X POST localhost:8000(/jobs/\w+) .* -d '(.*?)'", SECTION)
    result = re.search(r'"status":"succeeded".*?"result":', SECTION)
    assert post is not None and result is not None
    value, _ = json.JSONDecoder().raw_decode(SECTION, result.end())
    return post.group(1), json.loads(post.group(2)), value


def test_the_readme_example_is_the_job_in_tasks_py_as_written() -> None:
    assert readme_example() in (ROOT / "tasks.py").read_text()


# -- Real stacks, real RabbitMQ ---------------------------------------------------------------


@pytest.fixture(scope="module")
def two_stacks() -> Iterator[tuple[list[Process], str, str]]:
    """Two stacks on one queue (MAX_RETRIES=1: a failing job gives up at attempt 2)."""
    queue = f"test-{uuid.uuid4().hex[:10]}"
    started: list[Process] = []
    try:
        bases = []
        for _ in range(2):
            port = free_port()
            started.append(start_stack(PORT=port, QUEUE_NAME=queue, MAX_RETRIES=1, STOP_GRACE=1))
            bases.append(f"http://127.0.0.1:{port}")
        for stack, base in zip(started, bases, strict=True):
            wait_http(f"{base}/readyz", timeout=30)
            stack.wait_for(r"Worker process is ready for action")
        yield started, bases[0], bases[1]
    finally:
        for stack in started:
            stack.stop()
        delete_queues(queue)


def wait_for(base: str, task_id: str, done: Callable[[dict[str, Any]], bool], timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        view = httpx.get(f"{base}/tasks/{task_id}").json()
        if done(view):
            return dict(view)
        assert time.monotonic() < deadline, f"{task_id} is still {view} after {timeout} s"
        time.sleep(0.1)


def test_the_readme_example_succeeds_and_a_second_stack_reads_its_result(
    two_stacks: tuple[list[Process], str, str],
) -> None:
    _, first, second = two_stacks
    path, body, result = readme_request()

    task_id = httpx.post(f"{first}{path}", json=body).json()["id"]

    final = wait_for(second, task_id, lambda view: view["status"] in main.FINISHED)
    assert (final["status"], final["actor"], final["done"], final["total"]) == ("succeeded", "tally", 3, 3)
    assert final["result"] == result


def test_a_failing_job_shows_attempt_2_then_failed_with_its_message(two_stacks: tuple[list[Process], str, str]) -> None:
    stacks, base, _ = two_stacks

    task_id = httpx.post(f"{base}/jobs/tally", json={"title": "oops", "words": ["fail"]}).json()["id"]

    retried = wait_for(base, task_id, lambda view: view["attempts"] == 2)
    final = wait_for(base, task_id, lambda view: view["status"] in main.FINISHED)
    assert retried["status"] in {"running", "failed"}
    assert (final["status"], final["attempts"]) == ("failed", 2)
    assert final["error"] == {"type": "ValueError", "message": "oops: cannot count 'fail'"}
    # Either stack's worker may have run it.
    deadline = time.monotonic() + 10
    while not any(f"Retries exceeded for message '{task_id}'" in stack.output for stack in stacks):
        assert time.monotonic() < deadline, "no worker logged that it gave up"
        time.sleep(0.1)


def test_a_job_error_carrying_the_broker_password_reaches_neither_its_task_nor_the_log(
    two_stacks: tuple[list[Process], str, str],
) -> None:
    stacks, base, _ = two_stacks
    password = "guest"  # the stacks' broker URL is conftest's, guest:guest

    task_id = httpx.post(f"{base}/jobs/tally", json={"title": f"pw={password}", "words": ["fail"]}).json()["id"]

    final = wait_for(base, task_id, lambda view: view["status"] in main.FINISHED)
    assert final["error"] == {"type": "ValueError", "message": "pw=***: cannot count 'fail'"}
    deadline = time.monotonic() + 10
    while not any(f"Retries exceeded for message '{task_id}'" in stack.output for stack in stacks):
        assert time.monotonic() < deadline, "no worker logged that it gave up"
        time.sleep(0.1)
    logged = "\n".join(stack.output for stack in stacks)
    assert "pw=***: cannot count 'fail'" in logged  # Dramatiq's traceback of the attempt
    assert f"pw={password}" not in logged


def test_cancelling_the_example_job_mid_way_stops_it_at_its_next_report(
    two_stacks: tuple[list[Process], str, str],
) -> None:
    _, base, _ = two_stacks
    words = [f"word{number}" for number in range(30)]
    task_id = httpx.post(f"{base}/jobs/tally", json={"title": "long", "words": words}).json()["id"]
    wait_for(base, task_id, lambda view: view["done"] >= 1)

    cancelled_at = time.monotonic()
    assert httpx.delete(f"{base}/tasks/{task_id}").status_code == 202
    final = wait_for(base, task_id, lambda view: view["status"] in main.FINISHED)

    assert time.monotonic() - cancelled_at < 2.5
    assert final["status"] == "cancelled"
    assert 1 <= final["done"] < 30
    assert final["result"] is None
