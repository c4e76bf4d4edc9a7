"""The metrics endpoint, proven against a real Prometheus scraping a running stack."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import httpx
import pika
import psutil
import pytest
from conftest import (
    STACK_TMP,
    Process,
    TcpProxy,
    free_port,
    program_process,
    rabbit_connection,
    require_tool,
    start_stack,
    wait_http,
)
from prometheus_client.parser import text_string_to_metric_families

import tasks

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Stack:
    """A running stack with its HTTP and metrics addresses."""

    def __init__(self, process: Process, port: int, metrics_port: int) -> None:
        self.process = process
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.metrics_port = metrics_port

    def post(self, seconds: int) -> str:
        response = httpx.post(f"{self.base}/tasks", json={"seconds": seconds})
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def scrape(self) -> Samples:
        text = httpx.get(self.metrics_url, timeout=5).text
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples named ``name`` that carry ``labels``; 0 when none do."""
        wanted = set(labels.items())
        return sum(value for (sample, got), value in self.scrape().items() if sample == name and wanted <= got)

    def wait_for_value(self, name: str, expected: float, timeout: float = 30, **labels: str) -> None:
        deadline = time.monotonic() + timeout
        while (current := self.value(name, **labels)) != expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}{labels} is {current}, not {expected}; output:\n{self.process.tail}")
            time.sleep(0.2)


def started(
    stacks: list[Process], queue_name: str, port: int = 0, metrics_port: int = 0, **settings: str | int
) -> Stack:
    port, metrics_port = port or free_port(), metrics_port or free_port()
    process = start_stack(PORT=port, METRICS_PORT=metrics_port, QUEUE_NAME=queue_name, **settings)
    stacks.append(process)
    stack = Stack(process, port, metrics_port)
    try:
        wait_http(f"{stack.base}/readyz")
        wait_http(stack.metrics_url)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{process.tail}") from None
    return stack


class Prometheus:
    """Debian's prometheus, with a configuration, storage and port of this test's own."""

    def __init__(self, folder: Path, target_port: int) -> None:
        config = folder / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: onebox\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
        )
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = Process(
            [
                require_tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            env={},
            cwd=folder,
        )
        wait_http(f"{self.url}/-/ready", timeout=30)

    def query(self, expression: str) -> list[tuple[dict[str, str], float]]:
        """An instant query through Prometheus's HTTP API: (labels, value) per series."""
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expression}, timeout=5).json()
        assert answer["status"] == "success", answer
        return [(series["metric"], float(series["value"][1])) for series in answer["data"]["result"]]

    def scalar(self, expression: str) -> float | None:
        """The value of a query that yields one series; None when it yields none."""
        result = self.query(expression)
        assert len(result) <= 1, result
        return result[0][1] if result else None

    def wait_until(self, expression: str, check: Callable[[float | None], bool], timeout: float = 60) -> float | None:
        deadline = time.monotonic() + timeout
        while not check(value := self.scalar(expression)):
            if time.monotonic() > deadline:
                raise AssertionError(f"{expression} stayed at {value} for {timeout} s")
            time.sleep(0.5)
        return value


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    started_servers: list[Prometheus] = []

    def start(target_port: int) -> Prometheus:
        server = Prometheus(tmp_path, target_port)
        started_servers.append(server)
        return server

    yield start
    for server in started_servers:
        server.process.stop()


def publish_countdown_with_a_float(queue_name: str) -> str:
    """A countdown message from another producer that sent 1.5 for seconds.

    The API refuses 1.5 with a 400, but anything with the broker's address can
    publish: a script that calls countdown.send(1.5), an older release. The
    actor raises (range() takes no float), so Dramatiq retries it and then
    dead-letters it, as it would any task that keeps failing.
    """
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=queue_name, actor_name="countdown", args=(1.5,), kwargs={}, options={}
    )
    connection = rabbit_connection()
    try:
        connection.channel().basic_publish(
            "", queue_name, message.encode(), pika.BasicProperties(delivery_mode=2, message_id=message.message_id)
        )
    finally:
        connection.close()
    return message.message_id


def test_prometheus_stores_tasks_failures_retries_queue_depth_and_requests(
    stacks: list[Process], queue_name: str, prometheus: Callable[[int], Prometheus]
) -> None:
    # One task at a time, one held: the rest wait in the queue, ready.
    stack = started(stacks, queue_name, WORKER_THREADS=1, QUEUE_PREFETCH=1, MAX_RETRIES=1)
    server = prometheus(stack.metrics_port)
    server.wait_until('up{job="onebox"}', lambda up: up == 1)

    first = stack.post(4)
    stack.process.wait_for(rf"task {first} started")
    quick = [stack.post(1) for _ in range(5)]
    for task_id in quick[1::2]:
        assert httpx.delete(f"{stack.base}/tasks/{task_id}").status_code == 202
    failing = publish_countdown_with_a_float(queue_name)
    assert httpx.post(f"{stack.base}/tasks", json={"seconds": 0}).status_code == 400
    assert httpx.get(f"{stack.base}/tasks/no-such-task").status_code == 404

    queue = f'queue="{queue_name}"'
    on_queue = f'queue_name="{queue_name}",actor_name="countdown"'
    peak = server.wait_until(f"onebox_queue_messages_ready{{{queue}}}", lambda depth: (depth or 0) >= 5)
    server.wait_until(f"dramatiq_message_rejects_total{{{on_queue}}}", lambda rejects: rejects == 1)
    stack.process.wait_for(rf"task {quick[-1]} done")
    server.wait_until(f"onebox_queue_messages_ready{{{queue}}}", lambda depth: depth == 0)
    server.wait_until(f"dramatiq_messages_total{{{on_queue}}}", lambda total: total == 8)

    # 6 accepted (2 of them skipped as cancelled) and 2 attempts of the failing one.
    assert peak is not None and peak >= 5
    assert server.scalar(f"dramatiq_message_errors_total{{{on_queue}}}") == 2
    # A retry waits in the delay levels and comes back to the task queue: counted once, never on the delay queue.
    assert server.scalar(f"dramatiq_message_retries_total{{{on_queue}}}") == 1
    assert server.scalar(f'dramatiq_message_retries_total{{queue_name="{queue_name}.DQ"}}') is None
    assert server.scalar(f"dramatiq_message_duration_milliseconds_count{{{on_queue}}}") == 8
    assert server.scalar(f'dramatiq_message_duration_milliseconds_bucket{{{on_queue},le="5000.0"}}') == 8
    assert server.scalar(f'dramatiq_message_duration_milliseconds_bucket{{{on_queue},le="2500.0"}}') == 7
    assert server.scalar(f"dramatiq_messages_inprogress{{{on_queue}}}") == 0
    assert server.scalar("onebox_tasks_accepted_total") == 6
    assert server.scalar("onebox_broker_connected") == 1
    requests = {
        (labels["method"], labels["path"], labels["status_code"]): value
        for labels, value in server.query('litestar_requests_total{app_name="onebox"}')
    }
    assert requests[("POST", "/tasks", "202")] == 6
    assert requests[("POST", "/tasks", "400")] == 1
    assert requests[("DELETE", "/tasks/{task_id}", "202")] == 2
    assert requests[("GET", "/tasks/{task_id}", "404")] == 1
    assert server.scalar('sum(litestar_request_duration_seconds_count{path="/tasks",method="POST"})') == 7
    stack.process.wait_for(rf"task {failing} started seconds=1 attempt=2", timeout=0)


def test_503s_are_counted_by_reason_and_as_refusals_and_the_broker_shows_disconnected(
    stacks: list[Process], queue_name: str, proxy: TcpProxy
) -> None:
    stack = started(stacks, queue_name, CLOUDAMQP_URL=proxy.url())
    stack.wait_for_value("onebox_broker_connected", 1)

    proxy.cut()
    wait_http(f"{stack.base}/readyz", status=503)
    answer = httpx.post(f"{stack.base}/tasks", json={"seconds": 1})

    assert answer.status_code == 503
    assert stack.value("onebox_tasks_unavailable_total", reason="not_connected") == 1
    assert stack.value("litestar_requests_total", path="/tasks", status_code="503") == 1
    # The POST's; not /readyz's, a health check's answer.
    assert stack.value("onebox_refusals_total", status="503") == 1
    stack.wait_for_value("onebox_broker_connected", 0)


def restart_program(stack: Stack, program: str, ready: str) -> None:
    """Stop one program gracefully; supervisord starts it again by itself."""
    seen = len(stack.process.lines)
    program_process(stack.process, program).send_signal(signal.SIGTERM)
    stack.process.wait_for(ready, start=seen, timeout=40)


def files_of_dead_processes(folder: Path) -> list[str]:
    return [path.name for path in folder.glob("*.db") if not psutil.pid_exists(int(path.stem.rsplit("_", 1)[1]))]


def test_a_restart_of_either_program_or_the_stack_leaves_no_stale_or_doubled_figures(
    stacks: list[Process], queue_name: str
) -> None:
    stack = started(stacks, queue_name)
    for _ in range(2):
        stack.post(1)
    stack.wait_for_value("dramatiq_messages_total", 2)
    assert stack.value("onebox_tasks_accepted_total") == 2

    restart_program(stack, "worker", r"metrics at http://")
    wait_http(stack.metrics_url)
    # The new worker starts from nothing; the web's figures are untouched.
    assert stack.value("dramatiq_messages_total") == 0
    assert stack.value("onebox_tasks_accepted_total") == 2
    stack.post(1)
    stack.wait_for_value("dramatiq_messages_total", 1)
    assert stack.value("onebox_tasks_accepted_total") == 3
    worker_files = STACK_TMP / f"onebox-metrics-{stack.port}" / "worker"
    assert worker_files.is_dir()
    assert files_of_dead_processes(worker_files) == []

    restart_program(stack, "web", r"\[onebox\] \[INFO\] broker connected")
    assert stack.value("onebox_tasks_accepted_total") == 0
    assert stack.value("litestar_requests_total") == 0
    assert stack.value("dramatiq_messages_total") == 1
    assert files_of_dead_processes(worker_files.with_name("web")) == []

    stack.process.send_signal(signal.SIGTERM)
    assert stack.process.wait(timeout=40) == 0
    again = started(stacks, queue_name, port=stack.port, metrics_port=stack.metrics_port)
    assert again.value("dramatiq_messages_total") == 0
    assert again.value("onebox_tasks_accepted_total") == 0
    assert again.value("dramatiq_message_duration_milliseconds_count") == 0


def test_with_metrics_off_no_port_opens_and_no_file_is_written(stacks: list[Process], queue_name: str) -> None:
    port, metrics_port = free_port(), free_port()
    process = start_stack(PORT=port, METRICS_PORT=metrics_port, QUEUE_NAME=queue_name, METRICS="false")
    stacks.append(process)
    wait_http(f"http://127.0.0.1:{port}/readyz")
    response = httpx.post(f"http://127.0.0.1:{port}/tasks", json={"seconds": 1})
    assert response.status_code == 202
    process.wait_for(rf"task {response.json()['id']} done")

    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
    assert not (STACK_TMP / f"onebox-metrics-{port}").exists()


def test_the_metrics_port_cannot_be_the_public_port() -> None:
    with pytest.raises(SystemExit, match="metrics_port must differ from port"):
        tasks.load_settings(environ={"PORT": "8000", "METRICS_PORT": "8000"})
    assert tasks.load_settings(environ={"PORT": "8000", "METRICS_PORT": "8000", "METRICS": "false"}).port == 8000
