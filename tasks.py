"""What runs in the background, and what the web side shares with it.

Where things are, section by section (each a ``# -- <name> --`` line):

- Settings: Settings, every knob, from settings.toml and the environment.
- Logs: secrets redacted from every record; JSON lines with LOG_FORMAT=json.
- Broker and queues: what onebox declares, from tables (the queues, streams
  and delay levels); what a failure to reach the broker means (Trouble);
  Broker, Dramatiq's own, declaring from the tables.
- Task status: TaskEvent, the one contract with the web side; the worker's
  part: WorkerLink (the task queue's connection, lent to every thread),
  CancellationsFeed and TaskRuns (each run, told as events).
- Metrics: the worker's figures, and the one endpoint for web and worker.
- Jobs: @job and progress(); the countdown and the README's tally.
- Periodic jobs: @periodic, and Periodic, a job's schedule.
- The two programs: ``python tasks.py web`` and ``python tasks.py worker``,
  as supervisord runs them.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import inspect
import logging
import math
import os
import re
import resource
import shutil
import signal
import ssl
import sys
import tempfile
import threading
import time
import typing
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import chain
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, ParamSpec, cast, overload
from urllib.parse import unquote, urlsplit

import dramatiq
import msgspec
import pika
import pika.exceptions
from cronsim import CronSim
from dramatiq.broker import MessageProxy
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL, RabbitmqBroker, _RabbitmqConsumer
from dramatiq.common import dq_name, q_name, xq_name
from dramatiq.errors import BrokerConnectionError, ConnectionClosed
from dramatiq.middleware import CurrentMessage, Middleware, Retries, SkipMessage
from msgspec import Meta
from pika.adapters.utils.connection_workflow import AMQPConnectorStackTimeout

# -- Settings --------------------------------------------------------------------------

SETTINGS_FILE = Path(__file__).with_name("settings.toml")

# RabbitMQ closes a channel whose delivery stays unacknowledged past its
# consumer_timeout (30 minutes by default): a countdown must end well before.
LONGEST_COUNTDOWN = 1500
# CloudAMQP's shared plans close a connection that holds more than 1,000
# unacknowledged messages. The worker's task-queue connection also reads the
# cancellation stream: its two windows together stay within that by
# construction.
UNACKED_PER_CONNECTION = 1000
STREAM_PREFETCH = 100


class Settings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Every knob onebox has; docs/settings.md explains each."""

    cloudamqp_url: Annotated[str, Meta(pattern=r"^amqps?://")]
    queue_name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}$")]
    heartbeat: Annotated[int, Meta(ge=1, le=60)]
    publish_timeout: Annotated[float, Meta(gt=0, le=30)]
    port: Annotated[int, Meta(ge=1, le=65535)]
    web_workers: Annotated[int, Meta(ge=1, le=32)]
    max_body_bytes: Annotated[int, Meta(ge=64, le=1_048_576)]
    max_connections: Annotated[int, Meta(ge=64, le=1_000_000)]
    worker_processes: Annotated[int, Meta(ge=1, le=32)]
    worker_threads: Annotated[int, Meta(ge=1, le=UNACKED_PER_CONNECTION - STREAM_PREFETCH)]
    queue_prefetch: Annotated[int, Meta(ge=1, le=UNACKED_PER_CONNECTION - STREAM_PREFETCH)]
    max_retries: Annotated[int, Meta(ge=0, le=10)]
    max_seconds: Annotated[int, Meta(ge=1, le=LONGEST_COUNTDOWN)]
    task_memory_count: Annotated[int, Meta(ge=1, le=1_000_000)]
    task_memory_seconds: Annotated[int, Meta(ge=1, le=7 * 86400)]
    progress_every: Annotated[int, Meta(ge=0, le=LONGEST_COUNTDOWN)]
    # Stopping takes up to stop_grace + 6 s; supervisord kills at 30 s.
    stop_grace: Annotated[int, Meta(ge=1, le=20)]
    # A pattern, not a Literal, so that an error lists the choices.
    log_level: Annotated[str, Meta(pattern="^(DEBUG|INFO|WARNING|ERROR)$")]
    api_token: Annotated[str, Meta(pattern=r"^(|[\x21-\x7e]{16,})$", description="empty, or 16+ visible characters")]
    rate_limit_per_minute: Annotated[int, Meta(ge=0, le=1_000_000)]
    rate_limit_window: Annotated[int, Meta(ge=1, le=3600)]
    rate_limit_clients: Annotated[int, Meta(ge=1, le=1_000_000)]
    rate_limit_ipv6_prefix: Annotated[int, Meta(ge=1, le=128)]
    max_event_streams: Annotated[int, Meta(ge=1, le=100_000)]
    max_event_streams_per_client: Annotated[int, Meta(ge=1, le=1000)]
    client_ip_header: Annotated[str, Meta(pattern=r"^[A-Za-z0-9-]*$")]
    cors_origins: str
    # Development: restart web and worker when main.py, tasks.py or settings.toml change.
    reload: bool
    # RabbitMQ cluster (docs/scaling.md).
    queue_type: Annotated[str, Meta(pattern="^(classic|quorum)$")]
    # Metrics and logs (docs/operations.md).
    metrics: bool
    metrics_port: Annotated[int, Meta(ge=1, le=65535)]
    log_format: Annotated[str, Meta(pattern="^(text|json)$")]
    # Jobs (docs/jobs.md).
    result_max_bytes: Annotated[int, Meta(ge=16, le=1_000_000)]

    def __post_init__(self) -> None:
        if self.queue_prefetch < self.worker_threads:
            raise ValueError("queue_prefetch must be at least worker_threads, or threads sit idle")
        if self.max_event_streams >= self.max_connections:
            raise ValueError("max_event_streams must be below max_connections, or streams starve the health checks")
        if self.metrics and self.metrics_port == self.port:
            raise ValueError("metrics_port must differ from port: the public port must not show metrics")


def load_settings(path: Path = SETTINGS_FILE, environ: dict[str, str] | None = None) -> Settings:
    """Read settings.toml, let environment variables override it, validate."""
    environ = dict(os.environ) if environ is None else environ
    raw: dict[str, Any] = msgspec.toml.decode(path.read_bytes())
    for name in Settings.__struct_fields__:
        if name.upper() in environ:
            raw[name] = environ[name.upper()]
    try:
        # Lax conversion: environment variables are strings ("8000" -> 8000).
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as error:
        message, _, where = str(error).partition(" - at `$.")
        name = where.rstrip("`").upper() or "settings"
        raise SystemExit(f"onebox: invalid setting {name}: {message}") from None


def redact(text: str, url: str, *secrets: str) -> str:
    """The text without the broker URL's password (nor ``secrets``), for logs and error bodies."""
    password = urlsplit(url).password or ""
    for secret in (password, unquote(password), *secrets):
        if secret:
            text = text.replace(secret, "***")
    return text


settings = load_settings()
logger = logging.getLogger("onebox")
logger.setLevel(settings.log_level)


# -- Logs ------------------------------------------------------------------------------


def hide_secrets(text: str) -> str:
    return redact(text, settings.cloudamqp_url, settings.api_token)


class RedactedRecord(logging.LogRecord):
    """A log record without the broker password or API_TOKEN, its traceback
    included: a job's exception may carry them, and Dramatiq logs it.

    Every record of the process is one of these (the record factory), so
    every handler writes them redacted: granian's, Litestar's, Dramatiq's,
    and those made after this module loads.
    """

    def __init__(self, *arguments: Any, **options: Any) -> None:
        super().__init__(*arguments, **options)
        if self.exc_info:
            self.exc_text = hide_secrets(logging.Formatter().formatException(self.exc_info))

    def getMessage(self) -> str:
        return hide_secrets(super().getMessage())


logging.setLogRecordFactory(RedactedRecord)

# LOG_FORMAT=json: one JSON object per line, for log drains. Every formatter
# of both programs (granian, Litestar, Dramatiq's processes) is this one.

# Task lines carry these as fields (``extra=`` on the log call).
TASK_FIELDS = ("task_id", "attempt", "remaining", "seconds")


class JsonLines(logging.Formatter):
    """A log record as one line of JSON (redacted, as every record is)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            # run_web and run_worker name the program for all their processes.
            "process": os.environ.get("ONEBOX_PROGRAM", record.processName),
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update((name, record.__dict__[name]) for name in TASK_FIELDS if name in record.__dict__)
        if record.exc_text:
            line["exception"] = record.exc_text
        return msgspec.json.encode(line).decode()


class StderrLines(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a line is logged: Dramatiq points
    it at its log pipe in each process it forks."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


if settings.log_format == "json" and not logging.getLogger().handlers:
    # First: Dramatiq's logging.basicConfig then leaves it in place.
    json_handler = StderrLines()
    json_handler.setFormatter(JsonLines())
    logging.getLogger().addHandler(json_handler)
    logging.getLogger().setLevel(settings.log_level)


# -- Broker and queues -----------------------------------------------------------------
#
# Web and worker declare the same queues, exchanges and bindings with the same
# arguments (RabbitMQ refuses a second declaration that differs), from these
# tables: on CloudAMQP's free plans, 27 of the 100 queues allowed (6 for the
# work, 21 delay levels), and 21 exchanges of its own, all for the delays.


def events_stream(settings: Settings) -> str:
    return f"{settings.queue_name}.events"


def cancellations_stream(settings: Settings) -> str:
    return f"{settings.queue_name}.cancellations"


def snapshots_stream(settings: Settings) -> str:
    return f"{settings.queue_name}.snapshots"


# RabbitMQ trims a stream a whole segment at a time and always keeps the last
# one; with its default segment (500 MB) a small stream is never trimmed at
# all. Small segments make x-max-age and x-max-length-bytes bite. (LavinMQ's
# segments are 8 MiB whatever is asked.)
STREAM_SEGMENT_BYTES = 1_000_000
# A task may be scheduled up to a week ahead, then wait up to a week in the
# queue: a cancellation must outlive both, or a worker that starts after it
# was trimmed would run a cancelled task.
LONGEST_SCHEDULE = 7 * 86400
CANCELLATION_RETENTION = 14 * 86400
CANCELLATIONS_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "stream",
    "x-max-age": "14D",
    "x-max-length-bytes": 10_000_000,
    "x-stream-max-segment-size-bytes": STREAM_SEGMENT_BYTES,
}
# Task events for the longest TASK_MEMORY_SECONDS; 50 MB holds those of some
# 30,000 countdowns. Fixed, not from settings: a change of setting must not
# make the declaration differ.
EVENTS_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "stream",
    "x-max-age": "7D",
    "x-max-length-bytes": 50_000_000,
    "x-stream-max-segment-size-bytes": STREAM_SEGMENT_BYTES,
}
# Snapshots of the web processes' task boards (main.py, "Board snapshots"): a
# start reads the newest and the events written since. A week, like the events
# they stand for; 50 MB holds five of the largest snapshot a web process writes.
SNAPSHOTS_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "stream",
    "x-max-age": "7D",
    "x-max-length-bytes": 50_000_000,
    "x-stream-max-segment-size-bytes": STREAM_SEGMENT_BYTES,
}
# The AMQP message type of a marker that a reader writes to a stream at start:
# reading up to its own marker tells it that the past has been read.
SYNC = "sync"


def queues(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every queue onebox's work depends on, with its declaration arguments.

    The task queue, its delay and dead-letter queues and the delay levels are
    of QUEUE_TYPE; ``classic`` adds nothing, so that the first three stay
    exactly as Dramatiq declares them (docs/scaling.md).
    """
    queue = settings.queue_name
    kind = {"x-queue-type": "quorum"} if settings.queue_type == "quorum" else {}
    dead_letters = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": xq_name(queue), **kind}
    return {
        queue: dead_letters,
        dq_name(queue): dead_letters,
        # Messages expire head first: the TTL must be the same for all.
        xq_name(queue): {"x-message-ttl": DEAD_MESSAGE_TTL, **kind},
        cancellations_stream(settings): CANCELLATIONS_ARGUMENTS,
        events_stream(settings): EVENTS_ARGUMENTS,
        snapshots_stream(settings): SNAPSHOTS_ARGUMENTS,
        **{delay_level(settings, level): level_arguments(settings, level) for level in range(DELAY_LEVELS)},
    }


# Delays. A task that starts later waits in the broker, in no worker: a
# message held unacknowledged until its time would break RabbitMQ's
# consumer_timeout and count against CloudAMQP's 1,000 unacknowledged per
# connection. The delay, in units of DELAY_UNIT_MS rounded up, is written in
# binary in the routing key, one word per bit, highest first: "0.0. ... .1.0.1"
# (NServiceBus's scheme; plain AMQP, no plugin: RabbitMQ and LavinMQ alike).
# Level k is a topic exchange and a queue whose every message waits 2^k units
# (x-message-ttl; one TTL per queue, so messages expire in arrival order). Its
# exchange sends a key with bit k set into its queue and one without it on to
# level k-1; its queue, once a message has waited, dead-letters it into level
# k-1 with the same key. Level 0 passes on into the task queue. A message thus
# waits exactly its delay, one publish and one delivery whatever its length,
# and no consumer ever holds it.
DELAY_UNIT_MS = 500  # how late a task may start for rounding: lateness p99 stays under a second
DELAY_LEVELS = 21  # 2^21 - 1 half-seconds: 12.1 days, past LONGEST_SCHEDULE and Dramatiq's longest backoff (7 days)
LONGEST_DELAY_MS = ((1 << DELAY_LEVELS) - 1) * DELAY_UNIT_MS


def delay_level(settings: Settings, level: int) -> str:
    """The name of level ``level``: its queue, and its exchange."""
    return f"{settings.queue_name}.delay.{level}"


def level_arguments(settings: Settings, level: int) -> dict[str, Any]:
    onwards: dict[str, Any] = (
        {"x-dead-letter-exchange": delay_level(settings, level - 1)}
        if level
        else {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": settings.queue_name}
    )
    # Quorum queues dead-letter at most once unless told otherwise.
    replicated = (
        {"x-queue-type": "quorum", "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
        if settings.queue_type == "quorum"
        else {}
    )
    return {"x-message-ttl": DELAY_UNIT_MS << level, **onwards, **replicated}


def exchanges(settings: Settings) -> list[str]:
    """onebox's own exchanges (all topic, durable): one per delay level."""
    return [delay_level(settings, level) for level in range(DELAY_LEVELS)]


class Binding(typing.NamedTuple):
    """Messages to the exchange ``source`` whose key matches ``pattern`` go on to ``destination``."""

    source: str
    pattern: str
    destination: str
    to_exchange: bool


def bindings(settings: Settings) -> list[Binding]:
    """Each level's two ways on: bit set, into its queue; bit clear, to the level below."""
    routes = []
    for level in range(DELAY_LEVELS):
        name = delay_level(settings, level)
        below, to_exchange = (delay_level(settings, level - 1), True) if level else (settings.queue_name, False)
        routes.append(Binding(name, bit_pattern(level, "1"), name, False))
        routes.append(Binding(name, bit_pattern(level, "0"), below, to_exchange))
    return routes


def bit_pattern(level: int, bit: str) -> str:
    # Every word spelled out: LavinMQ's topic matching has "#" match no word at the end.
    words = ["*"] * DELAY_LEVELS
    words[DELAY_LEVELS - 1 - level] = bit
    return ".".join(words)


class Delayed(typing.NamedTuple):
    """Where a message that must wait ``delay_ms`` is published: exchange and routing key."""

    exchange: str
    routing_key: str


def delayed(settings: Settings, delay_ms: float) -> Delayed:
    """The route of a delay; rounded up to whole units, so a task never starts early."""
    units = math.ceil(delay_ms / DELAY_UNIT_MS)
    if not 0 < units < 1 << DELAY_LEVELS:
        raise ValueError(f"a delay must be from 1 ms to {LONGEST_DELAY_MS} ms, not {delay_ms} ms")
    key = ".".join(str(units >> level & 1) for level in reversed(range(DELAY_LEVELS)))
    return Delayed(delay_level(settings, DELAY_LEVELS - 1), key)


def start_at(settings: Settings, message: dramatiq.Message[Any], due: float) -> tuple[dramatiq.Message[Any], Delayed]:
    """The message to publish so that it starts at ``due`` (seconds since the
    epoch), and its route. The message carries its due time: a worker never
    runs it before (TaskRuns), even on a broker whose TTLs round down."""
    route = delayed(settings, (due - time.time()) * 1000)
    return message.copy(options={"due": due}), route


def declare(channel: Any, settings: Settings) -> None:
    """Declare every queue, exchange and binding of the tables, in about one round trip.

    Each declaration goes out without waiting for its answer (no-wait, through
    pika's asynchronous channel under the blocking one): 90 of them would
    otherwise take 90 round trips, seconds on a broker 30 ms away. The broker
    handles a channel's methods in order and closes the channel at the first
    refusal, so the last, synchronous declaration either raises that refusal
    or proves every one before it done.
    """
    pipeline = channel._impl
    for name, arguments in queues(settings).items():
        pipeline.queue_declare(name, durable=True, arguments=arguments)
    for name in exchanges(settings):
        pipeline.exchange_declare(name, exchange_type="topic", durable=True)
    for route in bindings(settings):
        if route.to_exchange:
            pipeline.exchange_bind(route.destination, route.source, route.pattern)
        else:
            pipeline.queue_bind(route.destination, route.source, route.pattern)
    channel.queue_declare(settings.queue_name, passive=True)


# Reaching the broker. Web and worker meet the same failures when they
# connect, and each failure has one outcome (docs/brokers.md, "When the broker
# fails at start"). Only a person can fix a refused login, a missing virtual
# host or access to it, or a refused declaration: a program that meets one
# before it ever reached the broker stops with one line that says what to fix.
# Everything else may pass by itself (nothing listening yet, a silent or
# stalled broker, TLS, a full connection limit): the programs stay up, the API
# answers 503 with the line, and both reconnect on their own.


class Trouble(msgspec.Struct, frozen=True):
    """A failed attempt to reach or use the broker, as one line for logs and 503s."""

    line: str
    needs_a_person: bool


def broker_address(settings: Settings) -> str:
    parts = urlsplit(settings.cloudamqp_url)
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    return f"{parts.hostname}:{port}"


def refused_connection(code: int, reason: str, settings: Settings) -> Trouble:
    """The broker closed the connection during its handshake, with ``code`` and ``reason``."""
    parts = urlsplit(settings.cloudamqp_url)
    user, vhost = unquote(parts.username or "guest"), unquote(parts.path[1:]) or "/"
    if code == 403:
        return Trouble(
            f"the broker at {broker_address(settings)} refused the login of user {user!r} ({reason}): "
            "check the user name and password in CLOUDAMQP_URL",
            needs_a_person=True,
        )
    if "connection limit" in reason:
        # Another container (or client) holds the virtual host's connections: they come back.
        return Trouble(f"the broker refused a connection: {reason} ({code}); retrying", needs_a_person=False)
    return Trouble(
        f"the broker refused user {user!r} the virtual host {vhost!r} ({reason}, {code}): check the virtual "
        "host (the path of CLOUDAMQP_URL) and that the user may use it",
        needs_a_person=True,
    )


def unreachable(error: BaseException, settings: Settings, seconds: float) -> Trouble:
    """A connection attempt that failed before the broker said why: it may pass by itself.

    ``seconds``: how long the client waited for the broker's handshake.
    """
    text = redact(str(error), settings.cloudamqp_url)
    if isinstance(error, ssl.SSLError) or "[SSL" in text:
        what = f"TLS failed: {text}"
    elif isinstance(error, ConnectionRefusedError) or "Connection refused" in text or "Connect call failed" in text:
        what = "nothing accepts connections there (connection refused)"
    elif isinstance(error, TimeoutError | AMQPConnectorStackTimeout):
        what = f"it did not answer within {seconds:g} s (no AMQP handshake)"
    # Both clients' IncompatibleProtocolError, and aiormq's bare end of stream.
    elif (
        isinstance(error, EOFError | StopAsyncIteration)
        or "IncompatibleProtocol" in type(error).__name__
        or "unexpectedly closed" in text
    ):
        what = "the server closed the connection during the AMQP handshake (is this a broker's AMQP port?)"
    else:
        what = f"{type(error).__name__}: {text}"
    return Trouble(f"cannot reach the broker at {broker_address(settings)}: {what}; retrying", needs_a_person=False)


def diagnose(error: BaseException, settings: Settings) -> Trouble:
    """What a pika connection failure means (main.py reads aiormq's)."""
    if isinstance(error, pika.exceptions.ProbableAuthenticationError | pika.exceptions.ProbableAccessDeniedError):
        # pika keeps the broker's close as text: "ConnectionClosedByBroker: (530) 'NOT_ALLOWED - ...'".
        found = re.search(r"\((\d{3})\) ['\"](.*)['\"]", str(error.args[0]) if error.args else "")
        code, reason = (int(found[1]), found[2]) if found else (403, str(error))
        return refused_connection(code, reason, settings)
    if isinstance(error, pika.exceptions.ConnectionClosedByBroker):
        return refused_connection(error.reply_code, error.reply_text, settings)
    return unreachable(cause(error), settings, connection_parameters(settings).stack_timeout)


def cause(error: BaseException) -> BaseException:
    """What happened under pika's wrappers (a connect error wraps a socket's, say)."""
    inner = getattr(error, "exception", None)
    if inner is None and isinstance(error, pika.exceptions.AMQPConnectionError) and error.args:
        inner = error.args[0]
    return cause(inner) if isinstance(inner, BaseException) else error


def refused_declaration(code: int, reason: str, settings: Settings) -> Trouble:
    """The broker refused a declaration: one line with what it refused, its reason and what to do.

    Declarations go out without waiting for each answer (declare): the
    broker's reason names the first one it refused.
    """
    named = re.search(r"\b(queue|exchange) '([^']*)'", reason)
    kind, name = named.groups() if named else ("queue", settings.queue_name)
    if code == 403:
        advice = "give the broker user configure, write and read permission on it"
    # RabbitMQ's words, then LavinMQ's.
    elif "inequivalent arg" in reason or "declared with other arguments" in reason:
        advice = (
            "it exists with other arguments (an older onebox, or by hand): delete it "
            "(management UI, or rabbitmqctl delete_queue) and start again"
        )
    else:
        advice = "check the broker's policies, limits and enabled queue types for it"
    return Trouble(f"the broker refused {kind} {name!r}: {reason} ({code}); {advice}", needs_a_person=True)


def declare_all(settings: Settings) -> Trouble | None:
    """The worker's first contact: declare everything on a connection of its own.

    Returns what went wrong, or None; the connection is closed either way.
    """
    try:
        connection = pika.BlockingConnection(connection_parameters(settings))
    except (pika.exceptions.AMQPError, AMQPConnectorStackTimeout, OSError) as error:
        return diagnose(error, settings)
    try:
        try:
            declare(connection.channel(), settings)
        except (pika.exceptions.ChannelClosedByBroker, pika.exceptions.ConnectionClosedByBroker) as refusal:
            return refused_declaration(refusal.reply_code, refusal.reply_text, settings)
    except (pika.exceptions.AMQPError, OSError) as error:
        return diagnose(error, settings)
    finally:
        if connection.is_open:
            connection.close()
    return None


def stop_at_start(trouble: Trouble) -> NoReturn:
    """Stop a program that a person must help: one line, exit status 1.

    Under supervisord, three such starts make the program FATAL and end the
    container, so the platform shows the line and does not loop for ever.
    """
    logger.critical("onebox: %s", trouble.line)
    # Not os._exit: the exit handlers write out the log lines still queued.
    raise SystemExit(1)


class Broker(RabbitmqBroker):
    """Dramatiq's RabbitMQ broker, declaring from the table above (Dramatiq
    knows no queue type) and holding no connection it does not use.

    Declaring the queues opens a connection in each consumer thread, which
    then idles for the life of the worker; a stock worker holds four
    connections for one queue. Closing it after the declaration leaves one
    connection per consumed queue (the queue and its delay queue).
    """

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        return queues(settings)[queue_name]

    def _declare_xq_queue(self, queue_name: str) -> Any:
        # Dramatiq declares its dead-letter queue with arguments of its own.
        arguments = queues(settings)[xq_name(queue_name)]
        return self.channel.queue_declare(queue=xq_name(queue_name), durable=True, arguments=arguments)

    @property
    def consumer_class(self) -> type[dramatiq.Consumer]:
        return Consumer

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        """Send a message; with ``delay`` (milliseconds), through the delay levels.

        Never into Dramatiq's delay queue, where a worker would hold it
        unacknowledged until its time. Dramatiq's Retries sends a retry this
        way: its backoff may grow to hours. In a worker, the task queue's
        consumer thread publishes it and this returns once RabbitMQ confirmed
        it (WorkerLink.publish): a worker thread opens no connection.
        """
        exchange, routing_key = "", q_name(message.queue_name)
        if delay is not None:
            message, route = start_at(settings, message, time.time() + delay / 1000)
            exchange, routing_key = route
        run = task_runs.running()
        retrying = run is not None and run.id == message.message_id
        self.emit_before("enqueue", message, delay)
        try:
            if worker_link.connection is not None:
                worker_link.publish(exchange, routing_key, message.encode())
            elif delay is None:
                super().enqueue(message)
            else:  # no worker here (a script): Dramatiq's channel of this thread
                self.channel.basic_publish(exchange, routing_key, message.encode(), PERSISTENT, mandatory=True)
        except ConnectionClosed as error:  # NotConfirmed, or Dramatiq's own
            if not retrying:
                raise
            # The failed attempt goes back to the queue instead of being acknowledged: retried, not lost.
            assert run is not None
            run.given_back = True
            logger.warning("task %s: its retry was not confirmed (%s); giving it back to the queue", run.id, error)
            return message
        if retrying and delay is not None:
            assert run is not None
            run.due = message.options["due"]
        self.emit_after("enqueue", message, delay)
        return message

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> dramatiq.Consumer:
        # Declare again on every (re)start: a queue deleted meanwhile (CloudAMQP
        # deletes one unused for 28 days) comes back without a restart.
        self.queues_pending.add(q_name(queue_name))
        try:
            consumer = super().consume(queue_name, prefetch, timeout)
        # Dramatiq logs a ConnectionError in one line, and anything else with a
        # traceback: say what happened, once per attempt.
        except ConnectionClosed as closed:
            raise BrokerConnectionError(diagnose(closed.message, settings).line) from None  # type: ignore[no-untyped-call]
        except (AMQPConnectorStackTimeout, OSError) as error:
            raise BrokerConnectionError(diagnose(error, settings).line) from None  # type: ignore[no-untyped-call]
        del self.connection
        if queue_name == settings.queue_name:
            # Task events and cancellations ride on this connection too (WorkerLink, below).
            worker_link.attach(consumer.connection)  # type: ignore[attr-defined]
        return consumer


class Consumer(_RabbitmqConsumer):
    """Dramatiq's consumer, except that a delivery given back (TaskRuns)
    returns to the queue at once instead of being acknowledged."""

    def ack(self, message: MessageProxy) -> None:
        if not task_runs.takes_back(message):
            super().ack(message)  # type: ignore[no-untyped-call]
            return
        tag = message._tag
        self.known_tags.discard(tag)
        try:
            self.connection.add_callback_threadsafe(functools.partial(self.channel.basic_nack, tag, requeue=True))
        except pika.exceptions.AMQPError as error:
            # The connection is gone, and with it the delivery: RabbitMQ gives it to the next worker.
            logger.debug("task %s goes back with its connection: %s", message.message_id, error)


def connection_parameters(settings: Settings) -> pika.URLParameters:
    """The worker's connection: bounded waits and heartbeats, TLS verified."""
    parameters = pika.URLParameters(settings.cloudamqp_url)
    parameters.heartbeat = settings.heartbeat
    parameters.blocked_connection_timeout = settings.heartbeat * 2
    parameters.socket_timeout = settings.publish_timeout
    parameters.stack_timeout = settings.publish_timeout * 2
    parameters.connection_attempts = 1
    if parameters.ssl_options is not None and parameters.ssl_options.server_hostname is None:
        # pika checks the certificate's host name only when told the name.
        parameters.ssl_options = pika.SSLOptions(parameters.ssl_options.context, server_hostname=parameters.host)
    return parameters


broker = Broker(confirm_delivery=True)
# pika logs each failed connection with a traceback; diagnose() says it in one line.
logging.getLogger("pika").setLevel(logging.CRITICAL)
broker.parameters = connection_parameters(settings)
broker.add_middleware(CurrentMessage())
dramatiq.set_broker(broker)


# -- Task status -----------------------------------------------------------------------
#
# RabbitMQ is the only state shared between containers, in two streams. Task
# events: workers and web processes write them, every web process reads the
# last TASK_MEMORY_SECONDS of them at start and follows on (main.py), so a
# restart forgets nothing. Cancellations: every worker reads a week of them at
# start and follows on, so a task cancelled while no worker ran is still
# refused by the next one.


class TaskError(msgspec.Struct, gc=False):
    """Why an attempt failed: the exception's type and message, secrets redacted."""

    type: str
    message: str


NO_RESULT = msgspec.Raw(b"null")


class TaskEvent(msgspec.Struct, gc=False, omit_defaults=True):
    """A change in a task's life, as the web processes receive it: the one
    contract between workers and web processes. "scheduled" is a task
    accepted to start at ``due``; "retrying" is a failed attempt that will run
    again at ``due``; "failed" is the last one; "handed_back" is a task that a
    stopping worker gave back to the broker, to run again from the start."""

    id: str
    event: Literal[
        "queued", "scheduled", "started", "progress", "retrying", "handed_back", "succeeded", "failed", "cancelled"
    ]
    at: float  # seconds since the epoch
    actor: str
    attempt: int = 1  # Dramatiq's: failed attempts so far + 1
    # Progress as the job last reported it: done of total (0: not known), and what it is at.
    done: int = 0
    total: int = 0
    message: str = ""
    result: msgspec.Raw = NO_RESULT  # the job's return value, as JSON
    error: TaskError | None = None
    due: float = 0  # when a scheduled task or a retry is due, seconds since the epoch; 0: none
    # A periodic job's run ("queued" alone): the job's schedule, and the tick it runs for (seconds since the epoch).
    periodic: str = ""
    tick: float = 0.0


class CancellationsFeed:
    """The cancellation stream, as every worker reads it.

    ``attach`` (WorkerLink, on each new task-queue connection) reads the
    stream from the start of its retention and follows on, so that a task
    cancelled while no worker ran is still refused by the next one.
    ``caught_up`` is set once the past has been read (up to a marker of its
    own); ``is_cancelled`` says whether a task's cancellation was read.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cancelled: dict[str, float] = {}
        self.caught_up = threading.Event()
        self.marker = ""
        self.reading_since = 0.0

    def attach(self, channel: Any) -> None:
        """Read the stream on ``channel``; runs in the consumer thread that owns it."""
        self.reading_since = time.monotonic()
        self.follow(channel)
        self.marker = str(uuid.uuid4())
        marker = pika.BasicProperties(delivery_mode=2, type=SYNC, message_id=self.marker)
        channel.basic_publish("", cancellations_stream(self.settings), b"", marker)
        # The stream deleted under us: declare it again and read on.
        channel.add_on_cancel_callback(lambda _: self.follow(channel))

    def follow(self, channel: Any) -> None:
        stream = cancellations_stream(self.settings)
        channel.queue_declare(stream, durable=True, arguments=CANCELLATIONS_ARGUMENTS)
        # A point in time, not an offset number: LavinMQ counts from 1, RabbitMQ from 0.
        since = datetime.now(UTC) - timedelta(seconds=CANCELLATION_RETENTION)
        channel.basic_consume(stream, self.on_cancellation, arguments={"x-stream-offset": since})

    def on_cancellation(self, channel: Any, method: Any, properties: pika.BasicProperties, body: bytes) -> None:
        if properties.type == SYNC:
            if properties.message_id == self.marker:
                self.caught_up.set()
                elapsed = time.monotonic() - self.reading_since
                logger.info("cancellations read: %d known, in %.2f s", len(self.cancelled), elapsed)
        else:
            now = time.time()
            self.cancelled[body.decode(errors="replace")] = now
            if len(self.cancelled) % 1000 == 0:
                self.cancelled = {key: at for key, at in self.cancelled.items() if at > now - CANCELLATION_RETENTION}
        channel.basic_ack(method.delivery_tag)

    def is_cancelled(self, task_id: str) -> bool:
        return task_id in self.cancelled


class WorkerLink:
    """The task queue's connection, lent to every worker thread of the process.

    Worker threads must not open connections of their own (Dramatiq's broker
    gives each thread one). The consumer thread of the task queue owns its
    connection and turns its I/O loop; ``attach`` (Broker.consume, in that
    thread) declares everything again, has ``cancellations`` read on it, and
    asks after every queue now and then (``renew``). Any thread may then
    ``publish`` a message, confirmed, or ``emit`` a task event, best effort:
    events go out a batch at a time, and a lost progress event is corrected
    by the next.
    """

    def __init__(self, settings: Settings, cancellations: CancellationsFeed) -> None:
        self.settings = settings
        self.cancellations = cancellations
        self.outbox: deque[TaskEvent] = deque()
        self.connection: pika.BlockingConnection | None = None
        self.channel: Any = None
        self.confirming: Any = None
        self.thread = 0

    def attach(self, connection: pika.BlockingConnection) -> None:
        """Set up on a new consumer connection; runs in its consumer thread."""
        # Everything again, in one round trip: a queue deleted meanwhile is
        # back, and events written before any web process ran are kept.
        catalogue = connection.channel()
        declare(catalogue, self.settings)
        catalogue.close()
        connection.call_later(FIRST_RENEWAL, lambda: self.renew(connection))
        channel = connection.channel()
        # A stream consumer without a window would get 65,535 at once on LavinMQ.
        channel.basic_qos(prefetch_count=STREAM_PREFETCH)
        self.cancellations.attach(channel)
        confirming = connection.channel()
        confirming.confirm_delivery()
        self.thread = threading.get_ident()
        self.connection, self.channel, self.confirming = connection, channel, confirming

    def renew(self, connection: pika.BlockingConnection) -> None:
        """Declare everything again and ask after every queue; again every
        RENEW_EVERY seconds for as long as the connection lasts.

        No consumer ever reads a delay level, and CloudAMQP deletes a queue
        that had no consumer, declaration or basic.get for 28 days, with the
        tasks in it. A declaration without an answer (no-wait, as declare
        makes them) does not count as use: RabbitMQ renews an idle queue's
        lease when it reports on the queue. A refusal here is logged, not
        fatal: the program's start stops on one (declare_all).
        """
        try:
            channel = connection.channel()
            declare(channel, self.settings)
            for name in queues(self.settings):
                channel.queue_declare(name, passive=True)
            channel.close()
        except pika.exceptions.AMQPChannelError as refusal:
            logger.warning("declaring the queues again failed: %s", refusal)
        connection.call_later(RENEW_EVERY, lambda: self.renew(connection))

    def publish(self, exchange: str, routing_key: str, body: bytes) -> None:
        """Publish a message on the task queue's connection; return once RabbitMQ
        has confirmed it (mandatory: a message no queue took is refused).
        Any thread may call this; the consumer thread does the publishing.
        """
        connection = self.connection
        if connection is None or not connection.is_open:
            raise NotConfirmed(pika.exceptions.ConnectionWrongStateError("no connection to the broker"))
        sending = Sending(lambda: self.confirming.basic_publish(exchange, routing_key, body, PERSISTENT, True))
        if threading.get_ident() == self.thread:
            sending.run()
        else:
            try:
                connection.add_callback_threadsafe(sending.run)
            except pika.exceptions.AMQPError as error:
                raise NotConfirmed(error) from None
        sending.wait(CONFIRM_TIMEOUT)

    def emit(self, event: TaskEvent) -> None:
        """Queue an event for the consumer thread to publish; any thread may call this."""
        self.outbox.append(event)
        connection = self.connection
        try:
            if connection is not None:
                connection.add_callback_threadsafe(self.flush)
        except pika.exceptions.AMQPError:
            logger.debug("task event for %s waits: no connection", event.id)

    def flush(self) -> None:
        batch = [self.outbox.popleft() for _ in range(len(self.outbox))]
        if batch and self.channel is not None and self.channel.is_open:
            self.channel.basic_publish("", events_stream(self.settings), msgspec.json.encode(batch))


class TaskRuns(Middleware):
    """Each task's run, through Dramatiq's hooks, told as task events.

    Before a task runs: refused if it was cancelled (once the cancellations
    are read), held until it is due, and, for a job, "started". After:
    "succeeded", "retrying", "failed" or "cancelled". A run whose retry
    RabbitMQ did not confirm, or that still runs as the worker stops, is
    handed back: "handed_back", and its delivery returns to the queue
    (Consumer.ack) for the next worker to run from the start. ``running``
    is the job of the calling thread: what progress() reports on.
    """

    def __init__(self, settings: Settings, link: WorkerLink, cancellations: CancellationsFeed) -> None:
        self.settings = settings
        self.link = link
        self.cancellations = cancellations
        # The job each worker thread runs: what progress() reports on.
        self.local = threading.local()
        # Every job running now, and the deliveries to give back rather than acknowledge.
        self.active: dict[str, Run] = {}
        self.given_back: set[str] = set()

    def emit(self, event: TaskEvent) -> None:
        if event.id not in self.given_back:  # a task given back is the next worker's to report on
            self.link.emit(event)

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        # Until the stream has been read, a cancelled task would look runnable.
        if not self.cancellations.caught_up.wait(timeout=30):
            logger.warning("cancellations not read yet; running task %s unchecked", message.message_id)
        wait_until_due(message)
        run = Run(message) if message.actor_name in jobs else None
        if self.cancellations.is_cancelled(message.message_id):
            logger.info("task %s cancelled before it started", message.message_id)
            if run is not None:
                self.emit(run.event("cancelled"))
            raise SkipMessage
        self.local.run = run
        if run is not None:
            self.active[run.id] = run
            self.emit(run.event("started"))

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        run, self.local.run = self.running(), None
        if run is None or run.id != message.message_id:
            return
        self.active.pop(run.id, None)
        if run.given_back:
            # A retry RabbitMQ did not confirm: the delivery goes back instead (Consumer.ack).
            self.emit(run.event("handed_back"))
            self.given_back.add(run.id)
            return
        if exception is None:
            if not run.cancelled:
                run.done = max(run.done, run.total)  # a job that returned has done all its steps
            self.emit(run.event("cancelled" if run.cancelled else "succeeded"))
            return
        text = redact(str(exception), self.settings.cloudamqp_url, self.settings.api_token)
        run.error = TaskError(type(exception).__name__, text[:ERROR_CHARS])
        # Dramatiq's Retries, which runs before this, marks the message failed when it gives up.
        self.emit(run.event("failed" if message.failed else "retrying"))

    def running(self) -> Run | None:
        """The job this thread runs, if any."""
        return getattr(self.local, "run", None)

    def before_consumer_thread_shutdown(self, broker: dramatiq.Broker, thread: Any) -> None:
        """The worker stops and jobs still run past STOP_GRACE: their deliveries
        go back to RabbitMQ when the connection closes, for the next worker to
        run from the start. Say so, on the connection still open, before it does."""
        if thread.queue_name != self.settings.queue_name:
            return
        for run in list(self.active.values()):
            self.link.outbox.append(run.event("handed_back"))
            self.given_back.add(run.id)
            logger.info("task %s handed back: still running as the worker stops", run.id)
        self.link.flush()

    def takes_back(self, message: MessageProxy) -> bool:
        """Whether the delivery goes back to the queue rather than being acknowledged."""
        if message.message_id not in self.given_back:
            return False
        self.given_back.discard(message.message_id)
        return True


# A message a worker sends: durable, like every task.
PERSISTENT = pika.BasicProperties(delivery_mode=2)
# How long a worker thread waits for RabbitMQ to confirm a message it sent.
CONFIRM_TIMEOUT = 10.0
# When a worker asks after every queue, so that none is deleted as unused
# (WorkerLink.renew): a minute after its consumer starts (a start stays
# quick: each question is a round trip), then every 6 hours.
FIRST_RENEWAL = 60.0
RENEW_EVERY = 6 * 3600
# A task that arrives before it is due waits this long at most in the worker.
# On RabbitMQ none does; LavinMQ rounds each level's TTL down to 100 ms, and
# clocks of web and worker may differ a little.
EARLY_WAIT_LIMIT = 5.0


class NotConfirmed(ConnectionClosed):
    """RabbitMQ did not confirm a message a worker sent: refused, unroutable, or no answer in time."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(cause)  # type: ignore[no-untyped-call]


class Sending:
    """One publish that a worker thread hands to the consumer thread, and waits for.

    A publish the waiting thread gave up on is not made later: the caller
    then gives the task back, and a late copy would run it twice.
    """

    def __init__(self, publish: Callable[[], object]) -> None:
        self.publish = publish
        self.lock = threading.Lock()
        self.state: Literal["waiting", "sending", "abandoned"] = "waiting"
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        with self.lock:
            if self.state == "abandoned":
                return
            self.state = "sending"
        try:
            self.publish()
        except Exception as error:  # noqa: BLE001 - handed to the waiting thread, which raises it
            self.error = error
        finally:
            self.done.set()

    def wait(self, timeout: float) -> None:
        """Return once confirmed; raise NotConfirmed if refused or not confirmed in time."""
        if not self.done.wait(timeout):
            with self.lock:
                if self.state == "waiting":
                    self.state = "abandoned"
                    raise NotConfirmed(TimeoutError(f"the broker took no message within {timeout:g} s"))
            # Being published: its connection's heartbeat bounds the wait.
            self.done.wait()
        if self.error is not None:
            raise NotConfirmed(self.error)


def wait_until_due(message: MessageProxy) -> None:
    """Never start a task before it is due, whatever the broker's timers did."""
    early = message.options.get("due", 0) - time.time()
    if early > EARLY_WAIT_LIMIT:
        logger.warning("task %s came %.1f s before it was due: are the clocks apart?", message.message_id, early)
    if early > 0:
        time.sleep(min(early, EARLY_WAIT_LIMIT))


def attempt(message: dramatiq.Message[Any] | MessageProxy) -> int:
    return int(message.options.get("retries", 0)) + 1


# An error's message and a progress message are cut to these lengths: every
# web process keeps them for every task it remembers.
ERROR_CHARS = 1000
MESSAGE_CHARS = 200


class Run:
    """One attempt at a job, as its worker thread knows it."""

    def __init__(self, message: MessageProxy) -> None:
        self.id, self.actor, self.attempt = message.message_id, message.actor_name, attempt(message)
        # When this attempt was due; after a failure, when the next one is (Broker.enqueue).
        self.due = message.options.get("due", 0)
        self.given_back = False  # its retry was not confirmed: the delivery goes back instead
        self.started = time.monotonic()
        self.period = 0  # progress_every periods since the start that have had their event
        self.done = self.total = 0
        self.message = ""
        self.result = NO_RESULT
        self.error: TaskError | None = None
        self.cancelled = False

    def event(
        self, kind: Literal["started", "progress", "retrying", "handed_back", "succeeded", "failed", "cancelled"]
    ) -> TaskEvent:
        return TaskEvent(
            self.id,
            kind,
            time.time(),
            self.actor,
            self.attempt,
            self.done,
            self.total,
            self.message,
            self.result,
            self.error,
            self.due if kind in ("started", "retrying") else 0,
        )


cancellations = CancellationsFeed(settings)
worker_link = WorkerLink(settings, cancellations)
task_runs = TaskRuns(settings, worker_link, cancellations)
# Before Retries in the list, so after it when a message is done: a failed
# attempt is then known to be the last one or not.
broker.add_middleware(task_runs, before=Retries)


# -- Metrics ---------------------------------------------------------------------------
#
# One endpoint per container for web and worker together. Every process of a
# program writes its figures to files in a directory of that program's own
# (prometheus_client's multiprocess mode), which the program empties as it
# starts, before any of its processes runs: a restart of one program drops its
# old figures and leaves the other's alone. The worker's Dramatiq main process
# forks the one server that adds both directories up at each scrape.


def metrics_dir(settings: Settings, program: str) -> Path:
    # Under /tmp, the one writable path; the HTTP port keeps apart stacks
    # that share a host (each container has its own /tmp anyway).
    return Path(tempfile.gettempdir()) / f"onebox-metrics-{settings.port}" / program


def fresh_metrics_dir(program: str) -> str:
    """Empty the program's metrics directory: stale files from a previous run
    would be added to the new run's figures (and a reused pid would carry on
    from its old counts)."""
    path = metrics_dir(settings, program)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def serve_metrics() -> int:
    """The metrics endpoint: web and worker figures, Prometheus text format."""
    from prometheus_client import CollectorRegistry, start_http_server  # noqa: PLC0415 - after Dramatiq's fork
    from prometheus_client.multiprocess import MultiProcessCollector  # noqa: PLC0415

    registry = CollectorRegistry()
    for program in ("web", "worker"):
        path = metrics_dir(settings, program)
        path.mkdir(parents=True, exist_ok=True)
        MultiProcessCollector(registry, str(path))  # type: ignore[no-untyped-call]
    # "::" also takes IPv4 and Fly's private network (IPv6); without IPv6, IPv4 alone.
    for host in ("::", "0.0.0.0"):
        try:
            _, thread = start_http_server(settings.metrics_port, host, registry)
        except OSError as error:
            failure = error
            continue
        logger.info("metrics at http://[%s]:%d/metrics", host, settings.metrics_port)
        thread.join()
        return 0
    logger.error("no metrics endpoint on port %d: %s", settings.metrics_port, failure)
    return 1


def worker_metrics() -> Middleware:
    """Dramatiq's own Prometheus middleware, under its own metric names (so that
    dashboards made for Dramatiq work), without its exposition server on
    0.0.0.0:9191: serve_metrics serves web and worker together instead."""
    # Dramatiq's module reads its directory as it loads.
    os.environ["dramatiq_prom_db"] = str(metrics_dir(settings, "worker"))
    from dramatiq.middleware.prometheus import Prometheus  # noqa: PLC0415

    class WorkerMetrics(Prometheus):
        @property
        def forks(self) -> list[Callable[[], int]]:
            return [serve_metrics]

    return cast(Middleware, WorkerMetrics())


if settings.metrics:
    # Before TaskRuns: a task it skips (cancelled) must be seen starting too,
    # or Dramatiq's in-progress gauge counts its end alone and goes negative.
    broker.add_middleware(worker_metrics(), before=TaskRuns)


# -- Jobs ------------------------------------------------------------------------------
#
# A job is a Dramatiq actor declared with @job: its tasks' status, progress,
# result and error reach every web process, and POST /jobs/<name> starts one
# with its keyword arguments as a JSON object (docs/jobs.md).


class Cancelled(Exception):
    """Raised by progress() once the task was cancelled; @job ends the task there, as cancelled."""


class ResultRefused(Exception):
    """A job returned what cannot be its result: no JSON, or more than RESULT_MAX_BYTES of it."""


def progress(done: int, total: int, message: str = "") -> None:
    """Report from inside a job: ``done`` of ``total`` steps (0: unknown), and what it is at.

    Raises Cancelled once the task was cancelled, so a job stops at its next
    report. Sends at most one event per PROGRESS_EVERY seconds, and none for
    done == total: the job's end follows, and its event carries the count.
    Outside a job (a direct call) it does nothing.
    """
    run = task_runs.running()
    if run is None:
        return
    if cancellations.is_cancelled(run.id):
        raise Cancelled(run.id)
    run.done, run.total, run.message = done, total, message[:MESSAGE_CHARS]
    every = settings.progress_every
    if not every or (total and done >= total):
        return
    # Periods since the start, not since the last event: ticks a second apart
    # that jitter by a millisecond still fall one to a period.
    period = int((time.monotonic() - run.started) / every)
    if period > run.period:
        run.period = period
        task_runs.emit(run.event("progress"))


def encode_result(value: object) -> msgspec.Raw:
    try:
        encoded = msgspec.json.encode(value)
    except TypeError as error:
        raise ResultRefused(f"the result is not JSON: {error}") from None
    if len(encoded) > settings.result_max_bytes:
        raise ResultRefused(
            f"the result is {len(encoded):,} bytes of JSON; RESULT_MAX_BYTES allows {settings.result_max_bytes:,}"
        )
    return msgspec.Raw(encoded)


# Retries: the first after 1 to 2 s (Dramatiq adds up to as much again of
# jitter), doubling each time, an hour apart at most.
MIN_BACKOFF = 1_000
MAX_BACKOFF = 3_600_000


class Job(msgspec.Struct, frozen=True):
    """A declared job: its actor, and the type its JSON arguments must have."""

    actor: dramatiq.Actor[..., None]
    arguments: type[msgspec.Struct]


jobs: dict[str, Job] = {}


def arguments_type(fn: Callable[..., object]) -> type[msgspec.Struct]:
    """A msgspec type of the function's parameters, constraints (Annotated[..., Meta]) included."""
    hints = typing.get_type_hints(fn, include_extras=True)
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = [
        (name, hints.get(name, Any))
        if parameter.default is parameter.empty
        else (name, hints.get(name, Any), parameter.default)
        for name, parameter in inspect.signature(fn).parameters.items()
    ]
    return msgspec.defstruct(f"{fn.__name__}_arguments", fields, kw_only=True, forbid_unknown_fields=True)


P = ParamSpec("P")


@overload
def job(fn: Callable[P, object], /) -> dramatiq.Actor[P, None]: ...


@overload
def job(**options: Any) -> Callable[[Callable[P, object]], dramatiq.Actor[P, None]]: ...


def job(fn: Callable[P, object] | None = None, /, **options: Any) -> Any:
    """Declare a job: ``@job`` or ``@job(time_limit=..., max_retries=...)`` (Dramatiq's actor options).

    The function's return value is the task's result (JSON, at most
    RESULT_MAX_BYTES); an exception fails the attempt, and Dramatiq retries it
    up to MAX_RETRIES times.
    """

    def declare(fn: Callable[P, object]) -> dramatiq.Actor[P, None]:
        @functools.wraps(fn)
        def run_job(*args: P.args, **kwargs: P.kwargs) -> None:
            run = task_runs.running()
            try:
                value = fn(*args, **kwargs)
            except Cancelled:
                if run is None:
                    raise
                run.cancelled = True  # acknowledged, not failed: the task is over
                return
            if run is not None:
                run.result = encode_result(value)

        declared = {
            "queue_name": settings.queue_name,
            "max_retries": settings.max_retries,
            # A retry waits in the delay levels (Broker.enqueue), held by no
            # worker: its backoff may grow past RabbitMQ's consumer_timeout.
            "min_backoff": MIN_BACKOFF,
            "max_backoff": MAX_BACKOFF,
            **options,
            # Returning it again will not make it smaller.
            "throws": (ResultRefused, *options.get("throws", ())),
        }
        actor: dramatiq.Actor[P, None] = dramatiq.actor(run_job, **declared)
        jobs[actor.actor_name] = Job(actor, arguments_type(fn))
        return actor

    return declare if fn is None else declare(fn)


# A countdown of max_seconds must never hit the time limit.
@job(time_limit=(settings.max_seconds + 60) * 1000)
def countdown(seconds: Annotated[int, Meta(ge=1, le=settings.max_seconds)]) -> None:
    """Count down from ``seconds``, logging once a second; stop when cancelled."""
    message = CurrentMessage.get_current_message()
    assert message is not None
    task_id, tries = message.message_id, attempt(message)
    redelivered = "yes" if getattr(message, "redelivered", False) else "no"
    fields = {"task_id": task_id, "attempt": tries, "seconds": seconds}
    logger.info(
        "task %s started seconds=%d attempt=%d redelivered=%s",
        *(task_id, seconds, tries, redelivered),
        extra={**fields, "remaining": seconds},
    )
    started = time.monotonic()
    for remaining in range(seconds - 1, -1, -1):
        # Sleep to the next whole second since the start, so ticks do not drift.
        time.sleep(max(0.0, started + (seconds - remaining) - time.monotonic()))
        try:
            progress(seconds - remaining, seconds)
        except Cancelled:
            logger.info(
                "task %s cancelled remaining=%d", task_id, remaining + 1, extra={**fields, "remaining": remaining + 1}
            )
            raise
        logger.info("task %s remaining=%d", task_id, remaining, extra={**fields, "remaining": remaining})
    logger.info("task %s done seconds=%d", task_id, seconds, extra={**fields, "remaining": 0})


# README, "Add your own job": the example, exactly as the README shows it.
@job
def tally(title: str, words: list[str]) -> dict[str, Any]:
    """Count the words, one a second; the word "fail" fails the attempt."""
    counts: dict[str, int] = {}
    for done, word in enumerate(words):
        progress(done, len(words), f"counting {word!r}")
        if word == "fail":
            raise ValueError(f"{title}: cannot count {word!r}")
        counts[word] = counts.get(word, 0) + 1
        time.sleep(1)
    return {"title": title, "counts": counts}


# -- Periodic jobs ---------------------------------------------------------------------
#
# A job that runs on a schedule is declared beside it with @periodic: every
# so many seconds, or at the times of a cron expression (UTC). One web process
# at a time runs the ticks, whatever the number of containers (main.py,
# "Periodic jobs"; docs/jobs.md).

A = typing.TypeVar("A", bound=dramatiq.Actor[..., None])


class Periodic(msgspec.Struct, frozen=True):
    """A job's schedule, and what to do with a tick that cannot run on time.

    ``missed``: a tick that came while no web process ran the schedule (all
    down, or one taking over from another): "latest" runs the latest such
    tick once, late; "skip" runs none of them. ``overlap``: a tick that comes
    while the job's run for the tick before has not ended (queued, running):
    "skip" runs nothing for it; "run" queues it anyway.
    """

    name: str
    job: str
    every: int = 0  # seconds: ticks at whole multiples of it since the epoch (0 for a cron schedule)
    cron: str = ""  # five fields, in UTC
    arguments: dict[str, Any] = {}
    missed: Literal["latest", "skip"] = "latest"
    overlap: Literal["skip", "run"] = "skip"

    def next_tick(self, after: float) -> float:
        """The first tick later than ``after`` (seconds since the epoch)."""
        if self.every:
            return (after // self.every + 1) * self.every
        return next(CronSim(self.cron, datetime.fromtimestamp(after, UTC))).timestamp()

    def last_tick(self, at: float) -> float:
        """The last tick at ``at`` or before it."""
        if self.every:
            return at // self.every * self.every
        # CronSim counts back from the minute after: a tick at ``at`` itself is found too.
        after = datetime.fromtimestamp(at, UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
        return next(CronSim(self.cron, after, reverse=True)).timestamp()


schedules: dict[str, Periodic] = {}


def periodic(
    *,
    every: int | timedelta | None = None,
    cron: str | None = None,
    name: str | None = None,
    arguments: dict[str, Any] | None = None,
    missed: Literal["latest", "skip"] = "latest",
    overlap: Literal["skip", "run"] = "skip",
) -> Callable[[A], A]:
    """Run the @job below it on a schedule: ``every`` so many seconds (or a
    timedelta), or at the times of ``cron``, with ``arguments`` as its keyword
    arguments. ``name`` (the job's by default) tells two schedules of one job
    apart. A mistake in any of them stops the program at start, not at a tick.
    """

    def declare(actor: A) -> A:
        declared = jobs.get(actor.actor_name)
        if declared is None:
            raise TypeError(f"@periodic goes above @job: {actor.actor_name} is not a job")
        seconds = int(every.total_seconds()) if isinstance(every, timedelta) else every
        if (seconds is None) == (cron is None):
            raise ValueError(f"@periodic on {actor.actor_name} takes every= or cron=, one of them")
        if seconds is not None and seconds < 1:
            raise ValueError(f"@periodic on {actor.actor_name}: every= is at least 1 second")
        if cron is not None:
            CronSim(cron, datetime.now(UTC))  # CronSimError names what is wrong with it
        try:
            msgspec.convert(arguments or {}, declared.arguments)
        except msgspec.ValidationError as error:
            raise ValueError(f"@periodic on {actor.actor_name}: arguments: {error}") from None
        schedule = Periodic(name or actor.actor_name, actor.actor_name, seconds or 0, cron or "", arguments or {})
        schedule = msgspec.structs.replace(schedule, missed=missed, overlap=overlap)
        if schedule.name in schedules:
            raise ValueError(f"two periodic schedules named {schedule.name!r}: give one a name=")
        schedules[schedule.name] = schedule
        return actor

    return declare


# -- The two programs ------------------------------------------------------------------


def die_with_parent() -> None:
    """Ask Linux to stop this process when its parent dies.

    granian's and Dramatiq's worker processes outlive a main process that was
    killed outright, and would go on serving the port or holding tasks beside
    the main process that supervisord starts in its place.
    """
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1
die_with_parent()


# What the RELOAD setting watches.
RELOAD_FILES = ("main.py", "tasks.py", SETTINGS_FILE.name)


def run_web() -> None:
    """Serve main:app on PORT: in this very process, on granian's embedded
    server; with WEB_WORKERS > 1 or RELOAD, as granian's own main process,
    which supervises its worker processes (and restarts them on a change)."""
    os.environ["ONEBOX_PROGRAM"] = "web"
    if settings.metrics:
        # prometheus_client reads it as it loads, in every process of the program.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = fresh_metrics_dir("web")
    if settings.web_workers > 1 or settings.reload:
        # Each of granian's processes connects on its own: declare first, once.
        trouble = declare_all(settings)
        if trouble is not None and trouble.needs_a_person:
            stop_at_start(trouble)
        exec_granian()
    serve_web()


# Connections the kernel holds for the web server before it takes them (the
# kernel's somaxconn caps it: 4,096 on Linux since 5.4).
BACKLOG = 4096
# Files a web process keeps open besides its clients' connections: the broker,
# the metrics port, logs, its own modules.
FILES_BESIDES_CONNECTIONS = 256


def connections_that_fit() -> int:
    """MAX_CONNECTIONS, or fewer if this process cannot open that many files.

    Raises the soft limit on open files as far as the hard one allows: many
    containers start at 1,024, and a server out of files cannot accept the
    next connection, a health check's included. Inherited by granian's
    processes when it runs them (exec_granian).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = settings.max_connections + FILES_BESIDES_CONNECTIONS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return settings.max_connections
    fit = max(1, soft - FILES_BESIDES_CONNECTIONS)
    logger.warning(
        "MAX_CONNECTIONS is %d, but this process may open only %d files: %d connections at once",
        settings.max_connections,
        soft,
        fit,
    )
    return fit


def serve_web() -> None:
    import uvloop  # noqa: PLC0415 - the web's own imports: the worker never loads them
    from granian.constants import HTTPModes, Interfaces  # noqa: PLC0415
    from granian.http import HTTP1Settings  # noqa: PLC0415
    from granian.log import LogLevels  # noqa: PLC0415
    from granian.server.embed import Server  # noqa: PLC0415

    from main import app, link  # noqa: PLC0415

    server = Server(
        app,
        address="0.0.0.0",
        port=settings.port,
        interface=Interfaces.ASGI,
        # HTTP/1.1 only (platforms speak HTTP/2 to clients at their proxy): its
        # header timeout closes connections that send nothing, or too slowly.
        http=HTTPModes.http1,
        http1_settings=HTTP1Settings(header_read_timeout=10_000),
        # Every connection gets a place at once, up to MAX_CONNECTIONS: idle or
        # refused ones from a flood cannot keep a health check waiting in the
        # kernel's queue (by default the embedded server serves 128 at once).
        backpressure=connections_that_fit(),
        backlog=BACKLOG,
        websockets=False,
        log_level=LogLevels(settings.log_level.lower()),
        log_dictconfig=granian_logging(),
    )

    def stop() -> None:
        server.stop()  # type: ignore[no-untyped-call]
        # A long response (an event stream) must not hold the stop past the grace;
        # a daemon, so that a stop with nothing left to finish ends at once.
        deadline = threading.Timer(settings.stop_grace, os._exit, (0,))
        deadline.daemon = True
        deadline.start()

    async def serve() -> None:
        # Before the port opens: a refusal that needs a person stops the start here.
        trouble = await link.start()
        if trouble is not None and trouble.needs_a_person:
            stop_at_start(trouble)
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stop)
        await server.serve()

    uvloop.run(serve())


def exec_granian() -> NoReturn:
    """Replace this process with granian's command, serving main:app."""
    options = {
        "--interface": "asgi",
        "--host": "0.0.0.0",
        "--port": str(settings.port),
        "--workers": str(settings.web_workers),
        "--loop": "uvloop",
        "--http": "1",
        "--http1-header-read-timeout": "10000",
        "--backpressure": str(connections_that_fit()),
        "--backlog": str(BACKLOG),
        "--no-ws": None,
        "--log-level": settings.log_level.lower(),
        "--workers-kill-timeout": str(settings.stop_grace),
    }
    if settings.log_format == "json":
        # A file, in /tmp: the root filesystem may be read-only.
        path = Path(tempfile.gettempdir()) / f"onebox-granian-logging-{settings.port}.json"
        path.write_bytes(msgspec.json.encode(granian_logging()))
        options["--log-config"] = str(path)
    reload = [
        "--reload",
        "--reload-paths",
        str(SETTINGS_FILE.parent),
        # Names are matched one path part at a time: every other file is ignored.
        "--reload-ignore-patterns",
        f"^(?!({'|'.join(map(re.escape, RELOAD_FILES))})$)",
        # A change that does not import leaves granian waiting for the next one
        # instead of exiting, which supervisord would count as a crash.
        "--reload-ignore-worker-failure",
    ]
    flags = reload if settings.reload else []
    arguments = [item for item in chain(*options.items()) if item is not None]
    os.execv(sys.executable, [sys.executable, "-m", "granian", "main:app", *arguments, *flags])


def granian_logging() -> dict[str, Any] | None:
    """granian's own lines as JSON with LOG_FORMAT=json; its defaults otherwise."""
    if settings.log_format != "json":
        return None
    json_lines = {"()": "tasks.JsonLines"}
    return {"formatters": {"generic": json_lines, "access": json_lines}}


def run_worker() -> None:
    """Run the Dramatiq worker for this module: in this very process; with
    WORKER_PROCESSES > 1 or RELOAD, as Dramatiq's own main process, which
    supervises its worker processes (and restarts them on a change)."""
    os.environ["ONEBOX_PROGRAM"] = "worker"
    if not logging.getLogger().handlers:
        logging.basicConfig(format=WORKER_LOG_FORMAT, level=settings.log_level)
    if settings.metrics:
        fresh_metrics_dir("worker")
    trouble = declare_all(settings)
    if trouble is not None and trouble.needs_a_person:
        stop_at_start(trouble)
    if trouble is not None:
        logger.warning("%s", trouble.line)
    if settings.worker_processes > 1 or settings.reload:
        exec_dramatiq()
    work()


def work() -> None:
    """Dramatiq's worker threads in this process, until SIGTERM or SIGINT."""
    broker.emit_after("process_boot")
    worker = dramatiq.Worker(broker, worker_threads=settings.worker_threads)
    # Dramatiq's delay-queue default (threads x 1000) breaks CloudAMQP's limit on unacked messages.
    worker.queue_prefetch = worker.delay_prefetch = settings.queue_prefetch
    worker.start()
    if settings.metrics:
        threading.Thread(target=serve_metrics, name="metrics", daemon=True).start()
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    # Dramatiq's own words, as its command says them: the same line in either way of running.
    logger.info("Worker process is ready for action (%d threads).", settings.worker_threads)
    stopping.wait()
    logger.info("stopping: running tasks get up to %d s", settings.stop_grace)
    worker.stop(timeout=settings.stop_grace * 1000)
    broker.close()


# Dramatiq's own format, as its command prints it.
WORKER_LOG_FORMAT = "[%(asctime)s] [PID %(process)d] [%(threadName)s] [%(name)s] [%(levelname)s] %(message)s"


def exec_dramatiq() -> NoReturn:
    """Replace this process with Dramatiq's command, working for this module."""
    # Dramatiq reads its prefetch from the environment. Its delay-queue
    # default (threads x 1000) breaks CloudAMQP's limit on unacked messages.
    os.environ["dramatiq_queue_prefetch"] = str(settings.queue_prefetch)
    os.environ["dramatiq_delay_queue_prefetch"] = str(settings.queue_prefetch)
    options = {
        "--processes": str(settings.worker_processes),
        "--threads": str(settings.worker_threads),
        "--worker-shutdown-timeout": str(settings.stop_grace * 1000),
    }
    dramatiq_main = ["-m", "dramatiq"]
    if settings.log_format == "json":
        # Dramatiq's main process formats its own lines: it must load this
        # module (and its JSON handler) before Dramatiq sets up logging.
        dramatiq_main = ["-c", "import sys, tasks, dramatiq.cli; sys.exit(dramatiq.cli.main())"]
    # watchdog (7+) matches a pattern against the whole path.
    watch = ["--watch", str(SETTINGS_FILE.parent)]
    watch += chain(*(("--watch-include", str(SETTINGS_FILE.with_name(name))) for name in RELOAD_FILES))
    flags = watch if settings.reload else []
    os.execv(sys.executable, [sys.executable, *dramatiq_main, "tasks", *chain(*options.items()), *flags])


if __name__ == "__main__":
    # main.py imports this module as "tasks": the one already running, not a second copy.
    sys.modules["tasks"] = sys.modules["__main__"]
    commands = {"web": run_web, "worker": run_worker}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        raise SystemExit("usage: python tasks.py web|worker")
    commands[sys.argv[1]]()
