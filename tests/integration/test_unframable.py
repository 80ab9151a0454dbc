"""Rows no frame can carry, against the real PostgreSQL and RabbitMQ: the claim reads any
created_at, and a row that makes the broker close the whole connection is found and parked."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import sql

from outbox import frames, limits, migrate
from outbox.publisher import AmqpPublisher
from outbox.rows import Outcome, Result, Row
from outbox.settings import Settings
from outbox.store import PgStore
from tests import support


@pytest.mark.parametrize("created_at", ["infinity", "-infinity", "10000-01-01 00:00:00+00",
                                        "4713-01-01 00:00:00+00 BC"])
async def test_the_claim_reads_a_created_at_no_client_can_load(settings: Settings,
                                                                created_at: str) -> None:
    """psycopg cannot load such a timestamp: the claim itself raised, and the lane rolled its
    batch back at every cycle. Now it comes back as None, for the relay to park the row."""
    ident = sql.Identifier(settings.schema)
    migrate.downgrade(settings, "0002")  # a row written before revision 0003 refused it
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("INSERT INTO {}.outbox (routing_key, payload, created_at) "
                             "VALUES ('rk', '{{}}', now()), ('rk', '{{}}', %s)").format(ident),
                     (created_at,))
    migrate.upgrade(settings)
    store = PgStore(settings)
    session = await store.session()
    try:
        first, second = await session.claim(10)
        await session.release()
    finally:
        await session.close()
    assert first.created_at is not None and second.created_at is None
    assert (limits.row_problem(second, 131_072) or "").startswith("created_at: infinite")
    stats = await store.stats()  # `outbox status` reads it too
    assert stats.pending == 2


@pytest.fixture
async def publisher() -> AsyncIterator[AmqpPublisher]:
    pub = AmqpPublisher(support.make_settings("public", publish_timeout=10.0))
    await pub.start()
    assert await pub.wait_ready(10)
    try:
        yield pub
    finally:
        await pub.close()


def rows(queue: str, n: int) -> list[Row]:
    return [Row(i, uuid.uuid4(), "", queue, b'{"i": %d}' % i, "application/json", None, None,
                None, None, datetime.now(UTC), 0) for i in range(n)]


_OK = Outcome.CONFIRMED


def let_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let an oversized header frame reach the broker, as a limit the relay did not know of
    would: the check of `outbox.limits` and the marshalling's own are switched off."""
    monkeypatch.setattr(limits, "problem", lambda *args, **kwargs: None)
    marshal = frames.marshal_message

    def unchecked(number: int, body: bytes, exchange: str, routing_key: str, props: Any,
                  max_size: int) -> bytes:
        return marshal(number, body, exchange, routing_key, props, 1 << 30)

    monkeypatch.setattr(frames, "marshal_message", unchecked)


async def test_a_row_that_closes_the_connection_is_found_and_the_others_confirmed(
        publisher: AmqpPublisher, queue: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """RabbitMQ closes the whole connection (501 frame_too_large) for one row's header frame:
    every lane's confirms fail with it. The rows in flight are published again apart, in halves,
    until the one that closes a connection alone is found: it is poison; the others are
    confirmed, and another lane's batch on the same connection is not blamed."""
    let_through(monkeypatch)
    mine, other = rows(queue, 40), rows(queue, 30)
    mine[17].headers = orjson.dumps({"blob": "x" * 200_000}).decode()
    warm = rows(queue, 2)  # both lanes' channels open on the shared connection
    warmed = await asyncio.gather(*(publisher.publish([w], lane) for lane, w in enumerate(warm)))
    assert [[r.outcome for r in batch] for batch in warmed] == [[_OK], [_OK]]
    conn = publisher.connection
    assert conn is not None
    with caplog.at_level(logging.WARNING, logger="outbox.publisher"):
        results: list[list[Result]] = await asyncio.wait_for(asyncio.gather(
            publisher.publish(mine, 0), publisher.publish(other, 1)), 30)
    assert conn.is_closed  # the shared connection went down: the path under test was taken
    assert [i for i, r in enumerate(results[0]) if r.outcome is not Outcome.CONFIRMED] == [17]
    assert results[0][17].outcome is Outcome.POISON
    assert "closes the connection" in results[0][17].reason
    assert "frame_too_large" in results[0][17].reason
    # the other lane's rows are confirmed, or unsettled when its write came after the close
    # (claimed again later): never blamed
    assert {r.outcome for r in results[1]} <= {Outcome.CONFIRMED, Outcome.UNSETTLED}
    unsettled = [r for r, res in zip(other, results[1], strict=True)
                 if res.outcome is Outcome.UNSETTLED]
    assert await publisher.wait_ready(10)  # the publisher goes on, on a new connection
    again = await asyncio.wait_for(publisher.publish(unsettled + rows(queue, 3), 1), 10)
    assert [r.outcome for r in again] == [Outcome.CONFIRMED] * (len(unsettled) + 3)
    assert "unexpected publish error" not in caplog.text
    async with support.Collector([queue]) as consumer:
        await consumer.reached(74, 10)
    delivered = set(consumer.message_ids)
    assert str(mine[17].message_id) not in delivered
    assert {str(r.message_id) for r in warm + mine + other if r is not mine[17]} <= delivered
