"""A RabbitMQ 4 cluster on this machine, and one address in front of it.

Three podman containers of RABBITMQ_IMAGE on the host's network, each with a
node name, AMQP and distribution ports of its own (the machine's RabbitMQ
holds 5672, 25672 and epmd's 4369, which they share), one Erlang cookie, and
every port on loopback only. ``ClusterProxy`` forwards each new connection
to a node that answers AMQP, as a managed cluster's single host name does.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from conftest import free_port

# The official image elsewhere; here ../shared/container/rabbitmq-image.sh
# builds localhost/rabbitmq:4.0.5 and .ci/run exports it.
RABBITMQ_IMAGE = os.environ.get("RABBITMQ_IMAGE", "docker.io/library/rabbitmq:4.0")
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
# Erlang's distribution on loopback, as the AMQP listener.
LOOPBACK_DISTRIBUTION = "-kernel inet_dist_use_interface {127,0,0,1}"


def podman(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(["podman", *args], check=False, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


@dataclass(frozen=True)
class Node:
    container: str
    name: str  # the Erlang node name
    port: int
    dist_port: int

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"


class Cluster:
    """``size`` clustered RabbitMQ nodes; ``close()`` removes every container."""

    def __init__(self, size: int = 3) -> None:
        tag = uuid.uuid4().hex[:6]
        self.cookie = uuid.uuid4().hex
        self.nodes = [
            Node(f"onebox-rmq-{tag}-{index}", f"onebox-{tag}-{index}@localhost", free_port(), free_port())
            for index in range(1, size + 1)
        ]

    def start(self) -> float:
        """Start every node and join the others to the first; the seconds it took."""
        began = time.monotonic()
        for node in self.nodes:
            podman(
                "run",
                "-d",
                "--pull=never",
                "--network=host",
                f"--name={node.container}",
                f"--env=RABBITMQ_NODENAME={node.name}",
                f"--env=RABBITMQ_NODE_PORT={node.port}",
                f"--env=RABBITMQ_DIST_PORT={node.dist_port}",
                "--env=RABBITMQ_NODE_IP_ADDRESS=127.0.0.1",
                f"--env=RABBITMQ_ERLANG_COOKIE={self.cookie}",
                f"--env=RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS={LOOPBACK_DISTRIBUTION}",
                RABBITMQ_IMAGE,
            )
        for node in self.nodes:
            self.await_startup(node)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
        running = self.ctl(first, "-q", "eval", "length(rabbit_nodes:list_running()).").strip()
        assert running == str(len(self.nodes)), f"{running} of {len(self.nodes)} nodes run in the cluster"
        return time.monotonic() - began

    def ctl(self, node: Node, *args: str, tool: str = "rabbitmqctl", timeout: float = 120) -> str:
        return podman("exec", node.container, tool, "-n", node.name, *args, timeout=timeout)

    def await_startup(self, node: Node, timeout: float = 90) -> None:
        # await_startup fails at once while the Erlang node runs but its
        # rabbit application has not begun to boot.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ctl(node, "await_startup", "--timeout", str(int(timeout)))
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def kill(self, node: Node) -> None:
        """SIGKILL: the node dies with whatever it had not written."""
        podman("kill", "--signal=KILL", node.container)
        podman("wait", node.container)

    def stop(self, node: Node) -> None:
        """Shut the node down as an upgrade does: it hands its leaderships over first.

        (The image's rabbitmq-server ignores the SIGTERM of ``podman stop``.)
        """
        # The container ends with the node, and takes the command down with it.
        command = ["podman", "exec", node.container, "rabbitmqctl", "-n", node.name, "shutdown"]
        subprocess.run(command, check=False, capture_output=True, timeout=120)
        podman("wait", node.container)

    def restart(self, node: Node) -> None:
        """Start a stopped node's container again, with its data, and wait for it."""
        podman("start", node.container)
        self.await_startup(node)

    def pause(self, node: Node) -> None:
        """Freeze every process of the node: to the others it is cut off."""
        podman("pause", node.container)

    def unpause(self, node: Node) -> None:
        podman("unpause", node.container)

    def await_quorum_plus_one(self, node: Node) -> None:
        """Until every quorum queue has a member more than it needs, counting ``node``."""
        self.ctl(node, "await_online_quorum_plus_one", "--timeout", "90", tool="rabbitmq-upgrade")

    def node_named(self, name: str) -> Node:
        (node,) = [node for node in self.nodes if node.name == name]
        return node

    def leader(self, queue: str, asking: Node | None = None) -> Node:
        """The node leading ``queue`` (a quorum queue), or holding it (a classic one)."""
        asking = asking or self.nodes[0]
        lines = self.ctl(asking, "-q", "list_queues", "--no-table-headers", "name", "leader").splitlines()
        leaders = {line.split("\t")[0]: line.split("\t")[1] for line in lines if "\t" in line}
        return self.node_named(leaders[queue])

    def queues(self, asking: Node | None = None) -> dict[str, tuple[str, str]]:
        """Every queue's type and arguments, by name."""
        asking = asking or self.nodes[0]
        lines = self.ctl(asking, "-q", "list_queues", "--no-table-headers", "name", "type", "arguments").splitlines()
        return {name: (kind, arguments) for name, kind, arguments in (line.split("\t") for line in lines)}

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                podman("rm", "--force", "--time=0", node.container)


def answers_amqp(port: int, timeout: float = 1.0) -> bool:
    """Whether a RabbitMQ node on ``port`` starts an AMQP handshake (a load balancer's health check)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(AMQP_HEADER)
            return bool(sock.recv(1))
    except OSError:
        return False


class ClusterProxy:
    """One loopback address for the cluster: each new connection goes to the
    next node that passed its last health check; open ones are never moved."""

    def __init__(self, ports: list[int], check_every: float = 0.5) -> None:
        self.ports = ports
        self.live = set(ports)
        self.check_every = check_every
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        self.turn = itertools.cycle(ports)
        threading.Thread(target=self._check, daemon=True).start()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _check(self) -> None:
        while not self.closed:
            with ThreadPoolExecutor(len(self.ports)) as pool:
                checks = dict(zip(self.ports, pool.map(answers_amqp, self.ports), strict=True))
            self.live = {port for port, ok in checks.items() if ok}
            time.sleep(self.check_every)

    def _next_live(self) -> int | None:
        for _ in self.ports:
            port = next(self.turn)
            if port in self.live:
                return port
        return None

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            port = self._next_live()
            try:
                if port is None:
                    raise OSError("no live node")
                upstream = socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            source.settimeout(None)
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        with self.lock:
            self.sockets = [sock for sock in self.sockets if sock not in (source, sink)]

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
