"""What runs in the background, and what the web side shares with it.

Read top to bottom: the settings (settings.toml, overridden by environment
variables), the Dramatiq broker, the countdown actor, and the two commands
that supervisord runs: ``python tasks.py web`` and ``python tasks.py worker``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from itertools import chain
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import urlsplit

import dramatiq
import msgspec
import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import CurrentMessage
from msgspec import Meta

SETTINGS_FILE = Path(__file__).with_name("settings.toml")

# RabbitMQ closes a channel whose delivery stays unacknowledged past its
# consumer_timeout (30 minutes by default): a countdown must end well before.
LONGEST_COUNTDOWN = 1500


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
    worker_threads: Annotated[int, Meta(ge=1, le=1000)]
    # CloudAMQP's shared plans close a connection that holds more than 1,000
    # unacknowledged messages.
    queue_prefetch: Annotated[int, Meta(ge=1, le=1000)]
    max_retries: Annotated[int, Meta(ge=0, le=10)]
    max_seconds: Annotated[int, Meta(ge=1, le=LONGEST_COUNTDOWN)]
    # Stopping takes up to stop_grace + 5 s; supervisord kills at 30 s.
    stop_grace: Annotated[int, Meta(ge=1, le=20)]
    # A pattern, not a Literal, so that an error lists the choices.
    log_level: Annotated[str, Meta(pattern="^(DEBUG|INFO|WARNING|ERROR)$")]
    api_token: Annotated[str, Meta(pattern=r"^(|[\x21-\x7e]{16,})$", description="empty, or 16+ visible characters")]
    rate_limit_per_minute: Annotated[int, Meta(ge=0, le=1_000_000)]
    client_ip_header: Annotated[str, Meta(pattern=r"^[A-Za-z0-9-]*$")]
    cors_origins: str

    def __post_init__(self) -> None:
        if self.queue_prefetch < self.worker_threads:
            raise ValueError("queue_prefetch must be at least worker_threads, or threads sit idle")


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


def redact(text: str, url: str) -> str:
    """The text without the broker URL's password, for logs and error bodies."""
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


settings = load_settings()
logger = logging.getLogger("onebox")
logger.setLevel(settings.log_level)


class Broker(RabbitmqBroker):
    """Dramatiq's RabbitMQ broker, holding no connection it does not use.

    Declaring the queues opens a connection in each consumer thread, which
    then idles for the life of the worker; a stock worker holds four
    connections for one queue. Closing it after the declaration leaves one
    connection per consumed queue (the queue and its delay queue).
    """

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> dramatiq.Consumer:
        consumer = super().consume(queue_name, prefetch, timeout)
        del self.connection
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


@dramatiq.actor(
    queue_name=settings.queue_name,
    max_retries=settings.max_retries,
    # Retries wait in the delay queue, unacknowledged: stay far below
    # RabbitMQ's consumer_timeout.
    min_backoff=1_000,
    max_backoff=60_000,
    # A countdown of max_seconds must never hit the time limit.
    time_limit=(settings.max_seconds + 60) * 1000,
)
def countdown(seconds: int) -> None:
    """Count down from ``seconds``, logging once a second."""
    message = CurrentMessage.get_current_message()
    assert message is not None
    task_id = message.message_id
    attempt = message.options.get("retries", 0) + 1
    redelivered = "yes" if getattr(message, "redelivered", False) else "no"
    logger.info("task %s started seconds=%d attempt=%d redelivered=%s", task_id, seconds, attempt, redelivered)
    started = time.monotonic()
    for remaining in range(seconds - 1, -1, -1):
        # Sleep to the next whole second since the start, so ticks do not drift.
        time.sleep(max(0.0, started + (seconds - remaining) - time.monotonic()))
        logger.info("task %s remaining=%d", task_id, remaining)
    logger.info("task %s done seconds=%d", task_id, seconds)


def run_web() -> NoReturn:
    """Replace this process with granian serving main:app."""
    options = {
        "--interface": "asgi",
        "--host": "0.0.0.0",
        "--port": str(settings.port),
        "--workers": str(settings.web_workers),
        "--loop": "uvloop",
        "--log-level": settings.log_level.lower(),
        # A long response must not hold a stop past the grace period.
        "--workers-kill-timeout": str(settings.stop_grace),
    }
    os.execv(sys.executable, [sys.executable, "-m", "granian", "main:app", *chain(*options.items())])


def run_worker() -> NoReturn:
    """Replace this process with the Dramatiq worker for this module."""
    # Dramatiq reads its prefetch from the environment. Its delay-queue
    # default (threads x 1000) breaks CloudAMQP's limit on unacked messages.
    os.environ["dramatiq_queue_prefetch"] = str(settings.queue_prefetch)
    os.environ["dramatiq_delay_queue_prefetch"] = str(settings.queue_prefetch)
    options = {
        "--processes": str(settings.worker_processes),
        "--threads": str(settings.worker_threads),
        "--worker-shutdown-timeout": str(settings.stop_grace * 1000),
    }
    os.execv(sys.executable, [sys.executable, "-m", "dramatiq", "tasks", *chain(*options.items())])


if __name__ == "__main__":
    commands = {"web": run_web, "worker": run_worker}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        raise SystemExit("usage: python tasks.py web|worker")
    commands[sys.argv[1]]()
