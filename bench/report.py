"""The issue's targets, judged on one run's medians, and the tables of docs/benchmarks.md.

Every target is a ratio within the run or a fixed budget (connections,
MiB): these machines vary 2x from one day to the next, the ratios do not.
"""

from __future__ import annotations

from typing import Any

STACKS = {"onebox": "onebox", "comparison": "comparison", "raw": "raw publish ceiling", "bare": "bare web ceiling"}


def _target(name: str, measured: float, required: str, met: bool, unit: str = "") -> dict[str, Any]:
    return {"target": name, "measured": round(measured, 3), "unit": unit, "required": required, "met": met}


def targets(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 19's targets (onebox as deployed: metrics and the default rate
    limit on), then the guarantees that hold by construction."""
    enqueue = figures["enqueue"]
    one, comparison, raw, bare = (enqueue[name] for name in ("onebox", "comparison", "raw", "bare"))
    low, top = min(one, key=int), max(one, key=int)
    memory = figures["memory"]["onebox"]["idle"]["pss_mib"]
    memory_comparison = figures["memory"]["comparison"]["idle"]["pss_mib"]
    cold = figures["cold_start"]["onebox"]["launch_to_first_202_s"]
    cold_comparison = figures["cold_start"]["comparison"]["launch_to_first_202_s"]
    ceilings = bare[top]["cpu_us_per_request"] + raw[top]["cpu_us_per_request"]
    limiter, metrics = figures["rate_limiter"], figures["metrics"]["enqueue"]
    limiter_cost = limiter["on"]["cpu_us_per_request"] - limiter["off"]["cpu_us_per_request"]
    metrics_cost = metrics["on"][top]["cpu_us_per_request"] - metrics["off"][top]["cpu_us_per_request"]
    connections = figures["connections"]["onebox"]
    pickup, pickup_comparison = figures["pickup"]["onebox"], figures["pickup"]["comparison"]
    at_once = figures["concurrency"]["onebox"]
    ratios = [
        ("cold start, launch -> first 202 / comparison's", cold / cold_comparison, "<= 1.2", 1.2, "le"),
        ("PSS, idle / comparison's", memory / memory_comparison, "<= 0.75", 0.75, "le"),
        (f"req/s at {low} client / raw publish ceiling's", one[low]["rps"] / raw[low]["rps"], ">= 0.8", 0.8, "ge"),
        (f"p99 at {low} client / comparison's", one[low]["p99_ms"] / comparison[low]["p99_ms"], "<= 1", 1, "le"),
        (f"req/s at {top} clients / comparison's", one[top]["rps"] / comparison[top]["rps"], ">= 3", 3, "ge"),
        (
            f"CPU per request at {top} clients / (bare web + raw publish ceilings)",
            one[top]["cpu_us_per_request"] / ceilings,
            "<= 1.3",
            1.3,
            "le",
        ),
    ]
    return [
        *(
            _target(name, value, required, value <= bound if way == "le" else value >= bound, "x")
            for name, value, required, bound, way in ratios
        ),
        _target("PSS, idle", memory, "<= 100", memory <= 100, "MiB"),
        _target("rate limiter, CPU per request (on - off)", limiter_cost, "<= 30", limiter_cost <= 30, "µs"),
        _target(
            f"metrics, CPU per request at {top} clients (on - off)", metrics_cost, "<= 30", metrics_cost <= 30, "µs"
        ),
        _target("AMQP connections, idle", connections["idle"]["total"], "<= 3", connections["idle"]["total"] <= 3),
        _target("AMQP connections, peak", connections["peak"]["total"], "<= 3", connections["peak"]["total"] <= 3),
        _target(
            "pickup p99 / comparison's",
            pickup["p99_ms"] / pickup_comparison["p99_ms"],
            "<= 1",
            pickup["p99_ms"] <= pickup_comparison["p99_ms"],
            "x",
        ),
        _target("countdowns running at once", at_once["running"], ">= 500", at_once["running"] >= 500),
        _target("PSS with them running", at_once["pss_mib"], "< 256", at_once["pss_mib"] < 256, "MiB"),
        _target(
            "unacknowledged messages on the worker's connection",
            at_once["unacknowledged"],
            "<= 1000",
            at_once["unacknowledged"] <= 1000,
        ),
    ]


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def markdown(results: dict[str, Any], chart_name: str) -> str:
    """docs/benchmarks.md's tables, filled from the results."""
    figures, plan, box = results["figures"], results["plan"], results["machine"]
    lines = [
        f"Medians of {plan['runs']} run(s), `{results['command']}`, {results['started_at']}, "
        f"{results['elapsed_s']:.0f} s. {box['cpu']}, {box['cores']} cores, {box['memory_gib']} GiB, "
        f"Linux {box['kernel']}, Python {box['python']}, RabbitMQ {box['rabbitmq']}, {box['wrk']}.",
        "",
        f"![onebox against the comparison stack and the ceilings]({chart_name})",
        "",
    ]
    for figure, title in (
        ("enqueue", "Enqueue, broker on loopback, worker paused"),
        ("enqueue_delayed", f"Enqueue, broker {plan['delay_ms']:g} ms away each way, worker paused"),
    ):
        rounds = figures[figure]
        lines += [
            f"**{title}** ({plan['round_seconds']:g} s per round; 2xx = 2xx responses, or confirms for raw)",
            "",
            "| stack | clients | req/s | p50 ms | p99 ms | vs comparison | vs raw | CPU µs/req | 2xx | in queue |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, levels in rounds.items():
            for clients, one in levels.items():
                comparison, raw = rounds["comparison"][clients]["rps"], rounds["raw"][clients]["rps"]
                queued = f"{one['queued']:.0f}" if "queued" in one else "-"
                lines.append(
                    f"| {STACKS[name]} | {clients} | {one['rps']:,.0f} | {one['p50_ms']:.1f} | {one['p99_ms']:.1f} "
                    f"| {_ratio(one['rps'], comparison)} | {_ratio(one['rps'], raw)} | {one['cpu_us_per_request']:.0f} "
                    f"| {one['accepted']:.0f} | {queued} |"
                )
        lines.append("")
    limiter = figures["rate_limiter"]
    lines += [
        "**The rate limiter's cost** (onebox, 64 clients, worker paused, 8,000 client addresses in turn; "
        "on: the default limit, 60 per client per minute)",
        "",
        "| limiter | req/s | p99 ms | CPU µs/req | refused |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {state} | {one['rps']:,.0f} | {one['p99_ms']:.1f} | {one['cpu_us_per_request']:.0f} "
            f"| {one['refused']:.0f} |"
            for state, one in limiter.items()
        ),
        "",
    ]
    metrics = figures["metrics"]
    endpoint = metrics["endpoint"]
    lines += [
        "**The metrics' cost** (onebox, worker paused; off: `METRICS=false`, on: the default)",
        "",
        "| metrics | clients | req/s | p99 ms | CPU µs/req |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {state} | {clients} | {one['rps']:,.0f} | {one['p99_ms']:.1f} | {one['cpu_us_per_request']:.0f} |"
            for state, levels in metrics["enqueue"].items()
            for clients, one in levels.items()
        ),
        "",
        f"The metrics endpoint answers in {endpoint['p50_ms']:.1f} ms (p50), {endpoint['p99_ms']:.1f} ms (p99), "
        f"{endpoint['samples']:.0f} samples in {endpoint['bytes']:,.0f} bytes; "
        f"{endpoint['cpu_ms_per_scrape']:.1f} ms of CPU per scrape.",
        "",
        "**The whole stack** (onebox: supervisord, web, worker; comparison: uvicorn, dramatiq)",
        "",
        "| figure | onebox | comparison |",
        "|---|---:|---:|",
    ]
    rows = [
        ("pickup p50, POST sent → actor starts (ms)", "pickup", "p50_ms", "{:.1f}"),
        ("pickup p99 (ms)", "pickup", "p99_ms", "{:.1f}"),
        ("cold start, launch → first 202 (s)", "cold_start", "launch_to_first_202_s", "{:.2f}"),
    ]
    for label, figure, key, form in rows:
        one, other = figures[figure]["onebox"][key], figures[figure]["comparison"][key]
        lines.append(f"| {label} | {form.format(one)} | {form.format(other)} |")
    spawn = figures["cold_start"]["onebox"]["spawn_to_first_202_s"]
    lines.append(f"| cold start, supervisord starts web → first 202 (s) | {spawn:.2f} | - |")
    for phase in ("idle", "peak"):
        one, other = figures["connections"]["onebox"][phase], figures["connections"]["comparison"][phase]
        lines.append(f"| AMQP connections, {phase} | {one['total']:.0f} | {other['total']:.0f} |")
    for phase in ("idle", "peak"):
        one, other = figures["memory"]["onebox"][phase], figures["memory"]["comparison"][phase]
        lines.append(f"| PSS, {phase} (MiB) | {one['pss_mib']:.1f} | {other['pss_mib']:.1f} |")
        lines.append(f"| RSS, {phase} (MiB) | {one['rss_mib']:.1f} | {other['rss_mib']:.1f} |")
    one, other = figures["concurrency"]["onebox"], figures["concurrency"]["comparison"]
    posted = f"{results['plan']['countdowns']} countdowns posted: running at once"
    lines.append(f"| {posted} | {one['running']:.0f} | {other['running']:.0f} |")
    lines.append(f"| PSS with them running (MiB) | {one['pss_mib']:.1f} | {other['pss_mib']:.1f} |")
    settings = " ".join(f"{key}={value}" for key, value in one["settings"].items())
    lines += ["", f"Countdowns at once: onebox with `{settings}`; the comparison with Dramatiq's defaults.", ""]
    lines += ["**Each process's share** (PSS MiB idle / peak; AMQP connections idle / peak)", ""]
    lines += [
        "| stack | process | PSS idle | PSS peak | connections idle | connections peak |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in ("onebox", "comparison"):
        memory, connections = figures["memory"][name], figures["connections"][name]
        for role, idle in memory["idle"]["processes"].items():
            peak = memory["peak"]["processes"].get(role, {"pss_mib": 0.0})
            lines.append(
                f"| {name} | {role} | {idle['pss_mib']:.1f} | {peak['pss_mib']:.1f} "
                f"| {connections['idle']['processes'][role]:.0f} "
                f"| {connections['peak']['processes'].get(role, 0):.0f} |"
            )
    lines += ["", "**Targets**", "", "| target | measured | required | met |", "|---|---:|---:|---|"]
    for target in results["targets"]:
        lines.append(
            f"| {target['target']} | {target['measured']:g} {target['unit']} | {target['required']} "
            f"| {'yes' if target['met'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"
