"""What the benchmark stands on: child processes, queues, load generators and
samples of a process tree's memory and broker connections.

Everything here measures from the outside, the way an operator would: wrk
over HTTP, RabbitMQ's own message counts, /proc through psutil.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pika
import psutil

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"
AMQP_PORT = 5672
MIB = 1024 * 1024
# wrk's own limit on a round is whole seconds; each thread stops itself this
# much earlier, after a response, so that nothing is in flight at the end.
WRK_MARGIN = 1
# Dramatiq's and supervisord's log lines start with a local time in ms.
LOG_TIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def log_time(line: str) -> float:
    """The Unix time of a log line's timestamp (local time, as logged)."""
    match = LOG_TIME.search(line)
    if match is None:
        raise ValueError(f"no timestamp in {line!r}")
    return datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile: a value that was actually measured."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(venv: Path | None = None, **overrides: str | int) -> dict[str, str]:
    """The environment for a child process: ``venv`` (by default this one) first, plus settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTEST", "COV", "VIRTUAL_ENV"))}
    bin_directory = Path(sys.executable).parent if venv is None else venv / "bin"
    env["PATH"] = f"{bin_directory}:{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update({key: str(value) for key, value in overrides.items()})
    return env


class Process:
    """A child process in a session of its own, its merged output kept by line."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path = ROOT) -> None:
        self.command = command
        self.popen = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 30, start: int = 0) -> str:
        """The first output line from ``start`` on that matches ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        while True:
            for index in range(seen, len(self.lines)):
                if regex.search(self.lines[index]):
                    return self.lines[index]
            seen = len(self.lines)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no line matching {pattern!r} in {timeout} s from {self.command[:3]}:\n{self.tail}")
            if self.popen.poll() is not None and not self._reader.is_alive():
                raise RuntimeError(f"{self.command[:3]} exited ({self.popen.returncode}):\n{self.tail}")
            time.sleep(0.01)

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        return sum(1 for line in list(self.lines) if regex.search(line))

    @property
    def tail(self) -> str:
        return "\n".join(self.lines[-40:])

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 35) -> None:
        """SIGTERM, as a platform stops a container; then kill what is left."""
        tree = self.tree()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        self._kill(tree)

    def kill(self) -> None:
        """Kill the whole tree at once: for stacks whose tasks need not finish."""
        self._kill(self.tree())

    def _kill(self, tree: list[psutil.Process]) -> None:
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._reader.join(5)


@contextlib.contextmanager
def running(*processes: Process) -> Iterator[None]:
    try:
        yield
    finally:
        for process in processes:
            process.stop()


# -- RabbitMQ ------------------------------------------------------------------


def _channel_call(action: Any, url: str = RABBIT_URL) -> Any:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return action(connection.channel())
    finally:
        connection.close()


def queue_depth(queue: str, url: str = RABBIT_URL) -> int:
    """Messages ready in ``queue``; with no consumer, every message in it."""
    return int(_channel_call(lambda channel: channel.queue_declare(queue, passive=True).method.message_count, url))


def purge(queue: str, url: str = RABBIT_URL) -> None:
    _channel_call(lambda channel: channel.queue_purge(queue), url)


def delete_queues(*names: str, url: str = RABBIT_URL) -> None:
    def delete(channel: Any) -> None:
        for name in names:
            channel.queue_delete(name)

    _channel_call(delete, url)


def _rabbitmqctl_names(kind: str) -> list[str]:
    output = subprocess.run(
        ["rabbitmqctl", "-q", f"list_{kind}", "--no-table-headers", "name"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return output.split()


def leftovers(prefixes: list[str]) -> dict[str, list[str]]:
    """Queues and exchanges named ``prefix`` or ``prefix.<anything>``: what a
    stack on that queue declared (its delay, dead-letter, event and
    cancellation queues and exchanges, whatever the core names them)."""

    def ours(name: str) -> bool:
        return any(name == prefix or name.startswith(f"{prefix}.") for prefix in prefixes)

    return {kind: [name for name in _rabbitmqctl_names(kind) if ours(name)] for kind in ("queues", "exchanges")}


def sweep(prefixes: list[str]) -> None:
    """Delete every queue and exchange of ``leftovers``."""
    found = leftovers(prefixes)

    def delete(channel: Any) -> None:
        for name in found["queues"]:
            channel.queue_delete(name)
        for name in found["exchanges"]:
            channel.exchange_delete(name)

    _channel_call(delete)


def settled_depth(queue: str, expected: int, timeout: float = 5, url: str = RABBIT_URL) -> int:
    """The queue's depth once it stops growing: a publisher without confirms
    may still have messages on the way when its 2xx has been counted."""
    deadline = time.monotonic() + timeout
    depth = queue_depth(queue, url)
    while depth < expected and time.monotonic() < deadline:
        time.sleep(0.1)
        depth = queue_depth(queue, url)
    return depth


def unacknowledged(queue: str) -> int:
    """Messages delivered to the queue's consumers and not yet acknowledged."""
    output = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "--no-table-headers", "name", "messages_unacknowledged"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    for line in output.splitlines():
        name, _, count = line.partition("\t")
        if name == queue:
            return int(count)
    raise RuntimeError(f"queue {queue!r} not listed by rabbitmqctl")


def rabbitmq_version(url: str = RABBIT_URL) -> str:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        version = connection._impl.server_properties["version"]
    finally:
        connection.close()
    return version.decode() if isinstance(version, bytes) else str(version)


# -- HTTP ----------------------------------------------------------------------


def first_accepted(url: str, timeout: float = 60) -> float:
    """The time of the first 202 from POST ``url``, polled every 10 ms."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if client.post(url, json={"seconds": 1}).status_code == 202:
                    return time.time()
            time.sleep(0.01)
    raise RuntimeError(f"no 202 from {url} in {timeout} s")


def wrk(url: str, clients: int, seconds: float, script: str = "post.lua") -> dict[str, float]:
    """POST {"seconds": 1} to ``url`` from ``clients`` connections for ``seconds``.

    One wrk thread per connection, each stopping after its first response
    past ``seconds`` (bench/post.lua), so no request is left unanswered.
    """
    command = [
        "wrk",
        f"--threads={clients}",
        f"--connections={clients}",
        f"--duration={int(seconds) + WRK_MARGIN}s",
        "--timeout=10s",
        f"--script={BENCH / script}",
        url,
        "--",
        str(seconds),
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 30).stdout
    line = next((line for line in output.splitlines() if line.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no results:\n{output}")
    raw: dict[str, float] = json.loads(line.removeprefix("BENCH "))
    return {
        "clients": clients,
        "rps": raw["ok"] / raw["seconds"],
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "accepted": raw["ok"],
        "refused": raw["other"],
        "errors": raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"],
        "unfinished_clients": raw["unfinished"],
    }


def raw_publish(url: str, queue: str, inflight: int, seconds: float) -> dict[str, float]:
    """The publishing ceiling (bench/raw_publish.py), in a process of its own."""
    command = [sys.executable, str(BENCH / "raw_publish.py"), url, queue, str(inflight), str(seconds)]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 30).stdout
    result: dict[str, float] = json.loads(output)
    return {"clients": inflight, **result}


# -- Samples of a process tree -------------------------------------------------------


def _role(process: psutil.Process) -> str:
    command = " ".join(process.cmdline())
    if "supervisord" in command or "supervise.py" in command:
        return "supervisord"
    # onebox's programs, each one process by default.
    for program in ("web", "worker"):
        if command.endswith(f"tasks.py {program}"):
            return program
    if command.startswith("sh -c"):
        return "exit-on-fatal listener"
    for program in ("granian", "dramatiq", "uvicorn"):
        if program in command:
            parent = process.parent()
            child = parent is not None and program in " ".join(parent.cmdline())
            return f"{program} {'worker' if child else 'main'}"
    return process.name()


def sample(roots: list[Process], broker_ports: tuple[int, ...] = (AMQP_PORT,)) -> dict[str, Any]:
    """Memory (RSS, PSS) and established broker connections, per process and in all."""
    processes: dict[str, dict[str, float]] = {}
    local_ports: set[int] = set()
    members = sorted((member for root in roots for member in root.tree()), key=lambda member: member.pid)
    for member in members:
        try:
            role = _role(member)
            memory = member.memory_full_info()
            connections = [
                connection
                for connection in member.net_connections(kind="tcp")
                if connection.raddr
                and connection.raddr.port in broker_ports
                and connection.status == psutil.CONN_ESTABLISHED
            ]
        except psutil.NoSuchProcess:
            continue
        name, number = role, 1
        while name in processes:
            number += 1
            name = f"{role} {number}"
        processes[name] = {
            "rss_mib": memory.rss / MIB,
            "pss_mib": memory.pss / MIB,
            "connections": len(connections),
        }
        # A socket inherited across fork shows in both processes; count it once.
        local_ports.update(connection.laddr.port for connection in connections)
    return {
        "rss_mib": sum(process["rss_mib"] for process in processes.values()),
        "pss_mib": sum(process["pss_mib"] for process in processes.values()),
        "connections": len(local_ports),
        "processes": processes,
    }


def cpu_seconds(roots: list[Process]) -> float:
    """CPU time (user and system) spent so far by every process of the trees."""
    total = 0.0
    for member in (member for root in roots for member in root.tree()):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = member.cpu_times()
            total += times.user + times.system
    return total


def median_tree(runs: list[Any]) -> Any:
    """The median of every number across runs of the same shape."""
    first = runs[0]
    if isinstance(first, dict):
        keys = [key for key in first if all(isinstance(run, dict) and key in run for run in runs)]
        return {key: median_tree([run[key] for run in runs]) for key in keys}
    if isinstance(first, bool) or not isinstance(first, int | float):
        return first
    return statistics.median(runs)
