"""onebox's benchmarks, side by side with the stack tutorials ship and with
the ceilings, in one run on one machine:

    uv run python bench/run.py            # 3 runs, medians: docs/benchmarks.md's figures
    uv run python bench/run.py --quick    # one short round per figure (CI)

onebox runs as deployed (metrics and the default rate limit on, each request
from an address of its own: many users, none near the limit), but for figure
7, whose 500 countdowns come from one client. Needs RabbitMQ on
127.0.0.1:5672 (guest/guest) and wrk. Writes
bench/results/latest.{json,png,md} (quick: quick.*): raw figures of every
run, their medians, the targets met or missed, a chart and docs/benchmarks.md's tables.

Figures: 1 enqueue throughput and latency at 1, 16 and 64 clients, the
worker paused so that the queue can be counted; 2 the same with the broker
10 ms away; 3 pickup latency; 4 AMQP connections and 5 memory, idle and at
peak; 6 cold start; 7 countdowns running at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import chart
import httpx
import psutil
import report
from harness import (
    BENCH,
    RABBIT_URL,
    ROOT,
    cpu_seconds,
    delete_queues,
    first_accepted,
    free_port,
    log_time,
    median_tree,
    percentile,
    purge,
    queue_depth,
    rabbitmq_version,
    raw_publish,
    sample,
    settled_depth,
    sweep,
    unacknowledged,
    wrk,
)
from stacks import QUEUES, DelayProxy, Scratch, Stack, bare, new_queue, onebox, plain

PEAK_CLIENTS = 64
# Pickups one at a time, spaced so that 1-second countdowns never queue for a thread.
PICKUP_GAP = 0.25
# Figure 7: a documented configuration for many countdowns at once.
CONCURRENCY_SETTINGS = {"WORKER_THREADS": 500, "QUEUE_PREFETCH": 500}
DRAMATIQ_DEFAULTS = {"processes": os.cpu_count() or 1, "threads": 8}
COUNTDOWN_SECONDS = 30
# settings.toml's rate_limit_per_minute.
LIMIT_DEFAULT = 60
# onebox as deployed: metrics on (the default), the default rate limit on,
# behind a proxy that names the client (CLIENT_HEADER). Every load (post-clients.lua) sends
# its requests from 8,000 addresses in turn: many users, none near the limit.
CLIENT_HEADER = "X-Forwarded-For"
LOAD = "post-clients.lua"
# Tasks run before the metrics endpoint is timed, so that it holds worker figures.
SCRAPE_TASKS = 20
PACKAGES = (
    "granian",
    "uvloop",
    "litestar",
    "msgspec",
    "aiormq",
    "pamqp",
    "dramatiq",
    "pika",
    "supervisor",
    "fastapi",
    "pydantic",
    "uvicorn",
    "httptools",
    "aio-pika",
)


@dataclass(frozen=True)
class Plan:
    runs: int
    round_seconds: float
    levels: tuple[int, ...]
    pickups: int
    countdowns: int
    delay_ms: float
    scrapes: int


FULL = Plan(runs=3, round_seconds=5, levels=(1, 16, 64), pickups=30, countdowns=500, delay_ms=10, scrapes=200)
QUICK = Plan(runs=1, round_seconds=1, levels=(1, 16, 64), pickups=8, countdowns=500, delay_ms=10, scrapes=20)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- Figures 1 and 2: enqueue throughput and latency ------------------------------------


def load_rounds(stack: Stack, plan: Plan, script: str = LOAD) -> dict[str, dict[str, float]]:
    """One wrk round per level; with a queue, its messages counted after each."""
    first_accepted(stack.url)
    # Warm up: every connection opened, every lazy import done.
    wrk(stack.url, max(plan.levels), 1, script)
    rounds: dict[str, dict[str, float]] = {}
    for clients in plan.levels:
        if stack.queue is not None:
            purge(stack.queue, stack.broker_url)
        spent = cpu_seconds(stack.processes)
        result = wrk(stack.url, clients, plan.round_seconds, script)
        # What a request costs the stack's processes: a figure the noise of a
        # shared machine moves less than req/s.
        result["cpu_us_per_request"] = (cpu_seconds(stack.processes) - spent) / result["accepted"] * 1e6
        if stack.queue is not None:
            queued = settled_depth(stack.queue, int(result["accepted"]), url=stack.broker_url)
            result |= {"queued": queued, "missing": max(0, int(result["accepted"]) - queued)}
        rounds[str(clients)] = result
    return rounds


def raw_rounds(broker_url: str, plan: Plan) -> dict[str, dict[str, float]]:
    queue = new_queue("raw")
    rounds: dict[str, dict[str, float]] = {}
    try:
        for clients in plan.levels:
            result = raw_publish(broker_url, queue, clients, plan.round_seconds)
            queued = queue_depth(queue)
            purge(queue)
            rounds[str(clients)] = result | {"queued": queued, "missing": max(0, int(result["accepted"]) - queued)}
    finally:
        delete_queues(queue)
    return rounds


def enqueue(plan: Plan, scratch: Scratch, broker_url: str, with_bare: bool) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    say(f"  onebox, worker paused, broker {broker_url.rpartition('@')[2]}")
    with onebox(
        scratch,
        new_queue("onebox"),
        paused=True,
        broker_url=broker_url,
        RATE_LIMIT_PER_MINUTE=LIMIT_DEFAULT,
        CLIENT_IP_HEADER=CLIENT_HEADER,
    ) as stack:
        figures["onebox"] = load_rounds(stack, plan)
    say("  comparison, worker paused")
    with plain(new_queue("plain"), worker=False, broker_url=broker_url) as stack:
        figures["comparison"] = load_rounds(stack, plan)
    if with_bare:
        say("  bare Litestar on granian (no broker)")
        with bare(scratch) as stack:
            figures["bare"] = load_rounds(stack, plan)
    say("  raw publishing with confirms")
    figures["raw"] = raw_rounds(broker_url, plan)
    return figures


def rate_limiter(plan: Plan, scratch: Scratch) -> dict[str, dict[str, float]]:
    """onebox at the peak level with its per-client limiter off, then on at
    its default limit, requests from 8,000 addresses in turn (as many
    users, none near the limit): what the limiter costs."""
    rounds: dict[str, dict[str, float]] = {}
    for state, limit in (("off", 0), ("on", LIMIT_DEFAULT)):
        with onebox(
            scratch, new_queue("onebox"), paused=True, RATE_LIMIT_PER_MINUTE=limit, CLIENT_IP_HEADER=CLIENT_HEADER
        ) as stack:
            peak = replace(plan, levels=(PEAK_CLIENTS,))
            rounds[state] = load_rounds(stack, peak)[str(PEAK_CLIENTS)]
    return rounds


def metrics_cost(plan: Plan, scratch: Scratch) -> dict[str, Any]:
    """onebox with its metrics off, then on (the default), at 1 and 64
    clients: what they cost a request. Then the endpoint's answer time, with
    the worker running (it serves the endpoint) and figures from both programs."""
    rounds: dict[str, dict[str, dict[str, float]]] = {}
    for state, enabled in (("off", "false"), ("on", "true")):
        with onebox(
            scratch,
            new_queue("onebox"),
            paused=True,
            METRICS=enabled,
            RATE_LIMIT_PER_MINUTE=LIMIT_DEFAULT,
            CLIENT_IP_HEADER=CLIENT_HEADER,
        ) as stack:
            rounds[state] = load_rounds(stack, replace(plan, levels=(1, PEAK_CLIENTS)))
    metrics_port = free_port()
    with onebox(scratch, new_queue("onebox"), METRICS_PORT=metrics_port) as stack:
        first_accepted(stack.url)
        with httpx.Client(timeout=10) as client:
            for _ in range(SCRAPE_TASKS):
                client.post(stack.url, json={"seconds": 1})
            endpoint = f"http://127.0.0.1:{metrics_port}/metrics"
            deadline = time.monotonic() + 30
            while "dramatiq_messages_total{" not in client.get(endpoint).text and time.monotonic() < deadline:
                time.sleep(0.5)
            times: list[float] = []
            spent = cpu_seconds(stack.processes)
            for _ in range(plan.scrapes):
                began = time.perf_counter()
                body = client.get(endpoint).text
                times.append(time.perf_counter() - began)
            cpu_ms = (cpu_seconds(stack.processes) - spent) / plan.scrapes * 1000
    answer = {
        "p50_ms": percentile(times, 0.50) * 1000,
        "p99_ms": percentile(times, 0.99) * 1000,
        "cpu_ms_per_scrape": cpu_ms,
        "bytes": len(body),
        "samples": sum(1 for line in body.splitlines() if line and not line.startswith("#")),
    }
    return {"enqueue": rounds, "endpoint": answer}


# -- Figures 3 to 6: the whole stack, from launch to peak -------------------------------------


def pickup_delay(stack: Stack, client: httpx.Client) -> float:
    """POST sent → the actor's start line, in seconds, for one task; returns
    once ``PICKUP_GAP`` has passed since the POST."""
    mark = len(stack.log.lines)
    sent = time.time()
    response = client.post(stack.url, json={"seconds": 1})
    if response.status_code != 202:
        raise RuntimeError(f"{stack.name}: POST /tasks answered {response.status_code}: {response.text}")
    line = stack.log.wait_for(rf"task {response.json()['id']} started", 10, start=mark)
    time.sleep(max(0.0, sent + PICKUP_GAP - time.time()))
    return log_time(line) - sent


def pickup_figures(delays: list[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(delays, 0.50) * 1000,
        "p99_ms": percentile(delays, 0.99) * 1000,
        "samples": len(delays),
    }


def pickup(stack: Stack, samples: int) -> dict[str, float]:
    """POST sent → the actor's start line, one task at a time."""
    with httpx.Client(timeout=10) as client:
        return pickup_figures([pickup_delay(stack, client) for _ in range(samples)])


def idle_sample(stack: Stack) -> dict[str, Any]:
    """A sample once the broker connections stop changing: every consumer is up."""
    previous = sample(stack.processes)
    for _ in range(20):
        time.sleep(0.5)
        current = sample(stack.processes)
        if current["connections"] == previous["connections"] > 0:
            return current
        previous = current
    return previous


def peak_sample(stack: Stack, seconds: float) -> dict[str, Any]:
    """The highest of samples taken while 64 clients post tasks: each total's
    and each process's own maximum."""
    samples: list[dict[str, Any]] = []
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(wrk, stack.url, PEAK_CLIENTS, seconds, LOAD)
        time.sleep(min(1.0, seconds / 4))
        while not load.done():
            samples.append(sample(stack.processes))
            time.sleep(0.25)
        result = load.result()
    roles = {role for one in samples for role in one["processes"]}
    return {
        "rss_mib": max(one["rss_mib"] for one in samples),
        "pss_mib": max(one["pss_mib"] for one in samples),
        "connections": max(one["connections"] for one in samples),
        "processes": {
            role: {
                key: max(one["processes"][role][key] for one in samples if role in one["processes"])
                for key in ("rss_mib", "pss_mib", "connections")
            }
            for role in sorted(roles)
        },
        "load": {"rps": result["rps"], "p99_ms": result["p99_ms"]},
    }


def whole_stack(start: Callable[[], Stack], plan: Plan) -> dict[str, Any]:
    with start() as stack:
        first = first_accepted(stack.url)
        cold = {"launch_to_first_202_s": first - stack.launched}
        if stack.name == "onebox":
            cold["spawn_to_first_202_s"] = first - log_time(stack.log.wait_for(r"spawned: 'web'"))
        # The first task done: the worker is up and back to idle.
        stack.log.wait_for(r"task \S+ done", 60)
        idle = idle_sample(stack)
        latency = pickup(stack, plan.pickups)
        peak = peak_sample(stack, plan.round_seconds)
    return {"cold_start": cold, "idle": idle, "pickup": latency, "peak": peak}


# -- Figure 7: countdowns at once ----------------------------------------------------------


async def post_countdowns(url: str, count: int, seconds: int) -> None:
    limit = asyncio.Semaphore(16)
    async with httpx.AsyncClient(timeout=30) as client:

        async def post() -> None:
            async with limit:
                response = await client.post(url, json={"seconds": seconds})
                if response.status_code != 202:
                    raise RuntimeError(f"POST /tasks answered {response.status_code}: {response.text}")

        await asyncio.gather(*(post() for _ in range(count)))


def many_countdowns(scratch: Scratch) -> Stack:
    return onebox(scratch, new_queue("onebox"), WORKER_THREADS=500, QUEUE_PREFETCH=500)


def concurrency(start: Callable[[], Stack], settings: dict[str, int], plan: Plan) -> dict[str, Any]:
    stack = start()
    try:
        first_accepted(stack.url)
        stack.log.wait_for(r"task \S+ done", 60)
        asyncio.run(post_countdowns(stack.url, plan.countdowns, COUNTDOWN_SECONDS))
        started_pattern = rf"started seconds={COUNTDOWN_SECONDS}\b"
        # Wait until no more countdowns start: all of them, or every thread busy.
        deadline = time.monotonic() + COUNTDOWN_SECONDS - 5
        started, unchanged_since = 0, time.monotonic()
        while time.monotonic() < deadline and started < plan.countdowns:
            time.sleep(0.5)
            now = stack.log.count(started_pattern)
            if now != started:
                started, unchanged_since = now, time.monotonic()
            elif time.monotonic() - unchanged_since > 3:
                break
        memory = sample(stack.processes)
        assert stack.queue is not None
        return {
            "settings": settings,
            "posted": plan.countdowns,
            "running": stack.log.count(started_pattern) - stack.log.count(rf"done seconds={COUNTDOWN_SECONDS}\b"),
            "pss_mib": memory["pss_mib"],
            "rss_mib": memory["rss_mib"],
            "unacknowledged": unacknowledged(stack.queue),
            "connections": memory["connections"],
        }
    finally:
        # The countdowns need not finish: kill rather than wait out the grace.
        stack.stop(kill=True)


# -- One run, many runs ------------------------------------------------------------------------


def measure(plan: Plan, scratch: Scratch) -> dict[str, Any]:
    say("figure 1: enqueue, broker on loopback")
    direct = enqueue(plan, scratch, RABBIT_URL, with_bare=True)
    say("  onebox with its rate limiter off and on")
    limiter = rate_limiter(plan, scratch)
    say("  onebox with its metrics off and on; the metrics endpoint's answer time")
    metrics = metrics_cost(plan, scratch)
    say(f"figure 2: enqueue, broker {plan.delay_ms:g} ms away each way")
    with DelayProxy(plan.delay_ms) as proxy:
        delayed = enqueue(plan, scratch, proxy.url, with_bare=False)
    say("figures 3-6: whole stacks, launch to peak")
    stacks = {
        "onebox": whole_stack(
            lambda: onebox(
                scratch, new_queue("onebox"), RATE_LIMIT_PER_MINUTE=LIMIT_DEFAULT, CLIENT_IP_HEADER=CLIENT_HEADER
            ),
            plan,
        ),
        "comparison": whole_stack(lambda: plain(new_queue("plain")), plan),
    }
    say("figure 7: countdowns at once")
    at_once = {
        "onebox": concurrency(lambda: many_countdowns(scratch), CONCURRENCY_SETTINGS, plan),
        "comparison": concurrency(lambda: plain(new_queue("plain")), DRAMATIQ_DEFAULTS, plan),
    }
    return {
        "enqueue": direct,
        "enqueue_delayed": delayed,
        "rate_limiter": limiter,
        "metrics": metrics,
        "pickup": {name: figures["pickup"] for name, figures in stacks.items()},
        "connections": {
            name: {
                phase: {
                    "total": figures[phase]["connections"],
                    "processes": {role: one["connections"] for role, one in figures[phase]["processes"].items()},
                }
                for phase in ("idle", "peak")
            }
            for name, figures in stacks.items()
        },
        "memory": {
            name: {
                phase: {
                    "rss_mib": figures[phase]["rss_mib"],
                    "pss_mib": figures[phase]["pss_mib"],
                    "processes": {
                        role: {"rss_mib": one["rss_mib"], "pss_mib": one["pss_mib"]}
                        for role, one in figures[phase]["processes"].items()
                    },
                }
                for phase in ("idle", "peak")
            }
            for name, figures in stacks.items()
        },
        "peak_load": {name: figures["peak"]["load"] for name, figures in stacks.items()},
        "cold_start": {name: figures["cold_start"] for name, figures in stacks.items()},
        "concurrency": at_once,
    }


def delivery(runs: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Every round of every run: 2xx (or confirms) against messages queued."""
    totals: dict[str, dict[str, int]] = {}
    for run in runs:
        for figure in ("enqueue", "enqueue_delayed"):
            for name, rounds in run[figure].items():
                for result in rounds.values():
                    if "queued" not in result:
                        continue
                    total = totals.setdefault(name, {"rounds": 0, "accepted": 0, "queued": 0, "missing": 0})
                    total["rounds"] += 1
                    total["accepted"] += int(result["accepted"])
                    total["queued"] += int(result["queued"])
                    total["missing"] += int(result["missing"])
    return totals


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False).stdout
    return {
        "cpu": model[1] if model else platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "os": platform.freedesktop_os_release().get("PRETTY_NAME", platform.system()),
        "python": platform.python_version(),
        "rabbitmq": rabbitmq_version(),
        "wrk": wrk_version.partition(" Copyright")[0].strip() or "?",
        "packages": {name: metadata.version(name) for name in PACKAGES},
    }


@contextlib.contextmanager
def scratch_directory(core: Path) -> Iterator[Scratch]:
    with tempfile.TemporaryDirectory(prefix="onebox-bench-") as directory:
        yield Scratch.create(Path(directory), core.resolve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short round per figure, for CI")
    parser.add_argument("--output-dir", type=Path, default=BENCH / "results")
    parser.add_argument(
        "--core",
        type=Path,
        default=ROOT,
        help="measure the core files (main.py, tasks.py, supervise.py, settings.toml, supervisord.conf) found here",
    )
    arguments = parser.parse_args()
    plan = QUICK if arguments.quick else FULL
    stem = "quick" if arguments.quick else "latest"
    began = time.monotonic()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    runs: list[dict[str, Any]] = []
    try:
        with scratch_directory(arguments.core) as scratch:
            for number in range(1, plan.runs + 1):
                say(f"run {number} of {plan.runs}")
                runs.append(measure(plan, scratch))
    finally:
        # Each stack deleted its own queues; this takes what the core declared besides.
        sweep(QUEUES)
    # What was made, for checking that nothing of it is left.
    made = {"scratch": str(scratch.directory), "queue_prefixes": QUEUES}
    figures = median_tree(runs)
    results = {
        "command": " ".join(["uv run python bench/run.py", *sys.argv[1:]]),
        "core": str(arguments.core.resolve()),
        "started_at": started_at,
        "elapsed_s": round(time.monotonic() - began, 1),
        "machine": machine(),
        "plan": asdict(plan),
        "figures": figures,
        "delivery": delivery(runs),
        "targets": report.targets(figures),
        "runs": runs,
        "made": made,
    }
    arguments.output_dir.mkdir(parents=True, exist_ok=True)
    (arguments.output_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    chart.draw(results, arguments.output_dir / f"{stem}.png")
    table = report.markdown(results, f"{stem}.png")
    (arguments.output_dir / f"{stem}.md").write_text(table)
    print(table)
    say(f"done in {results['elapsed_s']} s: {arguments.output_dir / stem}.{{json,png,md}}")


if __name__ == "__main__":
    main()
