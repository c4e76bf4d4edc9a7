"""A private RabbitMQ node, for tests that stop, block or restart a broker.

The machine's RabbitMQ (rabbit@localhost on 127.0.0.1:5672) serves other
tests and engineers at the same time: a test that breaks a broker breaks its
own. This node has its own name, ports, data, logs, plugins file and Erlang
cookie, all in one temporary folder that the ``rabbitmq`` user owns (the
server refuses to run as root, and Debian's wrapper switches users anyway).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Node(ABC):
    """What a test does to a RabbitMQ node, through its rabbitmqctl."""

    @abstractmethod
    def ctl(self, *arguments: str, timeout: float = 60) -> str:
        """``rabbitmqctl -n NODE arguments``; its output, or an AssertionError."""

    def stop_app(self) -> None:
        """Stop RabbitMQ in the running Erlang VM: every connection closes."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.ctl("await_startup")

    def set_memory_watermark(self, fraction: float) -> None:
        """Below the node's own use, RabbitMQ blocks every publishing connection."""
        self.ctl("set_vm_memory_high_watermark", format(fraction, "f"))


def output_of(result: subprocess.CompletedProcess[str], arguments: tuple[str, ...]) -> str:
    """rabbitmqctl's output, or an AssertionError that shows it."""
    if result.returncode != 0:
        raise AssertionError(
            f"rabbitmqctl {' '.join(arguments)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )
    return result.stdout


def consumer_timeout_config(seconds: float | None) -> tuple[str, str]:
    """rabbitmq.conf lines and advanced.config for a consumer_timeout of ``seconds`` (None: the default).

    RabbitMQ checks a channel's deliveries against it once per channel tick,
    every 60 s by default: a tick of a second lets a test see a short timeout act.
    """
    if seconds is None:
        return "", "[].\n"
    return f"consumer_timeout = {int(seconds * 1000)}\n", "[{rabbit, [{channel_tick_interval, 1000}]}].\n"


class RabbitNode(Node):
    """One RabbitMQ node on 127.0.0.1, started and stopped by its owner."""

    def __init__(self, metrics: bool = False, consumer_timeout: float | None = None) -> None:
        self.consumer_timeout = consumer_timeout
        self.account = pwd.getpwnam("rabbitmq")
        self.port = free_port()
        # The rabbitmq_prometheus plugin's port: the broker's own message counters.
        self.metrics_port = free_port() if metrics else None
        self.dist_port = free_port()
        self.name = f"onebox-test-{self.port}@localhost"
        self.home = Path(tempfile.mkdtemp(prefix="onebox-rabbit-"))
        self.server: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def pid_file(self) -> Path:
        return self.home / "rabbit.pid"

    def environment(self) -> dict[str, str]:
        home = self.home
        return {
            "PATH": "/usr/bin:/bin",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            # The machine's env file names its own node; this one is empty.
            "RABBITMQ_CONF_ENV_FILE": str(home / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(home / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(home / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            # Erlang distribution on loopback only, as the machine's node.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def _prepare(self) -> None:
        home = self.home
        (home / "rabbitmq-env.conf").write_text("")
        impatience, advanced = consumer_timeout_config(self.consumer_timeout)
        (home / "advanced.config").write_text(advanced)
        (home / "rabbitmq.conf").write_text(
            impatience + f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            # Tests set the memory watermark by hand; keep the disk alarm out
            # of their way on a nearly full test machine.
            "disk_free_limit.absolute = 1MB\n"
            + (
                f"prometheus.tcp.port = {self.metrics_port}\nprometheus.tcp.ip = 127.0.0.1\n"
                if self.metrics_port
                else ""
            )
        )
        # Not the management plugin: it would take the machine's port 15672.
        (home / "enabled_plugins").write_text("[rabbitmq_prometheus].\n" if self.metrics_port else "[].\n")
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)
        for folder in ("mnesia", "log"):
            (home / folder).mkdir()
        for path in (home, *home.iterdir()):
            os.chown(path, self.account.pw_uid, self.account.pw_gid)

    def start(self, timeout: float = 90) -> float:
        """Start the node and wait until it serves AMQP; the seconds it took."""
        self._prepare()
        started = time.monotonic()
        with (self.home / "server.out").open("wb") as output:
            self.server = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=self.account.pw_uid,
                group=self.account.pw_gid,
                extra_groups=[],
                env=self.environment(),
                cwd=self.home,
            )
        self.ctl("wait", str(self.pid_file), "--timeout", str(int(timeout)), timeout=timeout + 10)
        self.startup_seconds = time.monotonic() - started
        return self.startup_seconds

    def ctl(self, *arguments: str, timeout: float = 60) -> str:
        """``rabbitmqctl -n NODE arguments``; its output, or an AssertionError."""
        result = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name, *arguments],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            user=self.account.pw_uid,
            group=self.account.pw_gid,
            extra_groups=[],
            env=self.environment(),
            cwd=self.home,
        )
        return output_of(result, arguments)

    def stop(self) -> None:
        """Stop the node and delete its folder, whatever state it is in."""
        server = self.server
        if server is not None and server.poll() is None:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                self.ctl("stop", str(self.pid_file), timeout=60)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                # The server's whole session is this node: its shell, the
                # Erlang VM and the VM's helpers.
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(10)
        shutil.rmtree(self.home, ignore_errors=True)

    def log(self) -> str:
        """The node's log, for a failure message."""
        logs = sorted((self.home / "log").glob("*.log"))
        return "\n".join(path.read_text(errors="replace")[-4000:] for path in logs)


# The machine runs RabbitMQ 3.10; CloudAMQP's free plan runs 4.0.5. An image
# of it: the official one, or a local stand-in (../shared/container/rabbitmq-image.sh).
RABBITMQ_IMAGE = os.environ.get("RABBITMQ_IMAGE", "docker.io/library/rabbitmq:4.0.5")


class RabbitContainer(Node):
    """One RabbitMQ node in a container (RABBITMQ_IMAGE), on 127.0.0.1.

    The same interface as RabbitNode. Host networking, as podman works here:
    the node has its own name and ports, and shares the machine's epmd. The
    Prometheus plugin serves the broker's own counters (messages published
    and delivered) on a port of its own, on loopback.
    """

    def __init__(
        self,
        podman: str,
        image: str = RABBITMQ_IMAGE,
        port: int | None = None,
        consumer_timeout: float | None = None,
    ) -> None:
        self.consumer_timeout = consumer_timeout
        self.podman = podman  # or docker: the same commands
        self.image = image
        # A named image is local here (no registry); the official one is pulled where it is missing.
        self.pull = "never" if "RABBITMQ_IMAGE" in os.environ else "missing"
        self.port = port or free_port()
        self.dist_port = free_port()
        self.metrics_port = free_port()
        self.name = f"onebox-rmq-{self.port}"
        self.node = f"{self.name}@localhost"
        self.home = Path(tempfile.mkdtemp(prefix="onebox-rabbit-"))
        self.startup_seconds = 0.0

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self, timeout: float = 90) -> float:
        """Start the container and wait until the node serves AMQP; the seconds it took."""
        impatience, advanced = consumer_timeout_config(self.consumer_timeout)
        (self.home / "advanced.config").write_text(advanced)
        (self.home / "rabbitmq.conf").write_text(
            impatience + f"prometheus.tcp.port = {self.metrics_port}\n"
            "prometheus.tcp.ip = 127.0.0.1\n"
            "disk_free_limit.absolute = 1MB\n"
            "loopback_users = none\n"
        )
        (self.home / "enabled_plugins").write_text("[rabbitmq_prometheus].\n")
        for path in (self.home, *self.home.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        started = time.monotonic()
        subprocess.run(
            [
                self.podman, "run", "-d", f"--pull={self.pull}", "--network", "host", "--name", self.name,
                "-v", f"{self.home}:/etc/onebox-rabbitmq:ro",
                "-e", f"RABBITMQ_NODENAME={self.node}",
                "-e", f"RABBITMQ_NODE_PORT={self.port}",
                "-e", f"RABBITMQ_DIST_PORT={self.dist_port}",
                "-e", "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1",
                "-e", "RABBITMQ_CONFIG_FILE=/etc/onebox-rabbitmq/rabbitmq.conf",
                "-e", "RABBITMQ_ADVANCED_CONFIG_FILE=/etc/onebox-rabbitmq/advanced.config",
                "-e", "RABBITMQ_ENABLED_PLUGINS_FILE=/etc/onebox-rabbitmq/enabled_plugins",
                "-e", "ERL_EPMD_ADDRESS=127.0.0.1",
                self.image,
            ],
            check=True, capture_output=True, text=True, timeout=60 if self.pull == "never" else 600,
        )  # fmt: skip
        # await_startup fails at once while the node has not registered with epmd yet.
        deadline = started + timeout
        while True:
            try:
                self.ctl("await_startup", "--timeout", "10", timeout=30)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"RabbitMQ in {self.name} did not start:\n{self.log()}") from None
                time.sleep(0.5)
        self.startup_seconds = time.monotonic() - started
        return self.startup_seconds

    def ctl(self, *arguments: str, timeout: float = 60) -> str:
        """``rabbitmqctl -n NODE arguments`` in the container; its output, or an AssertionError."""
        result = subprocess.run(
            [self.podman, "exec", self.name, "rabbitmqctl", "-n", self.node, *arguments],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        return output_of(result, arguments)

    def stop(self) -> None:
        # docker rm -f kills at once; podman waits for the stop timeout unless told not to.
        no_wait = ["-t", "0"] if Path(self.podman).name == "podman" else []
        subprocess.run([self.podman, "rm", "-f", *no_wait, self.name], capture_output=True, check=False, timeout=60)
        shutil.rmtree(self.home, ignore_errors=True)

    def log(self) -> str:
        result = subprocess.run(
            [self.podman, "logs", "--tail", "60", self.name], capture_output=True, text=True, check=False
        )
        return result.stdout + result.stderr
