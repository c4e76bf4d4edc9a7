"""The broker benchmark, in its quick mode: onebox measured on RabbitMQ 3.10
and 4.0.5 in one run, no acknowledged message missing, nothing left behind.

As with the main benchmark, the figures' values are not judged here; the
full run's are in bench/results/brokers.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import ROOT, declared_with_prefix, require_tool

# The quick run takes about a minute, more on a busy machine.
# About 80 s: run with -m slow; CI runs run.py's and status.py's quick modes.
pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    require_tool("wrk")
    require_tool("rabbitmqctl")
    require_tool("podman")
    output = tmp_path_factory.mktemp("bench-brokers")
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "brokers.py"), "--quick", f"--output-dir={output}"],
        cwd=ROOT,
        check=True,
        timeout=270,
    )
    return json.loads((output / "brokers-quick.json").read_text()), output


def test_each_broker_of_the_matrix_is_measured(bench: tuple[dict[str, Any], Path]) -> None:
    results = bench[0]

    assert set(results["figures"]) == {"3.10", "4.0.5"}
    for label, version in results["versions"].items():
        assert version.startswith(label), (label, version)
    for label, figures in results["figures"].items():
        enqueue, pickup = figures["enqueue"], figures["pickup"]
        assert enqueue["clients"] == 64, label
        assert enqueue["rps"] > 0, label
        assert 0 < enqueue["p50_ms"] <= enqueue["p99_ms"], label
        assert pickup["samples"] == results["plan"]["pickups"], label
        assert 0 < pickup["p50_ms"] <= pickup["p99_ms"], label
    # 4.0.5 against 3.10 in rounds run back to back: one ratio per round.
    ratios = results["noise"]["rps_ratio_by_round"]["4.0.5"]
    assert len(ratios) == results["plan"]["runs"]
    assert all(ratio > 0 for ratio in ratios)


def test_every_2xx_is_a_message_in_the_queue(bench: tuple[dict[str, Any], Path]) -> None:
    results = bench[0]

    for label, rounds in results["rounds"].items():
        assert len(rounds) == results["plan"]["runs"], label
        for result in rounds:
            assert result["accepted"] > 0, label
            # wrk leaves no request unanswered (bench/post.lua): with publisher
            # confirms the queue holds exactly one message per 2xx.
            assert result["queued"] == result["accepted"], label


def test_onebox_serves_the_load_without_errors_on_either_broker(bench: tuple[dict[str, Any], Path]) -> None:
    for label, rounds in bench[0]["rounds"].items():
        for result in rounds:
            assert (result["refused"], result["errors"]) == (0, 0), label


def test_the_readme_table_has_a_row_per_broker(bench: tuple[dict[str, Any], Path]) -> None:
    results, output = bench
    table = (output / "brokers-quick.md").read_text()

    assert "| broker | req/s at 64 clients | p50/p99 ms | pickup p50/p99 ms |" in table
    for version in results["versions"].values():
        assert table.count(f"| RabbitMQ {version} |") == 1, version


def test_nothing_is_left_running_or_declared(bench: tuple[dict[str, Any], Path]) -> None:
    made = bench[0]["made"]

    exists = subprocess.run(["podman", "container", "exists", made["container"]], check=False, timeout=60)
    assert exists.returncode == 1, made["container"]
    leftovers = []
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if made["scratch"] in command:
            leftovers.append(command)
    assert leftovers == []
    assert made["queue_prefixes"]
    for kind in ("queues", "exchanges"):
        assert declared_with_prefix(kind, made["queue_prefixes"]) == [], kind
