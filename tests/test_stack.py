"""The whole stack as users run it: supervisord, granian and the worker."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import httpx
import psutil
from conftest import BROKER_PORT, Broker, Process, free_port, program_of, stack_env, start_stack, wait_http


def started_stack(stacks: list[Process], queue_name: str, **settings: str | int) -> tuple[Process, str]:
    port = free_port()
    stack = start_stack(PORT=port, QUEUE_NAME=queue_name, **settings)
    stacks.append(stack)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{stack.tail}") from None
    return stack, base


def test_a_posted_countdown_runs_to_completion(stacks: list[Process], broker: Broker, broker_queue: str) -> None:
    stack, base = started_stack(stacks, broker_queue, CLOUDAMQP_URL=broker.url)

    response = httpx.post(f"{base}/tasks", json={"seconds": 2})

    assert response.status_code == 202
    task_id = response.json()["id"]
    stack.wait_for(rf"task {task_id} started seconds=2 attempt=1 redelivered=no")
    stack.wait_for(rf"task {task_id} remaining=1")
    stack.wait_for(rf"task {task_id} remaining=0")
    stack.wait_for(rf"task {task_id} done seconds=2")


def post_task(base: str, seconds: int) -> str:
    response = httpx.post(f"{base}/tasks", json={"seconds": seconds})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


# Past the grace period a stop spends up to ~6 s in one-second polling loops:
# dramatiq's worker process and its log watcher, supervisord's ticks.
STOP_OVERHEAD = 6


def stop_and_time(stack: Process, sig: int) -> tuple[int, float]:
    started = time.monotonic()
    stack.send_signal(sig)
    code = stack.wait(timeout=40)
    return code, time.monotonic() - started


def test_sigterm_lets_the_running_countdown_finish_and_exits_0(stacks: list[Process], queue_name: str) -> None:
    stack, base = started_stack(stacks, queue_name, STOP_GRACE=10)
    task_id = post_task(base, 3)
    stack.wait_for(rf"task {task_id} started")

    code, elapsed = stop_and_time(stack, signal.SIGTERM)

    assert code == 0
    assert elapsed < 10 + STOP_OVERHEAD
    stack.wait_for(rf"task {task_id} done seconds=3", timeout=0)


def test_sigint_hands_an_unfinished_countdown_back_and_the_next_start_completes_it(
    stacks: list[Process], queue_name: str
) -> None:
    stack, base = started_stack(stacks, queue_name, STOP_GRACE=1)
    task_id = post_task(base, 10)
    stack.wait_for(rf"task {task_id} started")

    code, elapsed = stop_and_time(stack, signal.SIGINT)

    assert code == 0
    assert elapsed < 1 + STOP_OVERHEAD < 10
    assert f"task {task_id} done" not in stack.output
    successor, _ = started_stack(stacks, queue_name)
    successor.wait_for(rf"task {task_id} started seconds=10 attempt=1 redelivered=yes")
    successor.wait_for(rf"task {task_id} done seconds=10", timeout=20)


def test_web_and_worker_stop_together(stacks: list[Process], queue_name: str) -> None:
    stack, _ = started_stack(stacks, queue_name)

    stack.send_signal(signal.SIGTERM)
    stack.wait(timeout=40)

    stopped = stack.wait_for(r"waiting for .*(web, worker|worker, web) to die")
    assert stopped


def test_a_program_that_keeps_crashing_ends_supervisord_with_a_failure(stacks: list[Process], queue_name: str) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        stack = start_stack(PORT=taken.getsockname()[1], QUEUE_NAME=queue_name)
        stacks.append(stack)

        code = stack.wait(timeout=90)

    assert code != 0
    stack.wait_for(r"gave up: web entered FATAL state", timeout=0)
    stack.wait_for(r"stopped: worker \(exit status 0\)", timeout=0)


def test_an_invalid_setting_stops_the_start_with_its_name_and_what_is_expected() -> None:
    result = subprocess.run(
        ["python", "tasks.py", "web"],
        check=False,
        env=stack_env(MAX_SECONDS="0"),
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 1
    assert result.stderr.strip() == "onebox: invalid setting MAX_SECONDS: Expected `int` >= 1"


def test_each_program_holds_its_broker_connections_and_no_more(
    stacks: list[Process], broker: Broker, broker_queue: str
) -> None:
    stack, base = started_stack(stacks, broker_queue, CLOUDAMQP_URL=broker.url)
    stack.wait_for(r"Worker process is ready for action")
    for _ in range(20):
        post_task(base, 1)

    connections = amqp_connections_by_program(stack, broker.port)

    assert connections == {"web": 1, "worker": 2}


def amqp_connections_by_program(stack: Process, port: int) -> dict[str, int]:
    """ESTABLISHED connections to the broker's port per program, summed over its processes."""
    counts: dict[str, int] = {}
    for child in psutil.Process(stack.popen.pid).children():
        name = program_of(" ".join(child.cmdline()))
        if name is None:
            continue
        tree = [child, *child.children(recursive=True)]
        counts[name] = sum(
            1
            for process in tree
            for connection in process.net_connections("tcp")
            if connection.raddr and connection.raddr.port == port and connection.status == "ESTABLISHED"
        )
    return counts


def test_the_broker_password_appears_in_no_output_line_nor_answer(stacks: list[Process], queue_name: str) -> None:
    secret = "Pa55-never-printed"
    port = free_port()
    unreachable = f"amqp://guest:{secret}@127.0.0.1:{free_port()}/"
    stack = start_stack(PORT=port, QUEUE_NAME=queue_name, CLOUDAMQP_URL=unreachable)
    stacks.append(stack)
    wait_http(f"http://127.0.0.1:{port}/healthz")

    stack.wait_for(r"\[onebox\] \[WARNING\] cannot reach the broker at 127.0.0.1:\d+: nothing accepts connections")
    stack.wait_for(r"ConsumerThread.*Consumer encountered a connection error: cannot reach the broker")
    answers = [httpx.post(f"http://127.0.0.1:{port}/tasks", json={"seconds": 1}).text for _ in range(3)]
    stack.send_signal(signal.SIGTERM)
    stack.wait(timeout=40)

    assert secret not in stack.output
    assert all(secret not in answer for answer in answers)


def test_a_refused_login_stops_the_start_without_showing_the_password(stacks: list[Process], queue_name: str) -> None:
    secret = "Pa55-never-printed"
    stack = start_stack(
        PORT=free_port(), QUEUE_NAME=queue_name, CLOUDAMQP_URL=f"amqp://guest:{secret}@127.0.0.1:{BROKER_PORT}/"
    )
    stacks.append(stack)

    assert stack.wait(timeout=90) != 0
    assert "refused the login of user 'guest'" in stack.output
    assert secret not in stack.output


def test_each_program_is_one_process_by_default(stacks: list[Process], queue_name: str) -> None:
    stack, _ = started_stack(stacks, queue_name)
    stack.wait_for(r"Worker process is ready for action")

    programs = [program_of(" ".join(child.cmdline())) for child in psutil.Process(stack.popen.pid).children()]

    assert sorted(filter(None, programs)) == ["web", "worker"]
    for child in psutil.Process(stack.popen.pid).children():
        if program_of(" ".join(child.cmdline())):
            assert child.children() == [], child.cmdline()


def test_with_several_processes_per_program_tasks_run_and_a_killed_main_process_leaves_none_behind(
    stacks: list[Process], queue_name: str
) -> None:
    stack, base = started_stack(stacks, queue_name, WEB_WORKERS=2, WORKER_PROCESSES=2)
    stack.wait_for(r"Worker process is ready for action")
    task_id = post_task(base, 1)
    stack.wait_for(rf"task {task_id} done seconds=1")

    for main in psutil.Process(stack.popen.pid).children():
        if program_of(" ".join(main.cmdline())):
            children = main.children()
            assert len(children) >= 2, main.cmdline()
            main.kill()
            _, alive = psutil.wait_procs(children, timeout=10)
            assert alive == [], [child.cmdline() for child in alive]
