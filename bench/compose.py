"""First run with compose: `compose up` (images built) → first 202, and `compose down` → everything gone.

    uv run python bench/compose.py            # 3 runs; writes bench/results/compose.json

Runs compose.yaml with compose.host.yaml through podman-compose, as
tests/test_compose.py does (this machine has no usable bridge network and no
registry: RABBITMQ_IMAGE and BASE_IMAGE name local images). The images are
built once before the first run and not timed. `down -v` deletes the broker's
volume too, so that "gone" means no container, pod, volume or network left.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from harness import BENCH, ROOT, free_port
from run import say

OFFICIAL_RABBITMQ = "docker.io/library/rabbitmq:4.0-management"


def compose(project: str, env: dict[str, str], *args: str, check: bool = True) -> None:
    command = [str(Path(sys.executable).parent / "podman-compose"), "-p", project]
    command += ["-f", "compose.yaml", "-f", "compose.host.yaml"]
    command += ["--podman-build-args=--network host --pull=never", "--podman-run-args=--pull=never", *args]
    subprocess.run(command, cwd=ROOT, env=env, check=check, capture_output=True, timeout=900)


def leftovers(project: str) -> list[str]:
    found = []
    for kind in ("container", "volume", "network"):
        listing = ["podman", kind, "ls", "-q", "--filter", f"label=io.podman.compose.project={project}"]
        found += subprocess.run(listing, check=True, capture_output=True, text=True).stdout.split()
    pods = ["podman", "pod", "ls", "-q", "--filter", f"name=^pod_{project}$"]
    return found + subprocess.run(pods, check=True, capture_output=True, text=True).stdout.split()


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def one_run(project: str, env: dict[str, str]) -> dict[str, float]:
    env = env | {
        "ONEBOX_PORT": str(free_port()),
        "RABBITMQ_PORT": str(free_port()),
        "RABBITMQ_DIST_PORT": str(free_port()),
        "RABBITMQ_MANAGEMENT_PORT": str(free_port()),
        "RABBITMQ_NODENAME": f"{project}@localhost",
    }
    url = f"http://127.0.0.1:{env['ONEBOX_PORT']}/tasks"
    try:
        started = time.monotonic()
        compose(project, env, "up", "-d")
        up_returned = time.monotonic() - started
        broker_listening = None
        deadline = started + 120
        while True:
            if broker_listening is None and port_open(int(env["RABBITMQ_PORT"])):
                broker_listening = time.monotonic() - started
            try:
                if httpx.post(url, json={"seconds": 1}, timeout=2).status_code == 202:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("no 202 within 120 s")
            time.sleep(0.1)
        first_202 = time.monotonic() - started
        time.sleep(2)  # the countdown runs out, as in a first try
        stopping = time.monotonic()
        compose(project, env, "down", "-v")
        while leftovers(project):
            time.sleep(0.1)
        return {
            "up_to_first_202_s": round(first_202, 2),
            "up_command_s": round(up_returned, 2),
            "up_to_broker_listening_s": round(broker_listening or first_202, 2),
            "down_to_gone_s": round(time.monotonic() - stopping, 2),
        }
    finally:
        compose(project, env, "down", "-v", "-t", "0", check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "compose.json")
    args = parser.parse_args()
    env = dict(os.environ)
    env.setdefault("RABBITMQ_IMAGE", OFFICIAL_RABBITMQ)
    project = f"onebox-bench-{uuid.uuid4().hex[:8]}"
    say("building the images (not timed)")
    compose(project, env, "build")
    runs = []
    try:
        for number in range(args.runs):
            runs.append(one_run(project, env))
            say(f"run {number + 1}: {runs[-1]}")
    finally:
        subprocess.run(["podman", "rmi", f"localhost/{project}_onebox"], check=False, capture_output=True)
    medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    podman = subprocess.run(["podman", "--version"], check=True, capture_output=True, text=True).stdout.strip()
    result: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "podman": podman,
        "rabbitmq_image": env["RABBITMQ_IMAGE"],
        "base_image": env.get("BASE_IMAGE", "(Containerfile default)"),
        "runs": runs,
        "medians": medians,
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    say(f"medians: {medians}")


if __name__ == "__main__":
    main()
