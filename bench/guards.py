"""What the guards cost: the per-client rate limiter and the refusals.

    uv run python bench/guards.py [--checkout DIR] [--only cpu,wrk,storm] [--storm-seconds 20]

Three parts, each against the code in DIR (by default this checkout; give an
older one, e.g. `git archive <commit> | tar -x -C DIR`, for a before figure):

- cpu: the app (main.create_app) answers through its ASGI interface in this
  process, no server, no broker: the CPU time per request of a body refused
  before the broker (400), limiter off and then on at 60, 6,000 and 600,000
  writes a minute, from one client and from a new address each request
  (X-Forwarded-For); and of each answer a client can get: 202 (a publisher
  that takes everything), 400, 413, 415, 429 and 503.
- wrk: a web process (python tasks.py web) on the shared RabbitMQ, wrk with
  64 connections posting bodies refused before the broker (bench/refused.lua,
  bench/refused-clients.lua): requests a second, limiter off and on.
- storm: a new address for every request for --storm-seconds, then the web
  process's memory (PSS) right after and two rate windows later.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from harness import BENCH, MIB, ROOT, Process, child_env, delete_queues, free_port

LIMITS = (60, 6_000, 600_000)
REQUESTS = 4000
ROUNDS = 5
WRK_CONNECTIONS = 64
WRK_SECONDS = 5
CLIENT_HEADER = "X-Forwarded-For"
INVALID = b'{"seconds": "x"}'


# -- cpu: in process ------------------------------------------------------------------


def scope(address: bytes, body: bytes, content_type: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/tasks",
        "raw_path": b"/tasks",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"localhost"),
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"x-forwarded-for", address),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def cpu_per_request(app: Any, body: bytes, many: bool, content_type: bytes = b"application/json") -> float:
    """CPU µs per request; the scopes are made beforehand, so that only the app is timed."""
    addresses = [
        f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}".encode() if many else b"10.0.0.1" for i in range(REQUESTS)
    ]
    scopes = [scope(address, body, content_type) for address in addresses]
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    began = time.process_time()
    for each in scopes:
        await app(each, receive, send)
    spent = (time.process_time() - began) / REQUESTS * 1e6
    assert len(statuses) == REQUESTS, statuses[:3]
    return spent


async def measure_cpu() -> dict[str, Any]:
    import main  # noqa: PLC0415 - from --checkout, after the multiprocess directory is set
    import tasks  # noqa: PLC0415

    def app(limit: int, down: bool = False) -> Any:
        """The app on a broker side that takes every task at once (a 202 without a broker) or, down, none."""
        settings = msgspec.structs.replace(tasks.settings, rate_limit_per_minute=limit, client_ip_header=CLIENT_HEADER)

        async def publish(*_: Any, **__: Any) -> None:
            if down:
                raise main.BrokerUnavailable("down", "connection_failed")

        ready = {"ready": property(lambda _: True)}
        if hasattr(main, "Publisher"):  # a --checkout from before the Publisher's split (72a24fc)
            return main.create_app(type("Taking", (main.Publisher,), {**ready, "publish": publish})(settings))  # type: ignore[call-arg]
        link = type("Ready", (main.BrokerLink,), ready)(settings)
        publisher = main.TaskPublisher(link)
        publisher.publish = publish  # type: ignore[method-assign]
        return main.create_app(link, publisher, main.EventsFeed(publisher))

    async def rounds(
        make: Callable[[], Any], body: bytes, many: bool, content_type: bytes = b"application/json"
    ) -> float:
        figures = [await cpu_per_request(make(), body, many, content_type) for _ in range(ROUNDS)]
        return statistics.median(figures)

    figures: dict[str, Any] = {"limiter": {}, "answers": {}}
    for many in (False, True):
        who = "many clients" if many else "one client"
        off = await rounds(lambda: app(0), INVALID, many)
        figures["limiter"][f"off, {who}"] = off
        for limit in LIMITS:
            on = await rounds(lambda limit=limit: app(limit), INVALID, many)  # type: ignore[misc]
            figures["limiter"][f"{limit}/min, {who}"] = on
            figures["limiter"][f"{limit}/min, {who}, cost"] = on - off
    if hasattr(main, "limit_writes"):
        figures["limiter alone"] = await limiter_alone(main, tasks)
    answers = figures["answers"]
    answers["202"] = await rounds(lambda: app(0), b'{"seconds": 1}', False)
    answers["400"] = await rounds(lambda: app(0), INVALID, False)
    answers["413"] = await rounds(lambda: app(0), b" " * (tasks.settings.max_body_bytes + 1), False)
    answers["415"] = await rounds(lambda: app(0), b"{}", False, b"text/plain")
    # Limit 1: the first request of each round is a 202, the rest 429s.
    answers["429"] = await rounds(lambda: app(1), b'{"seconds": 1}', False)
    answers["503"] = await rounds(lambda: app(0, down=True), b'{"seconds": 1}', False)
    return figures


async def limiter_alone(main: Any, tasks: Any) -> dict[str, float]:
    """CPU µs per request of onebox's own limiter around an app that does nothing: its whole cost, no noise."""

    async def nothing(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 400, "headers": []})

    async def send(_: Any) -> None:
        pass

    # One client, or a new one each request: IPv4 addresses, or IPv6 ones each in a /64 of its own.
    clients: dict[str, Callable[[int], str]] = {
        "one client, IPv4": lambda _: "203.0.113.7",
        "many clients, IPv4": lambda i: f"10.{i >> 8 & 255}.{i & 255}.7",
        "one client, IPv6": lambda _: "2001:db8:1:2::7",
        "many clients, IPv6": lambda i: f"2001:db8:{i:x}::7",
    }
    figures: dict[str, float] = {}
    for who, address in clients.items():
        scopes = [scope(address(i).encode(), INVALID, b"application/json") for i in range(REQUESTS)]
        for limit in LIMITS:
            settings = msgspec.structs.replace(
                tasks.settings, rate_limit_per_minute=limit, client_ip_header=CLIENT_HEADER
            )
            rounds = []
            for _ in range(ROUNDS):
                app = main.limit_writes(settings)(nothing)
                began = time.process_time()
                for each in scopes:
                    await app(each, None, send)
                rounds.append((time.process_time() - began) / REQUESTS * 1e6)
            figures[f"{limit}/min, {who}"] = statistics.median(rounds)
    return figures


# -- wrk and the storm: a web process --------------------------------------------------


def web(checkout: Path, **settings: str | int) -> tuple[Process, str]:
    port = free_port()
    queue = f"guards-{uuid.uuid4().hex[:8]}"
    env = child_env(None, PORT=port, QUEUE_NAME=queue, METRICS_PORT=free_port(), CLIENT_IP_HEADER=CLIENT_HEADER)
    env.update({key: str(value) for key, value in settings.items()})
    process = Process([sys.executable, "tasks.py", "web"], env, cwd=checkout)
    process.queue = queue  # type: ignore[attr-defined]
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    import httpx  # noqa: PLC0415

    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.stop()
    raise RuntimeError(f"web did not start:\n{process.tail}")


def stop(process: Process) -> None:
    process.stop()
    delete_queues(process.queue)  # type: ignore[attr-defined]


def run_wrk(base: str, script: str, seconds: float, connections: int = WRK_CONNECTIONS) -> dict[str, float]:
    command = [
        "wrk",
        f"--threads={connections}",
        f"--connections={connections}",
        f"--duration={int(seconds) + 1}s",
        "--timeout=10s",
        f"--script={BENCH / script}",
        f"{base}/tasks",
        "--",
        str(seconds),
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    raw = json.loads(next(line for line in output.splitlines() if line.startswith("BENCH ")).removeprefix("BENCH "))
    answered = raw["ok"] + raw["other"]
    return {"requests": answered, "rps": answered / raw["seconds"], "p50_ms": raw["p50_us"] / 1000}


def measure_wrk(checkout: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for limit in (0, *LIMITS):
        process, base = web(checkout, RATE_LIMIT_PER_MINUTE=limit)
        try:
            for script, who in (("refused.lua", "one client"), ("refused-clients.lua", "many clients")):
                figures[f"{limit or 'off'}/min, {who}"] = run_wrk(base, script, WRK_SECONDS)
        finally:
            stop(process)
    return figures


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no Pss line")


def measure_storm(checkout: Path, seconds: float, window: int) -> dict[str, Any]:
    settings: dict[str, str | int] = {"RATE_LIMIT_PER_MINUTE": 60}
    if window != 60:
        settings["RATE_LIMIT_WINDOW"] = window
    process, base = web(checkout, **settings)
    try:
        run_wrk(base, "refused-clients.lua", 2)  # warm: every code path loaded once
        time.sleep(2 * window + 1)
        before = pss_mib(process.pid)
        storm = run_wrk(base, "refused-clients.lua", seconds)
        after = pss_mib(process.pid)
        time.sleep(2 * window + 1)
        # One request, so that a limiter that turns its windows on requests has turned them.
        run_wrk(base, "refused.lua", 0.1, connections=1)
        later = pss_mib(process.pid)
    finally:
        stop(process)
    return {
        "addresses": storm["requests"],
        "window_s": window,
        "pss_before_mib": before,
        "pss_after_mib": after,
        "pss_two_windows_later_mib": later,
        "bytes_per_address_kept": (later - before) * MIB / storm["requests"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkout", type=Path, default=ROOT)
    parser.add_argument("--only", default="cpu,wrk,storm")
    parser.add_argument("--storm-seconds", type=float, default=20)
    parser.add_argument("--window", type=int, default=60, help="RATE_LIMIT_WINDOW, where the checkout has it")
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    parts = args.only.split(",")
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    )
    figures: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "checkout": str(checkout)}
    figures["commit"] = commit.stdout.strip() if checkout == ROOT else "see --checkout"
    if "cpu" in parts:
        with tempfile.TemporaryDirectory(prefix="onebox-guards-") as directory:
            # As run_web sets it: prometheus_client reads it as it loads.
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
            sys.path.insert(0, str(checkout))
            figures["cpu_us"] = asyncio.run(measure_cpu())
    if "wrk" in parts:
        figures["wrk"] = measure_wrk(checkout)
    if "storm" in parts:
        figures["storm"] = measure_storm(checkout, args.storm_seconds, args.window)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
