"""The price of replication: enqueue at 64 clients on a three-node RabbitMQ 4
cluster, quorum queues against classic ones, in one run on one machine.

    uv run python bench/replication.py            # 3 rounds of each, alternating (--rounds N)
    uv run python bench/replication.py --quick    # one short round of each

Needs podman, wrk and RABBITMQ_IMAGE (tests/cluster.py starts the cluster).
Both stacks run with the worker paused, as figure 1 of bench/run.py, and
reach the same node directly: the queue's leader is there (RabbitMQ puts it
on the declaring connection's node), so what differs is the type alone, and
a quorum queue confirms a message once two of three nodes have written it.
Writes bench/results/replication.json (quick: replication-quick.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pika
from harness import BENCH, ROOT, first_accepted, wrk
from stacks import Scratch, new_queue, onebox

sys.path.insert(0, str(ROOT / "tests"))
from cluster import Cluster  # the tests' rig, from their directory

CLIENTS = 64
TYPES = ("classic", "quorum")


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def purge(url: str, queue: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_purge(queue)
    finally:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one 2-second round of each")
    parser.add_argument("--rounds", type=int, default=3, help="5-second rounds of each, alternating")
    arguments = parser.parse_args()
    quick = arguments.quick
    rounds, seconds = (1, 2.0) if quick else (arguments.rounds, 5.0)
    cluster = Cluster(3)
    try:
        say(f"cluster of 3 nodes started in {cluster.start():.1f} s")
        node = cluster.nodes[0]
        with tempfile.TemporaryDirectory(prefix="onebox-bench-cluster-") as directory:
            scratch = Scratch.create(Path(directory))
            queues = {kind: new_queue(f"cluster-{kind}") for kind in TYPES}
            stacks = {
                kind: onebox(scratch, queues[kind], paused=True, broker_url=node.url, QUEUE_TYPE=kind) for kind in TYPES
            }
            try:
                for kind in TYPES:
                    first_accepted(stacks[kind].url)
                    wrk(stacks[kind].url, CLIENTS, 1)  # warm up
                    say(f"{kind}: {queues[kind]} led by {cluster.leader(queues[kind]).name}")
                runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in TYPES}
                for number in range(rounds):
                    for kind in TYPES:
                        purge(node.url, queues[kind])
                        result = wrk(stacks[kind].url, CLIENTS, seconds)
                        runs[kind].append(result)
                        say(f"round {number + 1} {kind}: {result['rps']:.0f} req/s, p99 {result['p99_ms']:.1f} ms")
            finally:
                for stack in stacks.values():
                    for process in stack.processes:
                        process.stop()
    finally:
        cluster.close()
    medians: dict[str, Any] = {
        kind: {
            figure: statistics.median(run[figure] for run in runs[kind])
            for figure in ("rps", "p50_ms", "p99_ms", "refused", "errors")
        }
        for kind in TYPES
    }
    medians["quorum_rps_of_classic"] = medians["quorum"]["rps"] / medians["classic"]["rps"]
    out = BENCH / "results" / ("replication-quick.json" if quick else "replication.json")
    out.write_text(json.dumps({"clients": CLIENTS, "seconds": seconds, "runs": runs, "medians": medians}, indent=2))
    print(json.dumps(medians, indent=2))


if __name__ == "__main__":
    main()
