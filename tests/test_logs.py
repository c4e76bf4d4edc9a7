"""The stack's output stays whole line by line, wherever it goes: a file, a pipe, a terminal.

supervisord and each program write through descriptors of their own; when the
output is a file, every one of them must append, or lines overwrite each other.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import time
from pathlib import Path

import httpx
from conftest import ROOT, Process, free_port, require_tool, stack_env, wait_http

# The README's command for people who have a RabbitMQ.
RUN = "uv run python supervise.py -c supervisord.conf"

# Every line the stack writes has one of these shapes.
LINE_SHAPES = {
    "supervisord": re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (CRIT|ERRO|WARN|INFO|DEBG|TRAC|BLAT) \S.*$"),
    "dramatiq or onebox": re.compile(
        r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\] \[PID \d+\] (\[[^]]+\] )?\[[^]]+\] \[[A-Z]+\] \S.*$"
    ),
    "granian": re.compile(r"^\[(DEBUG|INFO|WARNING|ERROR|CRITICAL)\] \S.*$"),
}


def shape_of(line: str) -> str | None:
    return next((name for name, shape in LINE_SHAPES.items() if shape.match(line)), None)


def test_the_readme_run_command_is_the_one_tested() -> None:
    assert f"\n{RUN}\n" in (ROOT / "README.md").read_text()


def test_output_redirected_to_a_file_keeps_every_line_whole(tmp_path: Path, queue_name: str) -> None:
    require_tool("uv")
    log, port = tmp_path / "onebox.log", free_port()
    stack = Process(
        ["bash", "-c", f"exec {RUN} > {shlex.quote(str(log))}"], stack_env(PORT=port, QUEUE_NAME=queue_name)
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=30)
        task_id = httpx.post(f"http://127.0.0.1:{port}/tasks", json={"seconds": 2}).json()["id"]
        # supervisord writes its own lines after the programs' (RUNNING 10 s after
        # the spawn, the stop), where an overwrite would show.
        wait_for_text(log, "success: worker entered RUNNING state")
        wait_for_text(log, f"task {task_id} done seconds=2")
        # Ctrl-C, as a terminal sends it: to the whole foreground process group.
        os.killpg(stack.popen.pid, signal.SIGINT)
        assert stack.wait(timeout=40) == 0
    finally:
        stack.stop()

    text = log.read_text()
    lines = text.splitlines()
    assert "\0" not in text
    assert [line for line in lines if shape_of(line) is None] == []
    countdown = [line.split(f"task {task_id} ", 1)[1] for line in lines if f"task {task_id} " in line]
    assert countdown == ["started seconds=2 attempt=1 redelivered=no", "remaining=1", "remaining=0", "done seconds=2"]
    for whole in ("spawned: 'web'", "spawned: 'worker'", "Listening at: http://", "Worker process is ready for action"):
        assert any(whole in line for line in lines), whole
    for program in ("web", "worker"):
        assert any(line.endswith(f"INFO stopped: {program} (exit status 0)") for line in lines), program


def wait_for_text(path: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in {path} within {timeout} s:\n{path.read_text()[-4000:]}")
        time.sleep(0.1)
