"""The publishing ceiling: what one AMQP connection can confirm, without HTTP.

One aio-pika connection on uvloop, one channel in confirm mode, a fixed
number of publishes in flight, each a durable, persistent, mandatory
Dramatiq message as onebox sends it. Prints one line of JSON: confirms per
second and the publish → confirm latency.

    python bench/raw_publish.py URL QUEUE IN_FLIGHT SECONDS
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

import aio_pika
import dramatiq
import uvloop
from harness import percentile


async def publish_for(url: str, queue: str, inflight: int, seconds: float) -> dict[str, float]:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True)
        body = dramatiq.Message(queue_name=queue, actor_name="countdown", args=(1,), kwargs={}, options={}).encode()
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def publisher() -> None:
            while time.perf_counter() < deadline:
                message = aio_pika.Message(
                    body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=str(uuid.uuid4())
                )
                sent = time.perf_counter()
                await channel.default_exchange.publish(message, routing_key=queue, mandatory=True)
                latencies.append(time.perf_counter() - sent)

        began, spent = time.perf_counter(), time.process_time()
        await asyncio.gather(*(publisher() for _ in range(inflight)))
        elapsed, spent = time.perf_counter() - began, time.process_time() - spent
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "accepted": len(latencies),
        "cpu_us_per_request": spent / len(latencies) * 1e6,
    }


def main() -> None:
    url, queue, inflight, seconds = sys.argv[1:]
    result = uvloop.run(publish_for(url, queue, int(inflight), float(seconds)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
