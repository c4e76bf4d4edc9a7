"""Shared test helpers: real processes, a real RabbitMQ, a TCP proxy to break."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pika
import psutil
import pytest
from rabbit_node import RabbitContainer

ROOT = Path(__file__).resolve().parent.parent
RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"
IN_CI = os.environ.get("CI") == "true"
# The app under test in this process publishes to a queue of this run's own.
os.environ["QUEUE_NAME"] = f"test-{uuid.uuid4().hex[:10]}"
# Tests load the service from one address; those of the limit set it themselves.
os.environ["RATE_LIMIT_PER_MINUTE"] = "0"
# The stacks' temporary files (metrics): their TMPDIR, removed when the tests end.
STACK_TMP = Path(tempfile.mkdtemp(prefix="onebox-test-stacks-"))
atexit.register(shutil.rmtree, STACK_TMP, ignore_errors=True)


def require_tool(name: str) -> str:
    """The tool's path; a missing tool skips on a laptop and fails in CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (.ci/run installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def machine_ctl(*arguments: str, timeout: float = 60) -> str:
    """``rabbitmqctl arguments`` for the machine's RabbitMQ."""
    return subprocess.run(
        ["rabbitmqctl", *arguments], capture_output=True, text=True, check=True, timeout=timeout
    ).stdout


def declared_with_prefix(kind: str, prefixes: list[str], ctl: Callable[..., str] = machine_ctl) -> list[str]:
    """RabbitMQ's queues or exchanges (``kind``) named ``<prefix>`` or ``<prefix>.<anything>``."""
    names = ctl("-q", f"list_{kind}", "--no-table-headers", "name").split()
    return [name for name in names if name.partition(".")[0] in prefixes]


def copy_checkout(destination: Path, skip: tuple[str, ...] = ()) -> None:
    """The checkout's files (tracked, and untracked ones git does not ignore) copied to ``destination``."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file() and not (skip and name.startswith(skip)):
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rabbit_connection(url: str = RABBIT_URL) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url))


def delete_queues(queue: str, url: str = RABBIT_URL) -> None:
    connection = rabbit_connection(url)
    try:
        channel = connection.channel()
        for name in (queue, f"{queue}.DQ", f"{queue}.XQ", f"{queue}.cancellations", f"{queue}.events"):
            channel.queue_delete(name)
    finally:
        connection.close()


def queue_depth(queue: str, url: str = RABBIT_URL) -> int:
    """Messages ready in the queue (it must exist)."""
    connection = rabbit_connection(url)
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


# -- The broker matrix ----------------------------------------------------------
#
# Users run RabbitMQ 4.0.5 (CloudAMQP's free plan); the machine runs 3.10.
# A test that takes the ``broker`` fixture runs against both.


@dataclass(frozen=True)
class Broker:
    """A RabbitMQ the tests talk to, over AMQP and its rabbitmqctl."""

    version: str
    port: int
    ctl: Callable[..., str]
    metrics_port: int | None = None  # the rabbitmq_prometheus plugin's, where enabled

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"


MACHINE_BROKER = Broker("3.10", 5672, machine_ctl)


@pytest.fixture(scope="session")
def rabbit4() -> Iterator[RabbitContainer]:
    """A RabbitMQ 4.0.5 node in a container (RABBITMQ_IMAGE), for the whole run."""
    node = RabbitContainer(require_tool("podman"))
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture
def broker4(rabbit4: RabbitContainer) -> Broker:
    return Broker("4.0.5", rabbit4.port, rabbit4.ctl, rabbit4.metrics_port)


@pytest.fixture(params=["3.10", "4.0.5"])
def broker(request: pytest.FixtureRequest) -> Broker:
    """Each RabbitMQ of the matrix in turn."""
    if request.param == MACHINE_BROKER.version:
        return MACHINE_BROKER
    return request.getfixturevalue("broker4")  # type: ignore[no-any-return]


@pytest.fixture
def app_queue(broker: Broker) -> Iterator[str]:
    """The queue the in-process app publishes to; deleted after the test."""
    yield os.environ["QUEUE_NAME"]
    delete_queues(os.environ["QUEUE_NAME"], broker.url)


@pytest.fixture
def queue_name() -> Iterator[str]:
    """A queue name of this test's own; its queues are deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    delete_queues(name)


@pytest.fixture
def broker_queue(broker: Broker) -> Iterator[str]:
    """A queue name of this test's own on ``broker``; deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    delete_queues(name, broker.url)


class Process:
    """A child process whose merged output is collected line by line."""

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
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def tail(self) -> str:
        return "\n".join(self.lines[-80:])

    def wait_for(self, pattern: str, timeout: float = 30, start: int = 0) -> re.Match[str]:
        """The first output line from ``start`` on that matches ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        while True:
            for index in range(seen, len(self.lines)):
                if match := regex.search(self.lines[index]):
                    return match
            seen = len(self.lines)
            if time.monotonic() > deadline:
                raise AssertionError(f"no line matching {pattern!r} in {timeout} s; output:\n{self.tail}")
            if self.popen.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"exited ({self.popen.returncode}) before {pattern!r}; output:\n{self.tail}")
            time.sleep(0.05)

    def send_signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        code = self.popen.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self) -> None:
        """End the process and everything it started, whatever state it is in."""
        try:
            children = psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(35)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        # supervisord puts each program in a process group of its own.
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        self._reader.join(5)


def stack_env(**overrides: str | int) -> dict[str, str]:
    """The environment for onebox's programs: this venv, plus settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTEST", "COV"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    # Stacks that run at once must not contend for the default metrics port.
    env["METRICS_PORT"] = str(free_port())
    env["TMPDIR"] = str(STACK_TMP)
    env.update({key: str(value) for key, value in overrides.items()})
    return env


def start_stack(**settings: str | int) -> Process:
    """supervisord with supervisord.conf, as the container runs it."""
    supervisord = str(Path(sys.executable).parent / "supervisord")
    return Process([supervisord, "-c", str(ROOT / "supervisord.conf")], stack_env(**settings))


def wait_http(url: str, timeout: float = 20, status: int = 200) -> httpx.Response:
    """Poll ``url`` until it answers ``status``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == status:
                return response
            last = response.status_code
        except httpx.HTTPError as error:
            last = error
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer {status} within {timeout} s (last: {last!r})")


class TcpProxy:
    """A TCP forwarder to a broker that a test can break and mend.

    ``cut()`` closes every connection and refuses new ones; ``blackhole()``
    accepts new connections and never answers, while open ones stop
    forwarding but stay open; ``restore()`` forwards again.
    """

    def __init__(self, target_port: int = 5672, tls: ssl.SSLContext | None = None) -> None:
        self.target = ("127.0.0.1", target_port)
        self.tls = tls
        self.mode = "forward"
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, user: str = "guest", password: str = "guest") -> str:
        if self.tls is not None:
            return f"amqps://{user}:{password}@localhost:{self.port}/"
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/"

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.mode == "cut":
                client.close()
                continue
            if self.tls is not None:
                try:
                    client = self.tls.wrap_socket(client, server_side=True)
                except (OSError, ssl.SSLError):
                    client.close()
                    continue
            with self.lock:
                self.sockets.append(client)
            if self.mode == "blackhole":
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets.append(upstream)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            source.settimeout(0.1)
        except OSError:  # closed by cut() or close() before this thread began
            return
        while not self.closed:
            if self.mode == "blackhole":
                time.sleep(0.05)
                continue
            try:
                data = source.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            if self.mode == "blackhole":
                continue  # dropped on the floor, as by a dead network
            try:
                sink.sendall(data)
            except OSError:
                break
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.close()

    def _close_all(self) -> None:
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def cut(self) -> None:
        self.mode = "cut"
        self._close_all()

    def blackhole(self) -> None:
        self.mode = "blackhole"

    def restore(self) -> None:
        if self.mode == "blackhole":
            # Connections held open while silent are dead to both ends by now.
            self._close_all()
        self.mode = "forward"

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self._close_all()


@pytest.fixture
def proxy(broker: Broker) -> Iterator[TcpProxy]:
    """A proxy to the broker of the matrix."""
    proxy = TcpProxy(broker.port)
    yield proxy
    proxy.close()


@pytest.fixture
def stacks() -> Iterator[list[Process]]:
    """Processes a test starts; all are stopped afterwards, whatever happened."""
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()
