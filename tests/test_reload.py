"""RELOAD=true: the web server and the worker restart on a change of main.py, tasks.py or settings.toml.

Each test runs the stack from a copy of the service's files, which it then edits.
"""

from __future__ import annotations

import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
from conftest import ROOT, Process, free_port, stack_env, wait_http

SERVICE_FILES = ("main.py", "tasks.py", "supervise.py", "settings.toml", "supervisord.conf", "index.html")


def start_reloading_stack(stacks: list[Process], directory: Path, queue_name: str) -> tuple[Process, str]:
    port = free_port()
    env = stack_env(PORT=port, QUEUE_NAME=queue_name, RELOAD="true")
    env.pop("LOG_LEVEL", None)  # the tests change it in settings.toml
    supervise = [sys.executable, str(directory / "supervise.py"), "-c", str(directory / "supervisord.conf")]
    stack = Process(supervise, env, cwd=directory)
    stacks.append(stack)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/readyz", timeout=40)
    stack.wait_for(r"Worker process is ready for action", timeout=40)
    return stack, base


def copy_of_the_service(directory: Path, **settings: str) -> Path:
    for name in SERVICE_FILES:
        shutil.copy(ROOT / name, directory / name)
    edit_settings(directory, **settings)
    return directory


def edit_settings(directory: Path, **settings: str) -> None:
    path = directory / "settings.toml"
    lines = path.read_text().splitlines()
    for key, value in settings.items():
        [index] = [i for i, line in enumerate(lines) if line.startswith(f"{key} = ")]
        lines[index] = f"{key} = {value}"
    path.write_text("\n".join(lines) + "\n")


def eventually(check: Callable[[], None], timeout: float = 60) -> None:
    """Call ``check`` until it stops raising AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except (AssertionError, httpx.HTTPError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_a_settings_change_restarts_web_and_worker_and_both_serve_it(
    queue_name: str, stacks: list[Process], tmp_path: Path
) -> None:
    directory = copy_of_the_service(tmp_path, log_level='"WARNING"')
    stack, base = start_reloading_stack(stacks, directory, queue_name)
    start = len(stack.lines)

    edit_settings(directory, max_seconds="7", log_level='"INFO"')

    def web_serves_the_new_limit() -> None:
        response = httpx.post(f"{base}/tasks", json={"seconds": 8}, timeout=5)
        assert response.status_code == 400
        assert "<= 7" in response.json()["detail"]

    eventually(web_serves_the_new_limit)
    stack.wait_for(r"Sending signal 'SIGHUP' to subprocesses", start=start)
    ready = stack.wait_for(r"Worker process is ready for action", start=start, timeout=60)
    assert ready
    task_id = httpx.post(f"{base}/tasks", json={"seconds": 1}).json()["id"]
    # At WARNING, before the change, the worker would not log the countdown.
    stack.wait_for(rf"task {task_id} started seconds=1", start=start, timeout=30)
    stack.wait_for(rf"task {task_id} done seconds=1", start=start, timeout=30)


def test_a_code_change_restarts_web_and_worker_on_the_new_code_and_other_files_do_not(
    queue_name: str, stacks: list[Process], tmp_path: Path
) -> None:
    directory = copy_of_the_service(tmp_path)
    stack, _ = start_reloading_stack(stacks, directory, queue_name)
    start = len(stack.lines)
    marker = f"reloaded-{uuid.uuid4().hex[:8]}"

    (directory / "notes.txt").write_text("not watched\n")
    (directory / "index.html").write_text((directory / "index.html").read_text() + "\n")
    with (directory / "tasks.py").open("a") as tasks:
        # Says which program imported the new code: granian's or dramatiq's.
        tasks.write(f'\nprint("{marker}", Path(sys.argv[0]).parent.name, flush=True)\n')

    stack.wait_for(rf"^{marker} granian$", start=start, timeout=60)
    stack.wait_for(rf"^{marker} dramatiq$", start=start, timeout=60)
    # Both list the changes they act on.
    changes = "\n".join(stack.lines[start:])
    assert "tasks.py" in changes
    assert "notes.txt" not in changes
    assert "index.html" not in changes
