"""The task-status figures: what task events cost and how fast they arrive.

    uv run python bench/status.py [--quick]

Starts onebox as deployed (supervisord, the default settings) against the
local RabbitMQ and measures:

1. events per 10-second countdown, and the AMQP messages that carry them,
   counted on a queue of the bench's own bound to the events exchange;
2. the web process's memory per 10,000 remembered tasks: its PSS before and
   after 10,000 POSTs, with the worker paused (each task then one "queued"
   entry in the web process's board); and, in this process, what a board of
   10,000 finished tasks (every timestamp set) allocates, by tracemalloc;
3. the latency from a worker's tick to an SSE client: the client's clock at
   each progress event minus the worker's clock at the tick (``updated_at``),
   for countdowns watched at once; one machine, one clock.

Writes bench/results/status{,-quick}.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pika
from harness import BENCH, MIB, RABBIT_URL, ROOT, first_accepted, percentile, sample, sweep
from run import machine, post_countdowns, say
from stacks import QUEUES, Scratch, Stack, new_queue, onebox

TASK_SECONDS = 10
REMEMBERED = 10_000
ENDS = {"succeeded", "failed", "cancelled"}


def events_per_task(stack: Stack, count: int) -> dict[str, float]:
    """Post ``count`` countdowns at once and count what crosses the events exchange."""
    assert stack.queue is not None
    with pika.BlockingConnection(pika.URLParameters(RABBIT_URL)) as connection:
        channel = connection.channel()
        listener = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(listener, f"{stack.queue}.events")
        asyncio.run(post_countdowns(stack.url, count, TASK_SECONDS))
        # The bench's countdowns alone (the stack's first task was of 1 s): a
        # task's "queued" and "progress" events say its total. A worker's
        # "started" can come before the web process's batched "queued".
        heard: dict[str, Counter[str]] = {}
        mine: set[str] = set()
        messages = 0
        # A safety net only: the default worker runs 8 countdowns at a time.
        deadline = time.monotonic() + TASK_SECONDS * (count // 8 + 1) + 30
        for _, _, body in channel.consume(listener, inactivity_timeout=1):
            if len(mine) == count and all(ENDS & set(heard[task]) for task in mine):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(mine)} tasks heard of, not all ended, by the deadline")
            if body is None:
                continue
            messages += 1
            for event in json.loads(body):
                heard.setdefault(event["id"], Counter())[event["event"]] += 1
                if event.get("total") == TASK_SECONDS:
                    mine.add(event["id"])
        channel.cancel()
    kinds = sum((heard[task] for task in mine), Counter())
    return {
        "tasks": len(mine),
        "events_per_task": kinds.total() / len(mine),
        # Batches carry other tasks' events too, so this is an upper bound.
        "messages_per_task": messages / len(mine),
        **{f"{kind}_per_task": number / len(mine) for kind, number in sorted(kinds.items())},
    }


def web_worker_pss(stack: Stack) -> float:
    processes = sample(stack.processes)["processes"]
    return float(processes["granian worker"]["pss_mib"])


def memory_per_remembered_tasks(scratch: Scratch) -> dict[str, float]:
    with onebox(scratch, new_queue("status"), paused=True, TASK_MEMORY_COUNT=REMEMBERED) as stack:
        first_accepted(stack.url)
        asyncio.run(post_countdowns(stack.url, 200, TASK_SECONDS))  # warm: every lazy import done
        before = web_worker_pss(stack)
        asyncio.run(post_countdowns(stack.url, REMEMBERED, TASK_SECONDS))
        time.sleep(1)
        after = web_worker_pss(stack)
        listed = httpx.get(stack.url, params={"limit": 1}).json()["total"]
    if listed != REMEMBERED:
        raise RuntimeError(f"the board holds {listed} tasks, not {REMEMBERED}")
    return {"web_pss_before_mib": before, "web_pss_after_mib": after, "mib_per_10000_tasks": after - before}


async def watch(client: httpx.AsyncClient, url: str, latencies: list[float]) -> None:
    response = await client.post(url, json={"seconds": TASK_SECONDS})
    task = response.json()
    async with client.stream("GET", f"{url}/{task['id']}/events") as stream:
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
    sys.path.insert(0, str(ROOT))
    import main  # noqa: PLC0415 - the web module, loaded only for this figure
    import tasks  # noqa: PLC0415

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
    return "\n".join(
        [
            "| figure | measured |",
            "|---|---:|",
            f"| task events per {TASK_SECONDS}-s countdown | {events['events_per_task']:.1f} |",
            f"| AMQP messages carrying them, per countdown ({events['tasks']} at once) "
            f"| {events['messages_per_task']:.2f} |",
            f"| web process PSS per {REMEMBERED:,} remembered (queued) tasks (MiB) "
            f"| {memory['mib_per_10000_tasks']:.1f} |",
            f"| allocated per {REMEMBERED:,} finished tasks, tracemalloc (MiB) "
            f"| {memory['board_mib_per_10000_finished']:.1f} |",
            f"| worker tick to SSE client, p50 (ms) | {latency['p50_ms']:.1f} |",
            f"| worker tick to SSE client, p99 (ms) | {latency['p99_ms']:.1f} |",
            f"| worker tick to SSE client, max (ms, {latency['samples']} ticks) | {latency['max_ms']:.1f} |",
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
    try:
        with tempfile.TemporaryDirectory(prefix="onebox-bench-") as directory:
            scratch = Scratch.create(Path(directory))
            say("events per task, and tick to SSE")
            with onebox(scratch, new_queue("status")) as stack:
                first_accepted(stack.url)
                figures = {"events": events_per_task(stack, at_once), "latency": tick_to_sse(stack, watchers)}
            say(f"memory per {REMEMBERED:,} remembered tasks")
            figures["memory"] = memory_per_remembered_tasks(scratch)
            figures["memory"]["board_mib_per_10000_finished"] = board_allocation()
    finally:
        sweep(QUEUES)
    stem = "status-quick" if arguments.quick else "status"
    results = {
        "command": " ".join(["uv run python bench/status.py", *sys.argv[1:]]),
        "machine": machine(),
        "figures": figures,
        # What was made, for checking that nothing of it is left.
        "made": {"queue_prefixes": QUEUES},
    }
    arguments.output_dir.mkdir(parents=True, exist_ok=True)
    (arguments.output_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(figures))


if __name__ == "__main__":
    main()
