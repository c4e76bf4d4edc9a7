"""Sequential POSTs through a broker that holds small frames back, as LavinMQ does:

    uv run python bench/nagle.py                          # this checkout
    uv run python bench/nagle.py --core before=/path/to/an/older/checkout --core after=.

LavinMQ leaves Nagle's algorithm on for its connections (its `tcp_nodelay`
setting is off by default, and CloudAMQP's users cannot change it). A small
frame the broker sends while an earlier one is still unacknowledged at the
TCP level waits for that acknowledgement, which Linux delays by up to 40 ms
when the client has nothing to send back. RabbitMQ sets TCP_NODELAY, so here a
proxy in front of the machine's RabbitMQ plays LavinMQ's part: toward onebox it
leaves Nagle on, toward RabbitMQ it turns it off.

Each core in turn serves ``--posts`` sequential POST /tasks (one client, one
at a time), ``--rounds`` times, the cores taking turns round by round. Writes
bench/results/nagle.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from harness import AMQP_PORT, BENCH, ROOT, first_accepted, percentile, sweep
from run import machine, say
from stacks import QUEUES, Scratch, new_queue, onebox

# A request held behind a delayed acknowledgement takes at least this long.
STALL_MS = 30


class NagleProxy:
    """RabbitMQ behind a proxy that sends to its clients with Nagle's algorithm on."""

    def __init__(self, target_port: int = AMQP_PORT) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()  # Nagle stays on toward the client
            except OSError:
                return
            broker = socket.create_connection(self.target)
            broker.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for source, sink in ((client, broker), (broker, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.close()

    def close(self) -> None:
        self.listener.close()


def sequential_posts(url: str, count: int) -> list[float]:
    """Milliseconds per POST, one after the other."""
    times: list[float] = []
    with httpx.Client(timeout=10) as client:
        for _ in range(count):
            began = time.perf_counter()
            response = client.post(url, json={"seconds": 1})
            times.append((time.perf_counter() - began) * 1000)
            if response.status_code != 202:
                raise RuntimeError(f"POST /tasks answered {response.status_code}: {response.text}")
    return times


def figures(times: list[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(times, 0.50),
        "p90_ms": percentile(times, 0.90),
        "p99_ms": percentile(times, 0.99),
        "stalled_share": sum(1 for each in times if each >= STALL_MS) / len(times),
        "posts": len(times),
    }


@contextlib.contextmanager
def scratches(cores: dict[str, Path]) -> Iterator[dict[str, Scratch]]:
    with tempfile.TemporaryDirectory(prefix="onebox-bench-") as directory:
        made: dict[str, Scratch] = {}
        for number, (name, core) in enumerate(cores.items()):
            folder = Path(directory) / str(number)
            folder.mkdir()
            made[name] = Scratch.create(folder, core.resolve())
        yield made


def measure(cores: dict[str, Path], rounds: int, posts: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in cores}
    proxy = NagleProxy()
    try:
        with scratches(cores) as made, contextlib.ExitStack() as held:
            stacks = {}
            for name, scratch in made.items():
                stack = onebox(scratch, new_queue("nagle"), broker_url=proxy.url)
                held.callback(stack.stop, kill=True)
                stacks[name] = stack
            for stack in stacks.values():
                first_accepted(stack.url)
            for number in range(rounds):
                order = list(stacks) if number % 2 == 0 else list(stacks)[::-1]
                for name in order:
                    say(f"  round {number + 1} of {rounds}: {name}")
                    times[name] += sequential_posts(stacks[name].url, posts)
    finally:
        proxy.close()
        sweep(QUEUES)
    return times


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Sequential POSTs through a broker that holds small frames (Nagle on toward the client), "
        f"`{results['command']}`, {results['started_at']}: {results['rounds']} rounds of {results['posts']} "
        "POSTs per core, the cores taking turns.",
        "",
        f"| core | p50 ms | p90 ms | p99 ms | POSTs over {STALL_MS} ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, each in results["figures"].items():
        lines.append(
            f"| {name} | {each['p50_ms']:.1f} | {each['p90_ms']:.1f} | {each['p99_ms']:.1f} "
            f"| {each['stalled_share']:.1%} |"
        )
    return "\n".join([*lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--core", action="append", default=[], help="NAME=DIRECTORY of a checkout (default: this)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--posts", type=int, default=50)
    parser.add_argument("--output-dir", type=Path, default=BENCH / "results")
    arguments = parser.parse_args()
    cores = dict(spec.split("=", 1) for spec in arguments.core) or {"this checkout": str(ROOT)}
    began = datetime.now(UTC).isoformat(timespec="seconds")
    times = measure({name: Path(path) for name, path in cores.items()}, arguments.rounds, arguments.posts)
    results = {
        "command": " ".join(["uv run python bench/nagle.py", *sys.argv[1:]]),
        "started_at": began,
        "machine": machine(),
        "rounds": arguments.rounds,
        "posts": arguments.posts,
        "figures": {name: figures(values) for name, values in times.items()},
        "times_ms": times,
    }
    arguments.output_dir.mkdir(parents=True, exist_ok=True)
    (arguments.output_dir / "nagle.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (arguments.output_dir / "nagle.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
