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
import msgspec
import pika
import psutil
import pytest
from rabbit_node import RabbitContainer

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"
# The app under test in this process publishes to a queue of this run's own.
os.environ["QUEUE_NAME"] = f"test-{uuid.uuid4().hex[:10]}"
# Tests load the service from one address; those of the limit set it themselves.
os.environ["RATE_LIMIT_PER_MINUTE"] = "0"
# The stacks' temporary files (metrics): their TMPDIR, removed when the tests end.
STACK_TMP = Path(tempfile.mkdtemp(prefix="onebox-test-stacks-"))
atexit.register(shutil.rmtree, STACK_TMP, ignore_errors=True)


# The commands a newcomer copies from the README, in order: run, test, run without containers.
README_COMMANDS = re.findall(r"^```bash\n(.*?)\n```$", (ROOT / "README.md").read_text(), re.MULTILINE | re.DOTALL)


def require_tool(name: str) -> str:
    """The tool's path; a missing tool skips on a laptop and fails in CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (.ci/run installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- The tests' broker -----------------------------------------------------------------
#
# The tests talk to a RabbitMQ on 127.0.0.1 (guest/guest) and drive it with its
# rabbitmqctl: the machine's, on ONEBOX_TEST_BROKER_PORT (5672), as .ci/run starts
# it. On a machine without both (a laptop with only uv and podman or Docker), the
# session runs one in a container, drives it through the container's own
# rabbitmqctl, and removes it at the end.

MACHINE_PORT = int(os.environ.get("ONEBOX_TEST_BROKER_PORT", "5672"))


def speaks_amqp(port: int) -> bool:
    """Whether a broker on 127.0.0.1:``port`` answers AMQP 0-9-1's greeting."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            return sock.recv(1) == b"\x01"  # a method frame: connection.start
    except OSError:
        return False


def container_engine() -> str:
    """podman, else docker; neither skips on a laptop and fails in CI."""
    return shutil.which("podman") or shutil.which("docker") or require_tool("podman")


def compose_rabbitmq_image() -> str:
    """RABBITMQ_IMAGE, else the image compose.yaml gives the broker by default."""
    if image := os.environ.get("RABBITMQ_IMAGE"):
        return image
    service = re.search(r"image: \$\{RABBITMQ_IMAGE:-(.+?)\}", (ROOT / "compose.yaml").read_text())
    assert service is not None, "compose.yaml names no default broker image"
    return service.group(1)


class SessionBroker:
    """The RabbitMQ every test reaches by default: the machine's, or a container of the session's own."""

    def __init__(self) -> None:
        self.on_machine = speaks_amqp(MACHINE_PORT) and shutil.which("rabbitmqctl") is not None
        self.port = MACHINE_PORT if self.on_machine else free_port()
        self.container: RabbitContainer | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def ctl(self, *arguments: str, timeout: float = 60) -> str:
        """``rabbitmqctl arguments``: the machine's, or the one in the session's container."""
        if self.container is not None:
            return self.container.ctl(*arguments, timeout=timeout)
        return subprocess.run(
            ["rabbitmqctl", *arguments], capture_output=True, text=True, check=True, timeout=timeout
        ).stdout


SESSION_BROKER = SessionBroker()
RABBIT_URL = SESSION_BROKER.url
BROKER_PORT = SESSION_BROKER.port
machine_ctl = SESSION_BROKER.ctl
if RABBIT_URL != "amqp://guest:guest@127.0.0.1:5672/":
    # settings.toml's default is localhost:5672: the app in this process and every stack go here instead.
    os.environ["CLOUDAMQP_URL"] = RABBIT_URL


@pytest.fixture(scope="session", autouse=True)
def session_broker() -> Iterator[SessionBroker]:
    """The session's own RabbitMQ container, where the machine has no broker; removed at the end."""
    engine_here = shutil.which("podman") or shutil.which("docker")
    if SESSION_BROKER.on_machine or not (engine_here or IN_CI):
        # With neither a broker nor an engine the unit tests still run; the others fail to connect.
        yield SESSION_BROKER
        return
    node = SESSION_BROKER.container = RabbitContainer(container_engine(), compose_rabbitmq_image(), SESSION_BROKER.port)
    try:
        node.start()
        yield SESSION_BROKER
    finally:
        node.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    node = SESSION_BROKER.container
    missing = f"onebox: no RabbitMQ with rabbitmqctl on 127.0.0.1:{MACHINE_PORT}"
    if node is not None:
        terminalreporter.write_line(
            f"{missing}; this session ran {node.image} as container {node.name} on port {node.port}, and removed it"
        )
    elif not SESSION_BROKER.on_machine:
        terminalreporter.write_line(f"{missing}, and neither podman nor docker to run one", red=True)


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


def rabbit_connection(url: str = RABBIT_URL) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url))


def delete_queues(queue: str, url: str = RABBIT_URL) -> None:
    """Every queue and exchange onebox declares for ``queue`` (tasks.py's tables)."""
    import tasks  # noqa: PLC0415 - conftest sets QUEUE_NAME before tasks reads its settings

    settings = msgspec.structs.replace(tasks.settings, queue_name=queue)
    connection = rabbit_connection(url)
    try:
        channel = connection.channel()
        for name in tasks.queues(settings):
            channel.queue_delete(name)
        for name in tasks.exchanges(settings):
            channel.exchange_delete(name)
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


MACHINE_BROKER = Broker("3.10" if SESSION_BROKER.on_machine else "session", BROKER_PORT, machine_ctl)
# Without the machine's 3.10 the matrix is 4.0.5 alone; the session's container serves the other tests.
MATRIX = ["3.10", "4.0.5"] if SESSION_BROKER.on_machine else ["4.0.5"]


@pytest.fixture(scope="session")
def rabbit4() -> Iterator[RabbitContainer]:
    """A RabbitMQ 4.0.5 node in a container (RABBITMQ_IMAGE), for the whole run."""
    node = RabbitContainer(container_engine())
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture
def broker4(rabbit4: RabbitContainer) -> Broker:
    return Broker("4.0.5", rabbit4.port, rabbit4.ctl, rabbit4.metrics_port)


@pytest.fixture
def vhost(broker4: Broker) -> Iterator[str]:
    """A virtual host of this test's own on RabbitMQ 4.0.5, deleted afterwards."""
    name = f"onebox-{uuid.uuid4().hex[:8]}"
    broker4.ctl("add_vhost", name)
    broker4.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield name
    broker4.ctl("delete_vhost", name)


@pytest.fixture(params=MATRIX)
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


# The queue fixtures stop the test's stacks before they delete: a web process or
# worker still running would declare the deleted queues again and leave them on
# the broker for good.
@pytest.fixture
def queue_name(stacks: list[Process]) -> Iterator[str]:
    """A queue name of this test's own; its queues are deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    stop_all(stacks)
    delete_queues(name)


@pytest.fixture
def broker_queue(broker: Broker, stacks: list[Process]) -> Iterator[str]:
    """A queue name of this test's own on ``broker``; deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    stop_all(stacks)
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


def program_of(command: str) -> str | None:
    """Which of onebox's programs a command line runs: "web", "worker" or neither.

    One process each by default (``python tasks.py web|worker``); granian's or
    Dramatiq's own main process with WEB_WORKERS or WORKER_PROCESSES above 1.
    """
    if command.endswith("tasks.py web") or "granian" in command:
        return "web"
    if command.endswith("tasks.py worker") or "dramatiq" in command:
        return "worker"
    return None


def program_process(stack: Process, program: str) -> psutil.Process:
    """The process supervisord runs for ``program`` ("web" or "worker")."""
    for child in psutil.Process(stack.popen.pid).children():
        if program_of(" ".join(child.cmdline())) == program:
            return child
    raise AssertionError(f"supervisord runs no {program}")


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
    return Process(
        [sys.executable, str(ROOT / "supervise.py"), "-c", str(ROOT / "supervisord.conf")], stack_env(**settings)
    )


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


def countdown_refusal(base: str, seconds: int) -> str:
    """What ``POST /tasks`` says to a countdown of ``seconds``: the problem's detail, or why it did not answer."""
    try:
        response = httpx.post(f"{base}/tasks", json={"seconds": seconds}, timeout=5)
    except httpx.HTTPError as error:
        return repr(error)
    return str(response.json().get("detail", response.status_code))


class TcpProxy:
    """A TCP forwarder to a broker that a test can break and mend; it sends
    to its clients with Nagle's algorithm on, as LavinMQ does.

    ``cut()`` closes every connection and refuses new ones; ``blackhole()``
    accepts new connections and never answers, while open ones stop
    forwarding but stay open; ``restore()`` forwards again.
    """

    def __init__(self, target_port: int = BROKER_PORT, tls: ssl.SSLContext | None = None, port: int = 0) -> None:
        self.target = ("127.0.0.1", target_port)
        self.tls = tls
        self.mode = "forward"
        self.listener = socket.create_server(("127.0.0.1", port))
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
            # As a broker's clients send. Toward the client Nagle stays on, as
            # LavinMQ leaves it (RabbitMQ turns it off).
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
    stop_all(started)


def stop_all(processes: list[Process]) -> None:
    for process in processes:
        process.stop()


# -- A worker by hand ------------------------------------------------------------------


class Clock:
    """time.time, time.monotonic and time.sleep for tasks.py; a sleep may cancel or raise."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.plans: list[tuple[float, Callable[[], None]]] = []

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        due = [plan for plan in self.plans if plan[0] <= self.now]
        self.plans = [plan for plan in self.plans if plan[0] > self.now]
        for _, action in due:
            action()

    def after(self, seconds: float, action: Callable[[], None]) -> None:
        self.plans.append((self.now + seconds, action))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    """tasks.py on a clock of the test's own, its cancellations read."""
    import tasks  # noqa: PLC0415 - conftest sets QUEUE_NAME before tasks reads its settings

    clock = Clock()
    monkeypatch.setattr(tasks, "time", clock)
    tasks.cancellations.caught_up.set()
    tasks.worker_link.outbox.clear()
    yield clock
    tasks.worker_link.outbox.clear()
