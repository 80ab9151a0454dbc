"""Property, against the real PostgreSQL and RabbitMQ: rows of any content, INSERTed with plain
SQL, are drained in-process by `PgStore` + `AmqpPublisher`; the drain ends within a deadline,
every row ends sent (and a real consumer receives it with the documented properties) or dead with
a reason, within bounded attempts, and the good rows of each batch are delivered. Rows the schema
refuses at insert must be refused by a named constraint."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import aiormq
import psycopg
import pytest
from hypothesis import event, given
from psycopg import errors as pgerrors
from psycopg import sql

from outbox.publisher import AmqpPublisher
from outbox.relay import Relay
from outbox.settings import Settings
from outbox.store import PgStore
from tests import rowspace, support
from tests.rowspace import MAX_BODY, RowSpec

EXCHANGE = support.unique("props")  # a fanout exchange bound to the test's queue
DRAIN_DEADLINE = 30.0
MAX_ATTEMPTS = 3
TABLE_CONSTRAINTS = {"outbox_routing_key_not_empty", "outbox_exactly_one_payload",
                     "outbox_headers_is_object", "outbox_ordering_key_not_empty"}


@pytest.fixture
def fanout(queue: str) -> Iterator[tuple[str, int]]:
    """The exchange that routes any routing key to the queue, and the negotiated frame_max."""

    async def declare() -> int:
        conn = await aiormq.connect(support.AMQP_URL)
        try:
            ch = await conn.channel()
            await ch.exchange_declare(EXCHANGE, exchange_type="fanout", auto_delete=False)
            await ch.queue_bind(queue, EXCHANGE, routing_key="")
            return int(conn.connection_tune.frame_max)
        finally:
            await conn.close()

    async def delete() -> None:
        conn = await aiormq.connect(support.AMQP_URL)
        try:
            await (await conn.channel()).exchange_delete(EXCHANGE)
        finally:
            await conn.close()

    frame_max = asyncio.run(declare())
    yield queue, frame_max
    asyncio.run(delete())


INSERT = """
INSERT INTO {}.outbox (exchange, routing_key, payload, payload_bytes, content_type, headers,
                       ordering_key, message_type, correlation_id, created_at)
VALUES (%(exchange)s, %(routing_key)s, %(payload)s::jsonb, %(payload_bytes)s, %(content_type)s,
        %(headers)s::jsonb, %(ordering_key)s, %(message_type)s, %(correlation_id)s,
        CASE WHEN %(created_at)s::text IS NULL THEN now()
             WHEN %(created_at)s::text IN ('infinity', '-infinity')
                  THEN %(created_at)s::text::timestamptz
             ELSE to_timestamp(%(created_at)s::text::float8) END)
RETURNING id, message_id, headers::text, payload::text,
          CASE WHEN isfinite(created_at) THEN floor(extract(epoch FROM created_at))::float8 END
"""


def insert(conn: psycopg.Connection[Any], schema: str, row: RowSpec) -> tuple[Any, ...] | None:
    """The row's id, message id, headers and payload as stored, and created_at in epoch seconds;
    None when the database refuses it (which must be a constraint, or a range it names)."""
    params = {**row.__dict__, "created_at": None if row.created_at is None
              else str(row.created_at)}
    query = sql.SQL(INSERT).format(sql.Identifier(schema))
    try:
        got = conn.execute(query, params).fetchone()
    except pgerrors.CheckViolation as exc:
        name = exc.diag.constraint_name or ""
        assert name.startswith("outbox_"), exc
        event(f"refused at insert: {name}")
        if name in TABLE_CONSTRAINTS:
            return None
        # refused by revision 0003's trigger: a row written before it (or by an UPDATE) is
        # still possible, and the relay must end it too; insert it as such a row
        conn.execute("SET session_replication_role = replica")  # no triggers
        try:
            got = conn.execute(query, params).fetchone()
        except pgerrors.CheckViolation as again:  # the table refuses it too, for another reason
            assert again.diag.constraint_name in TABLE_CONSTRAINTS, again
            event(f"refused at insert: {again.diag.constraint_name}")
            return None
        finally:
            conn.execute("SET session_replication_role = DEFAULT")
    except pgerrors.DatetimeFieldOverflow as exc:  # to_timestamp past PostgreSQL's range
        assert "timestamp" in str(exc), exc
        event("refused at insert: timestamp out of range")
        return None
    assert got is not None
    return tuple(got)


async def drain(settings: Settings) -> None:
    publisher = AmqpPublisher(settings)
    await publisher.start()
    relay = Relay(settings, PgStore(settings), publisher, drain=True, rng=random.Random(0))
    try:
        await rowspace.drain(relay, DRAIN_DEADLINE, lambda: f"counts: {relay.counts}")
    finally:
        await publisher.close()


def held_back(settings: Settings, horizon: bool = False) -> bool:
    """Keyed rows pending, not behind a dead row (with ``horizon``: not yet claimable because
    a transaction older than them still runs)."""
    cond = ("o.xact_id >= pg_snapshot_xmin(pg_current_snapshot())" if horizon else
            "NOT EXISTS (SELECT 1 FROM {s}.outbox d WHERE d.ordering_key = o.ordering_key "
            "AND d.id < o.id AND d.sent_at IS NULL)")
    q = ("SELECT EXISTS (SELECT 1 FROM {s}.outbox o WHERE o.ordering_key IS NOT NULL "
         "AND o.sent_at IS NULL AND o.dead_at IS NULL AND " + cond + ")")
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        got = conn.execute(sql.SQL(q).format(s=sql.Identifier(settings.schema))).fetchone()
    return bool(got and got[0])


async def run_example(settings: Settings, queue: str, frame_max: int,
                  batch: list[RowSpec]) -> None:
    schema = sql.Identifier(settings.schema)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DELETE FROM {}.outbox").format(schema))
        stored = {}
        for spec in batch:
            got = insert(conn, settings.schema, spec)
            if got is not None:
                stored[got[0]] = (spec, *got[1:])
    async with support.Collector([queue]) as consumer:
        for _ in range(MAX_ATTEMPTS + 2):
            await drain(settings)
            # a drain also ends when the only rows left are keyed rows written after the oldest
            # transaction still running anywhere (the ordering horizon, docs/ordering.md):
            # wait for the horizon to pass them and drain again
            if not held_back(settings):
                break
            await support.until(lambda: not held_back(settings, horizon=True), 30,
                                "the rows held back by the horizon released", interval=0.1)
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            ends = {r[0]: r[1:] for r in conn.execute(sql.SQL(
                "SELECT id, sent_at IS NOT NULL, dead_at IS NOT NULL, last_error, attempts, "
                "ordering_key FROM {}.outbox").format(schema))}
        sent = {str(stored[i][1]) for i, e in ends.items() if e[0]}
        await consumer.reached(len(sent), timeout=15)
    received = {m.properties.message_id: m for m in consumer.messages}
    dead_keys = {(e[4], i) for i, e in ends.items() if e[1] and e[4] is not None}
    for row_id, (spec, message_id, header_text, payload_text, epoch) in stored.items():
        is_sent, is_dead, last_error, attempts, key = ends[row_id]
        body = payload_text.encode() if payload_text is not None else spec.payload_bytes
        doubts = rowspace.problems(spec, EXCHANGE, header_text, epoch, body, frame_max)
        event("row: " + (doubts[0] if doubts else "within every limit")
              + (" -> sent" if is_sent else " -> dead" if is_dead else " -> pending"))
        assert attempts <= MAX_ATTEMPTS, f"row {row_id}: {attempts} attempts"
        if not (is_sent or is_dead):
            # a dead row blocks its key until an operator acts (DESIGN.md, Ordering)
            assert any(k == key and i < row_id for k, i in dead_keys), (
                f"row {row_id} still pending after the drain: {ends[row_id]}")
            continue
        if is_dead:
            assert last_error, f"row {row_id} dead without a reason"
            assert doubts, f"row {row_id} is within every limit but dead: {last_error}"
            continue
        got = received.get(str(message_id))
        assert got is not None, f"row {row_id} marked sent, never received"
        want = rowspace.expected(body, spec.content_type, payload_text is not None,
                                 header_text, spec.message_type, spec.correlation_id, epoch)
        assert got.body == want.body
        assert got.routing_key == spec.routing_key
        rowspace.check_properties(got.properties, want, settings.app_id,
                                  f"row {row_id} (created_at {epoch})")


@rowspace.INTEGRATION
@rowspace.with_edges(EXCHANGE, whole_range=True)
@given(batch=rowspace.batches(EXCHANGE, whole_range=True, refusable=True))
def test_every_row_ends_sent_or_dead_and_good_rows_are_delivered(
        schema: str, fanout: tuple[str, int], batch: list[RowSpec]) -> None:
    queue, frame_max = fanout
    settings = support.make_settings(
        schema, on_sent="mark", max_attempts=MAX_ATTEMPTS, retry_base=0, retry_max=0,
        batch_size=50, concurrency=2, max_body_bytes=MAX_BODY, publish_timeout=5.0)
    asyncio.run(run_example(settings, queue, frame_max, batch))
