"""Faults: a 202 is a promise that the countdown runs, whatever breaks.

Each test runs the whole stack (supervisord, granian, the worker) against a
private RabbitMQ node, through a TCP proxy that can cut or black-hole the
network. Clients POST one-second countdowns continuously while one thing
breaks; afterwards every task id that got a 202 must have its
``task <id> done`` line. Each trial prints its figures and adds them to
/tmp/onebox-faults.json: tasks accepted, completed and lost, the longest
answer while the fault lasted, and the seconds to recover after it ended.
``-m slow`` repeats every fault three times.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import dramatiq
import httpx
import pika
import psutil
import pytest
from conftest import Process, TcpProxy, free_port, program_process, require_tool, start_stack, wait_http
from rabbit_node import RabbitContainer, RabbitNode

HEARTBEAT = 2
PUBLISH_TIMEOUT = 2
# While the broker is away, POST answers 503 at once; a publish on a
# connection that went silent waits PUBLISH_TIMEOUT for its confirm first.
ANSWER_BOUND = PUBLISH_TIMEOUT + 1
# aiormq gives up on a connection after three (heartbeat + 1) s windows
# without a frame; its heartbeat task checks once a second, and closing
# takes a moment more.
WEB_DETECTION_BOUND = 3 * (HEARTBEAT + 1) + 2
# pika checks for incoming bytes every heartbeat + 5 s and closes the
# connection after one whole check interval without any: up to two
# intervals, and a moment to close.
WORKER_DETECTION_BOUND = 2 * (HEARTBEAT + 5) + 1
# How long each broker fault lasts: the fault itself, not a wait for anything.
OUTAGE_SECONDS = 3.0
RATE = 20
REQUEST_TIMEOUT = 15.0
FIGURES = Path("/tmp/onebox-faults.json")

LOGGED_AT = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")
STARTED = re.compile(r"task (\S+) started seconds=\d+ attempt=\d+ redelivered=(yes|no)")
DONE = re.compile(r"task (\S+) done seconds=")


# -- The load -----------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    sent: float  # time.monotonic()
    elapsed: float
    status: int | None  # None: no HTTP answer at all
    task_id: str | None = None
    problem: dict[str, Any] | None = None
    content_type: str = ""
    retry_after: str | None = None
    error: str = ""


class Load:
    """POSTs a one-second countdown RATE times a second, in the background."""

    def __init__(self, base: str, rate: float = RATE) -> None:
        self.base = base
        self.rate = rate
        self.answers: list[Answer] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopping.set()
        self._thread.join(REQUEST_TIMEOUT + 10)

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.base, timeout=REQUEST_TIMEOUT) as client:
            pending: set[asyncio.Task[None]] = set()
            next_at = time.monotonic()
            while not self._stopping.is_set():
                request = asyncio.create_task(self._post(client))
                pending.add(request)
                request.add_done_callback(pending.discard)
                next_at += 1 / self.rate
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if pending:
                await asyncio.wait(pending)

    async def _post(self, client: httpx.AsyncClient) -> None:
        sent = time.monotonic()
        try:
            response = await client.post("/tasks", json={"seconds": 1})
        except httpx.HTTPError as error:
            self.answers.append(Answer(sent, time.monotonic() - sent, None, error=repr(error)))
            return
        elapsed = time.monotonic() - sent
        content_type = response.headers.get("content-type", "")
        body = response.json() if "json" in content_type else None
        accepted = response.status_code == 202
        self.answers.append(
            Answer(
                sent,
                elapsed,
                response.status_code,
                task_id=body["id"] if accepted and body else None,
                problem=None if accepted else body,
                content_type=content_type,
                retry_after=response.headers.get("retry-after"),
            )
        )

    def accepted(self) -> set[str]:
        return {answer.task_id for answer in list(self.answers) if answer.task_id}

    def wait_for(self, condition: Callable[[Answer], bool], what: str, timeout: float = 30) -> Answer:
        """The first answer, in order of sending, that meets ``condition``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            matching = [answer for answer in list(self.answers) if condition(answer)]
            if matching:
                return min(matching, key=lambda answer: answer.sent)
            time.sleep(0.05)
        raise AssertionError(f"no answer {what} in {timeout} s; last answers: {self.answers[-5:]}")

    def wait_accepted(self, count: int, after: float = 0.0) -> None:
        """Until ``count`` POSTs sent after ``after`` have been accepted."""
        deadline = time.monotonic() + 30
        while sum(1 for answer in list(self.answers) if answer.task_id and answer.sent >= after) < count:
            assert time.monotonic() < deadline, f"fewer than {count} POSTs accepted in 30 s: {self.answers[-5:]}"
            time.sleep(0.05)


def post(base: str, seconds: int) -> str:
    response = httpx.post(f"{base}/tasks", json={"seconds": seconds}, timeout=REQUEST_TIMEOUT)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


# -- The worker's log -----------------------------------------------------------------


def monotonic_at(line: str) -> float:
    """When a line was logged, on the time.monotonic() clock."""
    match = LOGGED_AT.search(line)
    assert match, f"no timestamp in {line!r}"
    logged = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return logged - (time.time() - time.monotonic())


@dataclass
class Worklog:
    """Every start and completion the worker logged so far."""

    starts: dict[str, list[tuple[float, bool]]] = field(default_factory=dict)
    done: dict[str, int] = field(default_factory=dict)

    @classmethod
    def read(cls, stack: Process) -> Worklog:
        log = cls()
        for line in list(stack.lines):
            if started := STARTED.search(line):
                log.starts.setdefault(started[1], []).append((monotonic_at(line), started[2] == "yes"))
            elif done := DONE.search(line):
                log.done[done[1]] = log.done.get(done[1], 0) + 1
        return log


def wait_until_done(stack: Process, task_ids: set[str], timeout: float = 60) -> Worklog:
    """The worker's log once every task in ``task_ids`` is done, or at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        log = Worklog.read(stack)
        if task_ids <= log.done.keys() or time.monotonic() > deadline:
            return log
        time.sleep(0.2)


# -- The rig: a private broker, a proxy, the stack ---------------------------------------


# The machine's RabbitMQ 3.10, as a private node; or RabbitMQ 4.0.5 in a container.
Node = RabbitNode | RabbitContainer


@dataclass
class Rig:
    rabbit: Node
    proxy: TcpProxy
    stack: Process
    base: str
    queue: str

    def program(self, name: str) -> psutil.Process:
        """The process supervisord runs for ``python tasks.py <name>``."""
        return program_process(self.stack, name)


@contextmanager
def running_rig(rabbit: Node) -> Iterator[Rig]:
    """The whole stack, reaching the private node through a proxy."""
    proxy = TcpProxy(rabbit.port)
    queue = f"fault-{uuid.uuid4().hex[:10]}"
    port = free_port()
    stack = start_stack(
        PORT=port,
        QUEUE_NAME=queue,
        CLOUDAMQP_URL=proxy.url(),
        HEARTBEAT=HEARTBEAT,
        PUBLISH_TIMEOUT=PUBLISH_TIMEOUT,
        # Countdowns of one second at RATE a second, plus redeliveries after a fault.
        WORKER_THREADS=32,
        QUEUE_PREFETCH=64,
        STOP_GRACE=2,
        # All the load comes from this one address.
        RATE_LIMIT_PER_MINUTE=0,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{base}/readyz", timeout=30)
        except AssertionError as error:
            raise AssertionError(f"{error}; output:\n{stack.tail}") from None
        stack.wait_for("Worker process is ready for action", timeout=30)
        yield Rig(rabbit, proxy, stack, base, queue)
    finally:
        # Stop the stack while its broker is still reachable, then the proxy.
        stack.stop()
        proxy.close()


@pytest.fixture(scope="module")
def rabbit() -> Iterator[RabbitNode]:
    require_tool("rabbitmq-server")
    node = RabbitNode()
    try:
        seconds = node.start()
        print(f"\nprivate RabbitMQ node {node.name} on port {node.port} started in {seconds:.1f} s")
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def rabbit4() -> Iterator[RabbitContainer]:
    """A private RabbitMQ 4.0.5 node, the version CloudAMQP's free plan runs."""
    node = RabbitContainer(require_tool("podman"))
    try:
        seconds = node.start()
        print(f"\nprivate RabbitMQ 4.0.5 node {node.name} on port {node.port} started in {seconds:.1f} s")
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def figures() -> Iterator[list[dict[str, Any]]]:
    trials: list[dict[str, Any]] = []
    yield trials
    FIGURES.write_text(json.dumps(trials, indent=2) + "\n")


@pytest.fixture
def rig(rabbit: RabbitNode) -> Iterator[Rig]:
    with running_rig(rabbit) as rig:
        yield rig


# -- The trials ----------------------------------------------------------------------------


@dataclass
class Trial:
    fault: str
    accepted: int
    completed: int
    lost: int
    # How the POSTs sent or answered while the fault lasted were answered;
    # "none" counts those that got no HTTP answer at all.
    answers_during_fault: dict[str, int]
    longest_answer_during_fault: float
    # How the answers slower than ANSWER_BOUND were answered.
    slow_answers: dict[str, int]
    # From the end of the fault to the first 202, and to the first countdown
    # started for a POST sent after it.
    recovery_seconds: float
    worker_recovery_seconds: float
    details: dict[str, float] = field(default_factory=dict)


def conclude(
    fault: str,
    rig: Rig,
    load: Load,
    start: float,
    end: float,
    figures: list[dict[str, Any]],
    reruns_are_redeliveries: bool = True,
    **details: float,
) -> Trial:
    """Wait for the work accepted under ``load``, and tell what became of it."""
    answers = list(load.answers)
    accepted = load.accepted()
    during = [answer for answer in answers if answer.sent <= end and answer.sent + answer.elapsed >= start]
    after = [answer for answer in answers if answer.task_id and answer.sent >= end]
    log = wait_until_done(rig.stack, accepted)
    completed = accepted & log.done.keys()
    first_start_after = min(
        (when for answer in after for when, _ in log.starts.get(str(answer.task_id), [])), default=float("nan")
    )
    trial = Trial(
        fault=fault,
        accepted=len(accepted),
        completed=len(completed),
        lost=len(accepted - completed),
        answers_during_fault=dict(Counter(str(answer.status).lower() for answer in during)),
        longest_answer_during_fault=round(max((answer.elapsed for answer in during), default=0.0), 3),
        slow_answers=dict(Counter(str(answer.status).lower() for answer in during if answer.elapsed > ANSWER_BOUND)),
        recovery_seconds=round(min(answer.sent + answer.elapsed for answer in after) - end, 3),
        worker_recovery_seconds=round(first_start_after - end, 3),
        details={name: round(value, 3) for name, value in details.items()},
    )
    print(f"\n{fault}: {json.dumps(asdict(trial))}")
    figures.append(asdict(trial))
    if reruns_are_redeliveries:
        # A message that RabbitMQ hands out again carries its redelivered flag.
        for task_id, starts in log.starts.items():
            assert all(redelivered for _, redelivered in starts[1:]), f"task {task_id} re-ran unmarked: {starts}"
    return trial


def assert_refusals_are_prompt_and_explained(load: Load, start: float, end: float) -> None:
    """While the broker is away, POST answers 503 with a reason, within the bound."""
    refusals = [answer for answer in load.answers if answer.status == 503 and start <= answer.sent <= end]
    assert refusals, "no POST was refused while the broker was away"
    for answer in refusals:
        assert answer.content_type.startswith("application/problem+json")
        assert answer.problem is not None and answer.problem["status"] == 503
        assert answer.problem["detail"]
        assert answer.retry_after == "1"
        assert answer.elapsed <= ANSWER_BOUND


def broker_restart(rig: Rig, figures: list[dict[str, Any]]) -> Trial:
    with Load(rig.base) as load:
        load.wait_accepted(10)
        start = time.monotonic()
        rig.rabbit.stop_app()
        try:
            load.wait_for(lambda answer: answer.sent > start and answer.status == 503, "503 while the broker is down")
            time.sleep(OUTAGE_SECONDS)
        finally:
            rig.rabbit.start_app()
        end = time.monotonic()
        load.wait_accepted(20, after=end)
    assert_refusals_are_prompt_and_explained(load, start, end)
    return conclude("broker restart", rig, load, start, end, figures)


def network_cut(rig: Rig, figures: list[dict[str, Any]]) -> Trial:
    with Load(rig.base) as load:
        load.wait_accepted(10)
        start = time.monotonic()
        rig.proxy.cut()
        try:
            load.wait_for(lambda answer: answer.sent > start and answer.status == 503, "503 while the network is cut")
            time.sleep(OUTAGE_SECONDS)
        finally:
            rig.proxy.restore()
        end = time.monotonic()
        load.wait_accepted(20, after=end)
    assert_refusals_are_prompt_and_explained(load, start, end)
    return conclude("network cut", rig, load, start, end, figures)


def network_black_hole(rig: Rig, figures: list[dict[str, Any]]) -> Trial:
    """Silence every connection; the heartbeats must notice it, on both sides."""
    consumer_error = "ConsumerThread\\({}\\).*Consumer encountered a connection error"
    with Load(rig.base) as load:
        load.wait_accepted(10)
        mark = len(rig.stack.lines)
        start = time.monotonic()
        rig.proxy.blackhole()
        try:
            timeout = WORKER_DETECTION_BOUND + 10
            web = rig.stack.wait_for(r"\[onebox\] \[WARNING\] the broker connection was lost", timeout, mark)
            workers = [
                rig.stack.wait_for(consumer_error.format(re.escape(queue)), timeout, mark)
                for queue in (rig.queue, f"{rig.queue}.DQ")
            ]
        finally:
            rig.proxy.restore()
        end = time.monotonic()
        load.wait_accepted(20, after=end)
    assert_refusals_are_prompt_and_explained(load, start, end)
    return conclude(
        "network black hole",
        rig,
        load,
        start,
        end,
        figures,
        web_detection_seconds=monotonic_at(web.string) - start,
        worker_detection_seconds=max(monotonic_at(line.string) for line in workers) - start,
    )


def worker_killed(rig: Rig, figures: list[dict[str, Any]]) -> Trial:
    """SIGKILL the process running a countdown: RabbitMQ hands the task out again."""
    with Load(rig.base) as load:
        load.wait_accepted(10)
        task_id = post(rig.base, 3)
        rig.stack.wait_for(rf"task {task_id} started seconds=3 attempt=1 redelivered=no")
        mark = len(rig.stack.lines)
        start = time.monotonic()
        rig.program("worker").kill()
        rig.stack.wait_for(r"spawned: 'worker'", 30, mark)
        again = rig.stack.wait_for(rf"task {task_id} started seconds=3 attempt=1 redelivered=yes", 60, mark)
        end = monotonic_at(again.string)
        rig.stack.wait_for(rf"task {task_id} done seconds=3", 10, mark)
        load.wait_accepted(20, after=end)
    return conclude("worker SIGKILL", rig, load, start, end, figures, redelivered_after_seconds=end - start)


def web_killed(rig: Rig, figures: list[dict[str, Any]]) -> Trial:
    """SIGKILL the web process: supervisord starts a new one."""
    with Load(rig.base) as load:
        load.wait_accepted(10)
        mark = len(rig.stack.lines)
        start = time.monotonic()
        rig.program("web").kill()
        rig.stack.wait_for(r"spawned: 'web'", 30, mark)
        load.wait_accepted(20, after=start)
    unanswered = sum(1 for answer in load.answers if answer.status is None)
    return conclude("web SIGKILL", rig, load, start, start, figures, unanswered_posts=unanswered)


def duplicate_delivery(rig: Rig, figures: list[dict[str, Any]]) -> Trial:
    """Publish one task's message twice, as an at-least-once broker may deliver it."""
    message: dramatiq.Message[None] = dramatiq.Message(
        queue_name=rig.queue, actor_name="countdown", args=(1,), kwargs={}, options={}
    )
    with Load(rig.base) as load:
        load.wait_accepted(10)
        start = time.monotonic()
        connection = pika.BlockingConnection(pika.URLParameters(rig.rabbit.url))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            for _ in range(2):
                channel.basic_publish(
                    "",
                    rig.queue,
                    message.encode(),
                    pika.BasicProperties(delivery_mode=2, message_id=message.message_id),
                    mandatory=True,
                )
        finally:
            connection.close()
        end = time.monotonic()
        load.wait_accepted(20, after=end)
    log = wait_until_done(rig.stack, {message.message_id}, timeout=10)
    runs = log.starts.get(message.message_id, [])
    return conclude(
        "duplicate delivery",
        rig,
        load,
        start,
        end,
        figures,
        reruns_are_redeliveries=False,
        duplicate_runs_done=log.done.get(message.message_id, 0),
        duplicate_runs_marked_redelivered=sum(redelivered for _, redelivered in runs),
    )


def connection_blocked(rig: Rig, figures: list[dict[str, Any]]) -> Trial:
    """A memory alarm: RabbitMQ blocks publishers and stops reading from them."""
    with Load(rig.base) as load:
        load.wait_accepted(10)
        mark = len(rig.stack.lines)
        start = time.monotonic()
        rig.rabbit.set_memory_watermark(0.000001)
        try:
            rig.stack.wait_for(r"was blocked by", 10, mark)
            load.wait_for(lambda answer: answer.sent > start and answer.status == 503, "503 while blocked")
            time.sleep(OUTAGE_SECONDS)
        finally:
            rig.rabbit.set_memory_watermark(0.4)
        end = time.monotonic()
        load.wait_accepted(20, after=end)
    assert_refusals_are_prompt_and_explained(load, start, end)
    return conclude("connection blocked", rig, load, start, end, figures)


FAULTS: dict[str, Callable[[Rig, list[dict[str, Any]]], Trial]] = {
    "broker restart": broker_restart,
    "network cut": network_cut,
    "network black hole": network_black_hole,
    "worker SIGKILL": worker_killed,
    "web SIGKILL": web_killed,
    "duplicate delivery": duplicate_delivery,
    "connection blocked": connection_blocked,
}


@pytest.fixture(scope="module")
def black_hole(rabbit: RabbitNode, figures: list[dict[str, Any]]) -> Trial:
    with running_rig(rabbit) as rig:
        return network_black_hole(rig, figures)


@pytest.fixture(scope="module")
def blocked(rabbit: RabbitNode, figures: list[dict[str, Any]]) -> Trial:
    with running_rig(rabbit) as rig:
        return connection_blocked(rig, figures)


@pytest.fixture(scope="module")
def web_kill(rabbit: RabbitNode, figures: list[dict[str, Any]]) -> Trial:
    with running_rig(rabbit) as rig:
        return web_killed(rig, figures)


@pytest.fixture
def rig4(rabbit4: RabbitContainer) -> Iterator[Rig]:
    with running_rig(rabbit4) as rig:
        yield rig


# -- The tests --------------------------------------------------------------------------------


def test_a_broker_restart_under_load_loses_no_accepted_task(rig: Rig, figures: list[dict[str, Any]]) -> None:
    trial = broker_restart(rig, figures)

    assert trial.lost == 0
    assert set(trial.answers_during_fault) <= {"202", "503"}
    assert trial.longest_answer_during_fault <= ANSWER_BOUND


def test_a_network_cut_loses_no_accepted_task(rig: Rig, figures: list[dict[str, Any]]) -> None:
    trial = network_cut(rig, figures)

    assert trial.lost == 0
    assert set(trial.answers_during_fault) <= {"202", "503"}
    assert trial.longest_answer_during_fault <= ANSWER_BOUND


def test_a_silent_network_is_detected_within_the_heartbeat_bounds(black_hole: Trial) -> None:
    assert black_hole.details["web_detection_seconds"] <= WEB_DETECTION_BOUND
    assert black_hole.details["worker_detection_seconds"] <= WORKER_DETECTION_BOUND


def test_a_silent_network_loses_no_accepted_task(black_hole: Trial) -> None:
    assert black_hole.lost == 0


def test_a_silent_network_gets_every_post_answered_within_the_bound(black_hole: Trial) -> None:
    assert black_hole.longest_answer_during_fault <= ANSWER_BOUND


def test_a_silent_network_answers_posts_202_or_503_never_500(black_hole: Trial) -> None:
    assert set(black_hole.answers_during_fault) <= {"202", "503"}


def test_a_worker_killed_mid_countdown_is_restarted_and_its_task_redelivered(
    rig: Rig, figures: list[dict[str, Any]]
) -> None:
    trial = worker_killed(rig, figures)

    assert trial.lost == 0
    assert trial.answers_during_fault == {"202": sum(trial.answers_during_fault.values())}


def test_a_killed_web_process_is_restarted_and_loses_no_accepted_task(web_kill: Trial) -> None:
    assert web_kill.lost == 0
    assert set(web_kill.answers_during_fault) <= {"202", "none"}


def test_the_same_message_delivered_twice_runs_twice_without_harm(rig: Rig, figures: list[dict[str, Any]]) -> None:
    trial = duplicate_delivery(rig, figures)

    assert trial.lost == 0
    assert trial.details["duplicate_runs_done"] == 2
    # A second copy is a new delivery, not RabbitMQ's redelivery.
    assert trial.details["duplicate_runs_marked_redelivered"] == 0


def test_a_blocked_broker_connection_loses_no_accepted_task(blocked: Trial) -> None:
    assert blocked.lost == 0
    assert set(blocked.answers_during_fault) <= {"202", "503"}


def test_a_blocked_broker_connection_gets_every_post_answered_within_the_bound(blocked: Trial) -> None:
    assert blocked.longest_answer_during_fault <= ANSWER_BOUND


@pytest.mark.slow
@pytest.mark.parametrize("repetition", [1, 2, 3])
@pytest.mark.parametrize("fault", FAULTS)
def test_every_fault_three_times_loses_no_accepted_task(
    rig: Rig, figures: list[dict[str, Any]], fault: str, repetition: int
) -> None:
    trial = FAULTS[fault](rig, figures)

    assert trial.lost == 0


# -- The same faults on RabbitMQ 4.0.5 ---------------------------------------------------------


def test_on_rabbitmq_4_a_broker_restart_under_load_loses_no_accepted_task(
    rig4: Rig, figures: list[dict[str, Any]]
) -> None:
    trial = broker_restart(rig4, figures)

    assert trial.lost == 0
    assert set(trial.answers_during_fault) <= {"202", "503"}
    assert trial.longest_answer_during_fault <= ANSWER_BOUND


def test_on_rabbitmq_4_a_silent_network_is_detected_in_time_and_loses_no_accepted_task(
    rig4: Rig, figures: list[dict[str, Any]]
) -> None:
    trial = network_black_hole(rig4, figures)

    assert trial.lost == 0
    assert trial.details["web_detection_seconds"] <= WEB_DETECTION_BOUND
    assert trial.details["worker_detection_seconds"] <= WORKER_DETECTION_BOUND


def test_on_rabbitmq_4_a_blocked_broker_connection_loses_no_accepted_task(
    rig4: Rig, figures: list[dict[str, Any]]
) -> None:
    trial = connection_blocked(rig4, figures)

    assert trial.lost == 0
    assert trial.longest_answer_during_fault <= ANSWER_BOUND
