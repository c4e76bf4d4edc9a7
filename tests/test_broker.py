"""The web side against the real RabbitMQ, each of the matrix: confirms, outages, recovery."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pika
import pika.exceptions
import pytest
from conftest import Broker, Process, TcpProxy, free_port, rabbit_connection, stack_env
from litestar.testing import TestClient

import main
import tasks

BOUND = tasks.settings.publish_timeout + 0.5


def app_client(url: str) -> TestClient[Any]:
    settings = msgspec.structs.replace(tasks.settings, cloudamqp_url=url)
    return TestClient(main.create_app(*main.web_parts(settings)))


def wait_ready(client: TestClient[Any], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, f"not ready within {timeout} s: {client.get('/readyz').json()}"
        time.sleep(0.05)


@pytest.fixture
def client(broker: Broker, app_queue: str) -> Iterator[TestClient[Any]]:
    with app_client(broker.url) as client:
        wait_ready(client)
        yield client


@pytest.fixture
def worker(broker: Broker, app_queue: str) -> Iterator[Process]:
    """The real Dramatiq worker, consuming the app's queue."""
    process = Process(["python", "tasks.py", "worker"], stack_env(QUEUE_NAME=app_queue, CLOUDAMQP_URL=broker.url))
    yield process
    process.stop()


def get_message(queue: str, url: str) -> tuple[pika.BasicProperties, bytes]:
    connection = rabbit_connection(url)
    try:
        method, properties, body = connection.channel().basic_get(queue, auto_ack=True)
        assert method is not None, f"no message in {queue}"
        return properties, body
    finally:
        connection.close()


def test_a_posted_task_is_run_by_the_real_worker(client: TestClient[Any], worker: Process) -> None:
    response = client.post("/tasks", json={"seconds": 1})

    assert response.status_code == 202
    task_id = response.json()["id"]
    worker.wait_for(rf"task {task_id} started seconds=1 attempt=1 redelivered=no")
    worker.wait_for(rf"task {task_id} done seconds=1")


def test_the_message_is_persistent_and_encoded_as_dramatiq_encodes_it(
    client: TestClient[Any], broker: Broker, app_queue: str
) -> None:
    task_id = client.post("/tasks", json={"seconds": 3}).json()["id"]

    properties, body = get_message(app_queue, broker.url)
    assert properties.delivery_mode == 2
    message = tasks.countdown.message(3)
    expected = {**message.asdict(), "args": [3], "message_id": task_id}
    decoded = msgspec.json.decode(body)
    assert decoded | {"message_timestamp": 0} == expected | {"message_timestamp": 0}


def test_the_queue_is_durable(client: TestClient[Any], broker: Broker, app_queue: str) -> None:
    connection = rabbit_connection(broker.url)
    channel = connection.channel()

    # Declaring an existing queue with other properties is refused.
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="PRECONDITION_FAILED"):
        channel.queue_declare(app_queue, durable=False)
    connection.close()


def test_a_task_whose_queue_is_missing_is_a_503_not_a_202(
    client: TestClient[Any], broker: Broker, app_queue: str
) -> None:
    connection = rabbit_connection(broker.url)
    connection.channel().queue_delete(app_queue)
    connection.close()

    response = client.post("/tasks", json={"seconds": 1})

    assert response.status_code == 503
    assert response.json()["detail"] == f"queue '{app_queue}' was missing; nothing was queued"


def test_the_queue_is_declared_again_after_it_went_missing(
    client: TestClient[Any], broker: Broker, app_queue: str
) -> None:
    connection = rabbit_connection(broker.url)
    connection.channel().queue_delete(app_queue)
    connection.close()
    client.post("/tasks", json={"seconds": 1})

    response = client.post("/tasks", json={"seconds": 1})

    assert response.status_code == 202


def test_a_closed_port_is_a_503_at_once(app_queue: str) -> None:
    with app_client(f"amqp://guest:guest@127.0.0.1:{free_port()}/") as client:
        started = time.monotonic()
        response = client.post("/tasks", json={"seconds": 1})
        elapsed = time.monotonic() - started

        assert response.status_code == 503
        assert elapsed < 0.5
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "nothing accepts connections there (connection refused)" in ready.json()["detail"]


def test_a_broker_that_never_answers_is_a_503_within_the_bound(app_queue: str, proxy: TcpProxy) -> None:
    proxy.blackhole()
    with app_client(proxy.url()) as client:
        started = time.monotonic()
        response = client.post("/tasks", json={"seconds": 1})

        assert response.status_code == 503
        assert time.monotonic() - started < BOUND
        time.sleep(tasks.settings.publish_timeout + 0.5)
        assert "did not answer within" in client.get("/readyz").json()["detail"]


def test_a_connection_that_goes_silent_is_a_503_within_the_bound(app_queue: str, proxy: TcpProxy) -> None:
    with app_client(proxy.url()) as client:
        wait_ready(client)
        proxy.blackhole()

        started = time.monotonic()
        response = client.post("/tasks", json={"seconds": 1})

        assert time.monotonic() - started < BOUND
        assert response.status_code == 503
        assert response.json()["detail"] == (
            f"the broker did not confirm within {tasks.settings.publish_timeout:g} s; "
            "it may or may not have taken the request"
        )


def test_the_service_reconnects_by_itself_when_the_broker_returns(app_queue: str, proxy: TcpProxy) -> None:
    with app_client(proxy.url()) as client:
        wait_ready(client)
        proxy.cut()
        assert client.post("/tasks", json={"seconds": 1}).status_code == 503

        proxy.restore()

        wait_ready(client, timeout=5)
        assert client.post("/tasks", json={"seconds": 1}).status_code == 202


def test_the_broker_password_never_appears_in_answers_or_logs(
    broker: Broker, app_queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "hunter2-not-the-password"
    caplog.set_level(logging.DEBUG)
    with app_client(f"amqp://guest:{secret}@127.0.0.1:{broker.port}/") as client:
        time.sleep(1.5)
        answers = [client.post("/tasks", json={"seconds": 1}).text, client.get("/readyz").text]

    assert "ACCESS_REFUSED" in answers[1] or "Authentication" in answers[1]
    assert all(secret not in answer for answer in answers)
    assert secret not in caplog.text
