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
   stream; then on one that holds 10,000 finished countdowns' events
   (batched as figure 1 measured) and 5,000 waiting tasks' (no snapshot yet:
   it reads every event of the window, and writes a snapshot); then again,
   once 56 more countdowns (some 500 messages) have ended since: the time
   from launch to its "task board rebuilt" line and to its first ready
   /readyz, its CPU and memory, and the AMQP messages the broker delivered to
   it up to that line (counted in a proxy between the two).

--quick (CI) posts 2,000 tasks for figure 2 and starts on 1,000 finished and
500 waiting tasks for figure 4.

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
import socket
import sys
import tempfile
import threading
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
    AMQP_PORT,
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
# Countdowns that end between the first start on a history and the second:
# some 500 event messages, half of what makes web processes write the next snapshot.
TRAILING = 56
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


# The core under test (--core): where tasks.py and main.py are imported from.
CORE = [ROOT]


def core() -> ModuleType:
    """tasks.py, the one source of the events' shape and the stream's declaration."""
    if str(CORE[0]) not in sys.path:
        sys.path.insert(0, str(CORE[0]))
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

    _, _, feed = main.web_parts(core().settings)
    started = time.process_time()
    for batch in batches:
        feed.apply_batch(batch)
    return time.process_time() - started


class DeliveryCounter:
    """A TCP proxy to RabbitMQ that counts the messages the broker delivers
    through it (AMQP basic.deliver frames): what a web process reads, from
    the outside, whatever the code under test reports of itself."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.delivered = 0
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self.accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                broker = socket.create_connection(("127.0.0.1", AMQP_PORT))
            except OSError:
                return
            self.sockets += [client, broker]
            threading.Thread(target=self.pump, args=(client, broker, False), daemon=True).start()
            threading.Thread(target=self.pump, args=(broker, client, True), daemon=True).start()

    def pump(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        frames = bytearray()
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
                if count:
                    frames += data
                    self.count(frames)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def count(self, frames: bytearray) -> None:
        # A frame: type (1 byte), channel (2), size (4), payload, end (1); basic.deliver is method 60 of class 60.
        while len(frames) >= 7 and len(frames) >= (end := 8 + int.from_bytes(frames[3:7], "big")):
            if frames[0] == 1 and frames[7:11] == b"\x00\x3c\x00\x3c":
                self.delivered += 1
            del frames[:end]

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()


def web_start(scratch: Scratch, queue: str) -> dict[str, float]:
    """Start ``python tasks.py web`` on ``queue``, as supervisord does: the
    times to its "task board rebuilt" line and to its first ready /readyz,
    its web worker's PSS once ready, and the messages the broker delivered
    to it up to a second after that line. It stops once it has written its board's snapshot
    (a core without snapshots: a few seconds later)."""
    port = free_port()
    counter = DeliveryCounter()
    env = child_env(scratch.venv, PORT=port, QUEUE_NAME=queue, CLOUDAMQP_URL=counter.url, TMPDIR=str(scratch.directory))
    launched = time.time()
    web = Process([str(scratch.venv / "bin" / "python"), "tasks.py", "web"], env, cwd=scratch.core)
    try:
        with running(web):
            line = web.wait_for(r"task board rebuilt: \d+ tasks", 90)
            # On a busy machine the times say little alone: the CPU the web process had.
            cpu = cpu_seconds([web])
            ready = first_ready(f"http://127.0.0.1:{port}/readyz", launched + 90)
            time.sleep(1)  # whatever the first requests load
            memory = web_worker_memory([web])
            # A second after the rebuild: the cut a start writes at once when it found no snapshot is counted too.
            read = counter.delivered
            written = ""
            with contextlib.suppress(RuntimeError):
                written = web.wait_for(r"board snapshot written", 10)
    finally:
        counter.close()
    rebuilt = re.search(r"task board rebuilt: (\d+) tasks", line)
    assert rebuilt is not None
    snapshot = re.search(r"in (\d+) messages", written)
    return {
        "snapshot_messages_written": int(snapshot[1]) if snapshot else 0,
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


def waiting_batches(count: int) -> list[bytes]:
    """``count`` tasks that wait in the queue: their "queued" events, ten to a
    message (a burst of POSTs), dated over the last ``WRITTEN_OVER`` seconds."""
    now, tasks = time.time(), core()
    events = [
        tasks.TaskEvent(str(uuid.uuid4()), "queued", now - WRITTEN_OVER + number * WRITTEN_OVER / count, "countdown")
        for number in range(count)
    ]
    return [msgspec.json.encode(events[start : start + 10]) for start in range(0, count, 10)]


def rebuild(scratch: Scratch, finished: int, waiting: int, messages_per_task: float) -> dict[str, Any]:
    """Web starts: on an empty events stream; on ``finished`` countdowns' and
    ``waiting`` queued tasks' events (no snapshot yet: every event of the
    window); and again once TRAILING more countdowns have ended (from the
    snapshot the first start wrote, if the core writes them)."""
    empty = web_start(scratch, new_queue("status"))
    queue = new_queue("status")
    history = countdown_batches(finished, messages_per_task) + waiting_batches(waiting)
    write_events(f"{queue}.events", history)
    first = web_start(scratch, queue)
    trailing = countdown_batches(TRAILING, messages_per_task)
    write_events(f"{queue}.events", trailing)
    second = web_start(scratch, queue)
    return {
        "finished": finished,
        "waiting": waiting,
        "trailing": TRAILING,
        "messages_written": len(history),
        "trailing_messages": len(trailing),
        "apply_cpu_s": apply_cpu_seconds(history),
        "empty": empty,
        "first": first,
        "second": second,
        "rss_mib_per_10000_tasks": (first["web_rss_mib"] - empty["web_rss_mib"]) * 10_000 / (finished + waiting),
    }


def web_worker_memory(roots: list[Process]) -> dict[str, float]:
    """The web process's PSS and RSS (one process: ``tasks.py web``). On a
    shared machine its PSS swings by a MiB or two as other processes map the
    same libraries; its RSS does not, and is what a difference of boards is
    taken from."""
    process = sample(roots)["processes"]["web"]
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
    rebuilt, second = figures["rebuild"], figures["rebuild"]["second"]
    starts = (
        f"empty stream / {rebuilt['finished']:,} finished and {rebuilt['waiting']:,} waiting tasks, no snapshot "
        f"/ the same and {rebuilt['trailing_messages']:,} messages more"
    )

    def figure(name: str, style: str) -> str:
        return " / ".join(format(rebuilt[start][name], style) for start in ("empty", "first", "second"))

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
            f"| web start to `task board rebuilt`, {starts} (s) | {figure('launch_to_rebuilt_s', '.2f')} |",
            f"| web start to first ready `/readyz`, {starts} (s) | {figure('launch_to_ready_s', '.2f')} |",
            f"| CPU seconds of the web process to `task board rebuilt`, {starts} "
            f"| {figure('cpu_s_to_rebuilt', '.2f')} |",
            f"| of which decoding and applying the history's events, alone (CPU s) | {rebuilt['apply_cpu_s']:.2f} |",
            f"| web process PSS after the start, {starts} (MiB) | {figure('web_pss_mib', '.1f')} |",
            f"| web process RSS after the start, {starts} (MiB) | {figure('web_rss_mib', '.1f')} |",
            f"| AMQP messages the broker delivers to a web start, {starts} | {figure('messages_read', ',')} |",
            f"| tasks on the board after the start, {starts} | {figure('tasks_rebuilt', ',')} |",
            f"| web starts a month in CloudAMQP's free {FREE_PLAN_MESSAGES:,} messages, as the last start "
            f"| {FREE_PLAN_MESSAGES / second['messages_read']:,.0f} |",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer countdowns, for CI")
    parser.add_argument("--output-dir", type=Path, default=BENCH / "results")
    parser.add_argument(
        "--core",
        type=Path,
        default=ROOT,
        help="measure the main.py, tasks.py, settings.toml and supervisord.conf in this directory instead",
    )
    arguments = parser.parse_args()
    at_once = 5 if arguments.quick else 50
    watchers = 2 if arguments.quick else 10
    # Quick mode (CI) posts and rebuilds fewer tasks, and scales to 10,000.
    remembered = 2_000 if arguments.quick else REMEMBERED
    finished = 1_000 if arguments.quick else 10_000
    try:
        with tempfile.TemporaryDirectory(prefix="onebox-bench-") as directory:
            scratch = Scratch.create(Path(directory), arguments.core.resolve())
            CORE[0] = scratch.core
            say("events per task, and tick to SSE")
            # The watchers are one client: let it hold them all at once.
            with onebox(scratch, new_queue("status"), MAX_EVENT_STREAMS_PER_CLIENT=watchers) as stack:
                first_accepted(stack.url)
                figures = {"events": events_per_task(stack, at_once), "latency": tick_to_sse(stack, watchers)}
            say(f"memory of {remembered:,} remembered tasks")
            figures["memory"] = memory_per_remembered_tasks(scratch, remembered)
            figures["memory"]["board_mib_per_10000_finished"] = board_allocation()
            say(f"web starts: on an empty events stream; twice on {finished:,} finished and {finished // 2:,} waiting")
            figures["rebuild"] = rebuild(scratch, finished, finished // 2, figures["events"]["messages_per_task"])
    finally:
        sweep(QUEUES)
    stem = "status-quick" if arguments.quick else "status"
    results = {
        "command": " ".join(["uv run python bench/status.py", *sys.argv[1:]]),
        "core": str(arguments.core.resolve()),
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
