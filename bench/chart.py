"""The README's chart: throughput and p99 against clients, memory and connections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from report import STACKS

COLOURS = {"onebox": "tab:blue", "comparison": "tab:red", "raw": "tab:gray", "bare": "tab:green"}


def draw(results: dict[str, Any], path: Path) -> None:
    figures = results["figures"]
    figure, ((speed, latency), (memory, connections)) = plt.subplots(2, 2, figsize=(12, 9))
    delay = results["plan"]["delay_ms"]
    for key, style, where in (("enqueue", "-", "loopback"), ("enqueue_delayed", "--", f"{delay:g} ms away")):
        for name, levels in figures[key].items():
            clients = [int(level) for level in levels]
            label = f"{STACKS[name]}, {where}" if name != "bare" else STACKS[name]
            for axes, metric in ((speed, "rps"), (latency, "p99_ms")):
                values = [one[metric] for one in levels.values()]
                axes.plot(clients, values, style, marker="o", color=COLOURS[name], label=label)
    speed.set(title="Enqueue throughput", xlabel="concurrent clients", ylabel="2xx per second (raw: confirms)")
    latency.set(title="Enqueue latency, p99", xlabel="concurrent clients", ylabel="ms", yscale="log")
    levels = [int(level) for level in figures["enqueue"]["onebox"]]
    for axes in (speed, latency):
        axes.set_xscale("log", base=2)
        axes.set_xticks(levels, [str(level) for level in levels])
        axes.grid(alpha=0.3)
    speed.legend(fontsize=8)

    stacks = ["onebox", "comparison"]
    phases = ["idle", "peak"]
    width = 0.35
    for offset, phase in enumerate(phases):
        positions = [index + (offset - 0.5) * width for index in range(len(stacks))]
        pss = [figures["memory"][name][phase]["pss_mib"] for name in stacks]
        count = [figures["connections"][name][phase]["total"] for name in stacks]
        for axes, values in ((memory, pss), (connections, count)):
            bars = axes.bar(positions, values, width, label=phase, alpha=0.6 + 0.4 * offset, color="tab:purple")
            axes.bar_label(bars, fmt="%.0f", fontsize=8)
    memory.axhline(100, color="black", linestyle=":", label="onebox target, idle")
    memory.axhline(130, color="black", linestyle="--", label="onebox target, peak")
    memory.set(title="Memory of the process tree (PSS)", ylabel="MiB")
    connections.axhline(3, color="black", linestyle=":", label="onebox target")
    connections.set(title="AMQP connections", ylabel="established")
    for axes in (memory, connections):
        axes.set_xticks(range(len(stacks)), stacks)
        axes.legend(fontsize=8)
    machine = results["machine"]
    figure.suptitle(
        f"onebox benchmarks: medians of {results['plan']['runs']} run(s); "
        f"{machine['cpu']}, {machine['cores']} cores, Python {machine['python']}",
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
