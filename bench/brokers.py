"""onebox on each RabbitMQ of the matrix, in one run on one machine:

    uv run python bench/brokers.py            # 10 rounds and 100 pickups per broker
    uv run python bench/brokers.py --quick    # 1 short round and 8 pickups per broker (CI)

The brokers: the machine's RabbitMQ 3.10 on 127.0.0.1:5672, and RabbitMQ
4.0.5, what CloudAMQP's free plan runs, in a container (tests/rabbit_node.py's
RabbitContainer: image RABBITMQ_IMAGE, podman with CONTAINERS_CONF as
../shared/container/podman-setup.sh sets it). Needs wrk too.

Figures, per broker: run.py's figure 1 at 64 clients (enqueue with publisher
confirms, worker paused, every 2xx counted in the queue) and its figure 3
(pickup: POST sent → the actor's start line). Both brokers' stacks run side by
side and take turns, round by round (in the order A B, B A, ...) and pickup by
pickup, so that what other processes do on the shared machine falls on both
alike; the rounds' spread and the load average are kept as the noise.

Writes bench/results/brokers.{json,md} (quick: brokers-quick.*).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from harness import (
    BENCH,
    RABBIT_URL,
    ROOT,
    first_accepted,
    median_tree,
    rabbitmq_version,
    sweep,
)
from run import PEAK_CLIENTS, Plan, load_rounds, machine, pickup_delay, pickup_figures, say
from stacks import QUEUES, Scratch, Stack, new_queue, onebox

# The tests' container, one copy for both.
sys.path.append(str(ROOT / "tests"))
from rabbit_node import RABBITMQ_IMAGE, RabbitContainer

# runs: enqueue rounds per broker, an even number so that each goes first as often;
# pickups: tasks per broker.
FULL = Plan(runs=10, round_seconds=5, levels=(PEAK_CLIENTS,), pickups=100, countdowns=0, delay_ms=0, scrapes=0)
QUICK = Plan(runs=1, round_seconds=2, levels=(PEAK_CLIENTS,), pickups=8, countdowns=0, delay_ms=0, scrapes=0)


@dataclass(frozen=True)
class Broker:
    label: str
    """The version as the matrix names it."""
    url: str


@contextlib.contextmanager
def matrix() -> Iterator[tuple[list[Broker], str]]:
    """The brokers, and the name of the 4.0.5 container (removed on leaving)."""
    podman = shutil.which("podman")
    if podman is None:
        raise RuntimeError("podman is not installed: it runs RabbitMQ 4.0.5")
    node = RabbitContainer(podman)
    try:
        say(f"starting RabbitMQ 4.0.5 ({node.image}) in {node.name}")
        node.start()
        yield [Broker("3.10", RABBIT_URL), Broker("4.0.5", node.url)], node.name
    finally:
        node.stop()


def turns(brokers: list[Broker], number: int) -> list[Broker]:
    """A B, then B A: neither broker always goes first."""
    return brokers if number % 2 == 0 else brokers[::-1]


@dataclass(frozen=True)
class Pair:
    """onebox on one broker twice: its worker paused (enqueue), and whole (pickup)."""

    paused: Stack
    whole: Stack


@contextlib.contextmanager
def stacks(scratch: Scratch, brokers: list[Broker]) -> Iterator[dict[str, Pair]]:
    """A pair on each broker, started at once and ready; on leaving, killed
    (nothing of theirs needs to finish) and their queues deleted."""
    with contextlib.ExitStack() as held:
        running: dict[str, Pair] = {}
        for broker in brokers:
            pair: list[Stack] = []
            for paused in (True, False):
                stack = onebox(scratch, new_queue("brokers"), paused=paused, broker_url=broker.url)
                held.callback(stack.stop, kill=True)
                pair.append(stack)
            running[broker.label] = Pair(*pair)
        for each in running.values():
            first_accepted(each.paused.url)
            first_accepted(each.whole.url)
            # The first task done: the worker is up and back to idle.
            each.whole.log.wait_for(r"task \S+ done", 60)
        yield running


def enqueue(
    running: dict[str, Pair], brokers: list[Broker], plan: Plan, loads: list[float]
) -> dict[str, list[dict[str, float]]]:
    """run.py's figure 1 at 64 clients, one round per broker in turn; the
    load average after each round goes to ``loads``."""
    results: dict[str, list[dict[str, float]]] = {broker.label: [] for broker in brokers}
    for number in range(plan.runs):
        for broker in turns(brokers, number):
            say(f"  round {number + 1} of {plan.runs}, RabbitMQ {broker.label}")
            results[broker.label].append(load_rounds(running[broker.label].paused, plan)[str(PEAK_CLIENTS)])
            loads.append(os.getloadavg()[0])
    return results


def pickups(running: dict[str, Pair], brokers: list[Broker], plan: Plan) -> dict[str, list[float]]:
    """run.py's figure 3, one task per broker in turn: the delays in seconds."""
    delays: dict[str, list[float]] = {broker.label: [] for broker in brokers}
    with httpx.Client(timeout=10) as client:
        for number in range(plan.pickups):
            for broker in turns(brokers, number):
                delays[broker.label].append(pickup_delay(running[broker.label].whole, client))
    return delays


def summary(rounds: list[dict[str, float]], delays: list[float]) -> dict[str, Any]:
    """Medians of the rounds, their spread, and the pickup percentiles."""
    rates = [result["rps"] for result in rounds]
    return {
        "enqueue": median_tree(rounds),
        "rps_min": min(rates),
        "rps_max": max(rates),
        "pickup": pickup_figures(delays),
    }


def paired_ratios(enqueued: dict[str, list[dict[str, float]]]) -> dict[str, list[float]]:
    """Each broker's req/s over the first one's, round by round: the two
    rounds of a pair run back to back, so the machine's load weighs on both."""
    first, *others = enqueued
    return {
        label: [mine["rps"] / theirs["rps"] for mine, theirs in zip(enqueued[label], enqueued[first], strict=True)]
        for label in others
    }


def markdown(results: dict[str, Any]) -> str:
    plan, noise = results["plan"], results["noise"]
    lines = [
        f"RabbitMQ versions side by side, `{results['command']}`, {results['started_at']}, "
        f"{results['elapsed_s']:.0f} s. Enqueue: medians of {plan['runs']} rounds of "
        f"{plan['round_seconds']:g} s at {PEAK_CLIENTS} clients, worker paused, publisher confirms; "
        f"pickup: {plan['pickups']} tasks one at a time, per broker.",
        "",
        "| broker | req/s at 64 clients | p50/p99 ms | pickup p50/p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for label, figures in results["figures"].items():
        enqueue, latency = figures["enqueue"], figures["pickup"]
        lines.append(
            f"| RabbitMQ {results['versions'][label]} | {enqueue['rps']:,.0f} "
            f"| {enqueue['p50_ms']:.1f} / {enqueue['p99_ms']:.1f} "
            f"| {latency['p50_ms']:.1f} / {latency['p99_ms']:.1f} |"
        )
    spreads = ", ".join(
        f"{label}: {figures['rps_min']:,.0f}-{figures['rps_max']:,.0f} req/s, "
        f"{figures['enqueue']['cpu_us_per_request']:.0f} µs CPU per request"
        for label, figures in results["figures"].items()
    )
    first = next(iter(results["figures"]))
    pairs = "; ".join(
        f"{label} made {statistics.median(ratios):.2f}x {first}'s req/s "
        f"(median of {len(ratios)} pairs of rounds run back to back, {min(ratios):.2f}-{max(ratios):.2f}x)"
        for label, ratios in noise["rps_ratio_by_round"].items()
    )
    lines += [
        "",
        f"Noise: rounds ranged {spreads}; load average (1 min) {min(noise['load_1min']):.1f}"
        f"-{max(noise['load_1min']):.1f} on {results['machine']['cores']} cores, shared with other test runs. "
        f"{pairs}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short round and a few pickups, for CI")
    parser.add_argument("--output-dir", type=Path, default=BENCH / "results")
    arguments = parser.parse_args()
    plan = QUICK if arguments.quick else FULL
    loads: list[float] = []
    began = time.monotonic()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    with matrix() as (brokers, container):
        try:
            versions = {broker.label: rabbitmq_version(broker.url) for broker in brokers}
            with tempfile.TemporaryDirectory(prefix="onebox-bench-") as directory:
                scratch = Scratch.create(Path(directory))
                say("onebox on each broker, worker paused and whole")
                with stacks(scratch, brokers) as running:
                    say("enqueue at 64 clients, worker paused")
                    enqueued = enqueue(running, brokers, plan, loads)
                    say("pickup")
                    delays = pickups(running, brokers, plan)
        finally:
            # Each stack deleted its own queues; this takes what the core
            # declared besides. The container goes with all it holds.
            sweep(QUEUES)
    results = {
        "command": " ".join(["uv run python bench/brokers.py", *sys.argv[1:]]),
        "started_at": started_at,
        "elapsed_s": round(time.monotonic() - began, 1),
        "machine": machine(),
        "image": RABBITMQ_IMAGE,
        "versions": versions,
        "plan": asdict(plan),
        "figures": {label: summary(enqueued[label], delays[label]) for label in versions},
        "noise": {"load_1min": loads, "rps_ratio_by_round": paired_ratios(enqueued)},
        "rounds": enqueued,
        "pickup_delays_ms": {label: [delay * 1000 for delay in values] for label, values in delays.items()},
        # What was made, for checking that nothing of it is left.
        "made": {"scratch": str(scratch.directory), "queue_prefixes": QUEUES, "container": container},
    }
    stem = "brokers-quick" if arguments.quick else "brokers"
    arguments.output_dir.mkdir(parents=True, exist_ok=True)
    (arguments.output_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (arguments.output_dir / f"{stem}.md").write_text(table)
    print(table)
    say(f"done in {results['elapsed_s']} s: {arguments.output_dir / stem}.{{json,md}}")


if __name__ == "__main__":
    main()
