"""Brokers as they really fail at start, on the whole stack as users run it.

supervisord runs both programs against a broker that fails in one way from
the first moment. Each failure has one outcome (docs/brokers.md, "When the
broker fails at start"):

- it may pass by itself (nothing listens yet, a silent or stalled broker, a
  server that hangs up, a full connection limit): the container stays up,
  /healthz answers 200, /readyz and POST /tasks answer 503 with the reason,
  both programs say it in one line per attempt, and once the broker is good
  the stack serves without a restart;
- only a person can fix it (a refused login, a missing virtual host, no
  access to it): both programs stop with one line that says what to fix, and
  the container ends with a failure.

TLS failures are in tests/test_tls.py, refused declarations in
tests/test_brokers.py.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
from conftest import MACHINE_BROKER, Broker, Process, TcpProxy, delete_queues, free_port, start_stack, wait_http

# The usual bound: an answer about the broker comes within PUBLISH_TIMEOUT (2 s).
ANSWER_SECONDS = 2.5


@dataclass
class Failing:
    """A broker address that fails in one way, and how to make it good."""

    url: str
    mend: Callable[[], object]
    says: str  # what the 503s and the log lines say


@contextmanager
def failing(kind: str, broker: Broker) -> Iterator[Failing]:
    """A front to ``broker`` that fails as ``kind`` says until mended."""
    if kind == "nothing listens":
        port = free_port()
        proxies: list[TcpProxy] = []
        try:
            yield Failing(
                f"amqp://guest:guest@127.0.0.1:{port}/",
                lambda: proxies.append(TcpProxy(broker.port, port=port)),
                rf"cannot reach the broker at 127\.0\.0\.1:{port}: nothing accepts connections there",
            )
        finally:
            for proxy in proxies:
                proxy.close()
        return
    if kind == "connection limit":
        vhost = f"onebox-{uuid.uuid4().hex[:8]}"
        broker.ctl("add_vhost", vhost)
        try:
            broker.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
            broker.ctl("set_vhost_limits", "-p", vhost, '{"max-connections": 0}')
            yield Failing(
                f"amqp://guest:guest@127.0.0.1:{broker.port}/{vhost}",
                lambda: broker.ctl("set_vhost_limits", "-p", vhost, '{"max-connections": 20}'),
                r"the broker refused a connection: NOT_ALLOWED - .*connection limit \(0\) is reached",
            )
        finally:
            broker.ctl("delete_vhost", vhost)
        return
    proxy = TcpProxy(broker.port)
    try:
        if kind == "silent":
            proxy.blackhole()
            says = rf"cannot reach the broker at 127\.0\.0\.1:{proxy.port}: it did not answer within \d+ s"
        else:  # "hangs up": a load balancer with no broker behind it, or the wrong port
            proxy.cut()
            says = (
                rf"cannot reach the broker at 127\.0\.0\.1:{proxy.port}: the server closed the connection "
                r"during the AMQP handshake"
            )
        yield Failing(proxy.url(), proxy.restore, says)
    finally:
        proxy.close()


def post(base: str) -> httpx.Response:
    return httpx.post(f"{base}/tasks", json={"seconds": 1}, timeout=10)


def wait_until_accepted(base: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        response = post(base)
        if response.status_code == 202:
            return str(response.json()["id"])
        assert time.monotonic() < deadline, response.text
        time.sleep(0.2)


# A failure of the network in front of the broker looks the same whatever
# broker is behind it: those run against 4.0.5 (CloudAMQP's), the broker's own
# refusals against both versions.
MAY_PASS = [
    pytest.param("nothing listens", "4.0.5"),
    pytest.param("hangs up", "4.0.5"),
    pytest.param("connection limit", "3.10"),
    pytest.param("connection limit", "4.0.5"),
]


@pytest.mark.parametrize(("kind", "version"), MAY_PASS)
def test_a_broker_failing_at_start_that_may_pass_leaves_the_stack_up_with_503_until_it_is_good(
    stacks: list[Process], request: pytest.FixtureRequest, kind: str, version: str
) -> None:
    broker: Broker = request.getfixturevalue("broker4") if version == "4.0.5" else MACHINE_BROKER
    queue = f"test-failing-{uuid.uuid4().hex[:8]}"
    with failing(kind, broker) as front:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        stack = start_stack(PORT=port, QUEUE_NAME=queue, CLOUDAMQP_URL=front.url)
        stacks.append(stack)
        try:
            wait_http(f"{base}/healthz", timeout=30)
            began = time.monotonic()
            ready, posted = httpx.get(f"{base}/readyz", timeout=10), post(base)
            answered = time.monotonic() - began

            assert (ready.status_code, posted.status_code) == (503, 503), (ready.text, posted.text)
            assert answered < ANSWER_SECONDS
            for detail in (ready.json()["detail"], posted.json()["detail"]):
                assert re.search(front.says, detail), detail
            stack.wait_for(rf"\[onebox\] \[WARNING\] {front.says}")
            stack.wait_for(rf"Consumer encountered a connection error: {front.says}", timeout=60)
            assert "Traceback" not in stack.output

            front.mend()
            task_id = wait_until_accepted(base)
            stack.wait_for(rf"task {task_id} done seconds=1", timeout=60)
            assert stack.popen.poll() is None
        finally:
            stack.stop()
            if kind != "connection limit":
                delete_queues(queue, broker.url)


@pytest.fixture
def private_vhost(broker: Broker) -> Iterator[str]:
    vhost = f"onebox-{uuid.uuid4().hex[:8]}"
    broker.ctl("add_vhost", vhost)
    yield vhost
    broker.ctl("delete_vhost", vhost)


@pytest.fixture
def cloudamqp_user(broker: Broker) -> Iterator[str]:
    """A user with a password of its own, as CloudAMQP gives (guest's password is its name,
    and a redacted password would hide the name in every line)."""
    user = f"onebox-{uuid.uuid4().hex[:8]}"
    broker.ctl("add_user", user, "its-own-password")
    yield user
    broker.ctl("delete_user", user)


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("a wrong password", "refused the login of user '{user}' (ACCESS_REFUSED"),
        ("a missing virtual host", "the broker refused user '{user}' the virtual host 'no-such-vhost' (NOT_ALLOWED"),
        ("no access to the virtual host", "the broker refused user '{user}' the virtual host '{vhost}' (NOT_ALLOWED"),
    ],
)
def test_a_broker_failure_only_a_person_can_fix_stops_both_programs_with_one_line_each_try(
    stacks: list[Process], broker: Broker, private_vhost: str, cloudamqp_user: str, kind: str, says: str
) -> None:
    password = "its-own-password" if kind != "a wrong password" else "Pa55-never-printed"
    vhost = {"a missing virtual host": "no-such-vhost", "no access to the virtual host": private_vhost}.get(kind, "")
    url = f"amqp://{cloudamqp_user}:{password}@127.0.0.1:{broker.port}/{vhost}"
    stack = start_stack(PORT=free_port(), QUEUE_NAME="never-declared", CLOUDAMQP_URL=url)
    stacks.append(stack)

    assert stack.wait(timeout=90) != 0
    says = says.format(user=cloudamqp_user, vhost=private_vhost)
    lines = [line for line in stack.lines if says in line]
    # Each program stops at each try; supervisord gives up on the first to fail three times.
    assert "exited: web (exit status 1" in stack.output and "exited: worker (exit status 1" in stack.output
    assert re.search(r"gave up: (web|worker) entered FATAL state", stack.output)
    assert 2 <= len(lines) <= 8, stack.output
    assert all("[CRITICAL] onebox: " in line and "CLOUDAMQP_URL" in line for line in lines)
    assert "Traceback" not in stack.output
    assert "Pa55-never-printed" not in stack.output and "its-own-password" not in stack.output


def test_a_silent_broker_at_start_gets_503_within_two_seconds_of_healthz_for_a_minute_then_serves_when_it_answers(
    stacks: list[Process], broker4: Broker, queue_name: str
) -> None:
    with failing("silent", broker4) as front:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        stack = start_stack(PORT=port, QUEUE_NAME=queue_name, CLOUDAMQP_URL=front.url)
        stacks.append(stack)
        try:
            wait_http(f"{base}/healthz", timeout=30)
            began = time.monotonic()
            first = post(base)
            assert time.monotonic() - began < ANSWER_SECONDS
            assert first.status_code == 503 and re.search(front.says, first.json()["detail"]), first.text
            stack.wait_for(rf"Consumer encountered a connection error: {front.says}", timeout=60)

            time.sleep(60)

            assert stack.popen.poll() is None
            assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
            assert post(base).status_code == 503
            assert "FATAL" not in stack.output and "Traceback" not in stack.output
            front.mend()
            task_id = wait_until_accepted(base)
            stack.wait_for(rf"task {task_id} done seconds=1", timeout=60)
        finally:
            stack.stop()
            delete_queues(queue_name, broker4.url)
