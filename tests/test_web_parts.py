"""The web process's broker side, one part at a time, against the real RabbitMQ.

main.py's BrokerLink keeps the connection, TaskPublisher publishes with
confirms on it, EventsFeed follows the task events stream into a board. Each
works here without the others doing their job: the link with nothing
following it, the publisher over a bare link, the feed on a connection of
the test's own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiormq
import msgspec
import pika
import pytest
from conftest import RABBIT_URL, queue_depth, rabbit_connection

import main
import tasks

WITHIN = 10.0


def settings_for(queue: str) -> tasks.Settings:
    return msgspec.structs.replace(tasks.settings, cloudamqp_url=RABBIT_URL, queue_name=queue)


async def eventually(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WITHIN
    while not check():
        assert time.monotonic() < deadline, f"not so within {WITHIN} s"
        await asyncio.sleep(0.02)


def publish_events(settings: tasks.Settings, *events: tasks.TaskEvent) -> None:
    """One batch into the events stream, as a worker writes it."""
    connection = rabbit_connection()
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", tasks.events_stream(settings), msgspec.json.encode(list(events)))
    finally:
        connection.close()


def run(work: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(work(), 30))


# -- BrokerLink ---------------------------------------------------------------------------


def test_a_link_alone_connects_declares_every_queue_and_is_ready(queue_name: str) -> None:
    settings = settings_for(queue_name)

    async def work() -> None:
        link = main.BrokerLink(settings)
        trouble = await link.start()
        try:
            assert (trouble, link.ready, link.problem, link.tried.is_set()) == (None, True, "", True)
        finally:
            await link.close()
        assert not link.ready

    run(work)
    connection = rabbit_connection()
    try:
        channel = connection.channel()
        for name in tasks.queues(settings):
            channel.queue_declare(name, passive=True)  # raises if it is missing
    finally:
        connection.close()


def test_a_link_alone_that_cannot_connect_says_why_and_is_not_ready(queue_name: str) -> None:
    settings = msgspec.structs.replace(settings_for(queue_name), cloudamqp_url="amqp://guest:guest@127.0.0.1:1/")

    async def work() -> None:
        link = main.BrokerLink(settings)
        trouble = await link.start()
        assert trouble is not None and not trouble.needs_a_person
        assert not link.ready
        assert link.problem == trouble.line
        assert "connection refused" in link.problem

    run(work)


# -- TaskPublisher ------------------------------------------------------------------------


def test_a_publisher_over_a_bare_link_has_the_broker_confirm_a_task_into_its_queue(queue_name: str) -> None:
    settings = settings_for(queue_name)
    message = tasks.countdown.message(3).copy(queue_name=queue_name)

    async def work() -> None:
        link = main.BrokerLink(settings)
        assert await link.start() is None
        try:
            await main.TaskPublisher(link).publish(message)
        finally:
            await link.close()

    run(work)
    assert queue_depth(queue_name) == 1
    connection = rabbit_connection()
    try:
        _, properties, body = connection.channel().basic_get(queue_name, auto_ack=True)
    finally:
        connection.close()
    assert isinstance(properties, pika.BasicProperties) and properties.message_id == message.message_id
    assert body == message.encode()


def test_a_publisher_whose_link_is_down_refuses_at_once_with_the_links_problem(queue_name: str) -> None:
    link = main.BrokerLink(settings_for(queue_name))
    link.problem = "cannot reach the broker at 127.0.0.1:5672: nothing accepts connections there; retrying"

    async def work() -> None:
        started = time.monotonic()
        with pytest.raises(main.BrokerUnavailable) as refused:
            await main.TaskPublisher(link).cancel("some-task")
        assert time.monotonic() - started < 0.1
        assert (refused.value.detail, refused.value.reason) == (link.problem, "not_connected")

    run(work)


# -- EventsFeed ---------------------------------------------------------------------------


def test_a_feed_given_a_connection_reads_the_past_into_its_board_then_follows_the_stream(queue_name: str) -> None:
    settings = settings_for(queue_name)
    assert tasks.declare_all(settings) is None  # as a worker that started first does
    now = time.time()
    publish_events(settings, tasks.TaskEvent("t1", "queued", now, "countdown", total=3))
    # A link that never connects: the feed reads on the test's own connection.
    feed = main.EventsFeed(main.TaskPublisher(main.BrokerLink(settings)))

    async def work() -> None:
        connection = await aiormq.connect(RABBIT_URL)
        try:
            await feed.attach(connection)
            await asyncio.wait_for(feed.caught_up.wait(), WITHIN)
            assert feed.board.tasks["t1"].status == "queued"

            publish_events(settings, tasks.TaskEvent("t1", "started", now + 1, "countdown", done=0, total=3))
            await eventually(lambda: feed.board.tasks["t1"].status == "running")
        finally:
            await connection.close()

    run(work)


def test_a_feed_announces_its_own_events_to_the_stream_and_hears_them_back(queue_name: str) -> None:
    settings = settings_for(queue_name)
    assert tasks.declare_all(settings) is None  # as a worker that started first does
    writer = main.EventsFeed(main.TaskPublisher(main.BrokerLink(settings)))
    reader = main.EventsFeed(main.TaskPublisher(main.BrokerLink(settings)))

    async def work() -> None:
        connection = await aiormq.connect(RABBIT_URL)
        try:
            await writer.attach(connection)
            await reader.attach(connection)
            await asyncio.wait_for(reader.caught_up.wait(), WITHIN)

            writer.announce(tasks.TaskEvent("t2", "queued", time.time(), "tally"))

            assert writer.board.tasks["t2"].status == "queued"  # at once, here
            await eventually(lambda: "t2" in reader.board.tasks)  # soon, everywhere
        finally:
            await connection.close()

    run(work)
