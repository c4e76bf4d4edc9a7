"""The HTTP face of onebox: accept a countdown or a job, hand it to RabbitMQ, answer.

``python tasks.py web`` serves ``app`` on granian; the work runs in tasks.py.
Where things are, section by section (each a ``# -- <name> --`` line):

- Bodies: what the API takes and answers, as msgspec Structs.
- Task status: TaskBoard, the tasks this web process knows, from their events.
- Board snapshots: the board written to the snapshots stream (SnapshotWriter)
  and read back at start.
- The broker link: BrokerLink, the web process's one AMQP connection, kept up.
- Publishing: TaskPublisher, tasks, jobs and cancellations, each confirmed.
- The events feed: EventsFeed, the task events stream into the board; and
  web_parts, the three parts wired.
- Metrics: the web side's figures (requests, the broker, the queue).
- Hardening: the API token, the rate limit's client and what it counts,
  security headers.
- Routes: every route, documented as it answers.
- Periodic jobs: Scheduler, the ticks, from one web process at a time.
- The app: create_app and its parts (lifespans, router, middleware, CORS,
  OpenAPI, logging); ``app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import ipaddress
import logging
import math
import random
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, TypeVar, cast

import aiormq
import aiormq.channel
import dramatiq
import msgspec
import pamqp.frame
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from litestar import HttpMethod, Litestar, MediaType, Request, Response, Router, delete, get, post, route
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.datastructures import ResponseHeader, State
from litestar.di import NamedDependency, Provide
from litestar.dto import MsgspecDTO
from litestar.enums import ScopeType
from litestar.exceptions import (
    ClientException,
    HTTPException,
    InternalServerException,
    NotAuthorizedException,
    NotFoundException,
    ServiceUnavailableException,
    ValidationException,
)
from litestar.handlers import HTTPRouteHandler
from litestar.handlers.base import BaseRouteHandler
from litestar.logging import LoggingConfig
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import (
    Components,
    Example,
    OpenAPIHeader,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Reference,
    Schema,
    SecurityScheme,
)
from litestar.params import FromPath, JSONBody, Parameter
from litestar.plugins.problem_details import ProblemDetailsConfig, ProblemDetailsException, ProblemDetailsPlugin
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.static_files import create_static_files_router
from litestar.types import (
    ASGIApp,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Message,
    Middleware,
    Receive,
    Scope,
    Send,
)
from litestar.typing import FieldDefinition
from prometheus_client import Counter, Gauge, Histogram
from swagger_ui_bundle import swagger_ui_path

import tasks
from tasks import Settings, settings

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator

logger = logging.getLogger("onebox")
# aiormq logs each failed connect with an error line of its own; BrokerLink.tell says it once, and why.
logging.getLogger("aiormq.connection").addFilter(lambda record: record.msg != "error when creating transport: %r")
KEEPALIVE_SECONDS = 15
EVENT_BATCH_SECONDS = 0.05
BODY_TIMEOUT_SECONDS = 10
# The longest a starting web process waits to read the task events of its
# memory window before it serves anyway (docs/task-status.md).
REBUILD_SECONDS = 20
# A broker problem that lasts is logged again this often, not at every retry.
PROBLEM_LOG_SECONDS = 30
# Stream deliveries acknowledged at once while catching up: below the stream's
# window (tasks.STREAM_PREFETCH), or the broker would wait for an ack that never comes.
ACK_EVERY = 50
# ... and never held longer than this: RabbitMQ closes a channel that holds a
# delivery unacknowledged past its consumer_timeout (30 min by default), and a
# quiet box reads fewer than ACK_EVERY events in that time.
ACK_WITHIN_SECONDS = 1.0
Body = TypeVar("Body", bound=msgspec.Struct)
# The worker's format (Dramatiq's), so that both programs read alike.
LOG_FORMAT = "[%(asctime)s] [PID %(process)d] [%(name)s] [%(levelname)s] %(message)s"


# -- Bodies ------------------------------------------------------------------


class TaskRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A countdown to run: a JSON integer of seconds."""

    seconds: Annotated[int, msgspec.Meta(ge=1, le=settings.max_seconds, examples=[5])]


DUE_AT = msgspec.Meta(description="When a scheduled task is due to start; absent when it starts at once.")


class TaskAccepted(msgspec.Struct, omit_defaults=True):
    """RabbitMQ has the task, durably: it will run."""

    id: Annotated[str, msgspec.Meta(description="The Dramatiq message id.")]
    seconds: int
    status: Literal["queued", "scheduled"]
    queued_at: datetime
    due_at: Annotated[datetime | None, DUE_AT] = None


class JobAccepted(msgspec.Struct, omit_defaults=True):
    """RabbitMQ has the job's task, durably: it will run."""

    id: Annotated[str, msgspec.Meta(description="The Dramatiq message id.")]
    actor: str
    status: Literal["queued", "scheduled"]
    queued_at: datetime
    due_at: Annotated[datetime | None, DUE_AT] = None


TaskStatus = Literal[
    "scheduled", "queued", "running", "retrying", "handed_back", "cancelling", "succeeded", "failed", "cancelled"
]
FINISHED = {"succeeded", "failed", "cancelled"}
# Not running: a cancellation ends these at once (every worker checks before it runs a task).
WAITING = {"scheduled", "queued", "retrying", "handed_back"}


class TaskView(msgspec.Struct, gc=False):
    """A task as this web process last heard of it (GET /tasks/{id})."""

    id: str
    actor: Annotated[str, msgspec.Meta(description="The job: countdown, or another @job in tasks.py.")]
    status: Annotated[
        TaskStatus,
        msgspec.Meta(
            description="scheduled (waits for due_at), queued, running, retrying (a failed attempt; the next "
            "is due at due_at), handed_back (a stopping worker gave it back; it runs again from the start), "
            "cancelling, succeeded, failed or cancelled."
        ),
    ]
    attempts: Annotated[int, msgspec.Meta(description="Attempts started: retries and reruns after a hand-back count.")]
    done: Annotated[int, msgspec.Meta(description="Steps done, as the job last reported.")]
    total: Annotated[int, msgspec.Meta(description="Steps in all; 0 while the job has not said.")]
    updated_at: datetime
    # No default: Litestar's OpenAPI cannot show a Raw one.
    result: Annotated[msgspec.Raw, msgspec.Meta(description="What a succeeded job returned (JSON).")]
    message: Annotated[str, msgspec.Meta(description="What the job last said it was doing.")] = ""
    error: Annotated[tasks.TaskError | None, msgspec.Meta(description="Why the last attempt failed.")] = None
    # The countdown's own fields, as before jobs: total and total - done.
    seconds: int | None = None
    remaining: int | None = None
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    due_at: Annotated[
        datetime | None, msgspec.Meta(description="When it was last due to start: as scheduled, or its next attempt.")
    ] = None
    periodic: Annotated[
        str | None, msgspec.Meta(description="The periodic job (GET /schedules) whose tick this task runs.")
    ] = None


class TaskChange(msgspec.Struct):
    """One event of GET /tasks/{id}/events, as an EventSource reads it."""

    event: Annotated[TaskStatus, msgspec.Meta(description="The task's status.")]
    data: Annotated[
        str,
        msgspec.Meta(
            description="The task, as GET /tasks/{id} returns it: one line of JSON.",
            # Litestar's schema_extra: what the string holds.
            extra_json_schema={
                "extra": {
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": "#/components/schemas/TaskView"},
                }
            },
        ),
    ]


class TaskPage(msgspec.Struct):
    """Recent tasks, newest first."""

    items: list[TaskView]
    total: int
    limit: int
    offset: int


class Status(msgspec.Struct):
    status: Literal["ok", "ready"]


class Problem(msgspec.Struct, omit_defaults=True):
    """Every error, as RFC 9457 problem details (application/problem+json)."""

    status: int
    title: str
    detail: str
    # Which parameters were wrong (GET /tasks' limit and offset), when the detail is not enough.
    errors: list[dict[str, Any]] | msgspec.UnsetType = msgspec.UNSET


# -- Task status ----------------------------------------------------------------


def timestamp(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


# How often the board looks for unfinished tasks past their memory (at most).
SWEEP_SECONDS = 10.0


class Tick(msgspec.Struct, frozen=True):
    """A periodic job's last tick that was queued: its time, and its task."""

    at: float
    task: str


class TaskBoard:
    """The recent tasks, as this web process reads them from the broker.

    Every web process reads every task event (tasks.py's events stream) and
    keeps the newest ``task_memory_count`` finished tasks for
    ``task_memory_seconds`` after they end. A task that has not ended
    (queued, scheduled, running) is kept until ``task_memory_seconds`` after
    its last news or its due time, whichever is later: a task due in a week is
    known all week. At most ``task_memory_count`` of those too, so that a
    flood of waiting tasks cannot fill the process's memory. At start the board
    comes back from a snapshot and the events written since ("Board snapshots").
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Every task known, in the order first heard of (GET /tasks lists it newest first).
        self.tasks: OrderedDict[str, TaskView] = OrderedDict()
        # The same ids by whether they ended, oldest first: what the memory's bounds drop.
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.unfinished: OrderedDict[str, None] = OrderedDict()
        self.next_sweep = 0.0
        self.changed: dict[str, asyncio.Event] = {}
        # Each periodic job's last tick: kept however long ago it ran.
        self.ticks: dict[str, Tick] = {}

    def window_start(self) -> datetime:
        return datetime.now(UTC) - timedelta(seconds=self.settings.task_memory_seconds)

    def apply(self, event: tasks.TaskEvent) -> None:
        view = self.tasks.get(event.id)
        at = timestamp(event.at)
        if view is None:
            first: TaskStatus = "scheduled" if event.event == "scheduled" else "queued"
            view = TaskView(event.id, event.actor, first, event.attempt, event.done, event.total, at, tasks.NO_RESULT)
            self.tasks[event.id] = view
        if event.event in ("queued", "scheduled"):
            # The worker's news can overtake the web process's own.
            view.queued_at = view.queued_at or at
            view.total = view.total or event.total
            view.due_at = view.due_at or (timestamp(event.due) if event.due else None)
            if event.periodic:
                view.periodic = event.periodic
                self.ticked(event.periodic, Tick(event.tick, event.id))
        elif view.status in FINISHED and event.attempt <= view.attempts:
            return  # news from after the end of this attempt
        else:
            self.update(view, event, at)
        if view.actor == tasks.countdown.actor_name:
            view.seconds, view.remaining = view.total, view.total - view.done
        self.keep(view)
        self.notify(event.id)

    def update(self, view: TaskView, event: tasks.TaskEvent, at: datetime) -> None:
        # Every start after the first is a new attempt: a retry, or a rerun of a
        # task whose worker stopped or died (Dramatiq's count knows only retries).
        restarted = event.event == "started" and view.started_at is not None and at > view.started_at
        view.attempts, view.updated_at = max(view.attempts + restarted, event.attempt), at
        # A job that has not said its total yet keeps the one it was queued with.
        view.done, view.total, view.message = event.done, event.total or view.total, event.message
        view.due_at = timestamp(event.due) if event.due else view.due_at
        cancelling = view.status == "cancelling"
        match event.event:
            case "started":
                view.status, view.started_at = "cancelling" if cancelling else "running", at
            case "progress":
                view.status, view.started_at = "cancelling" if cancelling else "running", view.started_at or at
            case "retrying":
                # Waiting for its next attempt, which a cancellation still stops.
                view.status, view.error = "cancelling" if cancelling else "retrying", event.error
            case "handed_back":
                view.status = "cancelling" if cancelling else "handed_back"
            case "succeeded" | "failed" | "cancelled":
                view.status, view.finished_at = event.event, at
                # The event's result points into the batch it came in: copied, the batch can go.
                view.result, view.error = event.result.copy(), event.error

    def ticked(self, periodic: str, tick: Tick) -> None:
        if (last := self.ticks.get(periodic)) is None or tick.at >= last.at:
            self.ticks[periodic] = tick

    def load(self, views: list[TaskView], ticks: dict[str, Tick]) -> None:
        """Take in the tasks of a snapshot, oldest first, then forget what the memory no longer holds."""
        for periodic, tick in ticks.items():
            self.ticked(periodic, tick)
        for view in views:
            self.tasks[view.id] = view
            self.tasks.move_to_end(view.id)
        # Unfinished tasks leave the memory in the order they were first heard of, finished ones as they ended.
        ended = [view for view in self.tasks.values() if view.status in FINISHED]
        for view in self.tasks.values():
            if view.status not in FINISHED:
                self.file(view)
        for view in sorted(ended, key=lambda view: view.finished_at or view.updated_at):
            self.file(view)
        self.next_sweep = 0.0
        self.forget()

    def keep(self, view: TaskView) -> None:
        """File a task that changed as finished or not, and forget what the memory no longer holds."""
        self.file(view)
        self.forget()

    def file(self, view: TaskView) -> None:
        if view.status in FINISHED:
            self.unfinished.pop(view.id, None)
            self.finished.setdefault(view.id)
        else:
            self.finished.pop(view.id, None)
            self.unfinished.setdefault(view.id)

    def forget(self) -> None:
        """Drop the finished tasks past the count or the age, and the unfinished ones past theirs."""
        memory = self.settings.task_memory_seconds
        oldest_kept = time.time() - memory
        finished = self.finished
        while finished and (
            len(finished) > self.settings.task_memory_count
            or self.tasks[next(iter(finished))].updated_at.timestamp() < oldest_kept
        ):
            del self.tasks[finished.popitem(last=False)[0]]
        while len(self.unfinished) > self.settings.task_memory_count:
            del self.tasks[self.unfinished.popitem(last=False)[0]]
        # An unfinished task's age is its last news or due time, in no order: looked at now and then.
        if time.monotonic() >= self.next_sweep:
            self.next_sweep = time.monotonic() + min(SWEEP_SECONDS, memory)
            for task_id in [task_id for task_id in self.unfinished if self.expires(task_id) < oldest_kept]:
                del self.unfinished[task_id], self.tasks[task_id]

    def expires(self, task_id: str) -> float:
        """When an unfinished task's memory starts counting: its last news, or its due time if later."""
        view = self.tasks[task_id]
        return max(view.updated_at, view.due_at or view.updated_at).timestamp()

    def notify(self, task_id: str) -> None:
        if changed := self.changed.pop(task_id, None):
            changed.set()

    async def wait_for_change(self, task_id: str, timeout: float) -> bool:
        changed = self.changed.setdefault(task_id, asyncio.Event())
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def unknown(self, task_id: str) -> NotFoundException:
        return NotFoundException(
            detail=f"no task {task_id} is known: tasks are remembered for {self.settings.task_memory_seconds} s "
            f"after their last news or due time, {self.settings.task_memory_count} finished and as many unfinished "
            "at most; "
            "an older task may still be queued, running or done"
        )


# -- Board snapshots ------------------------------------------------------------
#
# A web process that starts reads the newest snapshot of a board from the
# snapshots stream, then the task events written since: what is pending, not
# the history (docs/task-status.md, "Board snapshots"). Any web process writes
# one once SNAPSHOT_EVERY event messages have passed since the last: first a
# cut, a message in the events stream; then, as it reads its own cut back, its
# board exactly as the events up to the cut left it, compressed, in parts.
# Every web process that reads a cut counts again from there, so that several
# of them seldom write twice.
#
# A snapshot names its cut's offset in the events stream. An offset means
# something only in the stream it was read from (not in one deleted and
# declared again, nor on another broker), so a start reads from the offset
# and takes the first message for the cut only if it has the cut's id;
# anything else, or nothing (RabbitMQ waits for an offset past a stream's
# end), and it reads the events since the cut's time instead.

SNAPSHOT_EVERY = 1000  # event messages since the last cut (times 1 to 1.5, drawn per web process)
SNAPSHOT_MIN_SECONDS = 60  # between two cuts, anyone's, under any load
# A write that has not read its cut back by then is given up.
CUT_TIMEOUT_SECONDS = 60
SNAPSHOT_PART_BYTES = 256 * 1024
# Compressed; the stream keeps 50 MB (tasks.SNAPSHOTS_ARGUMENTS). 15,000 tasks take 0.6 MB.
SNAPSHOT_MAX_BYTES = 10_000_000
SNAPSHOT_MAX_JSON = 400_000_000
# Where a start looks for the newest snapshot, in seconds back, then in the
# whole stream (None) if it finds none: under load there is one in the last
# minutes; at rest the stream is short.
SNAPSHOT_LOOKBACK = (600, None)
SNAPSHOT_READ_SECONDS = 15
# The cut comes first when read from its offset, at once; after this long, it is not there.
CUT_WAIT_SECONDS = 5.0
# Events are read again from this long before a cut's time when it is not found: the clocks may differ.
CLOCK_MARGIN_SECONDS = 60.0
# AMQP message types: a cut in the events stream, a part in the snapshots stream.
CUT = "cut"
PART = "snapshot"


class Cut(msgspec.Struct, frozen=True):
    """A point in the events stream that a snapshot stands for."""

    id: str
    at: float  # the writer's clock, just before it wrote the cut
    offset: int = -1  # in the events stream, as the writer read it back


class BoardSnapshot(msgspec.Struct):
    """A web process's board as the events up to its cut left it."""

    cut: Cut
    tasks: list[TaskView]  # in the order first heard of
    ticks: dict[str, Tick] = {}


class SnapshotSchedule:
    """When this web process writes a snapshot of its board."""

    def __init__(self) -> None:
        self.since_cut = 0  # event messages read since the last cut, anyone's
        self.threshold = self.draw()
        self.cut: Cut | None = None  # this process's cut, written and not read back yet
        self.last_cut = -math.inf  # time.monotonic() of the last cut written or heard, anyone's

    def draw(self) -> int:
        # Web processes count the same messages: drawn apart, the first to
        # reach its count writes, and the others hear its cut before theirs.
        return int(SNAPSHOT_EVERY * random.uniform(1, 1.5))  # noqa: S311 - not a secret

    def write_soon(self) -> None:
        """A start that found no snapshot writes one as soon as it has read the events."""
        self.since_cut = self.threshold

    def due(self) -> bool:
        waited = time.monotonic() - self.last_cut
        if self.cut is not None and waited < CUT_TIMEOUT_SECONDS:
            return False
        return self.since_cut >= self.threshold and waited >= SNAPSHOT_MIN_SECONDS

    def new_cut(self) -> Cut:
        self.cut, self.last_cut = Cut(str(uuid.uuid4()), time.time()), time.monotonic()
        return self.cut

    def heard(self, kind: str | None, message_id: str | None, offset: int) -> Cut | None:
        """Count a message of the events stream; this process's own cut when it is that."""
        if kind != CUT:
            self.since_cut += 1
            return None
        self.since_cut, self.threshold, self.last_cut = 0, self.draw(), time.monotonic()
        if self.cut is None or message_id != self.cut.id:
            return None
        cut, self.cut = self.cut, None
        return Cut(cut.id, cut.at, offset)


class SnapshotParts:
    """The snapshots read from the snapshots stream, put together from their parts."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[int, bytes]] = {}
        self.newest: bytes | None = None
        self.messages = 0

    def add(self, headers: dict[str, Any], body: bytes) -> None:
        snapshot, part, parts = headers.get("snapshot"), headers.get("part"), headers.get("parts")
        if not isinstance(snapshot, str) or not isinstance(part, int) or not isinstance(parts, int):
            return
        if not 0 <= part < parts <= SNAPSHOT_MAX_BYTES // SNAPSHOT_PART_BYTES + 1:
            return
        received = self.parts.setdefault(snapshot, {})
        received[part] = body
        if len(received) == parts:
            del self.parts[snapshot]
            self.newest = b"".join(received[index] for index in range(parts))


def encode_snapshot(cut: Cut, board: TaskBoard) -> bytes:
    return msgspec.json.encode(BoardSnapshot(cut, list(board.tasks.values()), board.ticks))


def decode_snapshot(compressed: bytes) -> BoardSnapshot | None:
    """The snapshot, or None (logged) when this process cannot read it."""
    try:
        inflater = zlib.decompressobj()
        encoded = inflater.decompress(compressed, SNAPSHOT_MAX_JSON)
        if inflater.unconsumed_tail:
            raise ValueError(f"more than {SNAPSHOT_MAX_JSON:,} bytes of JSON")
        snapshot = msgspec.json.decode(encoded, type=BoardSnapshot)
    except (zlib.error, ValueError) as error:  # msgspec.DecodeError is a ValueError
        logger.warning("ignored a board snapshot that this process cannot read: %s", error)
        return None
    for view in snapshot.tasks:
        # A result points into the snapshot's JSON: copied, the JSON can go.
        view.result = tasks.NO_RESULT if view.result == tasks.NO_RESULT else view.result.copy()
    return snapshot


async def read_snapshot_parts(connection: AbstractConnection, stream: str, start: datetime | str) -> SnapshotParts:
    """The snapshots written since ``start``, up to a marker of this process's own."""
    parts, marker, read_all = SnapshotParts(), str(uuid.uuid4()), asyncio.Event()
    channel = await connection.channel()
    try:
        # Parts are large: few at a time.
        await channel.basic_qos(prefetch_count=4)

        async def on_part(message: DeliveredMessage) -> None:
            properties = message.header.properties
            parts.messages += 1
            if properties.message_type == PART:
                parts.add(properties.headers or {}, message.body)
            elif properties.message_type == tasks.SYNC and properties.message_id == marker:
                read_all.set()
            assert message.delivery_tag is not None
            await channel.basic_ack(message.delivery_tag)

        await channel.basic_consume(stream, on_part, arguments={"x-stream-offset": start})
        properties = aiormq.spec.Basic.Properties(delivery_mode=2, message_type=tasks.SYNC, message_id=marker)
        await channel.basic_publish(b"", routing_key=stream, properties=properties)
        await read_all.wait()
    finally:
        if not channel.is_closed:
            await channel.close()
    return parts


async def newest_snapshot(connection: AbstractConnection, settings: Settings) -> tuple[BoardSnapshot | None, int]:
    """The newest snapshot in the stream, and how many messages finding it read."""
    stream, messages = tasks.snapshots_stream(settings), 0
    for lookback in SNAPSHOT_LOOKBACK:
        start = "first" if lookback is None else datetime.now(UTC) - timedelta(seconds=lookback)
        parts = await read_snapshot_parts(connection, stream, start)
        messages += parts.messages
        if parts.newest is not None:
            return decode_snapshot(parts.newest), messages
    return None, messages


def stream_offset(message: DeliveredMessage) -> int:
    """Where a stream's message is in it; -1 if the broker did not say."""
    offset = (message.header.properties.headers or {}).get("x-stream-offset")
    return offset if isinstance(offset, int) else -1


# The event loop holds tasks weakly: each one spawned (a batch's publish, a snapshot's write) is kept here until done.
BACKGROUND: set[asyncio.Task[Any]] = set()


def spawn(work: Coroutine[Any, Any, object]) -> None:
    """Run ``work`` without waiting for it."""
    task = asyncio.create_task(work)
    BACKGROUND.add(task)
    task.add_done_callback(BACKGROUND.discard)


class SnapshotWriter:
    """Writes this web process's board to the snapshots stream, now and then.

    ``heard`` counts each message of the events stream (SnapshotSchedule says
    when a snapshot is due): when one is, it writes a cut to the events
    stream; when this process reads its own cut back, it writes the board as
    the events up to the cut left it, compressed, in parts, each confirmed.
    A snapshot that cannot be written is logged and skipped: the next start
    reads more events instead.
    """

    def __init__(self, publisher: TaskPublisher) -> None:
        self.publisher = publisher
        self.settings = publisher.settings
        self.schedule = SnapshotSchedule()

    def heard(self, message: DeliveredMessage, board: TaskBoard, caught_up: bool) -> None:
        kind, message_id = message.header.properties.message_type, message.header.properties.message_id
        if (own := self.schedule.heard(kind, message_id, stream_offset(message))) is not None:
            # Now the board is what the events up to the cut made it: encoded before anything changes it.
            spawn(self.write_snapshot(own, encode_snapshot(own, board), len(board.tasks)))
        elif caught_up and self.schedule.due():
            spawn(self.write_cut(message.channel, self.schedule.new_cut()))

    async def write_cut(self, channel: AbstractChannel | None, cut: Cut) -> None:
        """Mark the events stream where this process's next snapshot stands.

        The body is an empty batch of events: a web process of a version
        before snapshots applies it as nothing.
        """
        if channel is None or channel.is_closed:
            return
        properties = aiormq.spec.Basic.Properties(delivery_mode=2, message_type=CUT, message_id=cut.id)
        try:
            await channel.basic_publish(b"[]", routing_key=tasks.events_stream(self.settings), properties=properties)
        except (aiormq.exceptions.AMQPError, ConnectionError) as error:
            logger.debug("no cut written: %s", self.publisher.link.describe(error))

    async def write_snapshot(self, cut: Cut, encoded: bytes, count: int) -> None:
        """The board at the cut, compressed, in parts, each confirmed by the broker."""
        started = time.perf_counter()
        compressed = await asyncio.to_thread(zlib.compress, encoded, 1)
        if len(compressed) > SNAPSHOT_MAX_BYTES:
            logger.warning(
                "no board snapshot written: %d tasks take %s bytes, over %s; a start reads the events instead",
                count,
                f"{len(compressed):,}",
                f"{SNAPSHOT_MAX_BYTES:,}",
            )
            return
        parts = [compressed[at : at + SNAPSHOT_PART_BYTES] for at in range(0, len(compressed), SNAPSHOT_PART_BYTES)]
        stream = tasks.snapshots_stream(self.settings)
        try:
            await asyncio.gather(
                *(
                    self.publisher.deliver(
                        part,
                        stream,
                        f"{cut.id}.{index}",
                        PART,
                        {"snapshot": cut.id, "part": index, "parts": len(parts)},
                    )
                    for index, part in enumerate(parts)
                )
            )
        except BrokerUnavailable as error:
            logger.warning("board snapshot not written: %s", error.detail)
            return
        elapsed = (time.perf_counter() - started) * 1000
        logger.info(
            "board snapshot written: %d tasks, %s bytes in %d messages, %.0f ms",
            *(count, f"{len(compressed):,}", len(parts), elapsed),
        )


# -- The broker link -------------------------------------------------------------
#
# The web process's broker side is three parts over one AMQP connection:
# BrokerLink keeps the connection, TaskPublisher publishes with confirms on
# it, EventsFeed follows the task events stream into the TaskBoard. web_parts
# wires them; create_app hands each to the routes that need it.


class BrokerUnavailable(ServiceUnavailableException):
    """RabbitMQ did not take the task; the detail says why, the reason (a metric's label) in a word."""

    def __init__(self, detail: str, reason: str = "not_connected") -> None:
        super().__init__(detail=detail, headers={"Retry-After": "1"})
        self.reason = reason


class Refused(Exception):
    """The broker refused a declaration: only a person can fix it."""

    def __init__(self, trouble: tasks.Trouble) -> None:
        super().__init__(trouble.line)
        self.trouble = trouble


# aiormq's exception for a channel closed with each code (it keeps the text alone).
REPLY_CODES = {kind: code for code, kind in aiormq.channel.EXCEPTION_MAPPING.items()}


class BrokerConnection(aiormq.Connection):
    """aiormq's connection, keeping the broker's reason when it refuses the handshake.

    aiormq checks a reply against the frames it expects before it looks for
    Connection.Close, so a refused virtual host or a full connection limit
    becomes "InvalidFrameError" without the broker's words. Here the close
    comes first, as ConnectionClosed(code, reason).
    """

    @staticmethod
    async def _rpc(request: Any, writer: asyncio.StreamWriter, frame_receiver: Any, wait_response: bool = True) -> Any:
        writer.write(pamqp.frame.marshal(request, 0))
        await writer.drain()
        if not wait_response:
            return None
        _, _, frame = await frame_receiver.get_frame()
        if isinstance(frame, aiormq.spec.Connection.Close):
            if frame.reply_code == 403:
                raise aiormq.exceptions.ProbableAuthenticationError(frame.reply_text)
            raise aiormq.exceptions.ConnectionClosed(frame.reply_code, frame.reply_text)
        if request.synchronous and frame.name not in request.valid_responses:
            raise aiormq.exceptions.InvalidFrameError(f"Expected one of {request.valid_responses!r}, got {frame!r}")
        return frame


class Follower(Protocol):
    """What reads on each new connection of a BrokerLink (the EventsFeed)."""

    @property
    def channel(self) -> AbstractChannel | None: ...

    async def attach(self, connection: AbstractConnection) -> None: ...


class BrokerLink:
    """The web process's one AMQP connection, kept up for the life of the app.

    ``start`` connects once, before the process serves, and returns what went
    wrong; ``run`` then keeps a connection up, reconnecting by itself a
    second after each loss. Every connection declares the queues exactly as
    the worker does, opens ``channel`` in confirm mode (what TaskPublisher
    publishes on) and has its ``follower`` (EventsFeed) attach to it; the
    loss of the follower's channel counts as the connection's. ``ready``
    while ``channel`` is open; ``problem`` says why not (the detail of every
    503), logged when it changes; ``tried`` is set once the first attempt to
    connect has ended, well or not.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connection: AbstractConnection | None = None
        self.channel: aiormq.Channel | None = None
        self.follower: Follower | None = None
        self.problem = "not connected to the broker yet"
        self.told_at = 0.0
        self.tried = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self.channel is not None and not self.channel.is_closed

    async def start(self) -> tasks.Trouble | None:
        """Connect once, before the web process serves: what went wrong, or None."""
        try:
            await self.connect()
        except Exception as error:  # noqa: BLE001 - any failure is told, and run() tries again
            await self.close()
            trouble = self.diagnose(error)
            if not trouble.needs_a_person:  # that one, the caller says as it stops
                self.tell(trouble.line)
            return trouble
        finally:
            self.tried.set()
        self.mark_connected()
        return None

    def mark_connected(self) -> None:
        self.problem = ""
        logger.info("broker connected")

    async def run(self) -> None:
        """Keep the connection up for the life of the app (start()'s, or a new one)."""
        while True:
            if self.ready:
                assert self.connection is not None and self.channel is not None
                closings = [self.connection.closing, self.channel.closing]
                if self.follower is not None and self.follower.channel is not None:
                    closings.append(self.follower.channel.closing)
                await asyncio.wait(closings, return_when=asyncio.FIRST_COMPLETED)
                self.tell("the broker connection was lost; reconnecting")
                await self.close()
                await asyncio.sleep(1)
            try:
                await self.connect()
                self.mark_connected()
            except Exception as error:  # noqa: BLE001 - any failure means: not connected, retry
                self.tell(self.diagnose(error).line)
                await self.close()
                await asyncio.sleep(1)
            finally:
                self.tried.set()

    def tell(self, problem: str) -> None:
        """The reason for 503s, logged when it changes and then twice a minute, not at every retry."""
        now = time.monotonic()
        if problem != self.problem or now - self.told_at >= PROBLEM_LOG_SECONDS:
            logger.warning("%s", problem)
            self.told_at = now
        self.problem = problem

    def diagnose(self, error: BaseException) -> tasks.Trouble:
        """What a failed connection or declaration means (tasks.py, "Broker and queues")."""
        if isinstance(error, Refused):
            return error.trouble
        if isinstance(error, aiormq.exceptions.ProbableAuthenticationError):
            return tasks.refused_connection(403, str(error.args[0]), self.settings)
        if isinstance(error, aiormq.exceptions.ConnectionClosed) and len(error.args) == 2:
            return tasks.refused_connection(error.args[0], str(error.args[1]), self.settings)
        return tasks.unreachable(error, self.settings, self.settings.publish_timeout)

    async def connect(self) -> None:
        url = self.settings.cloudamqp_url
        separator = "&" if "?" in url else "?"
        async with asyncio.timeout(self.settings.publish_timeout):
            connection = BrokerConnection(f"{url}{separator}heartbeat={self.settings.heartbeat}")
            self.connection = connection
            await connection.connect()
            channel = cast(aiormq.Channel, await connection.channel(publisher_confirms=True))
            await self.declare_queues(channel)
        if self.follower is not None:
            await self.follower.attach(connection)
        self.channel = channel

    async def declare_queues(self, channel: AbstractChannel) -> None:
        """Declare the queues, exchanges and bindings exactly as the worker does
        (tasks.py's tables); raise Refused if the broker will not.

        No-wait, in about one round trip, as tasks.declare: the broker closes
        the channel at the first refusal, which the last, synchronous
        declaration then raises.
        """
        settings = self.settings
        try:
            for name, arguments in tasks.queues(settings).items():
                await channel.queue_declare(name, durable=True, arguments=arguments, nowait=True)
            for name in tasks.exchanges(settings):
                await channel.exchange_declare(name, exchange_type="topic", durable=True, nowait=True)
            for route in tasks.bindings(settings):
                if route.to_exchange:
                    await channel.exchange_bind(route.destination, route.source, route.pattern, nowait=True)
                else:
                    await channel.queue_bind(route.destination, route.source, route.pattern, nowait=True)
            await channel.queue_declare(settings.queue_name, passive=True)
        except aiormq.exceptions.ChannelInvalidStateError:
            # The refusal closed the channel while no-wait declarations still went out.
            try:
                await channel.closing
            except aiormq.exceptions.ChannelClosed as refusal:
                raise self.refused(refusal) from None
            raise
        except aiormq.exceptions.ChannelClosed as refusal:
            raise self.refused(refusal) from None

    def refused(self, refusal: aiormq.exceptions.ChannelClosed) -> Refused:
        code = REPLY_CODES.get(type(refusal), refusal.args[0])
        return Refused(tasks.refused_declaration(code, str(refusal.args[-1]), self.settings))

    async def close(self) -> None:
        """Close the connection, and with it every channel on it (the follower's too)."""
        connection, self.connection, self.channel = self.connection, None, None
        if connection is not None and not connection.is_closed:
            await connection.close()

    def describe(self, error: BaseException) -> str:
        return tasks.redact(f"{type(error).__name__}: {error}", self.settings.cloudamqp_url)


# -- Publishing -------------------------------------------------------------------


class TaskPublisher:
    """Tasks, jobs and cancellations into RabbitMQ, each confirmed before it counts.

    ``publish`` and ``cancel`` (and ``deliver``, under both) return once
    RabbitMQ has confirmed the message, durably, or raise BrokerUnavailable:
    its detail says why, and whether the broker may have taken it; its reason
    says so in a word (a metric's label). While the link is not ready they
    raise at once instead of waiting. Every request awaits its own confirm on
    the link's one channel, so a remote broker's round trip does not cap
    throughput.
    """

    def __init__(self, link: BrokerLink) -> None:
        self.link = link
        self.settings = link.settings

    async def publish(self, message: dramatiq.Message[Any], due: float | None = None) -> None:
        """Return once RabbitMQ has confirmed the task, or raise BrokerUnavailable.

        With ``due`` (seconds since the epoch), the task waits in the delay
        levels until then (tasks.py, "Delays").
        """
        if due is None:
            await self.deliver(message.encode(), message.queue_name, message.message_id)
            return
        message, route = tasks.start_at(self.settings, message, due)
        await self.deliver(message.encode(), route.routing_key, message.message_id, exchange=route.exchange)

    async def cancel(self, task_id: str) -> None:
        """Record a cancellation in the durable stream every worker reads."""
        await self.deliver(task_id.encode(), tasks.cancellations_stream(self.settings), f"cancel:{task_id}")

    async def deliver(
        self,
        body: bytes,
        queue: str,
        message_id: str,
        kind: str | None = None,
        headers: dict[str, Any] | None = None,
        *,
        exchange: str = "",
    ) -> None:
        channel = self.link.channel
        if channel is None or channel.is_closed:
            raise BrokerUnavailable(self.link.problem or "the broker connection is closed")
        properties = aiormq.spec.Basic.Properties(
            delivery_mode=2, message_id=message_id, message_type=kind, headers=headers
        )
        try:
            await channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=queue,
                properties=properties,
                # Without mandatory, RabbitMQ confirms a message that no queue took.
                mandatory=True,
                timeout=self.settings.publish_timeout,
                # The confirm proves the write; waiting for the socket to drain
                # would hold the channel's lock from every other request.
                wait=False,
            )
        except asyncio.CancelledError:
            # aiormq cancels pending publishes when it drops a dead connection.
            if (task := asyncio.current_task()) is not None and task.cancelling():
                raise
            raise BrokerUnavailable(
                "the broker connection was lost; it may or may not have taken the request", "connection_lost"
            ) from None
        except TimeoutError:
            raise BrokerUnavailable(
                f"the broker did not confirm within {self.settings.publish_timeout:g} s; "
                "it may or may not have taken the request",
                "confirm_timeout",
            ) from None
        except aiormq.exceptions.PublishError:
            # Somebody deleted the queue (a delay level, for a scheduled task): declare it again for the next request.
            await self.link.declare_queues(channel)
            missing = f"queue {queue!r}" if not exchange else "a delay level"
            raise BrokerUnavailable(f"{missing} was missing; nothing was queued", "queue_missing") from None
        except aiormq.exceptions.DeliveryError:
            raise BrokerUnavailable("the broker refused the message; nothing was queued", "refused") from None
        except (aiormq.exceptions.AMQPError, ConnectionError) as error:
            raise BrokerUnavailable(
                f"the broker connection failed: {self.link.describe(error)}; it may or may not have taken the request",
                "connection_failed",
            ) from None


# -- The events feed -------------------------------------------------------------


class EventsFeed:
    """The task events stream, followed into this process's TaskBoard, ``board``.

    ``attach`` (the link calls it on every new connection) reads the past,
    then follows the stream: the first time, the newest board snapshot and
    the events since its cut (or, with none, the memory window's events);
    after a reconnect, on from the event after the last one read, so that
    nothing in between is missed (applying an event twice changes nothing).
    ``caught_up`` is set once the past has been read, up to a marker of this
    process's own; ``read_to_here`` waits for the same of everything written
    before it. ``announce`` (best effort, batched) and ``record`` (confirmed)
    write this process's own events and apply them here at once. Its
    SnapshotWriter hears every message too, and now and then writes the board
    for the next start.
    """

    def __init__(self, publisher: TaskPublisher) -> None:
        self.publisher = publisher
        self.link = publisher.link
        self.settings = publisher.settings
        self.board = TaskBoard(self.settings)
        self.channel: aiormq.Channel | None = None
        self.outbox: list[tasks.TaskEvent] = []
        self.dropped_events = 0
        # Where this process has read to, and whether it has read the past (up to a marker of its own).
        self.offset: int | None = None
        self.marker = ""
        self.caught_up = asyncio.Event()
        # At start: the snapshot's cut, until found in the events stream; where
        # to read from when it is not there; what the rebuild read, for its log line.
        self.snapshot_tried = False
        self.resume_after: Cut | None = None
        self.replay_from: datetime | None = None
        self.rebuilt_from = "no snapshot"
        self.events_read = 0
        self.snapshots = SnapshotWriter(publisher)
        # Markers written by read_to_here, until read back.
        self.markers: dict[str, asyncio.Event] = {}

    async def attach(self, connection: AbstractConnection) -> None:
        """Read the past on a new connection (the snapshot, the first time), then follow the stream."""
        if not self.snapshot_tried:
            await self.restore_snapshot(connection)
        async with asyncio.timeout(self.settings.publish_timeout):
            self.channel = cast(aiormq.Channel, await connection.channel())
            await self.listen(self.channel)

    async def restore_snapshot(self, connection: AbstractConnection) -> None:
        """Start the board from the newest snapshot, if there is one: then the
        events stream is read from its cut on, not from the window's start."""
        try:
            async with asyncio.timeout(SNAPSHOT_READ_SECONDS):
                snapshot, messages = await newest_snapshot(connection, self.settings)
        except TimeoutError:
            snapshot, messages = None, 0
            logger.warning("no board snapshot read in %d s: reading the window's events instead", SNAPSHOT_READ_SECONDS)
        self.snapshot_tried = True
        if snapshot is None:
            self.rebuilt_from = f"no snapshot ({messages} messages read looking)"
            self.snapshots.schedule.write_soon()  # for the next start, however few events there are
            return
        self.board.load(snapshot.tasks, snapshot.ticks)
        self.resume_after = snapshot.cut
        self.rebuilt_from = f"a snapshot of {len(snapshot.tasks)} tasks ({messages} messages)"

    async def listen(self, channel: AbstractChannel) -> None:
        """Consume the events stream on ``channel`` from ``read_from``; until
        caught up, write a marker to read back.

        Offsets are used only within one broker, never carried over.
        """
        stream = tasks.events_stream(self.settings)
        await channel.basic_qos(prefetch_count=tasks.STREAM_PREFETCH)
        await channel.basic_consume(stream, self.on_event, arguments={"x-stream-offset": self.read_from()})
        channel.on_consumer_cancel_callbacks.add(lambda _: self.relisten(channel))
        if (cut := self.resume_after) is not None:
            asyncio.get_running_loop().call_later(CUT_WAIT_SECONDS, self.cut_overdue, channel, cut)
        if not self.caught_up.is_set():
            self.marker = str(uuid.uuid4())
            marker = aiormq.spec.Basic.Properties(delivery_mode=2, message_type=tasks.SYNC, message_id=self.marker)
            await channel.basic_publish(b"", routing_key=stream, properties=marker)

    def read_from(self) -> datetime | int:
        """Where the events stream is read from: on from the last event read,
        the snapshot's cut, or a point in time (the memory window's start)."""
        if self.offset is not None:
            return self.offset + 1
        if self.resume_after is not None:
            return self.resume_after.offset
        return self.replay_from or self.board.window_start()

    async def relisten(self, channel: AbstractChannel) -> None:
        """The stream was deleted: declare it again and read it from the window's start."""
        self.offset = None
        await channel.queue_declare(tasks.events_stream(self.settings), durable=True, arguments=tasks.EVENTS_ARGUMENTS)
        await self.listen(channel)

    async def on_event(self, message: DeliveredMessage) -> None:
        if message.channel is not self.channel:
            return  # a channel given up for reading again elsewhere
        properties = message.header.properties
        kind, message_id = properties.message_type, properties.message_id
        offset = stream_offset(message)
        self.events_read += 1
        if self.resume_after is not None and not self.found_cut(message_id):
            return
        if kind not in (tasks.SYNC, CUT):
            self.apply_batch(message.body)
        elif kind == tasks.SYNC and message_id in self.markers:
            self.markers.pop(message_id).set()
        elif message_id == self.marker and not self.caught_up.is_set():
            self.caught_up.set()
            self.replay_from = None
            logger.info(
                "task board rebuilt: %d tasks, from %s and %d event messages",
                *(len(self.board.tasks), self.rebuilt_from, self.events_read),
            )
        self.snapshots.heard(message, self.board, self.caught_up.is_set())
        if offset >= 0:
            self.offset = offset
        # While catching up, one acknowledgement for many: each ack is a frame,
        # and nothing is served yet. Then each at once: the ack carries the TCP
        # acknowledgement of the delivery, which a broker that delays small
        # frames (Nagle's algorithm, LavinMQ's default) waits for before it
        # sends the confirm a request is waiting for (docs/brokers.md, LavinMQ).
        assert message.delivery_tag is not None
        catching_up = not self.caught_up.is_set() and properties.message_type != tasks.SYNC
        if not catching_up or message.delivery_tag % ACK_EVERY == 0:
            await message.channel.basic_ack(message.delivery_tag, multiple=True)

    def found_cut(self, message_id: str | None) -> bool:
        """Whether the first message read from the snapshot's cut offset is the cut.

        When it is not, the events stream is not the one the snapshot was
        taken from, or has lost the cut: its events since the cut's time are
        read again on a channel of their own (applying one twice changes nothing).
        """
        cut, self.resume_after = self.resume_after, None
        if cut is not None and message_id == cut.id:
            return True
        if cut is not None:
            self.replay_cut(cut, "another message is at its offset")
        return False

    def cut_overdue(self, channel: AbstractChannel, cut: Cut) -> None:
        if channel is self.channel and self.resume_after is cut:
            self.resume_after = None
            self.replay_cut(cut, f"nothing came from its offset in {CUT_WAIT_SECONDS:g} s")

    def replay_cut(self, cut: Cut, why: str) -> None:
        self.replay_from = min(self.board.window_start(), timestamp(cut.at - CLOCK_MARGIN_SECONDS))
        logger.warning(
            "the board snapshot's cut is not in the events stream (%s: the stream was deleted or trimmed "
            "since): reading its events since %s",
            *(why, self.replay_from.isoformat(timespec="seconds")),
        )
        spawn(self.read_again())

    async def read_again(self) -> None:
        """Read the events stream again from ``read_from`` on a new channel, up to a new marker."""
        old = self.channel
        if old is None or old.is_closed:
            return  # the next connection reads from there
        try:
            # The new channel first: events this process announces meanwhile go out on it.
            self.channel, self.offset = cast(aiormq.Channel, await old.connection.channel()), None
            await old.close()
            await self.listen(self.channel)
        except (aiormq.exceptions.AMQPError, ConnectionError) as error:
            logger.warning("the events stream cannot be read again yet: %s", self.link.describe(error))

    async def read_to_here(self) -> None:
        """Return once this process has read every event written before now:
        a marker of its own, read back."""
        channel = self.channel
        if channel is None or channel.is_closed:
            raise BrokerUnavailable(self.link.problem or "the broker connection is closed")
        marker, read = str(uuid.uuid4()), asyncio.Event()
        self.markers[marker] = read
        try:
            properties = aiormq.spec.Basic.Properties(delivery_mode=2, message_type=tasks.SYNC, message_id=marker)
            await channel.basic_publish(b"", routing_key=tasks.events_stream(self.settings), properties=properties)
            await asyncio.wait_for(read.wait(), REBUILD_SECONDS)
        finally:
            self.markers.pop(marker, None)

    def apply_batch(self, body: bytes) -> None:
        try:
            events = msgspec.json.decode(body, type=list[tasks.TaskEvent])
        except msgspec.DecodeError:
            events = self.decode_one_by_one(body)
        for event in events:
            self.board.apply(event)

    def decode_one_by_one(self, body: bytes) -> list[tasks.TaskEvent]:
        """The events of a batch that this process can read; each other one is dropped alone."""
        try:
            raw_events = msgspec.json.decode(body, type=list[msgspec.Raw])
        except msgspec.DecodeError as error:
            self.drop("a batch of task events", error)
            return []
        events = []
        for raw in raw_events:
            try:
                events.append(msgspec.json.decode(raw, type=tasks.TaskEvent))
            except msgspec.DecodeError as error:
                fields = msgspec.json.decode(raw)
                task_id = fields.get("id") if isinstance(fields, dict) else None
                self.drop(f"a task event of task {task_id!r}", error)
        return events

    def drop(self, what: str, error: msgspec.DecodeError) -> None:
        self.dropped_events += 1
        logger.warning("ignored %s that this process cannot read (%d so far): %s", what, self.dropped_events, error)

    async def record(self, event: tasks.TaskEvent) -> None:
        """Write one event to the events stream, confirmed by the broker, and apply it here."""
        await self.publisher.deliver(
            msgspec.json.encode([event]), tasks.events_stream(self.settings), f"event:{event.id}"
        )
        self.board.apply(event)

    def announce(self, event: tasks.TaskEvent) -> None:
        """Tell every web process soon, without waiting: events are best effort.

        Events wait a moment in the outbox and go out together, so that a busy
        process publishes (and hears back) one message per batch, not per task.
        """
        self.board.apply(event)
        self.outbox.append(event)
        if len(self.outbox) == 1:
            asyncio.get_running_loop().call_later(EVENT_BATCH_SECONDS, self.flush)

    def flush(self) -> None:
        batch, self.outbox = self.outbox, []
        channel = self.channel
        if channel is not None and not channel.is_closed:
            body = msgspec.json.encode(batch)
            spawn(channel.basic_publish(body, routing_key=tasks.events_stream(self.settings), wait=False))


def web_parts(settings: Settings) -> tuple[BrokerLink, TaskPublisher, EventsFeed]:
    """The web process's broker side, wired: the feed follows the events on every connection of the link."""
    link = BrokerLink(settings)
    publisher = TaskPublisher(link)
    feed = EventsFeed(publisher)
    link.follower = feed
    return link, publisher, feed


# -- Metrics --------------------------------------------------------------------
#
# Web-side figures; tasks.py serves them with the worker's (docs/operations.md).

TASKS_ACCEPTED = Counter("onebox_tasks_accepted_total", "Tasks RabbitMQ confirmed: POST /tasks answered 202.")
TASKS_UNAVAILABLE = Counter(
    "onebox_tasks_unavailable_total", "POST /tasks answered 503: RabbitMQ did not take the task.", ["reason"]
)
BROKER_CONNECTED = Gauge(
    "onebox_broker_connected",
    "1 while every web process of this container has a usable broker connection.",
    multiprocess_mode="min",
)
QUEUE_READY = Gauge(
    "onebox_queue_messages_ready",
    "Messages ready in the task queue (whole broker: every container reports the same queue).",
    ["queue"],
    multiprocess_mode="mostrecent",
)
QUEUE_CONSUMERS = Gauge(
    "onebox_queue_consumers",
    "Consumers of the task queue (whole broker): one per worker process.",
    ["queue"],
    multiprocess_mode="mostrecent",
)
# Fresh enough for an autoscaler; a passive declare every 2 s costs the broker nothing.
QUEUE_WATCH_SECONDS = 2.0
# Litestar's names and labels, so that its dashboards work.
REQUEST_LABELS = ["method", "path", "status_code", "app_name"]
REQUESTS = Counter("litestar_requests_total", "Requests answered, by route and status.", REQUEST_LABELS)
REQUEST_SECONDS = Histogram(
    "litestar_request_duration_seconds", "Time to answer, by route and status, in seconds.", REQUEST_LABELS
)
# Refusals are counted, never logged one by one: a flood of them would be a flood of lines.
REFUSALS = Counter(
    "onebox_refusals_total",
    "Requests refused, by status: 408 body too slow, 413 too large, 415 not JSON, 429 over a limit, 503 broker "
    "unavailable or too many event streams (not the health checks' own 503).",
    ["status"],
)
REFUSED = frozenset({408, 413, 415, 429, 503})
HEALTH_CHECKS = frozenset({"/healthz", "/readyz"})


def count_requests(app: ASGIApp) -> ASGIApp:
    """Count each request and time it, by route (not by task id) and status; and each refusal.

    What Litestar's PrometheusMiddleware counts, under its names, at a
    fraction of its cost (68 µs of CPU per request, bench/metrics_cpu.py):
    no request object, no label dict, each (method, route, status) looked up
    once, and no in-progress gauge, whose two writes a request would pay for
    a figure that is zero between scrapes.
    """
    children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}

    async def counted(scope: Scope, receive: Receive, send: Send) -> None:
        status = HTTPStatus.INTERNAL_SERVER_ERROR.value
        began = time.perf_counter()

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_and_note)
        finally:
            method = scope["method"] if scope["type"] == ScopeType.HTTP else scope["type"]
            key = (method, scope["path_template"], status)
            if (figures := children.get(key)) is None:
                refused = status in REFUSED and key[1] not in HEALTH_CHECKS
                figures = children[key] = (
                    REQUESTS.labels(*key, "onebox"),
                    REQUEST_SECONDS.labels(*key, "onebox"),
                    REFUSALS.labels(str(status)) if refused else None,
                )
            figures[0].inc()
            figures[1].observe(time.perf_counter() - began)
            if figures[2] is not None:
                figures[2].inc()

    return counted


async def watch_broker(link: BrokerLink) -> None:
    """Keep the broker gauges fresh: connected or not, and the queue's depth.

    The depth comes from a passive declare on a channel of its own: when the
    queue is missing, RabbitMQ closes that channel, not the link's.
    """
    queue = link.settings.queue_name
    channel: AbstractChannel | None = None
    while True:
        BROKER_CONNECTED.set(1 if link.ready else 0)
        connection = link.connection
        if link.ready and connection is not None:
            try:
                async with asyncio.timeout(link.settings.publish_timeout):
                    if channel is None or channel.is_closed or channel.connection is not connection:
                        channel = await connection.channel()
                    declared = await channel.queue_declare(queue, passive=True)
                QUEUE_READY.labels(queue).set(declared.message_count or 0)
                QUEUE_CONSUMERS.labels(queue).set(declared.consumer_count or 0)
            except asyncio.CancelledError:
                # aiormq cancels what is pending on a connection it drops.
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise
                channel = None
            except Exception as error:  # noqa: BLE001 - whatever one read hit, the gauges must go on
                channel = None
                logger.debug("queue depth unknown: %s", link.describe(error))
        await asyncio.sleep(QUEUE_WATCH_SECONDS)


# -- Hardening ------------------------------------------------------------------


async def require_token(connection: ASGIConnection[Any, Any, Any, Any], __: BaseRouteHandler) -> None:
    """With API_TOKEN set, every /tasks and /jobs route takes "Authorization: Bearer <token>".

    Task ids, results and cancellation are each client's business; the page,
    the docs and the health checks stay open, and so does OPTIONS, which says
    only what the schema says. The guard of the API's router (create_app),
    installed only when a token is set, and async: for every request Litestar
    copies the handler for each guard, and runs a sync guard in a thread.
    """
    if isinstance(connection, Request) and connection.method == "OPTIONS":
        return
    token = connection.app.state.settings.api_token
    scheme, _, offered = connection.headers.get("authorization", "").partition(" ")
    # Constant time: how long a comparison takes must not leak the token.
    if scheme.lower() != "bearer" or not hmac.compare_digest(offered.encode(), token.encode()):
        raise NotAuthorizedException(
            detail="a valid bearer token is required", headers={"WWW-Authenticate": 'Bearer realm="onebox"'}
        )


def client_address(request: Request[Any, Any, Any]) -> str:
    """The client's address, from the platform's header when one is configured (address_of)."""
    return address_of(request.scope, request.app.state.settings.client_ip_header.lower().encode())


def address_of(scope: Scope, header: bytes) -> str:
    """The client's address: the last entry of ``header`` (lower case) when there is one, else the peer.

    Behind a proxy the socket peer is the proxy. Of a list (X-Forwarded-For)
    only the last entry is the proxy's own: the ones before it, and any line
    of the header before the last, are whatever the client sent.
    """
    value = b""
    if header:
        for name, line in scope["headers"]:
            if name == header:
                value = line
    if value:
        return value.rsplit(b",", 1)[-1].strip().decode("latin-1")
    client = scope.get("client")
    return client[0] if client else "unknown"


def writes_to_broker(scope: Scope) -> bool:
    """POST /tasks, POST /jobs/{name} and DELETE /tasks/{id}: what the rate limit counts.

    Each makes the broker store and deliver messages (and spends a plan's
    monthly quota); reads do not.
    """
    return (
        scope["type"] == ScopeType.HTTP
        and scope["method"] in ("POST", "DELETE")
        and scope["path"].startswith(("/tasks", "/jobs/"))
    )


# The longest text form of an IPv6 address (with an IPv4 tail): a key is never longer.
LONGEST_ADDRESS = 45


def client_key(address: str, ipv6_prefix: int) -> str | int:
    """Whom the rate limit counts: an IPv4 address, or an IPv6 address's first ``ipv6_prefix`` bits.

    One IPv6 subscriber gets a /64 (or a /56, a /48) and may take any address
    in it, so a per-address limit would be no limit. IPv4 addresses, the
    common case, are never parsed; an IPv4 address mapped into IPv6 counts
    as itself. Anything unparsable counts as its text, cut short.
    """
    if ":" not in address:
        return address[:LONGEST_ADDRESS]
    try:
        parsed = ipaddress.IPv6Address(address)
    except ValueError:
        return address[:LONGEST_ADDRESS]
    if parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return int(parsed) >> (128 - ipv6_prefix)


# Where the clients past RateLimiter.clients are counted, together: no client's key
# (IPv6 keys are never negative), whatever a header says.
OVERFLOW = -1


class RateLimiter:
    """At most ``limit`` requests per client per ``window`` seconds, in constant time and bounded memory.

    Two dicts of counts: this window's and the last one's. At a window's end
    the last is dropped whole and this one takes its place, so a client seen
    once is forgotten two windows later without being read again, and a
    request costs two dict lookups whatever the limit (Litestar's limiter
    decoded, grew and encoded a list of every request of the window). A
    request passes while the last window's count, weighted by the share of it
    still within one window of now, plus this window's count, is below the
    limit: a sliding window's estimate, with no burst of twice the limit
    across a boundary. A refused request is not counted.

    At most ``clients`` clients are counted per window; newcomers past them
    share one counter (OVERFLOW) with one client's allowance. A storm of
    fresh addresses then gets one client's worth, the clients already
    counted keep theirs, and memory stays at about 2 x clients x 100 bytes.
    """

    def __init__(self, limit: int, window: float, clients: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.clients = clients
        self.clock = clock
        self.current: dict[str | int, int] = {}
        self.previous: dict[str | int, int] = {}
        self.ends = clock() + window

    def take(self, client: str | int) -> tuple[bool, int, int]:
        """Count a request: (allowed, requests remaining, seconds until the window ends or, refused, to wait)."""
        now = self.clock()
        if now >= self.ends:
            self.turn(now)
        current = self.current
        count = current.get(client)
        if count is None:
            if len(current) >= self.clients:
                client = OVERFLOW
                count = current.get(OVERFLOW, 0)
            else:
                count = 0
        left = self.ends - now
        earlier = self.previous.get(client, 0) * left / self.window
        if earlier + count + 1 > self.limit:
            return False, 0, self.wait(earlier, count, left)
        current[client] = count + 1
        return True, int(self.limit - earlier - count - 1), math.ceil(left)

    def turn(self, now: float) -> None:
        """Start the window that holds ``now``; a window with no request in it leaves nothing behind."""
        passed = (now - self.ends) // self.window
        self.previous = self.current if passed == 0 else {}
        self.current = {}
        self.ends += (passed + 1) * self.window

    def wait(self, earlier: float, count: int, left: float) -> int:
        """Whole seconds until the client's next request passes (at least 1)."""
        room = self.limit - 1 - count
        # No room: the next window, where this one's count is the last's, shrinking.
        # Room: this window, until the last window's weighted count has shrunk into it.
        seconds = left + self.window * (1 - (self.limit - 1) / count) if room < 0 else left - left * room / earlier
        # Less a rounding error, or a whole second would be added to an exact figure.
        return max(1, math.ceil(seconds - 1e-9))


TOO_MANY = msgspec.json.encode(Problem(429, "Too Many Requests", "Too Many Requests"))


def limit_writes(settings: Settings) -> Callable[[ASGIApp], ASGIApp]:
    """The rate limit, as raw ASGI middleware: no request object, the 429 sent from here.

    Every answer of a counted route carries the RateLimit-* headers of the
    IETF draft (Litestar's limiter sent the same), and a 429 Retry-After.
    """
    limit = max(1, round(settings.rate_limit_per_minute * settings.rate_limit_window / 60))
    limiter = RateLimiter(limit, settings.rate_limit_window, settings.rate_limit_clients)
    header = settings.client_ip_header.lower().encode()
    prefix = settings.rate_limit_ipv6_prefix
    fixed = [
        (b"ratelimit-policy", f"{limit}; w={settings.rate_limit_window}".encode()),
        (b"ratelimit-limit", str(limit).encode()),
    ]

    def middleware(app: ASGIApp) -> ASGIApp:
        async def limited(scope: Scope, receive: Receive, send: Send) -> None:
            if not writes_to_broker(scope):
                await app(scope, receive, send)
                return
            allowed, remaining, seconds = limiter.take(client_key(address_of(scope, header), prefix))
            if not allowed:
                wait = str(seconds).encode()
                headers = [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(TOO_MANY)).encode()),
                    (b"retry-after", wait),
                    *fixed,
                    (b"ratelimit-remaining", b"0"),
                    (b"ratelimit-reset", wait),
                ]
                start: HTTPResponseStartEvent = {"type": "http.response.start", "status": 429, "headers": headers}
                body: HTTPResponseBodyEvent = {"type": "http.response.body", "body": TOO_MANY, "more_body": False}
                await send(start)
                await send(body)
                return
            counts = [
                *fixed,
                (b"ratelimit-remaining", str(remaining).encode()),
                (b"ratelimit-reset", str(seconds).encode()),
            ]

            async def send_with_counts(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", ()), *counts]
                await send(message)

            await app(scope, receive, send_with_counts)

        return limited

    return middleware


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"strict-transport-security", b"max-age=31536000"),
    # The docs page runs Swagger UI's inline initializer; nothing loads from elsewhere.
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
        b"img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
]


async def add_security_headers(message: Message, _: Scope) -> None:
    if message["type"] == "http.response.start":
        message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]


# -- Routes ---------------------------------------------------------------------
#
# Each route documents its answers as it sends them (docs/api.md, "The
# schema"): the body it takes, every status with its problem and a real
# example, its headers. A client generated from /docs/openapi.json has one
# typed call per route, and one per job.

API_DESCRIPTION = """Start countdowns and jobs, follow them, cancel them (docs/api.md).

Bodies are decoded strictly. An `integer` is a JSON number written without a
fraction or exponent, as OpenAPI 3.1.0 defines it: `5`, never `5.0`, `5e0` or
`"5"`, each a 400. Unknown fields are refused. Every error is RFC 9457
problem details (`application/problem+json`)."""


class StrictJSON(MsgspecDTO[Body]):
    """Decode the body as JSON, strictly: "5" and 5.0 are not 5.

    Litestar's own decoding is lax and would turn "5" into 5. The body's
    schema is the type's own, under its name, and says that unknown fields
    are refused (Litestar leaves additionalProperties out).
    """

    def decode_bytes(self, value: bytes) -> Body:
        try:
            return msgspec.json.decode(value, type=self.model_type)
        except msgspec.DecodeError as error:
            raise ValidationException(detail=str(error)) from None

    @classmethod
    def create_openapi_schema(
        cls, field_definition: FieldDefinition, handler_id: str, schema_creator: SchemaCreator
    ) -> Reference | Schema:
        body = schema_creator.for_field_definition(FieldDefinition.from_annotation(cls.model_type))
        schema = body if isinstance(body, Schema) else schema_creator.schema_registry.from_reference(body).schema
        if cls.model_type.__struct_config__.forbid_unknown_fields:
            schema.additional_properties = False
        return body


NOT_JSON = "the body must be JSON: Content-Type: application/json"
TOO_SLOW = f"the body took more than {BODY_TIMEOUT_SECONDS} s"


async def require_json(request: Request[Any, Any, Any]) -> None:
    if request.content_type[0] != "application/json":
        raise ClientException(status_code=415, detail=NOT_JSON)
    try:
        async with asyncio.timeout(BODY_TIMEOUT_SECONDS):
            body = await request.body()
    except TimeoutError:
        raise ClientException(status_code=408, detail=TOO_SLOW) from None
    except InternalServerException:
        # Litestar's word for a client that left before its body ended.
        raise ValidationException(detail="the body ended before its Content-Length") from None
    if not body:
        expected = '{"seconds": <integer>}' if request.url.path == "/tasks" else "an object of the job's arguments"
        raise ValidationException(detail=f"the body is empty; expected {expected}")


@dataclass
class Documented(Operation):
    """An operation as the API answers it, for what ResponseSpec cannot say.

    The 401 goes where no token is asked (API_TOKEN empty: the route carries
    no bearer requirement); 401, 429 and 503 carry their headers; and the 400
    that Litestar adds to any route with a parameter (its own error model, as
    JSON) goes: every 400 the API sends is declared by its route, as
    problem+json.
    """

    def __post_init__(self) -> None:
        responses = self.responses if self.responses is not None else {}
        default = responses.get("400")
        if isinstance(default, OpenAPIResponse) and MediaType.JSON in (default.content or {}):
            del responses["400"]
        if not self.security:
            responses.pop("401", None)
        for status, response in responses.items():
            if isinstance(response, OpenAPIResponse) and status in ANSWER_HEADERS:
                response.headers = {**(response.headers or {}), **ANSWER_HEADERS[status]}


def header(description: str) -> OpenAPIHeader:
    return OpenAPIHeader(schema=Schema(type=OpenAPIType.STRING), description=description, required=True)


RETRY_AFTER = {"Retry-After": header("Seconds to wait before trying again.")}
# What limit_writes adds to every answer of a write while RATE_LIMIT_PER_MINUTE is not 0.
RATE_LIMIT_HEADERS = {
    ("RateLimit-Limit", "60"): "Writes this client may make per window.",
    ("RateLimit-Remaining", "59"): "Writes it has left.",
    ("RateLimit-Reset", "60"): "Seconds until the window ends (on a 429: until the next write passes).",
    ("RateLimit-Policy", "60; w=60"): "`<limit>; w=<window seconds>`.",
}
ANSWER_HEADERS = {
    "401": {"WWW-Authenticate": header('`Bearer realm="onebox"`: send `Authorization: Bearer <API_TOKEN>`.')},
    "429": {
        **RETRY_AFTER,
        **{
            name: OpenAPIHeader(
                schema=Schema(type=OpenAPIType.STRING), description=f"{text} Unless from an event stream's limit."
            )
            for (name, _), text in RATE_LIMIT_HEADERS.items()
        },
    },
    "503": RETRY_AFTER,
}


# Starting later: query parameters, not body fields, so that a job's body stays
# exactly its keyword arguments (a job may have an argument called "delay").
Delay = Annotated[
    int | None,
    Parameter(
        ge=1,
        le=tasks.LONGEST_SCHEDULE,
        description="Start the task this many seconds from now (1 to 604800: 7 days). Not with `at`.",
    ),
]
# A string, parsed here: an instant without its offset, or with a "+" that the
# URL turned into a space, gets an answer that says so.
At = Annotated[
    str | None,
    Parameter(
        max_length=64,
        schema_extra={"format": "date-time"},
        description="Start the task at this instant, RFC 3339 with its UTC offset (`2026-05-01T09:00:00Z`; "
        "in a URL, `+02:00` is `%2B02:00`), in the future and at most 7 days ahead. Not with `delay`.",
    ),
]
RFC_3339 = "an RFC 3339 instant with its UTC offset, as in 2026-05-01T09:00:00Z or 2026-05-01T11:00:00+02:00"


def due_time(delay: int | None, at: str | None) -> float | None:
    """When the task is due (seconds since the epoch), or None: at once."""
    if delay is not None and at is not None:
        raise ValidationException(detail="give delay or at, not both")
    now = time.time()
    if delay is not None:
        return now + delay
    if at is None:
        return None
    try:
        instant = msgspec.convert(at, datetime)
    except msgspec.ValidationError:
        hint = "; in a URL a + reads as a space: write it %2B" if " " in at else ""
        raise ValidationException(detail=f"at must be {RFC_3339}{hint}") from None
    if instant.tzinfo is None:
        raise ValidationException(detail=f"at must be {RFC_3339}: {at} has no offset")
    due = instant.timestamp()
    if due <= now:
        raise ValidationException(detail=f"at {at} is in the past")
    if due > now + tasks.LONGEST_SCHEDULE:
        furthest = timestamp(now + tasks.LONGEST_SCHEDULE).isoformat(timespec="seconds")
        raise ValidationException(detail=f"at {at} is more than 7 days ahead (until {furthest})")
    return due


Answer = tuple[int, str, str] | tuple[int, str, str, list[dict[str, Any]]]


def problems(*answers: Answer) -> dict[int, ResponseSpec]:
    """Answers as documented: (status, when, the detail of a real one[, its errors])."""
    return {
        status: ResponseSpec(
            Problem,
            description=when,
            media_type="application/problem+json",
            generate_examples=False,
            examples=[Example(value=msgspec.to_builtins(Problem(status, HTTPStatus(status).phrase, *example)))],
        )
        for status, when, *example in answers
    }


UNAUTHORIZED = (401, "API_TOKEN is set and the bearer token is missing or wrong.", "a valid bearer token is required")
# Every write: POST /tasks, POST /jobs/<name>, DELETE /tasks/{id} (writes_to_broker).
RATE_LIMITED = (
    429,
    "More than RATE_LIMIT_PER_MINUTE writes from this client this minute (unless it is 0); see Retry-After.",
    "Too Many Requests",
)
# What every start refuses before the broker is asked.
WRITE_REFUSED = [
    (408, f"The body took more than {BODY_TIMEOUT_SECONDS} s to arrive.", TOO_SLOW),
    (413, "The body is larger than MAX_BODY_BYTES.", "Request Entity Too Large"),
    (415, "The body is not Content-Type: application/json.", NOT_JSON),
    RATE_LIMITED,
    UNAUTHORIZED,
]
EXAMPLE_ID = "5671b11c-2004-494d-91e1-0f445ac3fb0e"
NOT_QUEUED = (
    "cannot reach the broker at 127.0.0.1:5672: nothing accepts connections there (connection refused); retrying"
)
LIMITED_HEADERS = [
    ResponseHeader(
        name=name, value=value, documentation_only=True, description=f"{text} While RATE_LIMIT_PER_MINUTE is not 0."
    )
    for (name, value), text in RATE_LIMIT_HEADERS.items()
]
ACCEPTED_HEADERS = [
    ResponseHeader(
        name="Location", value=f"/tasks/{EXAMPLE_ID}", documentation_only=True, required=True, description="The task."
    ),
    *LIMITED_HEADERS,
]


@post(
    "/tasks",
    status_code=202,
    dto=StrictJSON[TaskRequest],
    return_dto=None,
    before_request=require_json,
    responses=problems(
        (400, "Not a valid countdown; `detail` says what and where.", "Expected `int`, got `str` - at `$.seconds`"),
        *WRITE_REFUSED,
        (503, "RabbitMQ did not take the task; `detail` says why. Retry after Retry-After.", NOT_QUEUED),
    ),
    response_headers=ACCEPTED_HEADERS,
    operation_class=Documented,
    operation_id="create_task",
    summary="Start a countdown",
)
async def create_task(
    data: JSONBody[TaskRequest],
    publisher: NamedDependency[TaskPublisher],
    feed: NamedDependency[EventsFeed],
    delay: Delay = None,
    at: At = None,
) -> Response[TaskAccepted]:
    """Queue a countdown of `seconds`, to start at once, after `delay` seconds or
    `at` an instant. 202 means RabbitMQ has confirmed it, durably."""
    due = due_time(delay, at)
    message = tasks.countdown.message(data.seconds)
    try:
        await publisher.publish(message, due)
    except BrokerUnavailable as error:
        TASKS_UNAVAILABLE.labels(error.reason).inc()
        raise
    TASKS_ACCEPTED.inc()
    queued_at = message.message_timestamp / 1000
    status: Literal["queued", "scheduled"] = "queued" if due is None else "scheduled"
    feed.announce(
        tasks.TaskEvent(
            message.message_id, status, queued_at, tasks.countdown.actor_name, total=data.seconds, due=due or 0
        )
    )
    due_at = None if due is None else timestamp(due)
    accepted = TaskAccepted(message.message_id, data.seconds, status, timestamp(queued_at), due_at)
    return Response(accepted, status_code=202, headers={"Location": f"/tasks/{message.message_id}"})


# What a job route's `data` is: each route names its job's own type (signature_namespace).
JobArguments = msgspec.Struct


def job_route(name: str, job: tasks.Job) -> HTTPRouteHandler:
    """POST /jobs/<name>: a route of the job's own, its body the job's keyword arguments.

    Every job's route is made here: a query parameter shared by all of them
    goes in start_job's signature.
    """

    async def start_job(
        data: JSONBody[JobArguments],
        publisher: NamedDependency[TaskPublisher],
        feed: NamedDependency[EventsFeed],
        delay: Delay = None,
        at: At = None,
    ) -> Response[JobAccepted]:
        due = due_time(delay, at)
        message = job.actor.message_with_options(kwargs=msgspec.to_builtins(data))
        await publisher.publish(message, due)
        queued_at = message.message_timestamp / 1000
        status: Literal["queued", "scheduled"] = "queued" if due is None else "scheduled"
        feed.announce(tasks.TaskEvent(message.message_id, status, queued_at, name, due=due or 0))
        due_at = None if due is None else timestamp(due)
        accepted = JobAccepted(message.message_id, name, status, timestamp(queued_at), due_at)
        return Response(accepted, status_code=202, headers={"Location": f"/tasks/{message.message_id}"})

    return post(
        f"/jobs/{name}",
        status_code=202,
        dto=StrictJSON[job.arguments],  # type: ignore[name-defined]  # a type known at run time
        return_dto=None,
        signature_namespace={"JobArguments": job.arguments},
        before_request=require_json,
        responses=problems(
            (400, "Not the job's arguments; `detail` says what and where.", "Expected `object`, got `array`"),
            *WRITE_REFUSED,
            (503, "RabbitMQ did not take the job; `detail` says why. Retry after Retry-After.", NOT_QUEUED),
        ),
        response_headers=ACCEPTED_HEADERS,
        operation_class=Documented,
        operation_id=f"start_{name}",
        summary=f"Start a {name} job",
        description=f"{inspect.getdoc(job.actor.fn) or ''}\n\n"
        "Its keyword arguments, checked against the function's types; it starts at once, after `delay` "
        "seconds or `at` an instant. 202 means RabbitMQ has confirmed it; GET /tasks/{id} follows it.",
    )(start_job)


@post("/jobs/{name:str}", include_in_schema=False)
async def unknown_job(name: FromPath[str]) -> None:
    """Any other name: 404 before the body is read."""
    raise NotFoundException(detail=f"no job {name!r}; the jobs are {', '.join(sorted(tasks.jobs))}")


@get(
    "/tasks",
    responses=problems(
        (
            400,
            "`limit` or `offset` out of range; `errors` says which.",
            "Validation failed for GET /tasks?limit=0",
            [{"message": "Expected `int` >= 1", "key": "limit", "source": "query"}],
        ),
        UNAUTHORIZED,
    ),
    operation_class=Documented,
    operation_id="list_tasks",
    summary="Recent tasks",
)
async def list_tasks(
    feed: NamedDependency[EventsFeed],
    limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
    offset: Annotated[int, Parameter(ge=0, le=1_000_000)] = 0,
) -> TaskPage:
    """The tasks this web process knows, newest first."""
    known = feed.board.tasks
    newest_first = list(reversed(known.values()))
    return TaskPage(newest_first[offset : offset + limit], len(known), limit, offset)


UNKNOWN_TASK = (404, "No such task here, or no longer remembered.", TaskBoard(settings).unknown(EXAMPLE_ID).detail)


@get(
    "/tasks/{task_id:str}",
    responses=problems(UNKNOWN_TASK, UNAUTHORIZED),
    operation_class=Documented,
    operation_id="get_task",
    summary="A task's status",
)
async def get_task(task_id: FromPath[str], feed: NamedDependency[EventsFeed]) -> TaskView:
    """Status, job, progress, result or error, timestamps and attempts."""
    if view := feed.board.tasks.get(task_id):
        return view
    raise feed.board.unknown(task_id)


class StreamSlots:
    """How many live event streams are open, in all and per client.

    A stream holds a connection and a coroutine for as long as its task runs:
    unbounded, a few thousand from one address would starve every other
    request of the process.
    """

    def __init__(self, settings: Settings) -> None:
        self.total, self.per_client = settings.max_event_streams, settings.max_event_streams_per_client
        self.held: dict[str, int] = {}

    def take(self, client: str) -> None:
        if self.held.get(client, 0) >= self.per_client:
            raise ClientException(status_code=429, detail=self.client_full(), headers={"Retry-After": "5"})
        if sum(self.held.values()) >= self.total:
            raise ServiceUnavailableException(detail=self.server_full(), headers={"Retry-After": "5"})
        self.held[client] = self.held.get(client, 0) + 1

    def give_back(self, client: str) -> None:
        if (left := self.held.pop(client) - 1) > 0:
            self.held[client] = left

    def client_full(self) -> str:
        return f"this client has {self.per_client} event streams open, the most it may"

    def server_full(self) -> str:
        return f"this server has {self.total} event streams open, the most it holds; poll GET /tasks/{{id}}"


EXAMPLE_VIEW = msgspec.json.encode(
    TaskView(
        EXAMPLE_ID,
        "countdown",
        "running",
        1,
        1,
        3,
        datetime(2026, 11, 25, 4, 7, 42, 23000, tzinfo=UTC),
        tasks.NO_RESULT,
        seconds=3,
        remaining=2,
        queued_at=datetime(2026, 11, 25, 4, 7, 41, 13000, tzinfo=UTC),
        started_at=datetime(2026, 11, 25, 4, 7, 41, 22000, tzinfo=UTC),
    )
).decode()
EVENT_STREAM = ResponseSpec(
    # The body is text; read as events (OpenAPI 3.2's itemSchema, Schemathesis), each is a TaskChange.
    cast("type[Any]", str | TaskChange),
    description="Server-Sent Events, until the task ends. Each event is named for the task's status "
    "(`event: running`) and carries the task as GET /tasks/{id} returns it, one line of JSON (`data: {...}`): "
    f"a TaskChange. A comment (`: keep-alive`) comes after {KEEPALIVE_SECONDS} s without news. The last event "
    "is `succeeded`, `failed` or `cancelled`; then the stream ends.",
    media_type="text/event-stream",
    generate_examples=False,
    examples=[Example(value=f"event: running\r\ndata: {EXAMPLE_VIEW}\r\n\r\n: keep-alive\r\n\r\n")],
)


@get(
    "/tasks/{task_id:str}/events",
    responses={
        200: EVENT_STREAM,
        **problems(
            UNKNOWN_TASK,
            UNAUTHORIZED,
            (
                429,
                "This client has MAX_EVENT_STREAMS_PER_CLIENT streams open; see Retry-After.",
                StreamSlots(settings).client_full(),
            ),
            (
                503,
                "This server has MAX_EVENT_STREAMS streams open; see Retry-After.",
                StreamSlots(settings).server_full(),
            ),
        ),
    },
    operation_class=Documented,
    operation_id="task_events",
    summary="A task's changes, live",
)
async def task_events(
    task_id: FromPath[str], feed: NamedDependency[EventsFeed], request: Request[Any, Any, Any]
) -> ServerSentEvent:
    """Server-Sent Events: the task after each change (event = its status), until it ends."""
    board = feed.board
    if task_id not in board.tasks:
        raise board.unknown(task_id)
    slots: StreamSlots = request.app.state.streams
    client = client_address(request)
    slots.take(client)

    async def changes() -> AsyncIterator[ServerSentEventMessage]:
        try:
            sent = b""
            while view := board.tasks.get(task_id):
                current = msgspec.json.encode(view)
                if current != sent:
                    yield ServerSentEventMessage(data=current.decode(), event=view.status)
                    sent = current
                if view.status in FINISHED:
                    return
                if not await board.wait_for_change(task_id, KEEPALIVE_SECONDS):
                    # Proxies close a connection that stays silent too long.
                    yield ServerSentEventMessage(comment="keep-alive", data=None)
        finally:
            slots.give_back(client)

    return ServerSentEvent(changes())


@delete(
    "/tasks/{task_id:str}",
    status_code=202,
    responses=problems(
        UNKNOWN_TASK,
        (
            409,
            "The task has succeeded or failed: there is nothing to cancel.",
            f"task {EXAMPLE_ID} has succeeded; it cannot be cancelled",
        ),
        RATE_LIMITED,
        UNAUTHORIZED,
        (503, "RabbitMQ did not take the cancellation; `detail` says why. Retry after Retry-After.", NOT_QUEUED),
    ),
    response_headers=LIMITED_HEADERS,
    operation_class=Documented,
    operation_id="cancel_task",
    summary="Cancel a task",
)
async def cancel_task(
    task_id: FromPath[str], publisher: NamedDependency[TaskPublisher], feed: NamedDependency[EventsFeed]
) -> TaskView:
    """A task that waits (scheduled, queued, retrying, handed back) never starts again;
    a running one stops at its next tick. Repeating is harmless.

    The task stays readable: `cancelling`, then `cancelled` (docs/api.md)."""
    board = feed.board
    view = board.tasks.get(task_id)
    if view is None:
        raise board.unknown(task_id)
    if view.status in ("succeeded", "failed"):
        raise ClientException(status_code=409, detail=f"task {task_id} has {view.status}; it cannot be cancelled")
    if view.status in ("cancelling", "cancelled"):
        return view  # already in the stream: a repeat writes nothing
    await publisher.cancel(task_id)
    if view.status in WAITING:
        # It will never start: every worker checks the stream before it runs a task.
        feed.announce(
            tasks.TaskEvent(task_id, "cancelled", time.time(), view.actor, view.attempts, view.done, view.total)
        )
    else:
        view.status = "cancelling"
        board.notify(task_id)
    return view


PAGE = Path(__file__).with_name("index.html").read_text()


@get("/", media_type=MediaType.HTML, include_in_schema=False)
async def page() -> str:
    """A page to start countdowns, watch them and cancel them."""
    return PAGE


@get("/healthz", operation_id="healthz", summary="Liveness")
async def healthz() -> Status:
    """The process answers. No I/O: a broker outage must not get it restarted."""
    return Status(status="ok")


@get(
    "/readyz",
    responses=problems((503, "The broker connection is not usable; `detail` says why.", NOT_QUEUED)),
    operation_class=Documented,
    operation_id="readyz",
    summary="Readiness",
)
async def readyz(link: NamedDependency[BrokerLink]) -> Status:
    """Ready while the broker connection is usable."""
    if not link.ready:
        raise BrokerUnavailable(link.problem)
    return Status(status="ready")


@route(["/tasks", "/tasks/{task_id:str}"], http_method=HttpMethod.OPTIONS, include_in_schema=False)
async def allowed_methods(request: Request[Any, Any, Any]) -> Response[None]:
    """Every method of the path: Litestar 2's own OPTIONS answer lists only
    those of the first handler registered on it (litestar#4169)."""
    path = request.scope["path_template"]
    methods = {method for each in request.app.routes if each.path_format == path for method in each.methods}
    return Response(None, status_code=204, headers={"Allow": ", ".join(sorted(methods))})


# -- Periodic jobs --------------------------------------------------------------
#
# The jobs declared with @periodic (tasks.py) run their ticks from the one web
# process that holds the exclusive queue <queue>.scheduler: it has the board,
# so it knows each job's last tick and whether that run has ended. The others
# ask for the queue every few seconds and are refused (RESOURCE_LOCKED) while
# it lives; it dies with its holder's connection, and another takes over. A
# tick's task has an id made of the job and the tick's time, and its "queued"
# event is confirmed before the task is published: a scheduler that dies in
# between loses that tick rather than doubling it, and one that takes over
# reads the events stream up to here before its first tick (docs/jobs.md).

SCHEDULER_RETRY_SECONDS = 2.0
TICKS = uuid.UUID("6f0c39a2-5e0e-4a8c-9d43-0c1b8f6d2b57")  # the namespace of ticks' task ids


def tick_task_id(settings: Settings, schedule: tasks.Periodic, tick: float) -> str:
    """The id of a tick's task: the same in every web process, so a tick is one task."""
    return str(uuid.uuid5(TICKS, f"{settings.queue_name}/{schedule.name}/{tick:.3f}"))


def first_tick(schedule: tasks.Periodic, last: Tick | None, now: float) -> float | None:
    """What a scheduler that takes over runs at once: the latest tick that
    came while none ran, if the job's ``missed`` policy says so. Never one for
    a job that has not run yet: it starts at its next tick."""
    latest = schedule.last_tick(now)
    if last is None or last.at >= latest or schedule.missed == "skip":
        return None
    return latest


class Scheduler:
    """Runs the periodic jobs' ticks while this web process holds <queue>.scheduler."""

    def __init__(self, publisher: TaskPublisher, feed: EventsFeed) -> None:
        self.publisher, self.feed, self.link = publisher, feed, publisher.link
        self.settings = publisher.settings
        self.queue = f"{self.settings.queue_name}.scheduler"
        self.leading = False
        self.refused = False  # said once: a broker that refuses the queue will refuse it again
        # Each job's last tick handled (queued, skipped or lost) while this process leads.
        self.handled: dict[str, float] = {}

    async def run(self) -> None:
        """Ask for the scheduler's queue until this process holds it, then run the ticks."""
        if not tasks.schedules:
            return
        await self.feed.caught_up.wait()
        while True:
            try:
                await self.lead()
            except (aiormq.exceptions.AMQPError, ConnectionError, BrokerUnavailable, TimeoutError) as error:
                logger.debug("not leading the periodic jobs: %s", self.link.describe(error))
            if self.leading:
                logger.warning("this web process no longer runs the periodic jobs")
            self.leading = False
            await asyncio.sleep(SCHEDULER_RETRY_SECONDS)

    async def lead(self) -> None:
        connection = self.link.connection
        if connection is None or not self.link.ready:
            return
        channel = await connection.channel()
        try:
            # Exclusive: the queue is this connection's alone, and goes with it.
            await channel.queue_declare(self.queue, exclusive=True)
        except aiormq.exceptions.ChannelLockedResource:
            return  # another web process leads
        except aiormq.exceptions.ChannelClosed as refusal:
            if not self.refused:
                logger.warning("the periodic jobs cannot run from here: queue %r refused: %s", self.queue, refusal)
            self.refused = True
            return
        lost = asyncio.Event()
        channel.closing.add_done_callback(lambda _: lost.set())
        # Consumed: a queue in use is not deleted as idle; and a cancel says it was deleted.
        channel.on_consumer_cancel_callbacks.add(lambda _: lost.set())
        await channel.basic_consume(self.queue, self.ignore, no_ack=True)
        try:
            await self.feed.read_to_here()
            self.leading = True
            logger.info("this web process runs the periodic jobs: %s", ", ".join(tasks.schedules))
            await self.take_over()
            await self.tick_until(lost)
        finally:
            if not channel.is_closed:
                await channel.close()

    async def ignore(self, _: DeliveredMessage) -> None:
        return None

    async def take_over(self) -> None:
        """Start each job from its last tick on the board; run a missed one as its policy says."""
        now, ticks = time.time(), self.feed.board.ticks
        for schedule in tasks.schedules.values():
            last = ticks.get(schedule.name)
            self.handled[schedule.name] = last.at if last is not None else schedule.last_tick(now)
            if (missed := first_tick(schedule, last, now)) is not None:
                await self.fire(schedule, missed)
            else:
                self.handled[schedule.name] = max(self.handled[schedule.name], schedule.last_tick(now))

    async def tick_until(self, lost: asyncio.Event) -> None:
        while not lost.is_set():
            now = time.time()
            due = {name: tasks.schedules[name].next_tick(handled) for name, handled in self.handled.items()}
            wake = min(due.values())
            if wake > now:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), wake - now)
                continue
            for name, tick in due.items():
                if tick <= now:
                    schedule = tasks.schedules[name]
                    # Late (a busy loop): the latest tick due, once; never a burst.
                    await self.fire(schedule, schedule.last_tick(now))

    async def fire(self, schedule: tasks.Periodic, tick: float) -> None:
        """Queue the job's task for the tick, unless its last run goes on (overlap="skip")."""
        self.handled[schedule.name] = tick  # handled, whatever happens next: lost rather than doubled
        board, at = self.feed.board, timestamp(tick).isoformat()
        last = board.ticks.get(schedule.name)
        running = board.tasks.get(last.task) if last is not None else None
        if schedule.overlap == "skip" and running is not None and running.status not in FINISHED:
            logger.info(
                "periodic job %s: tick %s skipped: the run of the tick before is %s",
                *(schedule.name, at, running.status),
            )
            return
        task_id = tick_task_id(self.settings, schedule, tick)
        job = tasks.jobs[schedule.job]
        event = tasks.TaskEvent(task_id, "queued", time.time(), schedule.job, periodic=schedule.name, tick=tick)
        try:
            await self.feed.record(event)
            await self.publisher.publish(
                job.actor.message_with_options(kwargs=schedule.arguments).copy(message_id=task_id)
            )
        except BrokerUnavailable as error:
            logger.warning("periodic job %s: tick %s lost: %s", schedule.name, at, error.detail)
            return
        logger.info("periodic job %s: tick %s queued as task %s", schedule.name, at, task_id)


class ScheduleView(msgspec.Struct):
    """A periodic job: its schedule, its next tick and its last run."""

    name: Annotated[str, msgspec.Meta(description="The schedule's name: the job's, unless @periodic named it.")]
    job: str
    every: Annotated[int | None, msgspec.Meta(description="Seconds between ticks; null for a cron schedule.")]
    cron: Annotated[str | None, msgspec.Meta(description="Five fields, in UTC; null for an interval.")]
    arguments: dict[str, Any]
    missed: Annotated[
        Literal["latest", "skip"],
        msgspec.Meta(description="A tick missed while no scheduler ran: run the latest once, or none."),
    ]
    overlap: Annotated[
        Literal["skip", "run"], msgspec.Meta(description="A tick while the last run goes on: skip it, or queue it.")
    ]
    next_at: datetime
    last_tick_at: Annotated[datetime | None, msgspec.Meta(description="The last tick that was queued.")]
    last_run: Annotated[TaskView | None, msgspec.Meta(description="Its task, while this web process remembers it.")]


class Schedules(msgspec.Struct):
    """Every periodic job, and whether this web process runs their ticks."""

    items: list[ScheduleView]
    runs_here: Annotated[bool, msgspec.Meta(description="This web process holds the scheduler's queue.")]


@get(
    "/schedules",
    responses=problems(UNAUTHORIZED),
    operation_class=Documented,
    operation_id="list_schedules",
    summary="Periodic jobs",
)
async def list_schedules(feed: NamedDependency[EventsFeed], scheduler: NamedDependency[Scheduler]) -> Schedules:
    """The jobs declared with `@periodic` in tasks.py: when each ticks next, and its last run."""
    now, board = time.time(), feed.board
    items = []
    for schedule in tasks.schedules.values():
        last = board.ticks.get(schedule.name)
        items.append(
            ScheduleView(
                schedule.name,
                schedule.job,
                schedule.every or None,
                schedule.cron or None,
                schedule.arguments,
                schedule.missed,
                schedule.overlap,
                timestamp(schedule.next_tick(now)),
                timestamp(last.at) if last is not None else None,
                board.tasks.get(last.task) if last is not None else None,
            )
        )
    return Schedules(items, scheduler.leading)


# -- The app ----------------------------------------------------------------------
#
# create_app puts the parts together; each piece of its configuration is a
# function of the settings, here in the order create_app uses them.


def problem_details(error: HTTPException) -> ProblemDetailsException:
    """One error shape: RFC 9457, with the exception's detail as `detail`."""
    errors = error.extra if isinstance(error.extra, list) else None
    headers = dict(error.headers or {})
    return ProblemDetailsException(
        status_code=error.status_code,
        title=HTTPStatus(error.status_code).phrase,
        detail=error.detail,
        headers=headers,
        extra={"errors": errors} if errors else None,
    )


@asynccontextmanager
async def connected(link: BrokerLink, feed: EventsFeed) -> AsyncIterator[None]:
    """The broker connection, kept for the life of the app.

    Platforms route traffic once the port answers: take none before the
    channel is open and the task board rebuilt, or a deploy's first requests
    get 503s and 404s. A broker that is down delays the start by one attempt
    (publish_timeout at most), no more.
    """
    keeper = asyncio.create_task(link.run())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(link.tried.wait(), link.settings.publish_timeout)
        if link.ready:
            await asyncio.wait_for(feed.caught_up.wait(), REBUILD_SECONDS)
    try:
        yield
    finally:
        keeper.cancel()
        await link.close()


@asynccontextmanager
async def in_background(work: Callable[[], Coroutine[Any, Any, None]]) -> AsyncIterator[None]:
    """``work`` runs for the life of the app."""
    task = asyncio.create_task(work())
    try:
        yield
    finally:
        task.cancel()


Lifespan = Callable[[Litestar], AbstractAsyncContextManager[None]]


def lifespans(link: BrokerLink, feed: EventsFeed, scheduler: Scheduler) -> list[Lifespan]:
    """The broker connection, the periodic jobs and, with METRICS, the broker's gauges."""
    hooks: list[Lifespan] = [lambda _: connected(link, feed), lambda _: in_background(scheduler.run)]
    if link.settings.metrics:
        hooks.append(lambda _: in_background(lambda: watch_broker(link)))
    return hooks


def api_router(settings: Settings) -> Router:
    """Every /tasks, /jobs and /schedules route: behind the token when one is
    set, and then, in the schema, exactly these routes ask for it."""
    return Router(
        "/",
        route_handlers=[
            # First: the path's own OPTIONS answer then stands for every method of it.
            allowed_methods,
            create_task,
            *(job_route(name, job) for name, job in tasks.jobs.items()),
            unknown_job,
            list_tasks,
            get_task,
            task_events,
            cancel_task,
            list_schedules,
        ],
        guards=[require_token] if settings.api_token else None,
        security=[{"bearer": []}] if settings.api_token else None,
    )


def middleware(settings: Settings) -> list[Middleware]:
    middleware: list[Middleware] = []
    if settings.metrics:
        # Outermost, so that it counts the limiter's 429s too.
        middleware.append(count_requests)
    if settings.rate_limit_per_minute:
        middleware.append(limit_writes(settings))
    return middleware


def cors_config(settings: Settings) -> CORSConfig | None:
    origins = [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]
    return CORSConfig(allow_origins=origins, allow_headers=["Authorization", "Content-Type"]) if origins else None


def openapi_config(settings: Settings) -> OpenAPIConfig:
    """The schema at /docs/openapi.json, and Swagger UI at /docs, served from the app's own assets."""
    bearer: dict[str, SecurityScheme | Reference] = {
        "bearer": SecurityScheme(type="http", scheme="bearer", description="API_TOKEN, when it is set.")
    }
    return OpenAPIConfig(
        title="onebox",
        version="0.1.0",
        description=API_DESCRIPTION,
        components=Components(security_schemes=bearer if settings.api_token else None),
        path="/docs",
        render_plugins=[
            SwaggerRenderPlugin(
                path="/",
                js_url="/docs/assets/swagger-ui-bundle.js",
                css_url="/docs/assets/swagger-ui.css",
                standalone_preset_js_url="/docs/assets/swagger-ui-standalone-preset.js",
                favicon="<link rel='icon' href='/docs/assets/favicon-32x32.png'>",
            )
        ],
    )


def logging_config(settings: Settings) -> LoggingConfig:
    return LoggingConfig(
        root={"level": settings.log_level, "handlers": ["queue_listener"]},
        formatters={"standard": {"()": "tasks.JsonLines"} if settings.log_format == "json" else {"format": LOG_FORMAT}},
        # Log the unexpected, not every client's mistake or a broker outage:
        # for these statuses Litestar writes no line at all, not only no
        # stack trace (tests/test_guards.py). Refusals are counted instead.
        log_exceptions="always",
        disable_stack_trace={400, 401, 404, 405, 408, 409, 413, 415, 429, 503},
    )


def create_app(link: BrokerLink, publisher: TaskPublisher, feed: EventsFeed) -> Litestar:
    """The web app, its routes given the broker side's three parts (web_parts)."""
    settings = link.settings
    scheduler = Scheduler(publisher, feed)
    return Litestar(
        route_handlers=[
            api_router(settings),
            page,
            healthz,
            readyz,
            # The API docs load their scripts from here, not from a CDN.
            create_static_files_router("/docs/assets", directories=[swagger_ui_path], include_in_schema=False),
        ],
        dependencies={
            "link": Provide(lambda: link, use_cache=True, sync_to_thread=False),
            "publisher": Provide(lambda: publisher, use_cache=True, sync_to_thread=False),
            "feed": Provide(lambda: feed, use_cache=True, sync_to_thread=False),
            "scheduler": Provide(lambda: scheduler, use_cache=True, sync_to_thread=False),
        },
        lifespan=lifespans(link, feed, scheduler),
        state=State({"settings": settings, "streams": StreamSlots(settings)}),
        middleware=middleware(settings),
        cors_config=cors_config(settings),
        before_send=[add_security_headers],
        plugins=[
            ProblemDetailsPlugin(ProblemDetailsConfig(exception_to_problem_detail_map={HTTPException: problem_details}))
        ],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=openapi_config(settings),
        logging_config=logging_config(settings),
    )


link, publisher, feed = web_parts(settings)
app = create_app(link, publisher, feed)
