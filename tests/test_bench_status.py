"""The task-status benchmark, in its quick mode: it runs and measures each
figure. As with the main benchmark, the figures' values are not judged here;
what is exact by design (the events of one countdown) is."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from conftest import ROOT, declared_with_prefix, require_tool

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def status(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_tool("rabbitmqctl")
    output = tmp_path_factory.mktemp("bench-status")
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "status.py"), "--quick", f"--output-dir={output}"],
        cwd=ROOT,
        check=True,
        timeout=240,
    )
    results: dict[str, Any] = json.loads((output / "status-quick.json").read_text())
    return results


def test_a_10_second_countdown_makes_12_events_in_fewer_messages(status: dict[str, Any]) -> None:
    events = status["figures"]["events"]

    # queued, started, progress at 9..1 remaining, succeeded.
    assert events["events_per_task"] == 12
    assert (events["queued_per_task"], events["started_per_task"], events["succeeded_per_task"]) == (1, 1, 1)
    assert events["progress_per_task"] == 9
    # Tasks running at once share their batches.
    assert events["messages_per_task"] < events["events_per_task"]


def test_every_watched_tick_reaches_the_sse_client(status: dict[str, Any]) -> None:
    latency = status["figures"]["latency"]

    assert latency["samples"] == latency["watchers"] * 9
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"]


def test_remembering_10000_tasks_is_measured_on_the_web_process(status: dict[str, Any]) -> None:
    memory = status["figures"]["memory"]

    assert memory["web_pss_after_mib"] > memory["web_pss_before_mib"] > 0
    assert memory["board_mib_per_10000_finished"] > 0


def test_nothing_is_left_declared(status: dict[str, Any]) -> None:
    prefixes = status["made"]["queue_prefixes"]

    assert prefixes
    for kind in ("queues", "exchanges"):
        assert declared_with_prefix(kind, prefixes) == [], kind
