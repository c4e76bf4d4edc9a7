"""Scheduled tasks: how late they start, what they cost, what declaring them costs.

    uv run python bench/delays.py            # 1,000 tasks per broker
    uv run python bench/delays.py --quick    # 100 tasks per broker (a smoke run)

On RabbitMQ 3.10 (a private node with the rabbitmq_prometheus plugin) and
4.0.5 (tests/rabbit_node.py's RabbitContainer: RABBITMQ_IMAGE, podman), onebox
as deployed (supervisord, default settings):

1. lateness: N tally jobs (they end at once), each posted with ``?at=`` an
   instant drawn at random within the same 10 s, some seconds ahead. A task's
   lateness is its worker's "started" event time minus its due time, both
   read from the events stream (one machine, one clock).
2. broker messages per task, from the broker's own counters (messages
   received from publishers plus messages delivered to consumers, all
   queues), around N scheduled tasks and around N tasks started at once,
   while the bench itself holds no AMQP connection (it polls GET /tasks);
   split into the task's own and its events' (each events-stream message
   that carried them: one publish, one delivery to the web process). And the
   dead-letterings (a message moving from one delay level to the next):
   inside the broker, no publish and no delivery.
3. what onebox declares: queues and exchanges, counted on the broker.
4. the time to declare all of it, as a web process does at start (aiormq,
   no-wait) and as a worker does (pika, no-wait), and one declaration at a
   time for comparison; through bench/delay_proxy.py, which puts the
   machine's RabbitMQ a round trip of 0, 30 or 50 ms away. First declaration
   (the queues are created) and again (they exist); median of 5.

Writes bench/results/delays{,-quick}.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiormq
import httpx
import msgspec
import pika
from harness import BENCH, ROOT, first_accepted, percentile, sweep
from run import machine, say
from stacks import QUEUES, DelayProxy, Scratch, new_queue, onebox

# The tests' broker nodes; and the core's own tables and declarers, measured here.
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from rabbit_node import RabbitContainer, RabbitNode

import main
import tasks

WINDOW = 10.0  # seconds within which every task is due
AHEAD = 15.0  # how far ahead the window starts: time to post them all
ROUND_TRIPS_MS = (0, 30, 50)
REPEATS = 5


# -- The brokers -------------------------------------------------------------------


@contextmanager
def private_broker(version: str) -> Iterator[tuple[str, int]]:
    """A RabbitMQ of the bench's own, with its Prometheus counters: its URL and metrics port."""
    node: RabbitNode | RabbitContainer
    if version == "3.10":
        node = RabbitNode(metrics=True)
    else:
        podman = shutil.which("podman")
        if podman is None:
            raise RuntimeError("podman is not installed: it runs RabbitMQ 4.0.5")
        node = RabbitContainer(podman)
    say(f"starting RabbitMQ {version}")
    node.start()
    try:
        assert node.metrics_port is not None
        yield node.url, node.metrics_port
    finally:
        node.stop()


def counters(metrics_port: int) -> dict[str, int]:
    """The broker's own message counters, all queues."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    totals = {"received": 0, "delivered": 0, "dead_lettered": 0}
    for name, value in re.findall(r"^rabbitmq_global_messages_(\w+?)_total(?:\{[^}]*\})? (\d+)", text, re.MULTILINE):
        if name in ("received", "delivered"):
            totals[name] += int(value)
        elif name.startswith("dead_lettered_expired"):
            totals["dead_lettered"] += int(value)
    return totals


# -- Scheduling and its lateness ----------------------------------------------------------


async def post_all(base: str, path: str, bodies: list[dict[str, Any]], starts: list[dict[str, str]]) -> list[str]:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        gate = asyncio.Semaphore(32)

        async def one(body: dict[str, Any], start: dict[str, str]) -> str:
            async with gate:
                response = await client.post(path, params=start, json=body)
            if response.status_code != 202:
                raise RuntimeError(f"POST {path} answered {response.status_code}: {response.text}")
            return str(response.json()["id"])

        return list(await asyncio.gather(*(one(body, start) for body, start in zip(bodies, starts, strict=True))))


def read_events(url: str, queue: str, ids: set[str]) -> tuple[dict[str, list[tasks.TaskEvent]], int]:
    """Each task's events, read from the start of the events stream, and the
    stream messages that carried them."""
    seen: dict[str, list[tasks.TaskEvent]] = {task_id: [] for task_id in ids}
    carriers = 0
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=100)
        stream = channel.consume(f"{queue}.events", arguments={"x-stream-offset": "first"}, inactivity_timeout=2)
        for method, properties, body in stream:
            if method is None:
                break
            channel.basic_ack(method.delivery_tag)
            if properties.type == tasks.SYNC:
                continue
            ours = [event for event in msgspec.json.decode(body, type=list[tasks.TaskEvent]) if event.id in seen]
            carriers += bool(ours)
            for event in ours:
                seen[event.id].append(event)
    return seen, carriers


def wait_until_ended(base: str, ids: set[str], timeout: float) -> None:
    """Poll GET /tasks until every task has ended: no AMQP of the bench's own meanwhile."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base, timeout=10) as client:
        while True:
            ended = set()
            for offset in range(0, len(ids) + 100, 100):
                page = client.get("/tasks", params={"limit": 100, "offset": offset}).json()
                ended |= {view["id"] for view in page["items"] if view["status"] in main.FINISHED}
            if ids <= ended:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(ids - ended)} of {len(ids)} tasks had not ended in {timeout} s")
            time.sleep(1)


def post_tasks(base: str, count: int, scheduled: bool) -> set[str]:
    bodies = [{"title": str(number), "words": []} for number in range(count)]
    if scheduled:
        window = time.time() + AHEAD
        instants = [window + random.uniform(0, WINDOW) for _ in range(count)]
        starts = [{"at": datetime.fromtimestamp(instant, UTC).isoformat()} for instant in instants]
    else:
        starts = [{}] * count
    return set(asyncio.run(post_all(base, "/jobs/tally", bodies, starts)))


def lateness(events: dict[str, list[tasks.TaskEvent]]) -> dict[str, float]:
    late = [started.at - started.due for kinds in events.values() for started in kinds if started.event == "started"]
    if len(late) != len(events):
        raise RuntimeError(f"{len(late)} starts for {len(events)} tasks")
    return {
        "tasks": len(late),
        "early": sum(value < 0 for value in late),
        "p50_s": percentile(late, 0.50),
        "p95_s": percentile(late, 0.95),
        "p99_s": percentile(late, 0.99),
        "max_s": max(late),
    }


# The broker's Prometheus counters are refreshed every 5 s.
COUNTERS_FRESH = 6.0


def on_broker(version: str, scratch: Scratch, count: int) -> dict[str, Any]:
    with private_broker(version) as (url, metrics_port):
        queue = new_queue("delays")
        with onebox(scratch, queue, broker_url=url) as stack:
            base = stack.url.removesuffix("/tasks")
            first_accepted(stack.url)
            stack.log.wait_for(r"cancellations read", 60)
            costs, phases = {}, {}
            for scheduled in (False, True):
                label = "scheduled" if scheduled else "at_once"
                say(f"RabbitMQ {version}: {count} tasks {label.replace('_', ' ')}")
                time.sleep(COUNTERS_FRESH)
                before = counters(metrics_port)
                ids = post_tasks(base, count, scheduled)
                wait_until_ended(base, ids, timeout=AHEAD + WINDOW + 120)
                time.sleep(COUNTERS_FRESH)  # the last event batches, and the counters' refresh
                after = counters(metrics_port)
                phases[label] = ids
                costs[label] = {key: (after[key] - before[key]) / count for key in after}
            for label, ids in phases.items():
                events, carriers = read_events(url, queue, ids)
                # Each event message: one publish, one delivery (to the one web process).
                costs[label]["events"] = 2 * carriers / count
                costs[label]["task"] = costs[label]["received"] + costs[label]["delivered"] - 2 * carriers / count
            declared = declared_names(url, queue)
        return {
            "lateness": lateness(events),
            "messages_per_task": costs,
            "queues": len(declared["queues"]),
            "exchanges": len(declared["exchanges"]),
        }


def declared_names(url: str, queue: str) -> dict[str, list[str]]:
    """What onebox declared for ``queue``, checked one passive declaration at a time."""
    settings = msgspec.structs.replace(tasks.settings, queue_name=queue)
    found: dict[str, list[str]] = {"queues": [], "exchanges": []}
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        for kind, names in (("queues", list(tasks.queues(settings))), ("exchanges", tasks.exchanges(settings))):
            for name in names:
                channel = connection.channel()
                try:
                    if kind == "queues":
                        channel.queue_declare(name, passive=True)
                    else:
                        channel.exchange_declare(name, passive=True)
                    found[kind].append(name)
                    channel.close()
                except pika.exceptions.ChannelClosedByBroker:
                    pass
    return found


# -- Declaring ------------------------------------------------------------------------


async def declare_web(url: str, settings: tasks.Settings, one_at_a_time: bool) -> float:
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        started = time.perf_counter()
        if one_at_a_time:
            await declare_one_at_a_time(channel, settings)
        else:
            await main.BrokerLink(settings).declare_queues(channel)
        return time.perf_counter() - started
    finally:
        await connection.close()


async def declare_one_at_a_time(channel: Any, settings: tasks.Settings) -> None:
    for name, arguments in tasks.queues(settings).items():
        await channel.queue_declare(name, durable=True, arguments=arguments)
    for name in tasks.exchanges(settings):
        await channel.exchange_declare(name, exchange_type="topic", durable=True)
    for route in tasks.bindings(settings):
        if route.to_exchange:
            await channel.exchange_bind(route.destination, route.source, route.pattern)
        else:
            await channel.queue_bind(route.destination, route.source, route.pattern)


def declare_worker(url: str, settings: tasks.Settings) -> float:
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        started = time.perf_counter()
        tasks.declare(channel, settings)
        return time.perf_counter() - started


def declaring() -> dict[str, dict[str, float]]:
    """Median seconds to declare everything, by round trip and way."""
    figures: dict[str, dict[str, float]] = {}
    ways: dict[str, Callable[[str, tasks.Settings], float]] = {
        "web, no-wait": lambda url, settings: asyncio.run(declare_web(url, settings, False)),
        "worker, no-wait": declare_worker,
        "one at a time": lambda url, settings: asyncio.run(declare_web(url, settings, True)),
    }
    for round_trip in ROUND_TRIPS_MS:
        with DelayProxy(round_trip / 2) as proxy:
            for way, declare in ways.items():
                first, again = [], []
                for _ in range(REPEATS):
                    settings = msgspec.structs.replace(tasks.settings, queue_name=new_queue("declare"))
                    first.append(declare(proxy.url, settings))
                    again.append(declare(proxy.url, settings))
                say(f"{round_trip} ms: {way}: first {statistics.median(first):.3f} s")
                figures[f"{round_trip} ms, {way}"] = {
                    "first_s": statistics.median(first),
                    "again_s": statistics.median(again),
                }
    return figures


# -- The run ----------------------------------------------------------------------------


def markdown(figures: dict[str, Any]) -> str:
    lines = [
        "| broker | tasks | lateness p50 / p95 / p99 / max (s) | early | messages per task, scheduled: "
        "task + events | the same, at once | dead-letterings per scheduled task | queues | exchanges |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for version, broker in figures["brokers"].items():
        late, costs = broker["lateness"], broker["messages_per_task"]

        def sent(cost: dict[str, float]) -> str:
            return f"{cost['task']:.2f} + {cost['events']:.2f}"

        lines.append(
            f"| RabbitMQ {version} | {late['tasks']} | {late['p50_s']:.2f} / {late['p95_s']:.2f} / "
            f"{late['p99_s']:.2f} / {late['max_s']:.2f} | {late['early']} | "
            f"{sent(costs['scheduled'])} | {sent(costs['at_once'])} | "
            f"{costs['scheduled']['dead_lettered']:.2f} | {broker['queues']} | {broker['exchanges']} |"
        )
    lines += ["", "| round trip, way | first declaration (s) | again (s) |", "|---|---:|---:|"]
    for label, times in figures["declaring"].items():
        lines.append(f"| {label} | {times['first_s']:.3f} | {times['again_s']:.3f} |")
    return "\n".join(lines)


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 tasks per broker, for a smoke run")
    parser.add_argument("--output-dir", type=Path, default=BENCH / "results")
    arguments = parser.parse_args()
    count = 100 if arguments.quick else 1000
    try:
        with tempfile.TemporaryDirectory(prefix="onebox-bench-") as directory:
            scratch = Scratch.create(Path(directory))
            figures: dict[str, Any] = {"brokers": {}}
            for version in ("3.10", "4.0.5"):
                figures["brokers"][version] = on_broker(version, scratch, count)
            say("declaring")
            figures["declaring"] = declaring()
    finally:
        sweep(QUEUES)
    stem = "delays-quick" if arguments.quick else "delays"
    results = {
        "command": " ".join(["uv run python bench/delays.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average": os.getloadavg(),
        "figures": figures,
        "made": {"queue_prefixes": QUEUES},
    }
    arguments.output_dir.mkdir(parents=True, exist_ok=True)
    (arguments.output_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(figures))


if __name__ == "__main__":
    main_()
