"""The task-status figures: what task events cost and how fast they arrive.

    uv run python bench/status.py [--quick]

Starts onebox as deployed (supervisord, the default settings) against the
local RabbitMQ and measures:

1. events per 10-second countdown, and the AMQP messages that carry them,
   read from the events stream by a consumer of the bench's own from just
   before the countdowns were posted;
2. the web process's memory per 10,000 remembered tasks: its RSS (and PSS)
   before and after 10,000 POSTs, with the worker paused (each task then one "queued"
   entry in the web process's board); and, in this process, what a board of
   10,000 finished tasks (every timestamp set) allocates, by tracemalloc;
3. the latency from a worker's tick to an SSE client: the client's clock at
   each progress event minus the worker's clock at the tick (``updated_at``),
   for countdowns watched at once; one machine, one clock;
4. what a web start costs: ``python tasks.py web`` started on an empty events
   stream, and on one that holds 10,000 finished countdowns' events (written
   by the bench, batched as figure 1 measured): the time from launch to its
   "task board rebuilt" line and to its first ready /readyz, its PSS, and the
   AMQP messages it read (counted again by a consumer of the bench's own from
   the same point in time, up to a marker written after the start).

--quick (CI) posts 2,000 tasks for figure 2 and rebuilds 1,000 for figure 4,
and scales them to 10,000.

Writes bench/results/status{,-quick}.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import msgspec
import pika
from harness import (
    BENCH,
    MIB,
    RABBIT_URL,
    ROOT,
    Process,
    child_env,
    cpu_seconds,
    first_accepted,
    free_port,
    log_time,
    percentile,
    running,
    sample,
    sweep,
)
from run import machine, post_countdowns, say
from stacks import QUEUES, Scratch, Stack, new_queue, onebox

TASK_SECONDS = 10
REMEMBERED = 10_000
# CloudAMQP's free plan: messages a month, deliveries included.
FREE_PLAN_MESSAGES = 1_000_000
# The rebuilt tasks' events are dated over this many seconds before the web
# process starts: inside the default memory window (an hour).
WRITTEN_OVER = 3000
ENDS = {"succeeded", "failed", "cancelled"}


def events_per_task(stack: Stack, count: int) -> dict[str, float]:
    """Post ``count`` countdowns at once and count what the events stream gets of them."""
    assert stack.queue is not None
    # A point in time, as the web process reads from; a second's margin for the broker's clock.
    since = datetime.now(UTC) - timedelta(seconds=1)
    asyncio.run(post_countdowns(stack.url, count, TASK_SECONDS))
    # The bench's countdowns alone (the stack's first task was of 1 s): a
    # task's "queued" and "progress" events say its total. A worker's
    # "started" can come before the web process's batched "queued".
    heard: dict[str, Counter[str]] = {}
    mine: set[str] = set()
    batches: list[set[str]] = []
    # A safety net only: the default worker runs 8 countdowns at a time.
    deadline = time.monotonic() + TASK_SECONDS * (count // 8 + 1) + 30
    with pika.BlockingConnection(pika.URLParameters(RABBIT_URL)) as connection:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=core().STREAM_PREFETCH)
        stream = f"{stack.queue}.events"
        for method, properties, body in channel.consume(
            stream, arguments={"x-stream-offset": since}, inactivity_timeout=1
        ):
            if len(mine) == count and all(ENDS & set(heard[task]) for task in mine):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(mine)} tasks heard of, not all ended, by the deadline")
            if method is None:
                continue
            channel.basic_ack(method.delivery_tag)
            if properties.type == core().SYNC:
                continue  # a web process's marker, no events
            ids = set()
            for event in json.loads(body):
                ids.add(event["id"])
                heard.setdefault(event["id"], Counter())[event["event"]] += 1
                if event.get("total") == TASK_SECONDS:
                    mine.add(event["id"])
            batches.append(ids)
        channel.cancel()
    kinds = sum((heard[task] for task in mine), Counter())
    return {
        "tasks": len(mine),
        "events_per_task": kinds.total() / len(mine),
        # The messages that carry any of them: a batch may carry other tasks' events too.
        "messages_per_task": sum(1 for ids in batches if ids & mine) / len(mine),
        **{f"{kind}_per_task": number / len(mine) for kind, number in sorted(kinds.items())},
    }


def core() -> ModuleType:
    """tasks.py, the one source of the events' shape and the stream's declaration."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import tasks  # noqa: PLC0415 - the core's module, loaded only for the figures that need it

    return tasks


def countdown_events(task_id: str, queued_at: float) -> list[Any]:
    """A 10-s countdown's events, as the web process and a worker send them."""
    tasks = core()

    def event(kind: Any, after: float, done: int, total: int) -> Any:
        return tasks.TaskEvent(task_id, kind, queued_at + after, "countdown", done=done, total=total)

    return [
        event("queued", 0, 0, TASK_SECONDS),
        event("started", 0.01, 0, 0),
        *(event("progress", 0.01 + tick, tick, TASK_SECONDS) for tick in range(1, TASK_SECONDS)),
        event("succeeded", 0.01 + TASK_SECONDS, TASK_SECONDS, TASK_SECONDS),
    ]


def countdown_batches(count: int, messages_per_task: float) -> list[bytes]:
    """``count`` finished countdowns' events, in as many messages per task as
    real traffic took (figure 1): their events in time order, cut into that
    many batches. Their times spread over the last ``WRITTEN_OVER`` seconds,
    inside the default memory window."""
    now = time.time()
    events = sorted(
        (
            event
            for number in range(count)
            for event in countdown_events(str(uuid.uuid4()), now - WRITTEN_OVER + number * WRITTEN_OVER / count)
        ),
        key=lambda event: event.at,
    )
    messages = max(1, round(messages_per_task * count))
    size, extra = divmod(len(events), messages)
    bounds = [number * size + min(number, extra) for number in range(messages + 1)]
    return [msgspec.json.encode(events[start:end]) for start, end in itertools.pairwise(bounds)]


def write_events(stream: str, batches: list[bytes]) -> None:
    """The batches, to a new events stream."""
    with pika.BlockingConnection(pika.URLParameters(RABBIT_URL)) as connection:
        channel = connection.channel()
        channel.queue_declare(stream, durable=True, arguments=core().EVENTS_ARGUMENTS)
        for batch in batches[:-1]:
            channel.basic_publish("", stream, batch)
        # One channel writes in order: once the last batch is confirmed, all are in the stream.
        channel.confirm_delivery()
        channel.basic_publish("", stream, batches[-1])


def apply_cpu_seconds(batches: list[bytes]) -> float:
    """CPU seconds that a web process's decoding and applying of the batches
    takes alone, in this process: the rest of a rebuild is AMQP."""
    import main  # noqa: PLC0415 - the web module, loaded only for these figures

    publisher = main.Publisher(core().settings)
    started = time.process_time()
    for batch in batches:
        publisher.apply_batch(batch)
    return time.process_time() - started


def messages_since(stream: str, since: datetime) -> int:
    """The messages a reader from ``since`` gets, up to a marker of the bench's own written now."""
    marker = str(uuid.uuid4())
    read = 0
    with pika.BlockingConnection(pika.URLParameters(RABBIT_URL)) as connection:
        channel = connection.channel()
        channel.basic_publish("", stream, b"", pika.BasicProperties(type=core().SYNC, message_id=marker))
        channel.basic_qos(prefetch_count=core().STREAM_PREFETCH)
        deadline = time.monotonic() + 120
        for method, properties, _ in channel.consume(
            stream, arguments={"x-stream-offset": since}, inactivity_timeout=1
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the bench's marker not read back in 120 s ({read} messages read)")
            if method is None:
                continue
            channel.basic_ack(method.delivery_tag)
            if properties.message_id == marker:
                break
            read += 1
        channel.cancel()
    return read


def web_start(scratch: Scratch, queue: str) -> dict[str, float]:
    """Start ``python tasks.py web`` on ``queue``, as supervisord does: the
    times to its "task board rebuilt" line and to its first ready /readyz,
    its web worker's PSS once ready, and the messages it read at start."""
    port = free_port()
    env = child_env(scratch.venv, PORT=port, QUEUE_NAME=queue, CLOUDAMQP_URL=RABBIT_URL, TMPDIR=str(scratch.directory))
    since = datetime.now(UTC) - timedelta(seconds=core().settings.task_memory_seconds)
    launched = time.time()
    web = Process([str(scratch.venv / "bin" / "python"), "tasks.py", "web"], env, cwd=scratch.core)
    with running(web):
        line = web.wait_for(r"task board rebuilt: \d+ tasks", 90)
        # On a busy machine the times say little alone: the CPU the web process had.
        cpu = cpu_seconds([web])
        ready = first_ready(f"http://127.0.0.1:{port}/readyz", launched + 90)
        time.sleep(1)  # whatever the first requests load
        memory = web_worker_memory([web])
        read = messages_since(f"{queue}.events", since)
    rebuilt = re.search(r"task board rebuilt: (\d+) tasks", line)
    assert rebuilt is not None
    return {
        "tasks_rebuilt": int(rebuilt[1]),
        "launch_to_rebuilt_s": log_time(line) - launched,
        "launch_to_ready_s": ready - launched,
        "cpu_s_to_rebuilt": cpu,
        "web_pss_mib": memory["pss_mib"],
        "web_rss_mib": memory["rss_mib"],
        "messages_read": read,
    }


def first_ready(url: str, deadline: float) -> float:
    """The time of the first 200 from GET ``url``, polled every 10 ms."""
    with httpx.Client(timeout=1) as client:
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url).status_code == 200:
                    return time.time()
            time.sleep(0.01)
    raise RuntimeError(f"no 200 from {url} by the deadline")


def rebuild(scratch: Scratch, count: int, messages_per_task: float) -> dict[str, Any]:
    """A web start on an empty events stream, then one on ``count`` finished countdowns' events."""
    empty = web_start(scratch, new_queue("status"))
    queue = new_queue("status")
    batches = countdown_batches(count, messages_per_task)
    write_events(f"{queue}.events", batches)
    full = web_start(scratch, queue)
    if full["tasks_rebuilt"] != count:
        raise RuntimeError(f"the board was rebuilt with {full['tasks_rebuilt']} tasks, not {count}")
    return {
        "tasks": count,
        "messages_written": len(batches),
        "apply_cpu_s": apply_cpu_seconds(batches),
        "empty": empty,
        "full": full,
        "messages_read_per_10000_tasks": full["messages_read"] * 10_000 / count,
        "rss_mib_per_10000_tasks": (full["web_rss_mib"] - empty["web_rss_mib"]) * 10_000 / count,
    }


def web_worker_memory(roots: list[Process]) -> dict[str, float]:
    """The web worker's PSS and RSS. On a shared machine its PSS swings by a
    MiB or two as other processes map the same libraries; its RSS does not,
    and is what a difference of boards is taken from."""
    process = sample(roots)["processes"]["granian worker"]
    return {"pss_mib": process["pss_mib"], "rss_mib": process["rss_mib"]}


def memory_per_remembered_tasks(scratch: Scratch, count: int) -> dict[str, float]:
    with onebox(scratch, new_queue("status"), paused=True, TASK_MEMORY_COUNT=REMEMBERED) as stack:
        first_accepted(stack.url)
        asyncio.run(post_countdowns(stack.url, 200, TASK_SECONDS))  # warm: every lazy import done
        before = web_worker_memory(stack.processes)
        asyncio.run(post_countdowns(stack.url, count, TASK_SECONDS))
        time.sleep(1)
        after = web_worker_memory(stack.processes)
        listed = httpx.get(stack.url, params={"limit": 1}).json()["total"]
    # The 200 warming tasks and the first one are remembered too, up to REMEMBERED.
    if listed != min(count + 201, REMEMBERED):
        raise RuntimeError(f"the board holds {listed} tasks, not the {count} posted and those before")
    return {
        "tasks": count,
        "web_pss_before_mib": before["pss_mib"],
        "web_pss_after_mib": after["pss_mib"],
        "web_rss_before_mib": before["rss_mib"],
        "web_rss_after_mib": after["rss_mib"],
        "rss_mib_per_10000_tasks": (after["rss_mib"] - before["rss_mib"]) * 10_000 / count,
    }


async def watch(client: httpx.AsyncClient, url: str, latencies: list[float]) -> None:
    response = await client.post(url, json={"seconds": TASK_SECONDS})
    task = response.json()
    async with client.stream("GET", f"{url}/{task['id']}/events") as stream:
        stream.raise_for_status()
        async for line in stream.aiter_lines():
            if line.startswith("data:"):
                view = json.loads(line.removeprefix("data:"))
                if view["status"] == "running" and view["remaining"] < TASK_SECONDS:
                    latencies.append(time.time() - datetime.fromisoformat(view["updated_at"]).timestamp())


def tick_to_sse(stack: Stack, watchers: int) -> dict[str, float]:
    latencies: list[float] = []

    async def all_watchers() -> None:
        async with httpx.AsyncClient(timeout=TASK_SECONDS + 30) as client:
            await asyncio.gather(*(watch(client, stack.url, latencies) for _ in range(watchers)))

    asyncio.run(all_watchers())
    milliseconds = [latency * 1000 for latency in latencies]
    return {
        "watchers": watchers,
        "samples": len(milliseconds),
        "p50_ms": percentile(milliseconds, 0.5),
        "p99_ms": percentile(milliseconds, 0.99),
        "max_ms": max(milliseconds),
    }


def board_allocation() -> float:
    """MiB that main.TaskBoard allocates for REMEMBERED finished tasks, ids included."""
    tasks = core()
    import main  # noqa: PLC0415 - the web module, loaded only for this figure

    # Its app set the root logger to INFO: not for the bench's own pika and httpx lines.
    logging.getLogger().setLevel(logging.WARNING)

    board = main.TaskBoard(tasks.settings)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(REMEMBERED):
        task_id, now = str(uuid.uuid4()), time.time()
        for kind in ("queued", "started", "progress", "succeeded"):
            board.apply(tasks.TaskEvent(task_id, kind, now, "countdown", 1, TASK_SECONDS, TASK_SECONDS))
    allocated = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    if len(board.tasks) != REMEMBERED:
        raise RuntimeError(f"the board holds {len(board.tasks)} tasks, not {REMEMBERED}")
    return allocated / MIB


def markdown(figures: dict[str, Any]) -> str:
    events, memory, latency = figures["events"], figures["memory"], figures["latency"]
    rebuilt, empty, full = figures["rebuild"], figures["rebuild"]["empty"], figures["rebuild"]["full"]
    tasks = f"{rebuilt['tasks']:,} tasks"
    return "\n".join(
        [
            "| figure | measured |",
            "|---|---:|",
            f"| task events per {TASK_SECONDS}-s countdown | {events['events_per_task']:.1f} |",
            f"| AMQP messages carrying them, per countdown ({events['tasks']} at once) "
            f"| {events['messages_per_task']:.2f} |",
            f"| web process RSS per 10,000 remembered (queued) tasks (MiB, {memory['tasks']:,} posted) "
            f"| {memory['rss_mib_per_10000_tasks']:.1f} |",
            f"| allocated per {REMEMBERED:,} finished tasks, tracemalloc (MiB) "
            f"| {memory['board_mib_per_10000_finished']:.1f} |",
            f"| worker tick to SSE client, p50 (ms) | {latency['p50_ms']:.1f} |",
            f"| worker tick to SSE client, p99 (ms) | {latency['p99_ms']:.1f} |",
            f"| worker tick to SSE client, max (ms, {latency['samples']} ticks) | {latency['max_ms']:.1f} |",
            f"| web start to `task board rebuilt`, empty stream / {tasks} (s) "
            f"| {empty['launch_to_rebuilt_s']:.2f} / {full['launch_to_rebuilt_s']:.2f} |",
            f"| web start to first ready `/readyz`, empty stream / {tasks} (s) "
            f"| {empty['launch_to_ready_s']:.2f} / {full['launch_to_ready_s']:.2f} |",
            f"| CPU seconds of the web process to `task board rebuilt`, empty stream / {tasks} "
            f"| {empty['cpu_s_to_rebuilt']:.2f} / {full['cpu_s_to_rebuilt']:.2f} |",
            f"| of which decoding and applying the events, alone (CPU s, {tasks}) | {rebuilt['apply_cpu_s']:.2f} |",
            f"| web process PSS after the start, empty stream / {tasks} (MiB) "
            f"| {empty['web_pss_mib']:.1f} / {full['web_pss_mib']:.1f} |",
            f"| web process RSS after the start, empty stream / {tasks} (MiB) "
            f"| {empty['web_rss_mib']:.1f} / {full['web_rss_mib']:.1f} |",
            f"| AMQP messages a web start reads, empty stream / {tasks} "
            f"| {empty['messages_read']:,} / {full['messages_read']:,} |",
            f"| AMQP messages a web start reads, per 10,000 tasks in the window "
            f"| {rebuilt['messages_read_per_10000_tasks']:,.0f} |",
            f"| web starts a month in CloudAMQP's free {FREE_PLAN_MESSAGES:,} messages, 10,000 tasks in the window "
            f"| {FREE_PLAN_MESSAGES / rebuilt['messages_read_per_10000_tasks']:.1f} |",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer countdowns, for CI")
    parser.add_argument("--output-dir", type=Path, default=BENCH / "results")
    arguments = parser.parse_args()
    at_once = 5 if arguments.quick else 50
    watchers = 2 if arguments.quick else 10
    # Quick mode (CI) posts and rebuilds fewer tasks, and scales to 10,000.
    remembered = 2_000 if arguments.quick else REMEMBERED
    rebuilt = 1_000 if arguments.quick else 10_000
    try:
        with tempfile.TemporaryDirectory(prefix="onebox-bench-") as directory:
            scratch = Scratch.create(Path(directory))
            say("events per task, and tick to SSE")
            # The watchers are one client: let it hold them all at once.
            with onebox(scratch, new_queue("status"), MAX_EVENT_STREAMS_PER_CLIENT=watchers) as stack:
                first_accepted(stack.url)
                figures = {"events": events_per_task(stack, at_once), "latency": tick_to_sse(stack, watchers)}
            say(f"memory of {remembered:,} remembered tasks")
            figures["memory"] = memory_per_remembered_tasks(scratch, remembered)
            figures["memory"]["board_mib_per_10000_finished"] = board_allocation()
            say(f"web start on an empty events stream, and on {rebuilt:,} tasks' events")
            figures["rebuild"] = rebuild(scratch, rebuilt, figures["events"]["messages_per_task"])
    finally:
        sweep(QUEUES)
    stem = "status-quick" if arguments.quick else "status"
    results = {
        "command": " ".join(["uv run python bench/status.py", *sys.argv[1:]]),
        "machine": machine(),
        # Other work on the machine meanwhile skews the times.
        "load_average": os.getloadavg(),
        "figures": figures,
        # What was made, for checking that nothing of it is left.
        "made": {"queue_prefixes": QUEUES},
    }
    arguments.output_dir.mkdir(parents=True, exist_ok=True)
    (arguments.output_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(figures))


if __name__ == "__main__":
    main()
