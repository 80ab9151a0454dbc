"""The inbox consumer's rate: one `outbox.consumer.Consumer` draining a pre-filled queue, one effect
row plus one inbox row committed per message, messages acked only after the commit.

    python -m bench.inbox [n]    # inbox_consume_msgs_per_s (per-message handler) and the rate
                                 # of a batch handler (one INSERT per transaction)
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import aiormq
import psycopg
from pamqp import commands as spec
from psycopg import sql

from bench.common import body, delete_queues
from outbox import migrate
from outbox.consumer import Consumer, Message
from outbox.settings import Settings

PUBLISH_WINDOW = 5_000


async def _fill(amqp_url: str, queue: str, n: int) -> None:
    """Publish n persistent messages with distinct message ids, confirmed, in windows."""
    conn = await aiormq.connect(amqp_url)
    try:
        ch = await conn.channel(publisher_confirms=True)
        await ch.queue_declare(queue, durable=True)
        for start in range(0, n, PUBLISH_WINDOW):
            await asyncio.gather(*(
                ch.basic_publish(body(i), routing_key=queue, properties=spec.Basic.Properties(
                    message_id=str(uuid.uuid4()), delivery_mode=2,
                    content_type="application/json"))
                for i in range(start, min(n, start + PUBLISH_WINDOW))))
    finally:
        await conn.close()


def _schema(database_url: str, name: str, *, create: bool) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        ident = sql.Identifier(name)
        if create:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(ident))
        else:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(ident))


def _count(database_url: str, table: sql.Composable) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        rec = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
    assert rec is not None
    return int(rec[0])


async def inbox_consume_rate(database_url: str, amqp_url: str, n: int = 20000,
                             style: str = "message") -> float:
    """Pre-fill a queue with ``n`` ~200-byte persistent messages, then time one consumer applying
    an effect row and an inbox row per message (acked after the commit); returns msg/s.

    ``style="message"``: the usual per-message handler (one INSERT per message, pipelined);
    ``style="batch"``: a batch handler (one INSERT … SELECT unnest(…) per transaction)."""
    suffix = uuid.uuid4().hex[:10]
    schema, queue = f"bench_inbox_{suffix}", f"bench_inbox_{suffix}"
    settings = Settings.load({"database_url": database_url, "amqp_url": amqp_url,
                              "schema": schema}, environ={})
    _schema(database_url, schema, create=True)
    consumer: Consumer | None = None
    try:
        await asyncio.to_thread(migrate.upgrade, settings)
        effects = sql.SQL("{}.effects").format(sql.Identifier(schema))
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL(
                "CREATE TABLE {} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                "message_id uuid NOT NULL, n int NOT NULL)").format(effects))
        await _fill(amqp_url, queue, n)
        insert = sql.SQL("INSERT INTO {} (message_id, n) VALUES (%s, %s)").format(effects)

        insert_many = sql.SQL("INSERT INTO {} (message_id, n) "
                              "SELECT * FROM unnest(%s::uuid[], %s::int[])").format(effects)

        async def apply(conn: psycopg.AsyncConnection[Any], message: Message) -> None:
            await conn.execute(insert, (message.message_id, message.json()["n"]), prepare=True)

        async def apply_batch(conn: psycopg.AsyncConnection[Any],
                              messages: Sequence[Message]) -> None:
            await conn.execute(insert_many, ([m.message_id for m in messages],
                                             [m.json()["n"] for m in messages]), prepare=True)

        if style == "batch":
            consumer = Consumer(queue, batch_handler=apply_batch, name="bench", settings=settings)
        else:
            consumer = Consumer(queue, apply, name="bench", settings=settings)
        await consumer.start()
        async with asyncio.timeout(60):
            await consumer.subscribed.wait()
        start, cpu = time.perf_counter(), time.process_time()
        await consumer.wait_for(lambda c: c.acked >= n, timeout=max(60.0, n / 500))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        print(f"[bench inbox] {style} handler: {n} messages in {elapsed:.2f} s, consumer CPU "
              f"{cpu / n * 1e6:.0f} us/message", file=sys.stderr, flush=True)
        await consumer.close()
        applied = consumer.counts.applied
        if applied != n or _count(database_url, effects) != n:
            raise RuntimeError(f"expected {n} effects, applied {applied}")
        return n / elapsed
    finally:
        names = [queue]
        if consumer is not None:
            await consumer.close()
            names += [consumer.dead_letter_routing_key,
                      *{consumer.retry_queue(a) for a in range(1, consumer.max_attempts)}]
        await delete_queues(amqp_url, names)
        _schema(database_url, schema, create=False)


def main(argv: list[str]) -> None:
    from bench.common import AMQP_URL, DATABASE_URL

    logging.basicConfig(level=logging.WARNING)
    n = int(argv[0]) if argv else 20_000
    rate = asyncio.run(inbox_consume_rate(DATABASE_URL, AMQP_URL, n))
    batch = asyncio.run(inbox_consume_rate(DATABASE_URL, AMQP_URL, n, style="batch"))
    print(f"inbox_consume_msgs_per_s: {rate:.0f}")
    print(f"inbox_consume_batch_handler_msgs_per_s: {batch:.0f}")


if __name__ == "__main__":
    main(sys.argv[1:])
