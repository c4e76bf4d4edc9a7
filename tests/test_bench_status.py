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

    # What 2,000 tasks add is within the noise of a shared machine; what a
    # board of finished tasks allocates is not.
    assert memory["web_pss_after_mib"] > 0
    assert memory["web_pss_before_mib"] > 0
    assert 1 < memory["board_mib_per_10000_finished"] < 50


def test_a_web_start_rebuilds_its_board_from_every_task_in_the_stream(status: dict[str, Any]) -> None:
    rebuild = status["figures"]["rebuild"]
    history = rebuild["finished"] + rebuild["waiting"]

    assert rebuild["empty"]["tasks_rebuilt"] == 0
    assert rebuild["first"]["tasks_rebuilt"] == history
    assert rebuild["second"]["tasks_rebuilt"] == history + rebuild["trailing"]


def test_a_web_start_without_a_snapshot_reads_every_message_of_the_window(status: dict[str, Any]) -> None:
    rebuild = status["figures"]["rebuild"]

    # Looking for a snapshot: its marker in the last 10 minutes, then both
    # markers in the whole stream; then its marker in the events stream, and
    # the cut it writes at once for the snapshot it found none of.
    assert rebuild["empty"]["messages_read"] == 1 + 2 + 1 + 1
    assert rebuild["first"]["messages_read"] == rebuild["messages_written"] + 1 + 2 + 1 + 1
    # Batched as real traffic: fewer messages than events, more than one per task.
    assert rebuild["finished"] < rebuild["messages_written"] < rebuild["finished"] * 12


def test_a_web_start_reads_the_snapshot_and_the_events_since_its_cut(status: dict[str, Any]) -> None:
    rebuild = status["figures"]["rebuild"]
    parts = rebuild["first"]["snapshot_messages_written"]

    # The snapshot's parts and the markers in its stream (the first start's
    # two, its own); in the events stream: the cut, what came since, its marker.
    assert parts >= 1
    assert rebuild["second"]["messages_read"] == parts + 2 + 1 + 1 + rebuild["trailing_messages"] + 1


def test_decoding_and_applying_the_events_is_a_part_of_the_rebuild(status: dict[str, Any]) -> None:
    rebuild = status["figures"]["rebuild"]

    assert 0 < rebuild["apply_cpu_s"] < rebuild["first"]["cpu_s_to_rebuilt"]


def test_a_web_start_is_ready_only_once_its_board_is_rebuilt(status: dict[str, Any]) -> None:
    rebuild = status["figures"]["rebuild"]

    for start in (rebuild["empty"], rebuild["first"], rebuild["second"]):
        assert 0 < start["launch_to_rebuilt_s"] <= start["launch_to_ready_s"]
        assert 0 < start["cpu_s_to_rebuilt"] < start["launch_to_rebuilt_s"] * 2  # two cores at most
        assert start["web_pss_mib"] > 0


def test_nothing_is_left_declared(status: dict[str, Any]) -> None:
    prefixes = status["made"]["queue_prefixes"]

    assert prefixes
    for kind in ("queues", "exchanges"):
        assert declared_with_prefix(kind, prefixes) == [], kind
