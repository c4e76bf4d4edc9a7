"""The HTTP face of onebox: accept a countdown or a job, hand it to RabbitMQ, answer.

Read top to bottom: the bodies, the publisher (the web process's one AMQP
connection), the routes, error handling and the app. ``python tasks.py web``
serves it on granian; the countdown itself runs in tasks.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import aiormq
import dramatiq
import msgspec
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from litestar import Litestar, MediaType, Request, Response, delete, get, post
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.dto import MsgspecDTO
from litestar.exceptions import (
    ClientException,
    HTTPException,
    InternalServerException,
    NotAuthorizedException,
    NotFoundException,
    ServiceUnavailableException,
    ValidationException,
)
from litestar.handlers.base import BaseRouteHandler
from litestar.logging import LoggingConfig
from litestar.middleware.rate_limit import RateLimitConfig
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.params import FromPath, JSONBody, Parameter
from litestar.plugins.problem_details import ProblemDetailsConfig, ProblemDetailsException, ProblemDetailsPlugin
from litestar.plugins.prometheus import PrometheusConfig
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.static_files import create_static_files_router
from litestar.types import Message, Scope
from prometheus_client import Counter, Gauge
from swagger_ui_bundle import swagger_ui_path

import tasks
from tasks import Settings, settings

logger = logging.getLogger("onebox")
KEEPALIVE_SECONDS = 15
EVENT_BATCH_SECONDS = 0.05
BODY_TIMEOUT_SECONDS = 10
# The longest a starting web process waits to read the task events of its
# memory window before it serves anyway (README, "Task status").
REBUILD_SECONDS = 20
# Stream deliveries acknowledged at once: below the stream's window
# (tasks.STREAM_PREFETCH), or the broker would wait for an ack that never comes.
ACK_EVERY = 50
# The worker's format (Dramatiq's), so that both programs read alike.
LOG_FORMAT = "[%(asctime)s] [PID %(process)d] [%(name)s] [%(levelname)s] %(message)s"


# -- Bodies ------------------------------------------------------------------


class TaskRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A countdown to run: a JSON integer of seconds."""

    seconds: Annotated[int, msgspec.Meta(ge=1, le=settings.max_seconds, examples=[5])]


class TaskAccepted(msgspec.Struct):
    """RabbitMQ has the task, durably: it will run."""

    id: Annotated[str, msgspec.Meta(description="The Dramatiq message id.")]
    seconds: int
    status: Literal["queued"]
    queued_at: datetime


class JobAccepted(msgspec.Struct):
    """RabbitMQ has the job's task, durably: it will run."""

    id: Annotated[str, msgspec.Meta(description="The Dramatiq message id.")]
    actor: str
    status: Literal["queued"]
    queued_at: datetime


TaskStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
FINISHED = {"succeeded", "failed", "cancelled"}


class TaskView(msgspec.Struct, gc=False):
    """A task as this web process last heard of it (GET /tasks/{id})."""

    id: str
    actor: Annotated[str, msgspec.Meta(description="The job: countdown, or another @job in tasks.py.")]
    status: TaskStatus
    attempts: int
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
    errors: list[dict[str, Any]] | None = None


# -- Task status ----------------------------------------------------------------


def timestamp(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


class TaskBoard:
    """The recent tasks, as this web process reads them from the broker.

    Every web process reads every task event (tasks.py's events stream) and
    keeps the newest ``task_memory_count`` tasks for ``task_memory_seconds``.
    At start it reads the window's events again, so a restart forgets nothing.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tasks: OrderedDict[str, TaskView] = OrderedDict()
        self.changed: dict[str, asyncio.Event] = {}

    def window_start(self) -> datetime:
        return datetime.now(UTC) - timedelta(seconds=self.settings.task_memory_seconds)

    def apply(self, event: tasks.TaskEvent) -> None:
        view = self.tasks.get(event.id)
        at = timestamp(event.at)
        if view is None:
            view = TaskView(
                event.id, event.actor, "queued", event.attempt, event.done, event.total, at, tasks.NO_RESULT
            )
            self.remember(view)
        if event.event == "queued":
            # The worker's news can overtake the web process's own.
            view.queued_at = view.queued_at or at
            view.total = view.total or event.total
        elif view.status in FINISHED and event.attempt <= view.attempts:
            return  # news from after the end of this attempt
        else:
            self.update(view, event, at)
        if view.actor == tasks.countdown.actor_name:
            view.seconds, view.remaining = view.total, view.total - view.done
        self.notify(event.id)

    def update(self, view: TaskView, event: tasks.TaskEvent, at: datetime) -> None:
        # A job that has not said its total yet keeps the one it was queued with.
        view.attempts, view.updated_at = event.attempt, at
        view.done, view.total, view.message = event.done, event.total or view.total, event.message
        running: TaskStatus = "cancelling" if view.status == "cancelling" else "running"
        match event.event:
            case "started":
                view.status, view.started_at = running, at
            case "progress":
                view.status, view.started_at = running, view.started_at or at
            case "retrying":
                # Waiting for its next attempt, which a cancellation still stops.
                view.status = "cancelling" if view.status == "cancelling" else "queued"
                view.error = event.error
            case "succeeded" | "failed" | "cancelled":
                view.status, view.finished_at = event.event, at
                # The event's result points into the batch it came in: copied, the batch can go.
                view.result, view.error = event.result.copy(), event.error

    def remember(self, view: TaskView) -> None:
        self.tasks[view.id] = view
        oldest_kept = datetime.now(UTC).timestamp() - self.settings.task_memory_seconds
        while self.tasks and (
            len(self.tasks) > self.settings.task_memory_count
            or next(iter(self.tasks.values())).updated_at.timestamp() < oldest_kept
        ):
            self.tasks.popitem(last=False)

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
            f"after their last news, {self.settings.task_memory_count} at most; "
            "an older task may still be queued, running or done"
        )


# -- Publishing ---------------------------------------------------------------


class BrokerUnavailable(ServiceUnavailableException):
    """RabbitMQ did not take the task; the detail says why, the reason (a metric's label) in a word."""

    def __init__(self, detail: str, reason: str = "not_connected") -> None:
        super().__init__(detail=detail, headers={"Retry-After": "1"})
        self.reason = reason


class Publisher:
    """The web process's one AMQP connection, shared by all its requests.

    One channel in confirm mode carries every publish; many can await their
    confirms at once, so a remote broker's round trip does not cap throughput.
    ``run`` keeps the connection up for the life of the app, reconnecting by
    itself; while it is down, publishes fail at once instead of waiting.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.board = TaskBoard(settings)
        self.connection: AbstractConnection | None = None
        self.channel: aiormq.Channel | None = None
        self.events: aiormq.Channel | None = None
        self.outbox: list[tasks.TaskEvent] = []
        self.dropped_events = 0
        # The event loop holds tasks weakly: each batch's publish is kept here until done.
        self.sending: set[asyncio.Task[Any]] = set()
        self.problem = "not connected to the broker yet"
        self.ever_connected = asyncio.Event()
        # The task events stream: where this process has read to, and whether
        # it has read the past (up to a marker of its own).
        self.offset: int | None = None
        self.marker = ""
        self.caught_up = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self.channel is not None and not self.channel.is_closed

    async def run(self) -> None:
        while True:
            try:
                await self.connect()
                self.problem = ""
                self.ever_connected.set()
                logger.info("broker connected")
                assert self.connection is not None and self.channel is not None
                await asyncio.wait(
                    [self.connection.closing, self.channel.closing],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                self.problem = "the broker connection was lost; reconnecting"
            except Exception as error:  # noqa: BLE001 - any failure means: not connected, retry
                self.problem = f"cannot reach the broker: {self.describe(error)}"
            logger.warning("%s", self.problem)
            await self.close()
            await asyncio.sleep(1)

    async def connect(self) -> None:
        url = self.settings.cloudamqp_url
        separator = "&" if "?" in url else "?"
        async with asyncio.timeout(self.settings.publish_timeout):
            self.connection = await aiormq.connect(f"{url}{separator}heartbeat={self.settings.heartbeat}")
            channel = cast(aiormq.Channel, await self.connection.channel(publisher_confirms=True))
            await self.declare_queues(channel)
            self.events = cast(aiormq.Channel, await self.connection.channel())
            await self.listen_to_events(self.events)
        self.channel = channel

    async def listen_to_events(self, channel: AbstractChannel) -> None:
        """Read the task events of the memory window, then follow the stream.

        The first time, from a point in time: the board is rebuilt after a
        restart. After a reconnect, from the event after the last one read:
        nothing in between is missed, and applying an event twice changes
        nothing. Offsets are used only within one broker, never carried over.
        """
        stream = tasks.events_stream(self.settings)
        await channel.basic_qos(prefetch_count=tasks.STREAM_PREFETCH)
        start: datetime | int = self.offset + 1 if self.offset is not None else self.board.window_start()
        await channel.basic_consume(stream, self.on_event, arguments={"x-stream-offset": start})
        channel.on_consumer_cancel_callbacks.add(lambda _: self.relisten(channel))
        if not self.caught_up.is_set():
            self.marker = str(uuid.uuid4())
            marker = aiormq.spec.Basic.Properties(delivery_mode=2, message_type=tasks.SYNC, message_id=self.marker)
            await channel.basic_publish(b"", routing_key=stream, properties=marker)

    async def relisten(self, channel: AbstractChannel) -> None:
        """The stream was deleted: declare it again and read it from the window's start."""
        self.offset = None
        await channel.queue_declare(tasks.events_stream(self.settings), durable=True, arguments=tasks.EVENTS_ARGUMENTS)
        await self.listen_to_events(channel)

    async def on_event(self, message: DeliveredMessage) -> None:
        properties = message.header.properties
        if properties.message_type != tasks.SYNC:
            self.apply_batch(message.body)
        elif properties.message_id == self.marker and not self.caught_up.is_set():
            self.caught_up.set()
            logger.info("task board rebuilt: %d tasks", len(self.board.tasks))
        offset = (properties.headers or {}).get("x-stream-offset")
        if isinstance(offset, int):
            self.offset = offset
        # One acknowledgement for many: a start reads every message of the
        # window, and each ack is a frame. Fewer than the window stay unacked.
        assert message.delivery_tag is not None
        if message.delivery_tag % ACK_EVERY == 0 or properties.message_type == tasks.SYNC:
            await message.channel.basic_ack(message.delivery_tag, multiple=True)

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
        channel = self.events
        if channel is not None and not channel.is_closed:
            body = msgspec.json.encode(batch)
            sending = asyncio.create_task(
                channel.basic_publish(body, routing_key=tasks.events_stream(self.settings), wait=False)
            )
            self.sending.add(sending)
            sending.add_done_callback(self.sending.discard)

    async def declare_queues(self, channel: AbstractChannel) -> None:
        """Declare the queues exactly as the worker does (tasks.queues)."""
        for name, arguments in tasks.queues(self.settings).items():
            await channel.queue_declare(name, durable=True, arguments=arguments)

    async def close(self) -> None:
        connection, self.connection, self.channel, self.events = self.connection, None, None, None
        if connection is not None and not connection.is_closed:
            await connection.close()

    async def publish(self, message: dramatiq.Message[Any]) -> None:
        """Return once RabbitMQ has confirmed the task, or raise BrokerUnavailable."""
        await self.deliver(message.encode(), message.queue_name, message.message_id)

    async def cancel(self, task_id: str) -> None:
        """Record a cancellation in the durable stream every worker reads."""
        await self.deliver(task_id.encode(), tasks.cancellations_stream(self.settings), f"cancel:{task_id}")

    async def deliver(self, body: bytes, queue: str, message_id: str) -> None:
        channel = self.channel
        if channel is None or channel.is_closed:
            raise BrokerUnavailable(self.problem or "the broker connection is closed")
        try:
            await channel.basic_publish(
                body,
                routing_key=queue,
                properties=aiormq.spec.Basic.Properties(delivery_mode=2, message_id=message_id),
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
            # Somebody deleted the queue: declare it again for the next request.
            await self.declare_queues(channel)
            raise BrokerUnavailable(f"queue {queue!r} was missing; nothing was queued", "queue_missing") from None
        except aiormq.exceptions.DeliveryError:
            raise BrokerUnavailable("the broker refused the message; nothing was queued", "refused") from None
        except (aiormq.exceptions.AMQPError, ConnectionError) as error:
            raise BrokerUnavailable(
                f"the broker connection failed: {self.describe(error)}; it may or may not have taken the request",
                "connection_failed",
            ) from None

    def describe(self, error: BaseException) -> str:
        return tasks.redact(f"{type(error).__name__}: {error}", self.settings.cloudamqp_url)


# -- Metrics --------------------------------------------------------------------
#
# Web-side figures; tasks.py serves them with the worker's (README, "Metrics
# and logs"). Requests by route and status come from Litestar's middleware.

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


async def watch_broker(publisher: Publisher) -> None:
    """Keep the broker gauges fresh: connected or not, and the queue's depth.

    The depth comes from a passive declare on a channel of its own: when the
    queue is missing, RabbitMQ closes that channel, not the publisher's.
    """
    queue = publisher.settings.queue_name
    channel: AbstractChannel | None = None
    while True:
        BROKER_CONNECTED.set(1 if publisher.ready else 0)
        connection = publisher.connection
        if publisher.ready and connection is not None:
            try:
                async with asyncio.timeout(publisher.settings.publish_timeout):
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
                logger.debug("queue depth unknown: %s", publisher.describe(error))
        await asyncio.sleep(QUEUE_WATCH_SECONDS)


# -- Hardening ------------------------------------------------------------------


async def require_token(connection: ASGIConnection[Any, Any, Any, Any], __: BaseRouteHandler) -> None:
    """With API_TOKEN set, every /tasks and /jobs route takes "Authorization: Bearer <token>".

    Task ids, results and cancellation are each client's business; the page,
    the docs and the health checks stay open. An app guard installed only
    when a token is set, and async: for every request Litestar copies the
    handler for each guard, and runs a sync guard in a thread.
    """
    if not connection.scope["path"].startswith(("/tasks", "/jobs")):
        return
    token = connection.app.state.settings.api_token
    scheme, _, offered = connection.headers.get("authorization", "").partition(" ")
    # Constant time: how long a comparison takes must not leak the token.
    if scheme.lower() != "bearer" or not hmac.compare_digest(offered.encode(), token.encode()):
        raise NotAuthorizedException(
            detail="a valid bearer token is required", headers={"WWW-Authenticate": 'Bearer realm="onebox"'}
        )


def client_address(request: Request[Any, Any, Any]) -> str:
    """The client's address, from the platform's header when one is configured.

    Behind a proxy the socket peer is the proxy. Of a list (X-Forwarded-For)
    only the last entry is the proxy's own: the ones before it are whatever
    the client sent.
    """
    header = request.app.state.settings.client_ip_header
    if header and (value := request.headers.get(header)):
        return value.rsplit(",", 1)[-1].strip()
    return request.client.host if request.client else "unknown"


def writes_to_broker(request: Request[Any, Any, Any]) -> bool:
    """POST /tasks, POST /jobs/{name} and DELETE /tasks/{id}: what the rate limit counts.

    Each makes the broker store and deliver messages (and spends a plan's
    monthly quota); reads do not.
    """
    return request.method in ("POST", "DELETE") and request.url.path.startswith(("/tasks", "/jobs/"))


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


class StrictJSON(MsgspecDTO[TaskRequest]):
    """Decode the body as JSON, strictly: "5" and 5.0 are not 5.

    Litestar's own decoding is lax and would turn "5" into 5.
    """

    def decode_bytes(self, value: bytes) -> TaskRequest:
        try:
            return msgspec.json.decode(value, type=TaskRequest)
        except msgspec.DecodeError as error:
            raise ValidationException(detail=str(error)) from None


async def require_json(request: Request[Any, Any, Any]) -> None:
    if request.content_type[0] != "application/json":
        raise ClientException(status_code=415, detail="the body must be JSON: Content-Type: application/json")
    try:
        async with asyncio.timeout(BODY_TIMEOUT_SECONDS):
            body = await request.body()
    except TimeoutError:
        raise ClientException(status_code=408, detail=f"the body took more than {BODY_TIMEOUT_SECONDS} s") from None
    except InternalServerException:
        # Litestar's word for a client that left before its body ended.
        raise ValidationException(detail="the body ended before its Content-Length") from None
    if not body:
        expected = '{"seconds": <integer>}' if request.url.path == "/tasks" else "an object of the job's arguments"
        raise ValidationException(detail=f"the body is empty; expected {expected}")


ERRORS = {
    400: ResponseSpec(Problem, description="The body is not a valid task.", media_type="application/problem+json"),
    401: ResponseSpec(
        Problem,
        description="API_TOKEN is set and the bearer token is missing or wrong.",
        media_type="application/problem+json",
    ),
    413: ResponseSpec(Problem, description="The body is too large.", media_type="application/problem+json"),
    408: ResponseSpec(Problem, description="The body came too slowly.", media_type="application/problem+json"),
    415: ResponseSpec(Problem, description="The body is not JSON.", media_type="application/problem+json"),
    429: ResponseSpec(
        Problem, description="Too many tasks from this client; see Retry-After.", media_type="application/problem+json"
    ),
    503: ResponseSpec(
        Problem, description="The broker did not take the task; retry.", media_type="application/problem+json"
    ),
}


@post(
    "/tasks",
    status_code=202,
    dto=StrictJSON,
    return_dto=None,
    before_request=require_json,
    responses=ERRORS,
    summary="Start a countdown",
)
async def create_task(data: JSONBody[TaskRequest], publisher: NamedDependency[Publisher]) -> Response[TaskAccepted]:
    """Queue a countdown of `seconds`. 202 means RabbitMQ has confirmed it, durably."""
    message = tasks.countdown.message(data.seconds)
    try:
        await publisher.publish(message)
    except BrokerUnavailable as error:
        TASKS_UNAVAILABLE.labels(error.reason).inc()
        raise
    TASKS_ACCEPTED.inc()
    queued_at = message.message_timestamp / 1000
    publisher.announce(
        tasks.TaskEvent(message.message_id, "queued", queued_at, tasks.countdown.actor_name, total=data.seconds)
    )
    accepted = TaskAccepted(message.message_id, data.seconds, "queued", timestamp(queued_at))
    return Response(accepted, status_code=202, headers={"Location": f"/tasks/{message.message_id}"})


@post(
    "/jobs/{name:str}",
    status_code=202,
    before_request=require_json,
    responses={
        **ERRORS,
        404: ResponseSpec(Problem, description="No job of that name.", media_type="application/problem+json"),
    },
    summary="Start a job",
)
async def start_job(
    name: FromPath[str], request: Request[Any, Any, Any], publisher: NamedDependency[Publisher]
) -> Response[JobAccepted]:
    """Queue the job `name` (a function declared with `@job` in tasks.py) with its
    keyword arguments as a JSON object, checked against the function's types.
    202 means RabbitMQ has confirmed it; GET /tasks/{id} follows it."""
    job = tasks.jobs.get(name)
    if job is None:
        raise NotFoundException(detail=f"no job {name!r}; the jobs are {', '.join(sorted(tasks.jobs))}")
    try:
        arguments = msgspec.json.decode(await request.body(), type=job.arguments)
    except msgspec.DecodeError as error:
        raise ValidationException(detail=str(error)) from None
    message = job.actor.message_with_options(kwargs=msgspec.to_builtins(arguments))
    await publisher.publish(message)
    queued_at = message.message_timestamp / 1000
    publisher.announce(tasks.TaskEvent(message.message_id, "queued", queued_at, name))
    accepted = JobAccepted(message.message_id, name, "queued", timestamp(queued_at))
    return Response(accepted, status_code=202, headers={"Location": f"/tasks/{message.message_id}"})


@get(
    "/tasks",
    responses={400: ResponseSpec(Problem, description="A bad page.", media_type="application/problem+json")},
    summary="Recent tasks",
)
async def list_tasks(
    publisher: NamedDependency[Publisher],
    limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
    offset: Annotated[int, Parameter(ge=0, le=1_000_000)] = 0,
) -> TaskPage:
    """The tasks this web process knows, newest first."""
    known = publisher.board.tasks
    newest_first = list(reversed(known.values()))
    return TaskPage(newest_first[offset : offset + limit], len(known), limit, offset)


TASK_NOT_FOUND = {
    404: ResponseSpec(Problem, description="Unknown here, or expired.", media_type="application/problem+json")
}


@get("/tasks/{task_id:str}", responses=TASK_NOT_FOUND, summary="A task's status")
async def get_task(task_id: FromPath[str], publisher: NamedDependency[Publisher]) -> TaskView:
    """Status, job, progress, result or error, timestamps and attempts."""
    if view := publisher.board.tasks.get(task_id):
        return view
    raise publisher.board.unknown(task_id)


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
            raise ClientException(
                status_code=429,
                detail=f"this client has {self.per_client} event streams open, the most it may",
                headers={"Retry-After": "5"},
            )
        if sum(self.held.values()) >= self.total:
            raise ServiceUnavailableException(
                detail=f"this server has {self.total} event streams open, the most it holds; poll GET /tasks/{{id}}",
                headers={"Retry-After": "5"},
            )
        self.held[client] = self.held.get(client, 0) + 1

    def give_back(self, client: str) -> None:
        if (left := self.held.pop(client) - 1) > 0:
            self.held[client] = left


@get(
    "/tasks/{task_id:str}/events",
    responses={
        **TASK_NOT_FOUND,
        429: ResponseSpec(
            Problem, description="This client's streams are all open.", media_type="application/problem+json"
        ),
        503: ResponseSpec(
            Problem, description="The server's streams are all open.", media_type="application/problem+json"
        ),
    },
    summary="A task's changes, live",
)
async def task_events(
    task_id: FromPath[str], publisher: NamedDependency[Publisher], request: Request[Any, Any, Any]
) -> ServerSentEvent:
    """Server-Sent Events: the task after each change (event = its status), until it ends."""
    board = publisher.board
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
    responses={
        **TASK_NOT_FOUND,
        409: ResponseSpec(Problem, description="The task has finished.", media_type="application/problem+json"),
        503: ERRORS[503],
    },
    summary="Cancel a task",
)
async def cancel_task(task_id: FromPath[str], publisher: NamedDependency[Publisher]) -> TaskView:
    """A queued task never starts; a running one stops at its next tick. Repeating is harmless."""
    board = publisher.board
    view = board.tasks.get(task_id)
    if view is None:
        raise board.unknown(task_id)
    if view.status in ("succeeded", "failed"):
        raise ClientException(status_code=409, detail=f"task {task_id} has {view.status}; it cannot be cancelled")
    if view.status in ("cancelling", "cancelled"):
        return view  # already in the stream: a repeat writes nothing
    await publisher.cancel(task_id)
    if view.status == "queued":
        # It will never start: every worker checks the stream before it runs a task.
        publisher.announce(
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


@get("/healthz", summary="Liveness")
async def healthz() -> Status:
    """The process answers. No I/O: a broker outage must not get it restarted."""
    return Status(status="ok")


@get("/readyz", responses={503: ERRORS[503]}, summary="Readiness")
async def readyz(publisher: NamedDependency[Publisher]) -> Status:
    """Ready while the broker connection is usable."""
    if not publisher.ready:
        raise BrokerUnavailable(publisher.problem)
    return Status(status="ready")


# -- Errors and the app -----------------------------------------------------------


def problem_details(error: HTTPException) -> ProblemDetailsException:
    """One error shape: RFC 9457, with the exception's detail as `detail`."""
    errors = error.extra if isinstance(error.extra, list) else None
    headers = dict(error.headers or {})
    if error.status_code == 429:
        # Litestar's limiter says when its window resets; clients read Retry-After.
        headers.setdefault("Retry-After", headers.get("RateLimit-Reset", "60"))
    return ProblemDetailsException(
        status_code=error.status_code,
        title=HTTPStatus(error.status_code).phrase,
        detail=error.detail,
        headers=headers,
        extra={"errors": errors} if errors else None,
    )


def create_app(publisher: Publisher) -> Litestar:
    settings = publisher.settings

    @asynccontextmanager
    async def broker_connection(_: Litestar) -> AsyncIterator[None]:
        keeper = asyncio.create_task(publisher.run())
        # Platforms route traffic once the port answers: take none before the
        # channel is open and the task board rebuilt, or a deploy's first
        # requests get 503s and 404s. A broker that is down delays the start
        # by publish_timeout, no more.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(publisher.ever_connected.wait(), settings.publish_timeout)
            await asyncio.wait_for(publisher.caught_up.wait(), REBUILD_SECONDS)
        try:
            yield
        finally:
            keeper.cancel()
            await publisher.close()

    @asynccontextmanager
    async def broker_metrics(_: Litestar) -> AsyncIterator[None]:
        watcher = asyncio.create_task(watch_broker(publisher))
        try:
            yield
        finally:
            watcher.cancel()

    middleware = []
    if settings.metrics:
        # Outermost, so that it counts the limiter's 429s too; by route, not by task id.
        middleware.append(PrometheusConfig(app_name="onebox", group_path=True).middleware)
    if settings.rate_limit_per_minute:
        limit = RateLimitConfig(
            rate_limit=("minute", settings.rate_limit_per_minute),
            identifier_for_request=client_address,
            check_throttle_handler=writes_to_broker,
        )
        middleware.append(limit.middleware)
    origins = [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]

    return Litestar(
        route_handlers=[
            create_task,
            start_job,
            list_tasks,
            get_task,
            task_events,
            cancel_task,
            page,
            healthz,
            readyz,
            # The API docs load their scripts from here, not from a CDN.
            create_static_files_router("/docs/assets", directories=[swagger_ui_path], include_in_schema=False),
        ],
        guards=[require_token] if settings.api_token else None,
        dependencies={"publisher": Provide(lambda: publisher, use_cache=True, sync_to_thread=False)},
        lifespan=[broker_connection, broker_metrics] if settings.metrics else [broker_connection],
        state=State({"settings": settings, "streams": StreamSlots(settings)}),
        middleware=middleware,
        cors_config=CORSConfig(allow_origins=origins, allow_headers=["Authorization", "Content-Type"])
        if origins
        else None,
        before_send=[add_security_headers],
        plugins=[
            ProblemDetailsPlugin(ProblemDetailsConfig(exception_to_problem_detail_map={HTTPException: problem_details}))
        ],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="onebox",
            version="0.1.0",
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
        ),
        logging_config=LoggingConfig(
            root={"level": settings.log_level, "handlers": ["queue_listener"]},
            formatters={
                "standard": {"()": "tasks.JsonLines"} if settings.log_format == "json" else {"format": LOG_FORMAT}
            },
            # Log the unexpected, not every client's mistake or a broker outage.
            log_exceptions="always",
            disable_stack_trace={400, 401, 404, 405, 408, 409, 413, 415, 429, 503},
        ),
    )


app = create_app(Publisher(settings))
