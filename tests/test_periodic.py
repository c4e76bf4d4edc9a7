"""Periodic jobs: their ticks, their policies, and one scheduler however many
web processes run (tasks.py's @periodic, main.py's "Periodic jobs")."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dramatiq
import msgspec
import pika
import psutil
import pytest
from conftest import (
    MACHINE_BROKER,
    Broker,
    Process,
    copy_checkout,
    delete_queues,
    free_port,
    stack_env,
    stop_all,
    wait_http,
)
from cronsim import CronSimError
from litestar.testing import TestClient
from test_api import RecordingPublisher, offline_app

import main
import tasks

# -- Ticks --------------------------------------------------------------------------


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_an_interval_ticks_at_whole_multiples_of_it_since_the_epoch() -> None:
    every_minute = tasks.Periodic("p", "j", every=60)

    assert every_minute.next_tick(at("2026-12-04 03:00:30")) == at("2026-12-04 03:01:00")
    assert every_minute.next_tick(at("2026-12-04 03:01:00")) == at("2026-12-04 03:02:00")
    assert every_minute.last_tick(at("2026-12-04 03:01:00")) == at("2026-12-04 03:01:00")
    assert every_minute.last_tick(at("2026-12-04 03:01:59")) == at("2026-12-04 03:01:00")


def test_a_cron_schedule_ticks_at_its_times_in_utc() -> None:
    nightly = tasks.Periodic("p", "j", cron="0 3 * * *")

    assert nightly.next_tick(at("2026-12-04 02:59:59")) == at("2026-12-04 03:00:00")
    assert nightly.next_tick(at("2026-12-04 03:00:00")) == at("2026-12-05 03:00:00")
    assert nightly.last_tick(at("2026-12-04 03:00:00")) == at("2026-12-04 03:00:00")
    assert nightly.last_tick(at("2026-12-04 02:59:59")) == at("2026-12-03 03:00:00")


# -- Declaring ----------------------------------------------------------------------


@pytest.fixture
def declared() -> Iterator[None]:
    """Whatever a test declares is gone afterwards."""
    jobs, schedules = dict(tasks.jobs), dict(tasks.schedules)
    yield
    tasks.jobs.clear()
    tasks.jobs.update(jobs)
    tasks.schedules.clear()
    tasks.schedules.update(schedules)


def a_job() -> dramatiq.Actor[..., None]:
    """A job of a name of its own: Dramatiq's broker knows every actor by name."""

    def report(title: str = "daily") -> str:
        return title

    report.__name__ = f"report_{uuid.uuid4().hex[:8]}"
    return tasks.job(report)


def test_a_periodic_job_is_declared_above_its_job(declared: None) -> None:
    job = a_job()

    tasks.periodic(cron="0 3 * * *", arguments={"title": "nightly"})(job)

    assert tasks.schedules[job.actor_name] == tasks.Periodic(
        job.actor_name, job.actor_name, cron="0 3 * * *", arguments={"title": "nightly"}
    )


def test_two_schedules_of_one_job_have_names_of_their_own(declared: None) -> None:
    job = a_job()
    tasks.periodic(every=60)(job)

    tasks.periodic(every=3600, name="hourly")(job)
    with pytest.raises(ValueError, match="two periodic schedules named"):
        tasks.periodic(every=3600)(job)

    assert {tasks.schedules[job.actor_name].every, tasks.schedules["hourly"].every} == {60, 3600}


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"every": 60, "cron": "* * * * *"}, "takes every= or cron=, one of them"),
        ({}, "takes every= or cron=, one of them"),
        ({"every": 0}, "every= is at least 1 second"),
        ({"every": 60, "arguments": {"title": 3}}, "Expected `str`, got `int` - at `\\$.title`"),
        ({"every": 60, "arguments": {"words": []}}, "Object contains unknown field `words`"),
    ],
)
def test_a_schedule_that_cannot_run_stops_the_declaration(declared: None, options: dict[str, Any], error: str) -> None:
    job = a_job()

    with pytest.raises(ValueError, match=error):
        tasks.periodic(**options)(job)

    assert job.actor_name not in tasks.schedules


def test_a_bad_cron_expression_stops_the_declaration(declared: None) -> None:
    with pytest.raises(CronSimError, match="Bad minute"):
        tasks.periodic(cron="61 * * * *")(a_job())


def test_periodic_goes_above_job(declared: None) -> None:
    def plain() -> None:
        """Not a @job: no status, no route."""

    plain.__name__ = f"plain_{uuid.uuid4().hex[:8]}"

    with pytest.raises(TypeError, match="@periodic goes above @job"):
        tasks.periodic(every=60)(dramatiq.actor(plain))


# -- The board knows each job's last tick --------------------------------------------


def queued_tick(name: str, tick: float, task_id: str = "") -> tasks.TaskEvent:
    task_id = task_id or f"{name}-{tick}"
    return tasks.TaskEvent(task_id, "queued", time.time(), "report", periodic=name, tick=tick)


def test_a_ticks_queued_event_is_the_jobs_last_tick_and_an_older_one_is_not() -> None:
    board = main.TaskBoard(tasks.settings)

    board.apply(queued_tick("nightly", 200.0))
    board.apply(queued_tick("nightly", 100.0))

    assert board.ticks["nightly"] == main.Tick(200.0, "nightly-200.0")
    assert board.tasks["nightly-200.0"].periodic == "nightly"


def test_a_snapshot_carries_each_jobs_last_tick() -> None:
    board = main.TaskBoard(tasks.settings)
    board.apply(queued_tick("nightly", 200.0))
    compressed = zlib.compress(main.encode_snapshot(main.Cut("cut", time.time(), 1), board))

    snapshot = main.decode_snapshot(compressed)
    assert snapshot is not None
    after = main.TaskBoard(tasks.settings)
    after.load(snapshot.tasks, snapshot.ticks)

    assert after.ticks == {"nightly": main.Tick(200.0, "nightly-200.0")}


# -- Policies: a tick missed while no scheduler ran, a tick while the last run goes on --


MINUTELY = tasks.Periodic("minutely", "report", every=60)


def test_a_scheduler_that_takes_over_runs_the_latest_missed_tick_once() -> None:
    last = main.Tick(at("2026-12-04 03:00:00"), "t")

    assert main.first_tick(MINUTELY, last, at("2026-12-04 03:05:30")) == at("2026-12-04 03:05:00")


def test_with_missed_skip_a_scheduler_that_takes_over_runs_no_missed_tick() -> None:
    skipping = msgspec.structs.replace(MINUTELY, missed="skip")
    last = main.Tick(at("2026-12-04 03:00:00"), "t")

    assert main.first_tick(skipping, last, at("2026-12-04 03:05:30")) is None


def test_a_job_that_never_ran_starts_at_its_next_tick() -> None:
    assert main.first_tick(MINUTELY, None, at("2026-12-04 03:05:30")) is None


def test_a_job_whose_last_tick_ran_has_nothing_missed() -> None:
    last = main.Tick(at("2026-12-04 03:05:00"), "t")

    assert main.first_tick(MINUTELY, last, at("2026-12-04 03:05:30")) is None


class TickRecorder(main.EventsFeed):
    """Takes every event and message as confirmed, or fails the event as told."""

    publisher: RecordingPublisher

    def __init__(self, settings: tasks.Settings = tasks.settings) -> None:
        super().__init__(RecordingPublisher(settings))
        self.caught_up.set()
        self.recorded: list[tasks.TaskEvent] = []
        self.event_failure: main.BrokerUnavailable | None = None

    async def record(self, event: tasks.TaskEvent) -> None:
        if self.event_failure is not None:
            raise self.event_failure
        self.recorded.append(event)
        self.board.apply(event)


@pytest.fixture
def report(declared: None) -> tasks.Periodic:
    job = a_job()
    tasks.periodic(every=60, arguments={"title": "minutely"})(job)
    return tasks.schedules[job.actor_name]


def fire(recorder: TickRecorder, schedule: tasks.Periodic, tick: float) -> main.Scheduler:
    scheduler = main.Scheduler(recorder.publisher, recorder)
    asyncio.run(scheduler.fire(schedule, tick))
    return scheduler


def test_a_tick_queues_its_event_then_its_task_under_one_id(report: tasks.Periodic) -> None:
    recorder = TickRecorder()

    fire(recorder, report, 600.0)

    [event], [message] = recorder.recorded, recorder.publisher.messages
    assert (event.event, event.periodic, event.tick) == ("queued", report.name, 600.0)
    assert message.message_id == event.id == main.tick_task_id(tasks.settings, report, 600.0)
    assert (message.actor_name, message.kwargs) == (report.job, {"title": "minutely"})


def test_every_web_process_names_a_ticks_task_alike() -> None:
    ids = {main.tick_task_id(tasks.settings, MINUTELY, 600.0) for _ in range(2)}

    assert len(ids) == 1
    assert ids != {main.tick_task_id(tasks.settings, MINUTELY, 660.0)}


def test_a_tick_whose_event_the_broker_did_not_confirm_queues_no_task(report: tasks.Periodic) -> None:
    recorder = TickRecorder()
    recorder.event_failure = main.BrokerUnavailable("the broker did not confirm within 2 s")

    scheduler = fire(recorder, report, 600.0)

    assert recorder.publisher.messages == []
    assert scheduler.handled[report.name] == 600.0  # lost, never tried again


def test_a_tick_while_the_last_run_goes_on_is_skipped(report: tasks.Periodic) -> None:
    recorder = TickRecorder()
    fire(recorder, report, 600.0)
    recorder.board.apply(tasks.TaskEvent(recorder.recorded[0].id, "started", time.time(), report.job))

    fire(recorder, report, 660.0)

    assert len(recorder.publisher.messages) == 1


def test_with_overlap_run_a_tick_while_the_last_run_goes_on_is_queued(report: tasks.Periodic) -> None:
    recorder = TickRecorder()
    overlapping = msgspec.structs.replace(report, overlap="run")
    fire(recorder, overlapping, 600.0)
    recorder.board.apply(tasks.TaskEvent(recorder.recorded[0].id, "started", time.time(), report.job))

    fire(recorder, overlapping, 660.0)

    assert len(recorder.publisher.messages) == 2


def test_a_tick_after_the_last_run_ended_is_queued(report: tasks.Periodic) -> None:
    recorder = TickRecorder()
    fire(recorder, report, 600.0)
    recorder.board.apply(tasks.TaskEvent(recorder.recorded[0].id, "succeeded", time.time(), report.job))

    fire(recorder, report, 660.0)

    assert len(recorder.publisher.messages) == 2


# -- GET /schedules ----------------------------------------------------------------


def test_the_schedules_list_each_job_with_its_next_tick_and_last_run(report: tasks.Periodic) -> None:
    recorder = TickRecorder()
    fire(recorder, report, 600.0)
    with TestClient(offline_app(recorder.publisher, recorder)) as client:
        response = client.get("/schedules")

    [listed] = response.json()["items"]
    assert (listed["name"], listed["every"], listed["cron"]) == (report.name, 60, None)
    assert (listed["missed"], listed["overlap"]) == ("latest", "skip")
    assert datetime.fromisoformat(listed["next_at"]).timestamp() == report.next_tick(time.time())
    assert datetime.fromisoformat(listed["last_tick_at"]).timestamp() == 600.0
    assert listed["last_run"]["status"] == "queued"
    assert response.json()["runs_here"] is False


def test_the_schedules_need_the_api_token_when_one_is_set(report: tasks.Periodic) -> None:
    recorder = TickRecorder(msgspec.structs.replace(tasks.settings, api_token="a-long-enough-test-token"))
    with TestClient(offline_app(recorder.publisher, recorder)) as client:
        assert client.get("/schedules").status_code == 401


# -- Real stacks: one scheduler among many, handing over ------------------------------
#
# A copy of the service with a job that ticks every second, declared as a
# user declares one; each stack is supervisord, as the container runs it.

BEAT = '''
@periodic(every=1)
@job
def beat() -> None:
    """The trials' periodic job: it only runs."""


'''
TAKES_OVER = "this web process runs the periodic jobs"


@pytest.fixture(scope="module")
def beating(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("beating")
    copy_checkout(directory, skip=("tests/", "bench/", "docs/"))
    source = (directory / "tasks.py").read_text()
    (directory / "tasks.py").write_text(
        source.replace("# What the RELOAD setting watches.", BEAT + "# What the RELOAD setting watches.")
    )
    return directory


def beating_stack(directory: Path, broker: Broker, queue: str) -> tuple[Process, str]:
    port = free_port()
    command = [sys.executable, str(directory / "supervise.py"), "-c", str(directory / "supervisord.conf")]
    stack = Process(command, stack_env(PORT=port, QUEUE_NAME=queue, CLOUDAMQP_URL=broker.url), cwd=directory)
    return stack, f"http://127.0.0.1:{port}"


def kill_outright(stack: Process) -> None:
    """A container that dies: every process of the stack SIGKILLed at once."""
    root = psutil.Process(stack.popen.pid)
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    stack.wait(10)


class Beats(msgspec.Struct):
    """What the events stream says of the beat's ticks."""

    queued: dict[float, list[str]]  # tick -> the tasks queued for it
    started: dict[str, int]  # task -> attempts started

    def doubled(self) -> list[float]:
        return [tick for tick, ids in self.queued.items() if len(ids) > 1]

    def skipped(self, first: float, last: float) -> list[float]:
        return [float(tick) for tick in range(int(first), int(last) + 1) if float(tick) not in self.queued]


def beats(broker: Broker, queue: str) -> Beats:
    """Every beat tick queued and every run started, read from the events stream's start up to a marker."""
    found = Beats({}, {})
    marker = str(uuid.uuid4())
    connection = pika.BlockingConnection(pika.URLParameters(broker.url))
    try:
        channel = connection.channel()
        stream = f"{queue}.events"
        channel.basic_publish("", stream, b"", pika.BasicProperties(type=tasks.SYNC, message_id=marker))
        channel.basic_qos(prefetch_count=100)
        for method, properties, body in channel.consume(
            stream, arguments={"x-stream-offset": "first"}, inactivity_timeout=30
        ):
            assert method is not None, "the marker did not come back in 30 s"
            channel.basic_ack(method.delivery_tag)
            if properties.message_id == marker:
                break
            if properties.type:
                continue
            for event in msgspec.json.decode(body, type=list[tasks.TaskEvent]):
                if event.periodic == "beat":
                    found.queued.setdefault(event.tick, []).append(event.id)
                elif event.event == "started" and event.actor == "beat":
                    found.started[event.id] = found.started.get(event.id, 0) + 1
        channel.cancel()
    finally:
        connection.close()
    return found


def leader_of(running: list[Process], timeout: float = 30) -> Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leaders = [stack for stack in running if TAKES_OVER in stack.output]
        if leaders:
            assert len(leaders) == 1, "two web processes took the scheduler's queue"
            return leaders[0]
        time.sleep(0.1)
    raise AssertionError("no web process runs the periodic jobs")


def logged_at(line: str) -> float:
    """The time of a web process's log line (local time, to the millisecond)."""
    return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()


class Trial(msgspec.Struct):
    beats: Beats
    killed: float
    taken_over: float  # when another web process took the scheduler's queue


def trial(beating: Path, broker: Broker, queue: str, stacks: list[Process], before: float, after: float) -> Trial:
    """Three stacks on one queue; after ``before`` seconds the one that schedules is killed outright."""
    running = []
    for _ in range(3):
        stack, base = beating_stack(beating, broker, queue)
        stacks.append(stack)
        running.append((stack, base))
    for _, base in running:
        wait_http(f"{base}/readyz", timeout=60)
    leader = leader_of([stack for stack, _ in running])
    time.sleep(before)
    killed = time.time()
    kill_outright(leader)
    successor = leader_of([stack for stack, _ in running if stack is not leader])
    taken_over = logged_at(next(line for line in successor.lines if TAKES_OVER in line))
    time.sleep(after)
    for stack, _ in running:
        if stack is not leader:
            stack.stop()
    return Trial(beats(broker, queue), killed, taken_over)


# A killed process's connection closes at once: the next try (every 2 s) takes the queue.
HANDOVER_SECONDS = main.SCHEDULER_RETRY_SECONDS + 2
# The ticks of the handover, but the latest of them (missed="latest").
MOST_SKIPPED = int(HANDOVER_SECONDS)


def judge(result: Trial) -> None:
    ticks = sorted(result.beats.queued)
    skipped = result.beats.skipped(ticks[0], ticks[-1])
    runs = list(result.beats.started.values())
    print(
        f"{len(ticks)} ticks queued, {len(result.beats.doubled())} doubled, {len(skipped)} skipped {skipped}, "
        f"runs per tick {min(runs)}-{max(runs)}, handover {result.taken_over - result.killed:.2f} s"
    )
    assert result.beats.doubled() == []
    assert runs and max(runs) == 1
    assert result.taken_over - result.killed <= HANDOVER_SECONDS
    assert len(skipped) <= MOST_SKIPPED
    assert all(result.killed - 1 <= tick <= result.taken_over for tick in skipped)


def test_three_stacks_run_each_tick_once_and_another_takes_over_when_the_scheduler_dies(
    beating: Path, broker4: Broker, stacks: list[Process]
) -> None:
    queue = f"test-{uuid.uuid4().hex[:10]}"
    try:
        judge(trial(beating, broker4, queue, stacks, before=6, after=6))
    finally:
        stop_all(stacks)
        delete_queues(queue, broker4.url)


@pytest.mark.slow
def test_three_stacks_for_two_minutes_run_each_tick_once_across_the_schedulers_death(
    beating: Path, broker: Broker, broker_queue: str, stacks: list[Process]
) -> None:
    judge(trial(beating, broker, broker_queue, stacks, before=60, after=60))


def test_a_tick_missed_while_everything_was_down_runs_once_when_a_stack_is_back(
    beating: Path, queue_name: str, stacks: list[Process]
) -> None:
    stack, base = beating_stack(beating, MACHINE_BROKER, queue_name)
    stacks.append(stack)
    wait_http(f"{base}/readyz", timeout=60)
    stack.wait_for(r"periodic job beat: tick \S+ queued", timeout=30)
    stack.stop()
    time.sleep(5)

    stack, base = beating_stack(beating, MACHINE_BROKER, queue_name)
    stacks.append(stack)
    taken_over = logged_at(stack.wait_for(TAKES_OVER, timeout=60).string)
    stack.wait_for(r"periodic job beat: tick \S+ queued", timeout=30)
    stack.stop()

    ticks = sorted(beats(MACHINE_BROKER, queue_name).queued)
    down = max(range(len(ticks) - 1), key=lambda index: ticks[index + 1] - ticks[index])
    last_before, first_after = ticks[down], ticks[down + 1]
    # Five seconds down and more: of their ticks, only the latest at the take-over ran.
    assert first_after - last_before >= 5
    assert taken_over - 1 < first_after <= taken_over + 0.5
