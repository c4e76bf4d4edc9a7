"""The whole stack as users run it: supervisord, granian and the worker."""

from __future__ import annotations

import httpx

from conftest import Process, free_port, start_stack, wait_http


def started_stack(stacks: list[Process], queue_name: str, **settings: str | int) -> tuple[Process, str]:
    port = free_port()
    stack = start_stack(PORT=port, QUEUE_NAME=queue_name, **settings)
    stacks.append(stack)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/readyz")
    return stack, base


def test_a_posted_countdown_runs_to_completion(stacks: list[Process], queue_name: str) -> None:
    stack, base = started_stack(stacks, queue_name)

    response = httpx.post(f"{base}/tasks", json={"seconds": 2})

    assert response.status_code == 202
    task_id = response.json()["id"]
    stack.wait_for(rf"task {task_id} started seconds=2 attempt=1 redelivered=no")
    stack.wait_for(rf"task {task_id} remaining=1")
    stack.wait_for(rf"task {task_id} remaining=0")
    stack.wait_for(rf"task {task_id} done seconds=2")
