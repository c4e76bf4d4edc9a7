"""Guards that cost nothing: the rate limiter, and refusals that are counted, not logged.

The limiter keeps two windows of counts per client, so that its cost does
not grow with the limit and its memory does not grow with the addresses it
has seen; a storm of spoofed addresses against a whole stack proves the
second. bench/guards.py measures the first.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import Process, delete_queues, free_port, program_process, start_stack, wait_http
from litestar.testing import TestClient
from prometheus_client import REGISTRY
from test_api import RecordingPublisher, hardened_client

import main
import tasks

WINDOW = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(limit: int = 3, clients: int = 100) -> tuple[main.RateLimiter, Clock]:
    clock = Clock()
    return main.RateLimiter(limit, WINDOW, clients, clock), clock


def allowed(limiter: main.RateLimiter, client: str | int, times: int) -> list[bool]:
    return [limiter.take(client)[0] for _ in range(times)]


# -- The limiter --------------------------------------------------------------------------


def test_a_client_gets_the_limit_in_a_window_then_refusals() -> None:
    limit, _ = limiter(limit=3)

    assert allowed(limit, "203.0.113.1", 5) == [True, True, True, False, False]


def test_each_client_has_its_own_allowance() -> None:
    limit, _ = limiter(limit=1)

    assert allowed(limit, "203.0.113.1", 2) == [True, False]
    assert allowed(limit, "203.0.113.2", 1) == [True]


def test_the_last_windows_count_weighs_by_its_share_still_within_a_window() -> None:
    limit, clock = limiter(limit=4)
    allowed(limit, "203.0.113.1", 4)
    # A quarter into the next window, three quarters of the last one's 4 still count: 3.
    clock.now += WINDOW * 1.25

    assert allowed(limit, "203.0.113.1", 2) == [True, False]


def test_no_burst_of_twice_the_limit_across_a_window_boundary() -> None:
    limit, clock = limiter(limit=4)
    clock.now += WINDOW - 1
    allowed(limit, "203.0.113.1", 4)
    clock.now += 2

    assert allowed(limit, "203.0.113.1", 1) == [False]


def test_a_refused_request_is_not_counted() -> None:
    limit, clock = limiter(limit=2)
    allowed(limit, "203.0.113.1", 10)
    clock.now += WINDOW * 2

    assert allowed(limit, "203.0.113.1", 2) == [True, True]


@pytest.mark.parametrize(("limit", "used", "into_window"), [(1, 1, 0), (3, 3, 0), (60, 60, 30), (10, 4, 50)])
def test_the_wait_it_tells_is_when_the_next_request_passes(limit: int, used: int, into_window: float) -> None:
    limiter_, clock = limiter(limit=limit)
    clock.now += into_window
    allowed(limiter_, "203.0.113.1", used)
    if used < limit:
        # The rest of the allowance spent early in the next window: the last window's count still weighs.
        clock.now += WINDOW - into_window + 1
        while limiter_.take("203.0.113.1")[0]:
            pass
    passed, _, wait = limiter_.take("203.0.113.1")
    assert not passed
    start = clock.now

    clock.now = start + wait - 1
    assert not limiter_.take("203.0.113.1")[0]
    clock.now = start + wait
    assert limiter_.take("203.0.113.1")[0]


def test_it_tells_the_remaining_requests_and_the_seconds_to_the_windows_end() -> None:
    limit, clock = limiter(limit=3)
    clock.now += 20

    assert limit.take("203.0.113.1") == (True, 2, 40)
    assert limit.take("203.0.113.1") == (True, 1, 40)


def test_a_client_is_forgotten_two_windows_after_its_last_request() -> None:
    limit, clock = limiter(limit=1)
    allowed(limit, "203.0.113.1", 1)
    clock.now += WINDOW
    limit.take("203.0.113.2")
    assert "203.0.113.1" in limit.previous
    clock.now += WINDOW

    limit.take("203.0.113.2")

    assert "203.0.113.1" not in limit.previous
    assert "203.0.113.1" not in limit.current


def test_expired_clients_go_without_being_read_again() -> None:
    limit, clock = limiter(limit=1, clients=100_000)
    for number in range(50_000):
        limit.take(f"10.0.{number >> 8}.{number & 255}")
    clock.now += WINDOW * 5

    limit.take("203.0.113.1")

    assert (len(limit.previous), len(limit.current)) == (0, 1)


def test_past_the_client_cap_newcomers_share_one_allowance() -> None:
    limit, _ = limiter(limit=2, clients=3)
    for number in range(3):
        limit.take(f"203.0.113.{number}")

    assert allowed(limit, "198.51.100.1", 1) + allowed(limit, "198.51.100.2", 2) == [True, True, False]
    assert len(limit.current) == 4


def test_past_the_client_cap_the_clients_counted_keep_their_allowance() -> None:
    limit, _ = limiter(limit=2, clients=3)
    for number in range(3):
        limit.take(f"203.0.113.{number}")
    allowed(limit, "198.51.100.1", 5)

    assert allowed(limit, "203.0.113.0", 2) == [True, False]


def test_a_new_window_counts_new_clients_again() -> None:
    limit, clock = limiter(limit=1, clients=1)
    limit.take("203.0.113.1")
    allowed(limit, "198.51.100.1", 1)
    clock.now += WINDOW * 2

    assert allowed(limit, "198.51.100.1", 1) == [True]
    assert "198.51.100.1" in limit.current


# -- Who the client is ---------------------------------------------------------------------


def test_ipv6_addresses_of_one_64_are_one_client() -> None:
    assert main.client_key("2001:db8:1:2::1", 64) == main.client_key("2001:db8:1:2:ffff:eeee:dddd:cccc", 64)


def test_ipv6_addresses_of_two_64s_are_two_clients() -> None:
    assert main.client_key("2001:db8:1:2::1", 64) != main.client_key("2001:db8:1:3::1", 64)


def test_the_ipv6_prefix_is_a_setting() -> None:
    assert main.client_key("2001:db8::1", 128) != main.client_key("2001:db8::2", 128)
    assert main.client_key("2001:db8:1::1", 48) == main.client_key("2001:db8:1:ffff::1", 48)


def test_an_ipv4_address_mapped_into_ipv6_counts_as_itself() -> None:
    assert main.client_key("::ffff:203.0.113.7", 64) == main.client_key("203.0.113.7", 64)
    assert main.client_key("::ffff:203.0.113.7", 64) != main.client_key("::ffff:203.0.113.8", 64)


def test_an_unparsable_address_counts_as_its_text_cut_short() -> None:
    assert main.client_key("x:" * 1000, 64) == ("x:" * 1000)[: main.LONGEST_ADDRESS]


def test_the_address_is_the_last_entry_of_the_last_line_of_the_header() -> None:
    headers = [(b"x-forwarded-for", b"1.1.1.1"), (b"x-forwarded-for", b"2.2.2.2, 198.51.100.7")]
    scope: Any = {"headers": headers, "client": ("10.0.0.1", 1234)}

    assert main.address_of(scope, b"x-forwarded-for") == "198.51.100.7"


def test_without_the_header_the_address_is_the_peer() -> None:
    scope: Any = {"headers": [], "client": ("10.0.0.1", 1234)}

    assert main.address_of(scope, b"x-forwarded-for") == "10.0.0.1"


# -- The app: headers, logs, counts --------------------------------------------------------


def test_answers_of_limited_routes_carry_the_ratelimit_headers() -> None:
    with hardened_client(rate_limit_per_minute=3) as client:
        answer = client.post("/tasks", json={"seconds": 1})

    assert answer.status_code == 202
    assert (answer.headers["ratelimit-limit"], answer.headers["ratelimit-remaining"]) == ("3", "2")
    assert 0 < int(answer.headers["ratelimit-reset"]) <= 60
    assert answer.headers["ratelimit-policy"] == "3; w=60"


def test_a_429_is_a_problem_with_retry_after_and_the_ratelimit_headers() -> None:
    with hardened_client(rate_limit_per_minute=1) as client:
        client.post("/tasks", json={"seconds": 1})
        answer = client.post("/tasks", json={"seconds": 1})

    assert answer.status_code == 429
    assert answer.headers["content-type"] == "application/problem+json"
    assert msgspec.json.decode(answer.content, type=main.Problem) == main.Problem(
        429, "Too Many Requests", "Too Many Requests"
    )
    assert int(answer.headers["retry-after"]) > 0
    assert answer.headers["ratelimit-remaining"] == "0"
    assert answer.headers["x-content-type-options"] == "nosniff"


def test_reads_carry_no_ratelimit_headers() -> None:
    with hardened_client(rate_limit_per_minute=1) as client:
        answer = client.get("/tasks")

    assert "ratelimit-limit" not in answer.headers


def test_a_body_refused_by_validation_still_counts_against_the_limit() -> None:
    with hardened_client(rate_limit_per_minute=1) as client:
        refused = client.post("/tasks", json={"seconds": "x"})
        answer = client.post("/tasks", json={"seconds": 1})

    assert (refused.status_code, answer.status_code) == (400, 429)


def test_behind_a_proxy_ipv6_clients_of_one_64_share_a_limit() -> None:
    with hardened_client(rate_limit_per_minute=1, client_ip_header="Fly-Client-IP") as client:
        first = client.post("/tasks", json={"seconds": 1}, headers={"Fly-Client-IP": "2001:db8:5:6::1"})
        same = client.post("/tasks", json={"seconds": 1}, headers={"Fly-Client-IP": "2001:db8:5:6::2"})
        other = client.post("/tasks", json={"seconds": 1}, headers={"Fly-Client-IP": "2001:db8:5:7::1"})

    assert (first.status_code, same.status_code, other.status_code) == (202, 429, 202)


def test_the_window_is_a_setting_and_spreads_the_minutes_limit() -> None:
    with hardened_client(rate_limit_per_minute=60, rate_limit_window=2) as client:
        answers = [client.post("/tasks", json={"seconds": 1}) for _ in range(3)]

    assert [answer.status_code for answer in answers] == [202, 202, 429]
    assert answers[0].headers["ratelimit-policy"] == "2; w=2"


def refusals(status: int) -> float:
    return REGISTRY.get_sample_value("onebox_refusals_total", {"status": str(status)}) or 0.0


def refuse_each_way(client: TestClient[Any], publisher: RecordingPublisher) -> dict[int, int]:
    """One request for each refusal, by the status it got."""
    big = b" " * (tasks.settings.max_body_bytes + 1)
    statuses = [
        client.post("/tasks", content=b"{}", headers={"Content-Type": "text/plain"}).status_code,
        client.post("/tasks", content=big, headers={"Content-Type": "application/json"}).status_code,
    ]
    publisher.failure = main.BrokerUnavailable("down", "connection_failed")
    statuses.append(client.post("/tasks", json={"seconds": 1}).status_code)
    statuses.append(client.post("/tasks", json={"seconds": 1}).status_code)
    return {status: statuses.count(status) for status in statuses}


def app_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """What the app logged (through Litestar's queue listener, to stderr), less the test client's own lines."""
    time.sleep(0.2)
    return [line for line in capsys.readouterr().err.splitlines() if "[httpx]" not in line]


def test_refusals_write_no_log_line(capsys: pytest.CaptureFixture[str]) -> None:
    publisher = RecordingPublisher()
    with hardened_client(publisher, rate_limit_per_minute=3) as client:
        app_lines(capsys)
        got = refuse_each_way(client, publisher)
        lines = app_lines(capsys)

    assert got == {415: 1, 413: 1, 503: 1, 429: 1}
    assert lines == []


def test_an_unexpected_error_is_still_logged(capsys: pytest.CaptureFixture[str]) -> None:
    class Broken(RecordingPublisher):
        async def publish(self, *_: Any, **__: Any) -> None:
            raise RuntimeError("a bug")

    with hardened_client(Broken()) as client:
        app_lines(capsys)
        answer = client.post("/tasks", json={"seconds": 1})
        lines = app_lines(capsys)

    assert answer.status_code == 500
    assert any("Uncaught exception" in line for line in lines)
    assert any("RuntimeError: a bug" in line for line in lines)


def test_refusals_are_counted_by_status() -> None:
    publisher = RecordingPublisher()
    before = {status: refusals(status) for status in (413, 415, 429, 503)}
    with hardened_client(publisher, rate_limit_per_minute=3) as client:
        got = refuse_each_way(client, publisher)

    assert {status: refusals(status) - before[status] for status in before} == got


def test_a_health_checks_503_is_not_a_refusal() -> None:
    publisher = RecordingPublisher()
    publisher.link.connected = False
    before = refusals(503)
    with hardened_client(publisher) as client:
        assert client.get("/readyz").status_code == 503

    assert refusals(503) == before


def test_with_metrics_off_nothing_is_counted() -> None:
    publisher = RecordingPublisher()
    before = refusals(429)
    with hardened_client(publisher, rate_limit_per_minute=1, metrics=False) as client:
        statuses = [client.post("/tasks", json={"seconds": 1}).status_code for _ in range(3)]

    assert statuses == [202, 429, 429]
    assert refusals(429) == before


# -- A storm of spoofed addresses against a whole stack -------------------------------------

STORM_WINDOW = 3
STORM_REQUESTS = 200_000
WARM_UP_REQUESTS = 50_000
CONNECTIONS = 4
# Requests written at once on a connection before their answers are read.
BATCH = 50
INVALID = b'{"seconds": "x"}'
# The storm's bounds: a few MiB while it lasts (two windows of counts, at most
# 2 MiB), and back within the allocator's noise once its windows have passed
# (up to 3 MiB either way, measured). Litestar's limiter kept 12 MiB of 50,000 addresses.
GROWTH_MIB = 4.0
LEFT_MIB = 4.0


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no Pss in smaps_rollup")


def storm_request(number: int) -> bytes:
    address = f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}"
    return (
        f"POST /tasks HTTP/1.1\r\nHost: onebox\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(INVALID)}\r\nX-Forwarded-For: 192.0.2.1, {address}\r\n\r\n"
    ).encode() + INVALID


def send_storm(port: int, first: int, count: int, statuses: dict[bytes, int], deadline: float) -> None:
    """``count`` requests on one keep-alive connection, pipelined BATCH at a time, each from a new address."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for start in range(first, first + count, BATCH):
            assert time.monotonic() < deadline, "the storm took too long"
            batch = range(start, min(start + BATCH, first + count))
            sock.sendall(b"".join(storm_request(number) for number in batch))
            received = b""
            while received.count(b"HTTP/1.1 ") < len(batch) or not received.endswith(b"}"):
                chunk = sock.recv(1 << 16)
                assert chunk, "the server hung up"
                received += chunk
            for answer in received.split(b"HTTP/1.1 ")[1:]:
                statuses[answer[:3]] = statuses.get(answer[:3], 0) + 1


def storm(port: int, requests: int, seconds: float) -> dict[bytes, int]:
    deadline = time.monotonic() + seconds
    shares = [dict[bytes, int]() for _ in range(CONNECTIONS)]
    each = requests // CONNECTIONS
    threads = [
        threading.Thread(target=send_storm, args=(port, index * each, each, shares[index], deadline))
        for index in range(CONNECTIONS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 10)
    statuses: dict[bytes, int] = {}
    for share in shares:
        for status, count in share.items():
            statuses[status] = statuses.get(status, 0) + count
    return statuses


@dataclass
class Storm:
    requests: int
    statuses: dict[bytes, int]
    baseline_mib: float
    after_mib: float
    later_mib: float
    lines: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def spoofed_storm() -> Iterator[Storm]:
    requests = STORM_REQUESTS
    queue = f"guards-{uuid.uuid4().hex[:10]}"
    port = free_port()
    stack: Process = start_stack(
        PORT=port,
        QUEUE_NAME=queue,
        CLIENT_IP_HEADER="X-Forwarded-For",
        RATE_LIMIT_PER_MINUTE=60,
        RATE_LIMIT_WINDOW=STORM_WINDOW,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=30)
        web = program_process(stack, "web").pid
        # A first storm: every code path loaded, the limiter and the allocator's
        # arenas at their largest once (a window fills the client cap), as on a
        # server that has run a while.
        storm(port, WARM_UP_REQUESTS, WARM_UP_REQUESTS / 500)
        time.sleep(2 * STORM_WINDOW + 1)
        storm(port, CONNECTIONS * BATCH, 10)
        baseline = pss_mib(web)
        mark = len(stack.lines)
        statuses = storm(port, requests, requests / 500)
        after = pss_mib(web)
        lines = stack.lines[mark:]
        time.sleep(2 * STORM_WINDOW + 1)
        # A few requests: the limiter turns its windows when a request comes.
        storm(port, CONNECTIONS * BATCH, 10)
        later = pss_mib(web)
        yield Storm(requests, statuses, baseline, after, later, lines)
    finally:
        stack.stop()
        delete_queues(queue)


def test_a_spoofed_address_storm_is_answered_in_full(spoofed_storm: Storm) -> None:
    assert sum(spoofed_storm.statuses.values()) == spoofed_storm.requests
    assert set(spoofed_storm.statuses) <= {b"400", b"429"}, spoofed_storm.statuses


def test_a_spoofed_address_storm_grows_memory_by_a_few_mib_at_most(spoofed_storm: Storm) -> None:
    assert spoofed_storm.after_mib - spoofed_storm.baseline_mib <= GROWTH_MIB, spoofed_storm


def test_memory_is_back_to_its_level_two_windows_after_a_storm(spoofed_storm: Storm) -> None:
    assert spoofed_storm.later_mib - spoofed_storm.baseline_mib <= LEFT_MIB, spoofed_storm


def test_a_storm_of_refusals_writes_no_log_line_each(spoofed_storm: Storm) -> None:
    assert len(spoofed_storm.lines) < 10, spoofed_storm.lines[:20]
