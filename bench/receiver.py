"""`python -m bench.receiver AMQP_URL QUEUE`: the live-load phases' consumer, in a process of its
own (uvloop), so that the producers' event loop does not delay it.

It consumes QUEUE without acks, prints ``ready`` once consuming, then a line ``n t w [i x]`` per
message, written in batches every 5 ms: ``n`` from the JSON body, ``t`` from `time.perf_counter`
(CLOCK_MONOTONIC on Linux, so comparable with the producers' clock in the parent process), ``w``
from `time.time` (the wall clock PostgreSQL's timestamps use), and the body's ``i`` and ``x`` when
it has them (bench/latency.py's rows: when the row was inserted and by which transaction).
"""

from __future__ import annotations

import asyncio
import sys
import time

import aiormq
import orjson
import uvloop


async def consume(url: str, queue: str) -> None:
    conn = await aiormq.connect(url)
    channel = await conn.channel()
    await channel.basic_qos(prefetch_count=2000)
    lines: list[str] = []

    async def on_message(msg: aiormq.abc.DeliveredMessage) -> None:
        t, w = time.perf_counter(), time.time()
        body = orjson.loads(msg.body)
        extra = f" {body['i']} {body['x']}" if "x" in body else ""
        lines.append(f"{body['n']} {t} {w}{extra}\n")

    await channel.basic_consume(queue, on_message, no_ack=True)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        await asyncio.sleep(0.005)
        if lines:
            sys.stdout.write("".join(lines))
            sys.stdout.flush()
            lines.clear()


if __name__ == "__main__":
    uvloop.run(consume(sys.argv[1], sys.argv[2]))
