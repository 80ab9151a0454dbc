"""The three-way throughput comparison: the broker's ceiling, the relay, a naive relay."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiormq
import uvloop
from pamqp import commands as spec
from psycopg import sql

from bench.common import (
    AMQP_URL,
    ProcessRun,
    Queue,
    RelayProcess,
    Schema,
    aconnect,
    body,
    median,
    percentile,
    progress,
    run_drain,
)
from outbox.frames import Message, publish_pipelined
from outbox.settings import Settings


def _properties(n: int) -> spec.Basic.Properties:
    # The same properties the relay sets for a row of the benchmark.
    return spec.Basic.Properties(
        content_type="application/json", delivery_mode=2, message_id=str(uuid.uuid4()),
        timestamp=datetime.now(UTC), app_id="outbox")


async def ceiling_rate(n: int, batch: int = 0, lanes: int = 1, url: str | None = None,
                       arguments: dict[str, Any] | None = None) -> float:
    """Raw aiormq, no database: publish n messages pipelined (the relay's own technique,
    `publish_pipelined`) and await their confirms. ``batch`` = 0 writes all n, then awaits all
    confirms; otherwise ``lanes`` channels each keep one batch in flight, like the relay's lanes.
    Messages are built (properties included) inside the timed section, as the relay builds them.
    ``url`` and ``arguments``: another broker and queue type (`Queue`)."""
    async with Queue(url, arguments) as queue:
        conn = await aiormq.connect(queue.url)
        try:
            channels = [await conn.channel(publisher_confirms=True, on_return_raises=True)
                        for _ in range(lanes)]
            size = batch or n
            starts = iter(range(0, n, size))

            async def lane(channel: aiormq.abc.AbstractChannel) -> None:
                for first in starts:
                    messages: list[Message] = [(body(i), "", queue.name, _properties(i))
                                               for i in range(first, min(n, first + size))]
                    pipelined = await publish_pipelined(channel, messages)
                    await pipelined.wait(None)
                    pipelined.forget()
                    for future in pipelined.futures:
                        future.result()  # raises if the broker refused one

            start = time.perf_counter()
            await asyncio.gather(*(lane(ch) for ch in channels))
            elapsed = time.perf_counter() - start
        finally:
            await conn.close()
    return n / elapsed


def ceiling(n: int, batch: int = 0, lanes: int = 1, url: str | None = None,
            arguments: dict[str, Any] | None = None) -> float:
    """`ceiling_rate` under uvloop, the relay's own event loop: under the default loop the
    ceiling measured ~6 % lower here (10,180 against 10,880 msg/s, three pairs), which would
    flatter the relay."""
    return uvloop.run(ceiling_rate(n, batch, lanes, url, arguments))


def relay_like_ceiling(n: int) -> float:
    """The ceiling with as many channels as the relay has lanes, one batch each in flight."""
    defaults = Settings()
    return ceiling(n, defaults.batch_size, defaults.concurrency)


async def confirm_latency(n: int, url: str | None = None,
                          arguments: dict[str, Any] | None = None) -> tuple[float, float]:
    """The broker's part of the latency: one message at a time through the relay's publish path
    (`publish_pipelined`), each confirm awaited before the next, with a consumer attached as in
    the latency phase. Returns p50 and p99 of publish-to-confirm, in ms. ``url`` and
    ``arguments``: another broker and queue type (`Queue`)."""
    async def drop(message: aiormq.abc.DeliveredMessage) -> None:
        pass

    times: list[float] = []
    async with Queue(url, arguments) as queue:
        conn = await aiormq.connect(queue.url)
        try:
            consumer = await conn.channel()
            await consumer.basic_consume(queue.name, drop, no_ack=True)
            channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
            for i in range(n):
                start = time.perf_counter()
                pipelined = await publish_pipelined(
                    channel, [(body(i), "", queue.name, _properties(i))])
                await pipelined.wait(None)
                pipelined.forget()
                pipelined.futures[0].result()  # raises if the broker refused it
                times.append((time.perf_counter() - start) * 1000)
        finally:
            await conn.close()
    return percentile(times, 0.50), percentile(times, 0.99)


def startup_seconds() -> ProcessRun:
    """A drain of an empty outbox: process start, imports, connections, exit."""
    with Schema() as schema:
        return run_drain(schema.settings)


def relay_drain(n: int, keys: int = 0, **env: str) -> tuple[float, ProcessRun]:
    """`outbox relay --drain` over a backlog of n rows; returns (seconds of work, the process).
    The caller subtracts the startup time it measured."""
    async def _run() -> tuple[float, ProcessRun]:
        async with Queue() as queue:
            with Schema() as schema:
                schema.fill(n, queue.name, keys)
                run = await asyncio.to_thread(run_drain, schema.settings, **env)
                left = schema.pending()
                if left:
                    progress(f"the relay left {left} of {n} rows pending (counted as not sent)")
        run.published = n - left
        return run.wall, run

    return asyncio.run(_run())


class Backlog:
    """A schema holding n pending rows for one queue; `window` measures a relay over the next
    messages of it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Backlog:
        self.queue = await self._stack.enter_async_context(Queue())
        self.schema = self._stack.enter_context(Schema())
        await asyncio.to_thread(self.schema.fill, self.n, self.queue.name)
        self._amqp = await aiormq.connect(AMQP_URL)
        self._stack.push_async_callback(self._amqp.close)
        self._channel = await self._amqp.channel()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def window(self, first: int = 5_000, last: int = 55_000) -> float:
        """The rate of a new `outbox relay` process from its ``first`` to its ``last`` published
        message (the queue's depth every 20 ms: ±0.5 % over 50k); then the relay is stopped and
        the queue emptied, so every window publishes into the same queue depths."""
        relay = RelayProcess(self.schema)
        try:
            start: tuple[float, int] | None = None
            async with asyncio.timeout(600):
                while True:
                    ok = await self._channel.queue_declare(self.queue.name, passive=True)
                    now, depth = time.perf_counter(), ok.message_count or 0
                    if start is None and depth >= first:
                        start = (now, depth)
                    elif start is not None and depth >= last:
                        return (depth - start[1]) / (now - start[0])
                    await asyncio.sleep(0.02)
        finally:
            relay.stop()
            await self._channel.queue_purge(self.queue.name)


def window_rates(big: int, small: int, rounds: int) -> tuple[list[float], list[float]]:
    """`Backlog.window` over one backlog of ``big`` rows (one window after another: it needs
    ``big`` > rounds * 60k or so) and, in turn, over fresh backlogs of ``small`` rows: the same
    messages drained with many rows pending and with few, the broker's decline over a long run
    left out."""
    async def _run() -> tuple[list[float], list[float]]:
        on_big, on_small = [], []
        async with Backlog(big) as backlog:
            for _ in range(rounds):
                on_big.append(await backlog.window())
                async with Backlog(small) as fresh:
                    on_small.append(await fresh.window())
                progress(f"  window over {big} rows: {on_big[-1]:.0f} msg/s, over {small}: "
                         f"{on_small[-1]:.0f} msg/s")
        return on_big, on_small

    return asyncio.run(_run())


async def naive_rate(n: int) -> float:
    """What a user would write: per row, lock one row, publish it, await its confirm, delete it,
    commit."""
    async with Queue() as queue:
        with Schema() as schema:
            schema.fill(n, queue.name)
            table = schema.table()
            select = sql.SQL(
                "SELECT id, message_id, payload::text, created_at FROM {} "
                "WHERE sent_at IS NULL AND dead_at IS NULL AND available_at <= now() "
                "ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED").format(table)
            delete = sql.SQL("DELETE FROM {} WHERE id = %s").format(table)
            amqp = await aiormq.connect(AMQP_URL)
            db = await aconnect(autocommit=False)
            try:
                channel = await amqp.channel(publisher_confirms=True, on_return_raises=True)
                start = time.perf_counter()
                done = 0
                while True:
                    cur = await db.execute(select)
                    rec = await cur.fetchone()
                    if rec is None:
                        await db.commit()
                        break
                    id_, message_id, payload, created_at = rec
                    await channel.basic_publish(
                        payload.encode(), routing_key=queue.name, mandatory=True,
                        properties=spec.Basic.Properties(
                            content_type="application/json", delivery_mode=2,
                            message_id=str(message_id), timestamp=created_at, app_id="outbox"))
                    await db.execute(delete, (id_,))
                    await db.commit()
                    done += 1
                elapsed = time.perf_counter() - start
            finally:
                await db.close()
                await amqp.close()
    return done / elapsed


@dataclass
class TracingCost:
    """Per mode ("off", "on"): the rates (msg/s) and CPU µs per message of each round."""

    rates: dict[str, list[float]]
    cpu_us: dict[str, list[float]]


def traced_vs_untraced(n: int, rounds: int) -> TracingCost:
    """`outbox relay --drain` over n rows that carry a ``traceparent`` (as a traced producer
    writes them), with tracing off and on (bench.traced), in turn each round; each mode's own
    start-up (the SDK's imports) left out of its rate and of its CPU."""
    def startup(module: str) -> ProcessRun:
        with Schema() as schema:
            return run_drain(schema.settings, module)

    async def drain(module: str) -> tuple[ProcessRun, int]:
        async with Queue() as queue:
            with Schema() as schema:
                schema.fill(n, queue.name, traced=True)
                run = await asyncio.to_thread(run_drain, schema.settings, module)
                return run, n - schema.pending()

    modules = {"off": "outbox", "on": "bench.traced"}
    starts = {mode: [startup(m) for _ in range(3)] for mode, m in modules.items()}
    wall0 = {mode: median([s.wall for s in runs]) for mode, runs in starts.items()}
    cpu0 = {mode: median([s.cpu for s in runs]) for mode, runs in starts.items()}
    cost = TracingCost({"off": [], "on": []}, {"off": [], "on": []})
    for r in range(rounds):
        # the order alternates, so that a drift of the machine's load favours neither
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
            run, published = asyncio.run(drain(modules[mode]))
            cost.rates[mode].append(published / max(1e-6, run.wall - wall0[mode]))
            cost.cpu_us[mode].append((run.cpu - cpu0[mode]) / n * 1e6)
        progress(f"  round {r + 1}: tracing off {cost.rates['off'][-1]:.0f} msg/s "
                 f"{cost.cpu_us['off'][-1]:.0f} µs CPU/msg, on {cost.rates['on'][-1]:.0f} msg/s "
                 f"{cost.cpu_us['on'][-1]:.0f} µs CPU/msg")
    return cost
