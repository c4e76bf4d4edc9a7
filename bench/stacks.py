"""The systems under test, each started as its users start it.

- onebox: supervisord (supervise.py) with supervisord.conf, as the container runs it;
- the comparison: uvicorn and ``dramatiq app`` from bench/plain/;
- the web ceiling: bench/bare.py on granian;
- the delay proxy that puts the broker 10 ms away.

A stack is a context manager: leaving it stops its processes and deletes its
queues, whatever happened inside.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from harness import BENCH, RABBIT_URL, ROOT, Process, child_env, delete_queues, free_port

PYTHON = sys.executable
PLAIN = BENCH / "plain"


@dataclass(frozen=True)
class Scratch:
    """A run's scratch directory, and in it onebox's venv as deployed; and
    the directory of the core under test (main.py, tasks.py, settings.toml,
    supervisord.conf): this checkout, or a copy with a change to measure."""

    directory: Path
    venv: Path
    core: Path

    @classmethod
    def create(cls, directory: Path, core: Path = ROOT) -> Scratch:
        """The Containerfile installs the runtime dependencies alone; this
        project's venv also holds the dev and bench groups, pydantic among
        them, which Litestar would then load (10 MiB more per web process)."""
        venv = directory / "venv"
        env = child_env() | {"UV_PROJECT_ENVIRONMENT": str(venv)}
        command = ["uv", "sync", "--frozen", "--no-default-groups", "--no-install-project", "--quiet"]
        subprocess.run([*command, f"--python={sys.executable}"], cwd=ROOT, env=env, check=True, timeout=300)
        return cls(directory, venv, core)


QUEUES: list[str] = []
"""Every queue name handed out, so that a test can check none is left."""


def new_queue(label: str) -> str:
    name = f"bench-{label}-{uuid.uuid4().hex[:8]}"
    QUEUES.append(name)
    return name


def queue_family(queue: str) -> tuple[str, str, str]:
    """The queue with its delay and dead-letter queues, as Dramatiq names them."""
    return queue, f"{queue}.DQ", f"{queue}.XQ"


@dataclass
class Stack:
    name: str
    processes: list[Process]
    url: str
    """POST /tasks."""
    queue: str | None
    launched: float
    broker_url: str = RABBIT_URL
    """Where the queue is: its queues are deleted there."""
    log: Process = field(init=False)
    """The process whose output carries the worker's log lines."""

    def __post_init__(self) -> None:
        self.log = self.processes[-1]

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self, kill: bool = False) -> None:
        try:
            for process in self.processes:
                process.kill() if kill else process.stop()
        finally:
            if self.queue is not None:
                delete_queues(*queue_family(self.queue), url=self.broker_url)


def paused_config(scratch: Scratch) -> Path:
    """supervisord.conf with the worker program not started, so that the
    queue keeps every message the web side published and they can be
    counted. Nothing else differs."""
    text = (scratch.core / "supervisord.conf").read_text()
    # %(here)s would now mean the scratch directory.
    text = text.replace("%(here)s", str(scratch.core))
    text = text.replace("[program:worker]\n", "[program:worker]\nautostart=false\n")
    path = scratch.directory / "supervisord-paused.conf"
    path.write_text(text)
    return path


def onebox(
    scratch: Scratch, queue: str, *, paused: bool = False, broker_url: str = RABBIT_URL, **settings: str | int
) -> Stack:
    """supervisord and its programs, or without the worker when ``paused``."""
    port = free_port()
    config = paused_config(scratch) if paused else scratch.core / "supervisord.conf"
    env = child_env(
        scratch.venv,
        PORT=port,
        QUEUE_NAME=queue,
        CLOUDAMQP_URL=broker_url,
        # Its metrics files go with the scratch directory.
        TMPDIR=str(scratch.directory),
        # The per-client rate limit would cap a load test from one address;
        # a metrics port of its own, as no two stacks can share one.
        **({"RATE_LIMIT_PER_MINUTE": 0, "METRICS_PORT": free_port()} | settings),
    )
    launched = time.time()
    supervise = [str(scratch.venv / "bin" / "python"), str(scratch.core / "supervise.py"), "-c", str(config)]
    process = Process(supervise, env)
    return Stack("onebox", [process], f"http://127.0.0.1:{port}/tasks", queue, launched, broker_url)


def plain(queue: str, *, worker: bool = True, broker_url: str = RABBIT_URL) -> Stack:
    """uvicorn with one worker and, unless paused, ``dramatiq app`` with its defaults."""
    port = free_port()
    env = child_env(QUEUE_NAME=queue, CLOUDAMQP_URL=broker_url)
    launched = time.time()
    uvicorn = [PYTHON, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", f"--port={port}", "--workers=1"]
    # Access logs off, as onebox's granian has them.
    processes = [Process([*uvicorn, "--no-access-log"], env, cwd=PLAIN)]
    if worker:
        processes.append(Process([PYTHON, "-m", "dramatiq", "app"], env, cwd=PLAIN))
    return Stack("comparison", processes, f"http://127.0.0.1:{port}/tasks", queue, launched, broker_url)


def bare(scratch: Scratch) -> Stack:
    port = free_port()
    python = str(scratch.venv / "bin" / "python")
    command = [python, "-m", "granian", "bare:app", "--interface=asgi", "--host=127.0.0.1", f"--port={port}"]
    launched = time.time()
    process = Process([*command, "--workers=1", "--loop=uvloop"], child_env(scratch.venv), cwd=BENCH)
    return Stack("bare", [process], f"http://127.0.0.1:{port}/tasks", None, launched)


class DelayProxy:
    """bench/delay_proxy.py in front of RabbitMQ, for as long as the block lasts."""

    def __init__(self, delay_ms: float) -> None:
        self.process = Process([PYTHON, str(BENCH / "delay_proxy.py"), "5672", str(delay_ms)], child_env(), cwd=BENCH)
        try:
            self.port = int(self.process.wait_for(r"listening on \d+", 10).rpartition(" ")[2])
        except RuntimeError:
            self.process.stop()
            raise
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.process.stop()
