"""A TCP proxy that holds every byte back for a fixed time, each way.

It stands in for a managed broker in another data centre: RabbitMQ on
loopback answers in well under a millisecond, CloudAMQP in tens. Bytes keep
their order and stream through; only their arrival is late, so many
publishes can be on the way at once, as on a real long line.

    python bench/delay_proxy.py TARGET_PORT DELAY_MS

It prints "listening on PORT" once it accepts connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import uvloop


async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    backlog: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await backlog.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                break
            writer.write(data)
            await writer.drain()

    delivery = asyncio.create_task(deliver())
    try:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                backlog.put_nowait((loop.time() + delay, data))
        backlog.put_nowait((loop.time() + delay, b""))
        with contextlib.suppress(ConnectionError):
            await delivery
    finally:
        delivery.cancel()
        writer.close()


async def serve(target_port: int, delay: float) -> None:
    async def connect(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            forward(client_reader, broker_writer, delay),
            forward(broker_reader, client_writer, delay),
        )

    server = await asyncio.start_server(connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on {port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    target_port, delay_ms = sys.argv[1:]
    uvloop.run(serve(int(target_port), float(delay_ms) / 1000))


if __name__ == "__main__":
    main()
