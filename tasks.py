"""What runs in the background, and what the web side shares with it.

Read top to bottom: the settings (settings.toml, overridden by environment
variables), the Dramatiq broker, task events, jobs (an actor whose status,
progress, result and error every web process sees), the countdown and the
example job, and the two commands that supervisord runs: ``python tasks.py
web`` and ``python tasks.py worker``.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import logging
import os
import re
import shutil
import signal
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
from dramatiq.broker import MessageProxy
from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL, RabbitmqBroker
from dramatiq.common import dq_name, q_name, xq_name
from dramatiq.middleware import CurrentMessage, Middleware, Retries, SkipMessage
from msgspec import Meta

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
    """Every knob onebox has; the README's settings table explains each."""

    cloudamqp_url: Annotated[str, Meta(pattern=r"^amqps?://")]
    queue_name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}$")]
    heartbeat: Annotated[int, Meta(ge=1, le=60)]
    publish_timeout: Annotated[float, Meta(gt=0, le=30)]
    port: Annotated[int, Meta(ge=1, le=65535)]
    web_workers: Annotated[int, Meta(ge=1, le=32)]
    max_body_bytes: Annotated[int, Meta(ge=64, le=1_048_576)]
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
    max_event_streams: Annotated[int, Meta(ge=1, le=100_000)]
    max_event_streams_per_client: Annotated[int, Meta(ge=1, le=1000)]
    client_ip_header: Annotated[str, Meta(pattern=r"^[A-Za-z0-9-]*$")]
    cors_origins: str
    # Development: restart web and worker when main.py, tasks.py or settings.toml change.
    reload: bool
    # RabbitMQ cluster (README, "Scaling out").
    queue_type: Annotated[str, Meta(pattern="^(classic|quorum)$")]
    # Metrics and logs (README, "Metrics and logs").
    metrics: bool
    metrics_port: Annotated[int, Meta(ge=1, le=65535)]
    log_format: Annotated[str, Meta(pattern="^(text|json)$")]
    # Jobs (README, "Add your own job").
    result_max_bytes: Annotated[int, Meta(ge=16, le=1_000_000)]

    def __post_init__(self) -> None:
        if self.queue_prefetch < self.worker_threads:
            raise ValueError("queue_prefetch must be at least worker_threads, or threads sit idle")
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


class RedactSecrets(logging.Filter):
    """The broker password and API_TOKEN out of every log line, tracebacks
    included: a job's exception may carry them, and Dramatiq logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = (settings.cloudamqp_url, settings.api_token)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, *secrets)
        record.msg, record.args = redact(record.getMessage(), *secrets), None
        return True


# Dramatiq's worker processes set up logging before they import this module.
for handler in logging.getLogger().handlers:
    handler.addFilter(RedactSecrets())


# -- JSON logs ----------------------------------------------------------------------
#
# LOG_FORMAT=json: one JSON object per line, for log drains. Every formatter
# of both programs (granian, Litestar, Dramatiq's processes) is this one.

# Task lines carry these as fields (``extra=`` on the log call).
TASK_FIELDS = ("task_id", "attempt", "remaining", "seconds")


class JsonLines(logging.Formatter):
    """A log record as one line of JSON, with secrets blanked out."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            # run_web and run_worker name the program for all their processes.
            "process": os.environ.get("ONEBOX_PROGRAM", record.processName),
            "pid": record.process,
            "logger": record.name,
            "message": hide_secrets(record.getMessage()),
        }
        line.update((name, record.__dict__[name]) for name in TASK_FIELDS if name in record.__dict__)
        if record.exc_info:
            line["exception"] = hide_secrets(self.formatException(record.exc_info))
        return msgspec.json.encode(line).decode()


def hide_secrets(text: str) -> str:
    return redact(text, settings.cloudamqp_url, settings.api_token)


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


# -- What onebox declares on the broker --------------------------------------------
#
# Web and worker declare the same queues with the same arguments (RabbitMQ
# refuses a second declaration that differs), from this one table: on
# CloudAMQP's free plans, 5 of the 100 queues allowed. No exchange of its own.


def events_stream(settings: Settings) -> str:
    return f"{settings.queue_name}.events"


def cancellations_stream(settings: Settings) -> str:
    return f"{settings.queue_name}.cancellations"


# RabbitMQ trims a stream a whole segment at a time and always keeps the last
# one; with its default segment (500 MB) a small stream is never trimmed at
# all. Small segments make x-max-age and x-max-length-bytes bite. (LavinMQ's
# segments are 8 MiB whatever is asked.)
STREAM_SEGMENT_BYTES = 1_000_000
CANCELLATION_RETENTION = 7 * 86400  # a task queued longer can no longer be cancelled
CANCELLATIONS_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "stream",
    "x-max-age": "7D",
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
# The AMQP message type of a marker that a reader writes to a stream at start:
# reading up to its own marker tells it that the past has been read.
SYNC = "sync"


def queues(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every queue onebox's work depends on, with its declaration arguments.

    The task queue and its delay and dead-letter queues are of QUEUE_TYPE;
    ``classic`` adds nothing, so that they stay exactly as Dramatiq declares
    them (README, "Scaling out").
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
    }


def declare_or_exit(settings: Settings) -> None:
    """Declare everything before a program starts; a refusal stops the start.

    A broker that refuses a declaration (arguments that differ from an older
    declaration, a missing permission, a policy or vhost limit) would
    otherwise be a restart loop of tracebacks. An unreachable broker is not a
    refusal: the programs start and reconnect by themselves.
    """
    try:
        connection = pika.BlockingConnection(connection_parameters(settings))
    except (pika.exceptions.AMQPError, OSError):  # OSError: TLS refused, for one
        return
    try:
        for name, arguments in queues(settings).items():
            try:
                connection.channel().queue_declare(name, durable=True, arguments=arguments)
            except (pika.exceptions.ChannelClosedByBroker, pika.exceptions.ConnectionClosedByBroker) as refusal:
                raise SystemExit(refused(name, refusal.reply_code, refusal.reply_text)) from None
    finally:
        if connection.is_open:
            connection.close()


def refused(queue: str, code: int, reason: str) -> str:
    """One line: the queue, the broker's reason, and what to do."""
    if code == 403:
        advice = "give the broker user configure, write and read permission on it"
    elif "inequivalent arg" in reason:
        advice = (
            "it exists with other arguments (an older onebox, or by hand): delete it "
            "(management UI, or rabbitmqctl delete_queue) and start again"
        )
    else:
        advice = "check the broker's policies, limits and enabled queue types for it"
    return f"onebox: the broker refused queue {queue!r}: {reason} ({code}); {advice}"


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

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> dramatiq.Consumer:
        # Declare again on every (re)start: a queue deleted meanwhile (CloudAMQP
        # deletes one unused for 28 days) comes back without a restart.
        self.queues_pending.add(q_name(queue_name))
        consumer = super().consume(queue_name, prefetch, timeout)
        del self.connection
        if queue_name == settings.queue_name:
            # Task events and cancellations ride on this connection too (TaskControl, below).
            control.attach(consumer.connection)  # type: ignore[attr-defined]
        return consumer


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
broker.parameters = connection_parameters(settings)
broker.add_middleware(CurrentMessage())
dramatiq.set_broker(broker)


# -- Task events and cancellations ------------------------------------------------
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
    contract between workers and web processes. "retrying" is a failed
    attempt that Dramatiq will run again; "failed" is the last one."""

    id: str
    event: Literal["queued", "started", "progress", "retrying", "succeeded", "failed", "cancelled"]
    at: float  # seconds since the epoch
    actor: str
    attempt: int = 1
    # Progress as the job last reported it: done of total (0: not known), and what it is at.
    done: int = 0
    total: int = 0
    message: str = ""
    result: msgspec.Raw = NO_RESULT  # the job's return value, as JSON
    error: TaskError | None = None


class TaskControl(Middleware):
    """Task events out and cancellations in, over the task queue's connection.

    Worker threads must not open connections of their own (Dramatiq's broker
    gives each thread one). The consumer thread of the task queue owns its
    connection and turns its I/O loop; on that connection this reads the
    cancellation stream from the start of its retention, then follows it,
    and publishes the events that worker threads hand it, a batch at a time.
    Events are best effort: a lost progress event is corrected by the next.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cancelled: dict[str, float] = {}
        self.caught_up = threading.Event()
        self.outbox: deque[TaskEvent] = deque()
        self.connection: pika.BlockingConnection | None = None
        self.channel: Any = None
        self.marker = ""
        self.reading_since = 0.0
        # The job each worker thread runs: what progress() reports on.
        self.local = threading.local()

    def attach(self, connection: pika.BlockingConnection) -> None:
        """Set up on a new consumer connection; runs in its consumer thread."""
        channel = connection.channel()
        # Events written before any web process ran are read by the first one.
        channel.queue_declare(events_stream(self.settings), durable=True, arguments=EVENTS_ARGUMENTS)
        # A stream consumer without a window would get 65,535 at once on LavinMQ.
        channel.basic_qos(prefetch_count=STREAM_PREFETCH)
        self.reading_since = time.monotonic()
        self.follow(channel)
        self.marker = str(uuid.uuid4())
        marker = pika.BasicProperties(delivery_mode=2, type=SYNC, message_id=self.marker)
        channel.basic_publish("", cancellations_stream(self.settings), b"", marker)
        # The stream deleted under us: declare it again and read on.
        channel.add_on_cancel_callback(lambda _: self.follow(channel))
        self.connection, self.channel = connection, channel

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

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        # Until the stream has been read, a cancelled task would look runnable.
        if not self.caught_up.wait(timeout=30):
            logger.warning("cancellations not read yet; running task %s unchecked", message.message_id)
        run = Run(message) if message.actor_name in jobs else None
        if self.is_cancelled(message.message_id):
            logger.info("task %s cancelled before it started", message.message_id)
            if run is not None:
                self.emit(run.event("cancelled"))
            raise SkipMessage
        self.local.run = run
        if run is not None:
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
        self.started = time.monotonic()
        self.period = 0  # progress_every periods since the start that have had their event
        self.done = self.total = 0
        self.message = ""
        self.result = NO_RESULT
        self.error: TaskError | None = None
        self.cancelled = False

    def event(self, kind: Literal["started", "progress", "retrying", "succeeded", "failed", "cancelled"]) -> TaskEvent:
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
        )


control = TaskControl(settings)
# Before Retries in the list, so after it when a message is done: a failed
# attempt is then known to be the last one or not.
broker.add_middleware(control, before=Retries)


# -- Metrics --------------------------------------------------------------------------
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
    # Before TaskControl: a task it skips (cancelled) must be seen starting too,
    # or Dramatiq's in-progress gauge counts its end alone and goes negative.
    broker.add_middleware(worker_metrics(), before=TaskControl)


# -- Jobs -----------------------------------------------------------------------------
#
# A job is a Dramatiq actor declared with @job: its tasks' status, progress,
# result and error reach every web process, and POST /jobs/<name> starts one
# with its keyword arguments as a JSON object (README, "Add your own job").


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
    run = control.running()
    if run is None:
        return
    if control.is_cancelled(run.id):
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
        control.emit(run.event("progress"))


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
            run = control.running()
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
            # Retries wait in the delay queue, unacknowledged: stay far below
            # RabbitMQ's consumer_timeout.
            "min_backoff": 1_000,
            "max_backoff": 60_000,
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


# What the RELOAD setting watches.
RELOAD_FILES = ("main.py", "tasks.py", SETTINGS_FILE.name)


def run_web() -> NoReturn:
    """Replace this process with granian serving main:app."""
    os.environ["ONEBOX_PROGRAM"] = "web"
    declare_or_exit(settings)
    options = {
        "--interface": "asgi",
        "--host": "0.0.0.0",
        "--port": str(settings.port),
        "--workers": str(settings.web_workers),
        "--loop": "uvloop",
        # HTTP/1.1 only (platforms speak HTTP/2 to clients at their proxy): its
        # header timeout closes connections that send nothing, or too slowly.
        "--http": "1",
        "--http1-header-read-timeout": "10000",
        "--log-level": settings.log_level.lower(),
        # A long response must not hold a stop past the grace period.
        "--workers-kill-timeout": str(settings.stop_grace),
    }
    if settings.metrics:
        # prometheus_client reads it as it loads, in every granian worker.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = fresh_metrics_dir("web")
    if settings.log_format == "json":
        options["--log-config"] = granian_json_logging()
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
    os.execv(sys.executable, [sys.executable, "-m", "granian", "main:app", *chain(*options.items()), *flags])


def run_worker() -> NoReturn:
    """Replace this process with the Dramatiq worker for this module."""
    os.environ["ONEBOX_PROGRAM"] = "worker"
    declare_or_exit(settings)
    # Dramatiq reads its prefetch from the environment. Its delay-queue
    # default (threads x 1000) breaks CloudAMQP's limit on unacked messages.
    os.environ["dramatiq_queue_prefetch"] = str(settings.queue_prefetch)
    os.environ["dramatiq_delay_queue_prefetch"] = str(settings.queue_prefetch)
    options = {
        "--processes": str(settings.worker_processes),
        "--threads": str(settings.worker_threads),
        "--worker-shutdown-timeout": str(settings.stop_grace * 1000),
    }
    if settings.metrics:
        fresh_metrics_dir("worker")
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


def granian_json_logging() -> str:
    """A logging configuration file for granian's own lines, in /tmp (the root
    filesystem may be read-only)."""
    json_lines = {"()": "tasks.JsonLines"}
    config = {"formatters": {"generic": json_lines, "access": json_lines}}
    path = Path(tempfile.gettempdir()) / f"onebox-granian-logging-{settings.port}.json"
    path.write_bytes(msgspec.json.encode(config))
    return str(path)


if __name__ == "__main__":
    commands = {"web": run_web, "worker": run_worker}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        raise SystemExit("usage: python tasks.py web|worker")
    commands[sys.argv[1]]()
