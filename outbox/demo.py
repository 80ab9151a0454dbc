"""`make demo`: events written with plain SQL, relayed to RabbitMQ, consumed once with the inbox.

    python -m outbox.demo

1. drops and recreates the schema ``outbox_demo`` (``OUTBOX_DEMO_SCHEMA``) and migrates it;
2. inserts ``OUTBOX_DEMO_EVENTS`` (5000) events with plain SQL, as an application in any language
   would: some with an ordering key, a few with a bytes payload;
3. declares a topic exchange and the queue of a "billing" consumer bound to it;
4. runs the relay in-process (``--drain``) while the consumer (``outbox.consumer``) applies each
   event to a ``shipments`` table and records it in the inbox, in one transaction;
5. then makes a slice of the events be published a second time, exactly as a relay that crashed
   after the broker's confirm but before its mark would, and shows the inbox skipping them;
6. prints a summary. Servers: ``OUTBOX_DATABASE_URL`` and ``OUTBOX_AMQP_URL`` (local defaults).

With ``OTEL_TRACES_EXPORTER`` set (``console`` prints the spans on stdout; the SDK must be
installed: ``pip install 'outbox[otel]'``), the relay and the consumer trace, and
``TRACED_EVENTS`` of the events are written with `outbox.enqueue` inside a "place order" span, so
their trace runs from that span through the relay to the consumer's handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from typing import Any

import aiormq
import psycopg
from psycopg import sql

import outbox
from outbox import logs, migrate, tracing
from outbox.consumer import Consumer, ConsumerCounts, Message
from outbox.runner import run_relay
from outbox.settings import Settings, redact

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
REPUBLISHED_PERCENT = 10
BYTES_EVENTS = 20
TRACED_EVENTS = 3


def progress(text: str, *, done: bool = False) -> None:
    """One line on stderr, rewritten in place on a terminal."""
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K{text}" + ("\n" if done else ""))
    elif done:
        sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _settings() -> Settings:
    return Settings.load({
        "database_url": os.environ.get("OUTBOX_DATABASE_URL") or DEFAULT_DATABASE_URL,
        "amqp_url": os.environ.get("OUTBOX_AMQP_URL") or DEFAULT_AMQP_URL,
        "schema": os.environ.get("OUTBOX_DEMO_SCHEMA") or "outbox_demo",
        "on_sent": "mark",  # keep sent rows, so that a slice can be "published again" later
        "http_port": 0, "log_level": "warning", "poll_interval": 0.2,
    }, environ={})


def _exec(settings: Settings, statement: sql.Composed, params: Any = None) -> list[Any]:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def prepare_database(settings: Settings, n: int, traced: int = 0) -> dict[str, int]:
    """A fresh schema, migrated; the consumer's table; n events inserted with plain SQL, but the
    last ``traced`` of the JSON ones, written with `outbox.enqueue` in a span each."""
    s = sql.Identifier(settings.schema)
    _exec(settings, sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(s))
    _exec(settings, sql.SQL("CREATE SCHEMA {}").format(s))
    migrate.upgrade(settings)
    # The consumer's own business table. No unique key: a duplicate effect would show.
    _exec(settings, sql.SQL(
        "CREATE TABLE {}.shipments (order_id int NOT NULL, message_id uuid NOT NULL, "
        "created_at timestamptz NOT NULL DEFAULT now())").format(s))
    exchange = settings.schema
    json_events = n - BYTES_EVENTS - traced
    with psycopg.connect(settings.database_url) as conn:  # one producer transaction
        # What an application in any language writes, in the transaction of its own change:
        #   INSERT INTO outbox (exchange, routing_key, payload, ordering_key) VALUES (...);
        # here for many orders at once. Every third order's events keep their order (a key).
        conn.execute(sql.SQL("""
            INSERT INTO {}.outbox (exchange, routing_key, payload, ordering_key, message_type)
            SELECT %s, 'orders.created',
                   jsonb_build_object('order_id', g, 'customer', 'c-' || mod(g, 97),
                                      'total_cents', 1000 + mod(g * 7, 5000)),
                   CASE WHEN mod(g, 3) = 0 THEN 'order-' || mod(g, 60) END,
                   'order.created'
              FROM generate_series(1, %s::int) AS g""").format(s), (exchange, json_events))
        # Opaque bodies (protobuf, avro, ...) go in payload_bytes.
        conn.execute(sql.SQL("""
            INSERT INTO {}.outbox (exchange, routing_key, payload_bytes, content_type)
            SELECT %s, 'orders.legacy', convert_to('order_id=' || g, 'UTF8'),
                   'text/plain'
              FROM generate_series(%s::int, %s::int) AS g""").format(s),
                     (exchange, n - BYTES_EVENTS + 1, n))
        for g in range(json_events + 1, json_events + traced + 1):
            with tracing.application_span("place order"):
                outbox.enqueue(conn, "orders.created", {"order_id": g, "customer": "c-traced",
                                                        "total_cents": 1000},
                               exchange=exchange, schema=settings.schema,
                               message_type="order.created")
    keyed = _exec(settings, sql.SQL(
        "SELECT count(*) FROM {}.outbox WHERE ordering_key IS NOT NULL").format(s))[0][0]
    return {"inserted": n, "keyed": keyed, "bytes": BYTES_EVENTS}


async def declare(settings: Settings) -> str:
    """A topic exchange named like the schema and the billing queue bound to ``orders.#``."""
    queue = f"{settings.schema}.billing"
    conn = await aiormq.connect(settings.amqp_urls[0])
    try:
        ch = await conn.channel()
        for name in (queue, f"{queue}.dead"):
            await ch.queue_delete(name)
        await ch.exchange_declare(settings.schema, exchange_type="topic", durable=True)
        await ch.queue_declare(queue, durable=True)
        await ch.queue_bind(queue, settings.schema, routing_key="orders.#")
    finally:
        await conn.close()
    return queue


async def cleanup_broker(settings: Settings, consumer: Consumer) -> None:
    conn = await aiormq.connect(settings.amqp_urls[0])
    try:
        ch = await conn.channel()
        retry = {consumer.retry_queue(a) for a in range(1, consumer.max_attempts)}
        names = [consumer.queue, consumer.dead_letter_routing_key, *sorted(retry)]
        for name in names:
            await ch.queue_delete(name)
        await ch.exchange_delete(settings.schema)
    finally:
        await conn.close()


def make_handler(settings: Settings) -> Any:
    insert = sql.SQL("INSERT INTO {}.shipments (order_id, message_id) VALUES (%s, %s)").format(
        sql.Identifier(settings.schema))

    async def create_shipment(conn: psycopg.AsyncConnection[Any], message: Message) -> None:
        if message.content_type == "application/json":
            order_id = message.json()["order_id"]
        else:
            order_id = int(message.body.decode().partition("=")[2])
        await conn.execute(insert, (order_id, message.message_id), prepare=True)

    return create_shipment


async def relay_until_sent(settings: Settings, deadline: float) -> int:
    """Run the relay with ``drain`` until no row is left unsent (a keyed row waits while an
    older transaction of another session is still open); returns the rows published."""
    published = 0
    unsent = sql.SQL("SELECT count(*) FROM {}.outbox WHERE sent_at IS NULL AND dead_at IS NULL"
                     ).format(sql.Identifier(settings.schema))
    while True:
        counts = await run_relay(settings, drain=True)
        published += counts.published
        left = (await asyncio.to_thread(_exec, settings, unsent))[0][0]
        if left == 0 or time.monotonic() > deadline:
            return published
        await asyncio.sleep(0.2)


async def wait_consumed(consumer: Consumer, expected: int, duplicates: int,
                        timeout: float) -> ConsumerCounts:
    def done(c: ConsumerCounts) -> bool:
        return c.applied + c.dead_lettered >= expected and c.duplicates >= duplicates

    deadline = time.monotonic() + timeout
    while not done(consumer.counts):
        c = consumer.counts
        progress(f"consuming: {c.received} received, {c.applied}/{expected} applied, "
                 f"{c.duplicates} duplicates skipped")
        if time.monotonic() > deadline:
            raise TimeoutError("the consumer did not finish in time")
        with contextlib.suppress(TimeoutError):
            await consumer.wait_for(done, timeout=0.5)
    c = consumer.counts
    progress(f"consumed: {c.received} received, {c.applied} applied, "
             f"{c.duplicates} duplicates skipped", done=True)
    return c


async def demo(settings: Settings, n: int) -> dict[str, Any]:
    start = time.monotonic()
    progress(f"preparing schema {settings.schema} on {redact(settings.database_url)}", done=True)
    traced = TRACED_EVENTS if tracing.setup(settings.batch_size) else 0
    facts = await asyncio.to_thread(prepare_database, settings, n, traced)
    queue = await declare(settings)
    consumer = Consumer(queue, make_handler(settings), name="demo-billing", settings=settings)
    s = sql.Identifier(settings.schema)
    try:
        await consumer.start()
        async with asyncio.timeout(30):
            await consumer.subscribed.wait()
        progress(f"relaying {n} events to exchange {settings.schema!r} -> queue {queue!r}",
                 done=True)
        flow_start = time.monotonic()
        published = await relay_until_sent(settings, time.monotonic() + 30)
        await wait_consumed(consumer, n, 0, timeout=60)
        # A lost confirm (or a relay killed after publishing, before marking) leaves rows that
        # were delivered but are still unsent in the table: the relay publishes them again.
        again = n * REPUBLISHED_PERCENT // 100
        await asyncio.to_thread(_exec, settings, sql.SQL(
            "UPDATE {}.outbox SET sent_at = NULL WHERE id IN "
            "(SELECT id FROM {}.outbox ORDER BY random() LIMIT %s)").format(s, s), (again,))
        progress(f"publishing {again} events a second time, as after a lost confirm", done=True)
        published += await relay_until_sent(settings, time.monotonic() + 30)
        counts = await wait_consumed(consumer, n, again, timeout=60)
        flow = time.monotonic() - flow_start
    finally:
        await consumer.close()
        with contextlib.suppress(Exception):
            await cleanup_broker(settings, consumer)
    elapsed = time.monotonic() - start
    rows, distinct = (await asyncio.to_thread(_exec, settings, sql.SQL(
        "SELECT count(*), count(DISTINCT message_id) FROM {}.shipments").format(s)))[0]
    tracing.flush()
    return {**facts, "traced": traced, "published": published, "republished": again,
            "consumed": counts.received, "applied": counts.applied,
            "duplicates": counts.duplicates, "dead": counts.dead_lettered,
            "effect_rows": rows, "distinct": distinct, "elapsed": elapsed, "flow": flow,
            "queue": queue}


def summary(schema: str, r: dict[str, Any]) -> str:
    ok = r["effect_rows"] == r["distinct"] == r["inserted"]
    lines = [
        f"outbox demo (schema {schema}, queue {r['queue']})",
        f"  events inserted (plain SQL): {r['inserted']:>7}  ({r['keyed']} with an ordering key,"
        f" {r['bytes']} bytes payloads)",
        f"  published:                   {r['published']:>7}  ({r['republished']} of them "
        "twice, as after a lost confirm)",
        f"  consumed:                    {r['consumed']:>7}",
        f"  effects applied:             {r['applied']:>7}",
        f"  duplicates skipped:          {r['duplicates']:>7}",
        f"  dead-lettered:               {r['dead']:>7}",
        *([f"  traced from a span:          {r['traced']:>7}  (spans printed above with "
           "OTEL_TRACES_EXPORTER=console)"] if r["traced"] else []),
        f"  shipments rows:              {r['effect_rows']:>7}  "
        f"({'one per event' if ok else 'MISMATCH'})",
        f"  elapsed:                     {r['elapsed']:>7.1f} s",
        f"  rate:                        {r['published'] / r['flow']:>7.0f} msg/s "
        f"(relayed and consumed in {r['flow']:.1f} s; the rest is setup)",
    ]
    return "\n".join(lines)


def main() -> int:
    logs.setup(os.environ.get("OUTBOX_DEMO_LOG_LEVEL", "warning"))
    settings = _settings()
    n = int(os.environ.get("OUTBOX_DEMO_EVENTS", "5000"))
    if n <= BYTES_EVENTS + TRACED_EVENTS:
        raise SystemExit(f"OUTBOX_DEMO_EVENTS must be more than {BYTES_EVENTS + TRACED_EVENTS}")
    try:
        from outbox.runner import install_uvloop

        install_uvloop()
        result = asyncio.run(demo(settings, n))
    except (OSError, psycopg.Error, aiormq.exceptions.AMQPError, TimeoutError) as exc:
        print(f"demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if isinstance(exc, OSError | psycopg.OperationalError):
            print("are PostgreSQL and RabbitMQ running? (OUTBOX_DATABASE_URL, OUTBOX_AMQP_URL)",
                  file=sys.stderr)
        return 1
    print(summary(settings.schema, result))
    return 0 if result["effect_rows"] == result["distinct"] == result["inserted"] else 1


if __name__ == "__main__":
    sys.exit(main())
