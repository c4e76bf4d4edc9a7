"""The benchmark command, in its quick mode: it runs, measures every figure
for every stack, loses no acknowledged message and leaves nothing behind.

The figures themselves are not judged here: on a shared machine they move
too much for a test; bench/results/ and the README hold the full runs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import ROOT, declared_with_prefix, require_tool

FIGURES = ("enqueue", "enqueue_delayed", "pickup", "connections", "memory", "cold_start", "concurrency")
LEVELS = ("1", "16", "64")
# The first test waits for the whole quick run (about two minutes).
pytestmark = pytest.mark.timeout(480)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    require_tool("wrk")
    require_tool("rabbitmqctl")
    output = tmp_path_factory.mktemp("bench")
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", f"--output-dir={output}"],
        cwd=ROOT,
        check=True,
        timeout=420,
    )
    return json.loads((output / "quick.json").read_text()), output


def test_every_figure_is_measured_for_onebox_and_the_comparison(bench: tuple[dict[str, Any], Path]) -> None:
    figures = bench[0]["figures"]

    assert set(FIGURES) <= set(figures)
    for figure in FIGURES:
        assert {"onebox", "comparison"} <= set(figures[figure]), figure
    assert set(figures["enqueue"]) == {"onebox", "comparison", "raw", "bare"}
    assert set(figures["enqueue_delayed"]) == {"onebox", "comparison", "raw"}
    for figure in ("enqueue", "enqueue_delayed"):
        for stack, levels in figures[figure].items():
            assert tuple(levels) == LEVELS, (figure, stack)
            for clients, result in levels.items():
                assert result["accepted"] > 0, (figure, stack, clients)
                assert 0 < result["p50_ms"] <= result["p99_ms"], (figure, stack, clients)


def test_no_acknowledged_message_is_missing_from_the_queue(bench: tuple[dict[str, Any], Path]) -> None:
    results = bench[0]

    for figure in ("enqueue", "enqueue_delayed"):
        for stack, levels in results["runs"][0][figure].items():
            if stack == "bare":
                continue
            for clients, result in levels.items():
                # wrk leaves no request unanswered (bench/post.lua), so the
                # queue holds exactly one message per 2xx or confirm.
                assert result["queued"] == result["accepted"], (figure, stack, clients)
    assert {stack: totals["missing"] for stack, totals in results["delivery"].items()} == {
        "onebox": 0,
        "comparison": 0,
        "raw": 0,
    }


def test_onebox_serves_the_load_without_errors(bench: tuple[dict[str, Any], Path]) -> None:
    for figure in ("enqueue", "enqueue_delayed"):
        for clients, result in bench[0]["figures"][figure]["onebox"].items():
            assert (result["refused"], result["errors"]) == (0, 0), (figure, clients)


def test_the_rate_limiters_cost_is_measured_with_it_off_and_on(bench: tuple[dict[str, Any], Path]) -> None:
    limiter = bench[0]["figures"]["rate_limiter"]

    assert set(limiter) == {"off", "on"}
    for state, result in limiter.items():
        assert result["accepted"] > 0, state
        # Every request from an address of its own: the limiter counts and never refuses.
        assert (result["refused"], result["errors"], result["missing"]) == (0, 0, 0), state


def test_the_metrics_cost_is_measured_off_and_on_and_the_endpoint_is_timed(bench: tuple[dict[str, Any], Path]) -> None:
    metrics = bench[0]["figures"]["metrics"]

    assert set(metrics["enqueue"]) == {"off", "on"}
    for state, levels in metrics["enqueue"].items():
        for clients, result in levels.items():
            assert result["accepted"] > 0 and result["cpu_us_per_request"] > 0, (state, clients)
            assert (result["refused"], result["errors"], result["missing"]) == (0, 0, 0), (state, clients)
    endpoint = metrics["endpoint"]
    assert 0 < endpoint["p50_ms"] <= endpoint["p99_ms"]
    assert endpoint["samples"] > 0 and endpoint["bytes"] > 0


def test_connections_and_memory_are_counted_per_process(bench: tuple[dict[str, Any], Path]) -> None:
    connections, memory = bench[0]["figures"]["connections"]["onebox"], bench[0]["figures"]["memory"]["onebox"]

    for phase in ("idle", "peak"):
        assert {"supervisord", "web", "worker"} <= set(memory[phase]["processes"])
        assert 0 < memory[phase]["pss_mib"] < memory[phase]["rss_mib"]
    idle = memory["idle"]
    assert connections["idle"]["total"] == sum(connections["idle"]["processes"].values()) > 0
    assert idle["pss_mib"] == pytest.approx(sum(one["pss_mib"] for one in idle["processes"].values()))
    # At peak each figure is the highest sampled: no process peaks above the whole.
    peak = memory["peak"]
    assert connections["peak"]["total"] <= sum(connections["peak"]["processes"].values())
    assert peak["pss_mib"] <= sum(one["pss_mib"] for one in peak["processes"].values()) + 1e-6


def test_the_documented_configuration_runs_every_posted_countdown_at_once(
    bench: tuple[dict[str, Any], Path],
) -> None:
    at_once = bench[0]["figures"]["concurrency"]

    assert at_once["onebox"]["running"] == at_once["onebox"]["posted"] == 500
    # Dramatiq's defaults: processes x 8 threads.
    assert at_once["comparison"]["running"] == at_once["comparison"]["settings"]["processes"] * 8


def test_cold_start_and_pickup_are_timed(bench: tuple[dict[str, Any], Path]) -> None:
    figures = bench[0]["figures"]

    cold = figures["cold_start"]["onebox"]
    assert 0 < cold["spawn_to_first_202_s"] < cold["launch_to_first_202_s"]
    assert figures["cold_start"]["comparison"]["launch_to_first_202_s"] > 0
    for stack in ("onebox", "comparison"):
        assert 0 < figures["pickup"][stack]["p50_ms"] <= figures["pickup"][stack]["p99_ms"]


def test_every_target_is_judged_on_a_measured_figure(bench: tuple[dict[str, Any], Path]) -> None:
    targets = bench[0]["targets"]

    assert len(targets) == 15  # issue 19's nine and six guarantees
    for target in targets:
        assert isinstance(target["met"], bool), target
        assert math.isfinite(target["measured"]), target


def test_results_describe_the_machine_and_package_versions(bench: tuple[dict[str, Any], Path]) -> None:
    machine = bench[0]["machine"]

    assert machine["cores"] >= 1
    assert machine["memory_gib"] > 0
    assert machine["cpu"] and machine["kernel"] and machine["python"] and machine["rabbitmq"]
    assert machine["wrk"].startswith("wrk")
    assert {"granian", "litestar", "aiormq", "dramatiq", "fastapi", "uvicorn"} <= set(machine["packages"])


def test_the_chart_and_the_readme_table_are_drawn(bench: tuple[dict[str, Any], Path]) -> None:
    output = bench[1]

    assert (output / "quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (output / "quick.md").read_text()
    assert "![onebox against the comparison stack and the ceilings](quick.png)" in table
    assert table.count("| onebox | 64 |") == 2


def test_nothing_is_left_running_or_declared(bench: tuple[dict[str, Any], Path]) -> None:
    made = bench[0]["made"]
    plain = ROOT / "bench" / "plain"

    leftovers = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        command = " ".join(process.info["cmdline"] or [])
        if made["scratch"] in command or process.info["cwd"] == str(plain):
            leftovers.append(command)
    assert leftovers == []
    assert made["queue_prefixes"]
    for kind in ("queues", "exchanges"):
        assert declared_with_prefix(kind, made["queue_prefixes"]) == [], kind
