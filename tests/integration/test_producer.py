"""The Python producer API writes in the caller's transaction, whatever the connection kind."""

from __future__ import annotations

from uuid import UUID

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import outbox
from outbox.migrate import sqlalchemy_url
from outbox.settings import Settings


def rows(settings: Settings) -> list[tuple[object, ...]]:
    with psycopg.connect(settings.database_url) as conn:
        return conn.execute(sql.SQL(
            "SELECT message_id, routing_key, payload, payload_bytes, ordering_key, headers, "
            "message_type, correlation_id, available_at > now() + interval '30 seconds' "
            "FROM {}.outbox ORDER BY id").format(sql.Identifier(settings.schema))).fetchall()


def test_sqlalchemy_session_commit_and_rollback(settings: Settings) -> None:
    engine = create_engine(sqlalchemy_url(settings.database_url))
    with Session(engine) as session, session.begin():
        mid = outbox.enqueue(session, "orders.created", {"id": 1}, schema=settings.schema,
                             ordering_key="order-1", headers={"traceparent": "00-x"},
                             message_type="order.created", correlation_id="c1", delay=60)
    with Session(engine) as session:
        outbox.enqueue(session, "orders.created", {"id": 2}, schema=settings.schema)
        session.rollback()
    engine.dispose()
    assert isinstance(mid, UUID)
    assert rows(settings) == [(mid, "orders.created", {"id": 1}, None, "order-1",
                               {"traceparent": "00-x"}, "order.created", "c1", True)]


def test_sqlalchemy_connection_and_bytes_payload(settings: Settings) -> None:
    engine = create_engine(sqlalchemy_url(settings.database_url))
    with engine.begin() as conn:
        outbox.enqueue(conn, "blobs", b"\x00\xff", schema=settings.schema)
        conn.execute(text("SELECT 1"))
    engine.dispose()
    [row] = rows(settings)
    assert row[2] is None and row[3] == b"\x00\xff"


def test_psycopg_connection(settings: Settings) -> None:
    with psycopg.connect(settings.database_url) as conn:
        outbox.enqueue(conn, "a", [1, 2, 3], schema=settings.schema)
        conn.rollback()
        outbox.enqueue(conn, "b", "text", schema=settings.schema)
        conn.commit()
    assert [(r[1], r[2]) for r in rows(settings)] == [("b", "text")]


async def test_sqlalchemy_async_session(settings: Settings) -> None:
    engine = create_async_engine(sqlalchemy_url(settings.database_url))
    async with AsyncSession(engine) as session, session.begin():
        await outbox.enqueue_async(session, "async.session", {"ok": True},
                                   schema=settings.schema)
    await engine.dispose()
    assert [r[1] for r in rows(settings)] == ["async.session"]


async def test_psycopg_async_connection(settings: Settings) -> None:
    async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
        await outbox.enqueue_async(conn, "async.psycopg", {"ok": True}, schema=settings.schema)
        await conn.commit()
    assert [r[1] for r in rows(settings)] == ["async.psycopg"]


def test_an_empty_routing_key_is_refused_before_the_database() -> None:
    with pytest.raises(ValueError, match="routing_key"):
        outbox.enqueue(object(), "", {})
