"""The same contract runs against the real store/publisher and the in-memory fakes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbox.ports import Publisher, Store
from outbox.publisher import AmqpPublisher
from outbox.settings import Settings
from outbox.store import PgStore
from outbox.testing import BLOCK, InMemoryStore, StubPublisher
from tests import support


@dataclass
class StoreCase:
    store: Store
    insert: Callable[..., int]  # (routing_key, *, ordering_key=None) -> id
    next_block: Callable[[], None]  # the next row's id begins a new block (outbox.testing.BLOCK)


@pytest.fixture(params=["memory", "postgres"])
def store_case(request: pytest.FixtureRequest) -> StoreCase:
    if request.param == "memory":
        mem = InMemoryStore()
        return StoreCase(mem, lambda rk, **kw: mem.insert(rk, {"x": 1}, **kw).id, mem.next_block)
    settings: Settings = request.getfixturevalue("settings")

    def insert(routing_key: str, *, ordering_key: str | None = None) -> int:
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            row = conn.execute(sql.SQL(
                "INSERT INTO {}.outbox (routing_key, payload, ordering_key) "
                "VALUES (%s, '{{\"x\": 1}}', %s) RETURNING id").format(
                    sql.Identifier(settings.schema)), (routing_key, ordering_key)).fetchone()
        assert row is not None
        return int(row[0])

    def next_block() -> None:
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute(  # (the id nextval hands out is never used: setval may go back to it)
                "SELECT setval(s, (nextval(s) + %(b)s - 1) / %(b)s * %(b)s - 1) "
                "FROM pg_get_serial_sequence(%(t)s, 'id') s",
                {"b": BLOCK, "t": f'"{settings.schema}".outbox'})

    return StoreCase(PgStore(settings), insert, next_block)


@pytest.fixture(params=["stub", "amqp"])
async def publisher_case(request: pytest.FixtureRequest,
                         queue: str) -> AsyncIterator[tuple[Publisher, str]]:
    """A publisher whose broker routes the default exchange's ``queue`` and nothing else."""
    if request.param == "stub":
        yield StubPublisher(routable={queue}), queue
        return
    pub = AmqpPublisher(support.make_settings("public", publish_timeout=5.0))
    await pub.start()
    assert await pub.wait_ready(10)
    try:
        yield pub, queue
    finally:
        await pub.close()


def wait(coro: Any) -> Any:
    return asyncio.wait_for(coro, 10)
