"""What the metrics cost the web process per request, without server or broker noise:

    uv run python bench/metrics_cpu.py

The app (main.create_app) answers GET /healthz through its ASGI interface in
this process, metrics off and on in turn, 12 rounds each; the figure is the
CPU time per request and the median difference of neighbouring rounds. The
enqueue benchmark (bench/run.py) measures the whole stack, where on a shared
machine the noise can be larger than this difference.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = 5000
ROUNDS = 12


async def call(app: Any) -> None:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/healthz",
        "raw_path": b"/healthz",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_: dict[str, Any]) -> None:
        pass

    await app(scope, receive, send)


async def cpu_per_request(app: Any) -> float:
    for _ in range(REQUESTS // 10):
        await call(app)
    began = time.process_time()
    for _ in range(REQUESTS):
        await call(app)
    return (time.process_time() - began) / REQUESTS * 1e6


async def measure() -> None:
    import main  # noqa: PLC0415 - after the multiprocess directory is set, as in a granian worker
    import tasks  # noqa: PLC0415

    figures: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(ROUNDS):
        for enabled in (False, True):
            settings = msgspec.structs.replace(tasks.settings, metrics=enabled)
            figures[enabled].append(await cpu_per_request(main.create_app(*main.web_parts(settings))))
    differences = [on - off for off, on in zip(figures[False], figures[True], strict=True)]
    print(f"metrics off: {statistics.median(figures[False]):.0f} µs CPU per request (median of {ROUNDS} rounds)")
    print(f"metrics on:  {statistics.median(figures[True]):.0f} µs CPU per request")
    print(f"difference:  {statistics.median(differences):.0f} µs (median of neighbouring rounds)")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="onebox-metrics-cpu-") as directory:
        # As run_web sets it: prometheus_client reads it as it loads.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        sys.path.insert(0, str(ROOT))
        asyncio.run(measure())
