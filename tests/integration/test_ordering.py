"""Per-key ordering, enforced by the claim in PostgreSQL (docs/ordering.md).

The claim takes only the head of each key (its first unsent row), and only once the transaction
that wrote it is older than every transaction still running. These tests drive `PgSession.claim`
directly (two sessions stand for two relays) and run real relays against RabbitMQ.

The head rule depends on the cluster-wide oldest running transaction, which other sessions on a
shared server can hold back for a moment: every "is claimable" check therefore polls (with a
deadline), while every "is not claimable" check is a plain assertion.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import sql

from outbox.rows import Row, Settlement
from outbox.runner import run_relay
from outbox.settings import Settings
from outbox.store import PgSession, PgStore
from tests import support

WAIT = 60.0  # deadline for a row to become claimable (a long transaction anywhere holds it)


def insert(settings: Settings, keys: list[str | None], routing_key: str = "r") -> list[int]:
    """Insert one row per entry of ``keys`` (autocommit, one statement); returns their ids."""
    q = sql.SQL(
        "INSERT INTO {}.outbox (routing_key, payload, ordering_key) "
        "SELECT %s, jsonb_build_object('i', i), k FROM unnest(%s::text[]) WITH ORDINALITY u(k, i) "
        "ORDER BY i RETURNING id").format(sql.Identifier(settings.schema))
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        return sorted(r[0] for r in conn.execute(q, (routing_key, keys)).fetchall())


def execute(settings: Settings, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
    q = sql.SQL(query).format(sql.Identifier(settings.schema))
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        cur = conn.execute(q, params)
        return cur.fetchall() if cur.description else []


async def session(settings: Settings) -> PgSession:
    return await PgStore(settings).session()


@contextlib.asynccontextmanager
async def two_writers(settings: Settings) -> AsyncIterator[tuple[
        psycopg.Connection[Any], psycopg.Connection[Any], PgSession,
        Callable[[psycopg.Connection[Any]], psycopg.Cursor[Any]]]]:
    """Two producer connections, each with a transaction of its own (T1, T2), a relay session,
    and a function that inserts a row of key "k" in a given producer's open transaction."""
    ins = sql.SQL("INSERT INTO {}.outbox (routing_key, payload, ordering_key) "
                  "VALUES ('r', '1', 'k') RETURNING id").format(sql.Identifier(settings.schema))
    t1 = psycopg.connect(settings.database_url)
    t2 = psycopg.connect(settings.database_url)
    s = await session(settings)
    try:
        yield t1, t2, s, lambda conn: conn.execute(ins)
    finally:
        t1.rollback()
        t1.close()
        t2.close()
        await s.close()


async def claim_until(s: PgSession, want: Callable[[list[Row]], bool],
                      limit: int = 500) -> list[Row]:
    """Claim until ``want(rows)``; releases the claims that did not satisfy it."""
    deadline = time.monotonic() + WAIT
    while True:
        rows = await s.claim(limit)
        if want(rows):
            return rows
        await s.release()
        if time.monotonic() > deadline:
            raise AssertionError(f"no satisfying claim within {WAIT}s; last: "
                                 f"{[(r.id, r.ordering_key) for r in rows]}")
        await asyncio.sleep(0.05)


def cli(settings: Settings, *args: str) -> str:
    proc = subprocess.run(support.outbox_cmd(*args), env=support.relay_env(settings),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


async def test_two_sessions_never_hold_two_rows_of_one_key(schema: str) -> None:
    """Heads only, one per key per claim, and nothing of a key while its head is in flight."""
    settings = support.make_settings(schema)
    ids = insert(settings, [f"k{i % 50}" for i in range(200)] + [None] * 20)
    first = {f"k{i}": ids[i] for i in range(50)}
    a, b = await session(settings), await session(settings)
    try:
        got = await claim_until(a, lambda rows: len([r for r in rows if r.ordering_key]) == 50)
        keyed = [r for r in got if r.ordering_key]
        assert {r.ordering_key: r.id for r in keyed} == first
        plain = [r.id for r in got if r.ordering_key is None]
        assert len(plain) == 20
        # every head is in flight in a: b gets nothing, neither heads nor the rows behind them
        assert await b.claim(500) == []
        await b.release()
        # a confirms half of the keys and schedules a retry for the other half
        done = [r for r in keyed if int(r.ordering_key[1:]) % 2 == 0]  # type: ignore[index]
        again = [r for r in keyed if int(r.ordering_key[1:]) % 2 == 1]  # type: ignore[index]
        s = Settlement(sent=[r.id for r in done] + plain)
        for r in again:
            s.retry(r.id, 30.0, "nack")
        await a.settle(s)
        # confirmed keys move on to their second row; delayed heads still block their key
        got = await claim_until(b, lambda rows: len(rows) == 25)
        assert sorted(r.id for r in got) == sorted(r.id + 50 for r in done)
        assert await a.claim(500) == []
        await a.release()
        await b.release()
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("on_sent", ["delete", "mark"])
async def test_concurrent_claims_hand_out_each_key_in_id_order(schema: str, on_sent: str) -> None:
    """Two sessions race claim/settle; every claimed row is the oldest unsent row of its key and
    no key is ever held twice at once."""
    settings = support.make_settings(schema, on_sent=on_sent)
    keys = [f"k{i % 7}" for i in range(700)]
    ids = insert(settings, list(keys))
    remaining: dict[str, list[int]] = defaultdict(list)
    for i, k in zip(ids, keys, strict=True):
        remaining[k].append(i)
    in_flight: dict[str, int] = {}
    order: dict[str, list[int]] = defaultdict(list)

    async def lane(s: PgSession) -> None:
        deadline = time.monotonic() + 60
        while any(remaining.values()):
            assert time.monotonic() < deadline, "the lanes did not drain the keys"
            rows = await s.claim(5)
            for r in rows:
                k = r.ordering_key
                assert k is not None
                assert k not in in_flight, f"{k} held twice: {in_flight[k]} and {r.id}"
                assert r.id == remaining[k][0], f"{k}: claimed {r.id}, head is {remaining[k][0]}"
                in_flight[k] = r.id
                order[k].append(r.id)
            await asyncio.sleep(0.002)  # "publishing": let the other lane claim meanwhile
            for r in rows:
                remaining[r.ordering_key].pop(0)  # type: ignore[index]
                del in_flight[r.ordering_key]  # type: ignore[arg-type]
            if rows:
                await s.settle(Settlement(sent=[r.id for r in rows]))
            else:
                await s.release()
                await asyncio.sleep(0.01)

    a, b = await session(settings), await session(settings)
    try:
        await asyncio.wait_for(asyncio.gather(lane(a), lane(b)), 90)
    finally:
        await a.close()
        await b.close()
    for k, got in order.items():
        assert got == sorted(got) and len(got) == 100, k
    left = support.count(settings, "sent_at IS NULL")
    assert left == 0


async def test_out_of_order_commit_waits_for_the_older_transaction(schema: str) -> None:
    """T1 inserts row 1 of k and stays open; T2 inserts row 2 of k and commits: row 2 is not
    claimed until T1 ends (then row 1 goes first)."""
    settings = support.make_settings(schema)
    async with two_writers(settings) as (t1, t2, s, insert_k):
        early = insert(settings, ["other"])  # committed before T1 began: not held back
        row1 = insert_k(t1).fetchone()
        row2 = insert_k(t2).fetchone()
        assert row1 and row2 and row1[0] < row2[0]
        t2.commit()
        # the price of the horizon: any keyed row written after T1 began waits for T1 too,
        # whatever its key; rows without a key never wait
        late = insert(settings, ["late", None])
        got = await claim_until(s, lambda rows: {r.id for r in rows} == {early[0], late[1]})
        await s.settle(Settlement(sent=[r.id for r in got]))
        stats = await PgStore(settings).stats()
        assert stats.held_back_rows == 2  # row 2 and "late"
        writer = stats.oldest_writer
        assert writer is not None and writer.pid is not None and stats.horizon_age_seconds >= 0
        assert writer.xids_since >= 1
        for _ in range(5):
            got = await s.claim(500)
            assert got == [], [r.id for r in got]
            await s.release()
        t1.commit()
        got = await claim_until(s, lambda rows: {r.ordering_key for r in rows} == {"k", "late"})
        assert sorted(r.id for r in got) == [row1[0], late[0]]
        await s.settle(Settlement(sent=[r.id for r in got]))
        got = await claim_until(s, lambda rows: bool(rows))
        assert [r.id for r in got] == [row2[0]]
        await s.release()


async def test_known_gap_a_later_first_write_with_an_earlier_id(schema: str) -> None:
    """What the horizon does not cover (docs/ordering.md, "Not guaranteed"): T2 writes first
    (so its transaction id is older), T1 then takes the smaller row id, T2 commits while T1 is
    open. Row 2 is claimable before row 1 exists for anyone: the key is published in commit
    order, not id order. Applications avoid it by locking the aggregate the key names."""
    settings = support.make_settings(schema)
    async with two_writers(settings) as (t1, t2, s, insert_k):
        t2.execute("SELECT pg_current_xact_id()")  # T2's first write happens here
        row1 = insert_k(t1).fetchone()
        row2 = insert_k(t2).fetchone()
        assert row1 and row2 and row1[0] < row2[0]
        t2.commit()
        got = await claim_until(s, lambda rows: bool(rows))
        assert [r.id for r in got] == [row2[0]]
        await s.release()


async def test_dead_row_blocks_only_its_key_and_retry_releases_it_in_order(
        schema: str, queue: str) -> None:
    settings = support.make_settings(schema)
    keys: list[str | None] = ["a", "b", "a", "b", None, "a", "b", None]
    ids = insert(settings, keys, routing_key=queue)
    by_key: dict[str | None, list[int]] = defaultdict(list)
    for i, k in zip(ids, keys, strict=True):
        by_key[k].append(i)
    execute(settings, "UPDATE {}.outbox SET dead_at = now(), last_error = 'test' WHERE id = %s",
            (by_key["a"][0],))
    mids = dict(execute(settings, "SELECT message_id::text, id FROM {}.outbox"))

    async def relay_until(n: int, consumer: support.Collector) -> None:
        async def delivered() -> bool:
            if consumer.count >= n:
                return True
            await run_relay(settings, drain=True)
            return False

        await support.until(delivered, WAIT + 10, f"{n} messages relayed", interval=0.1)

    async with support.Collector([queue]) as consumer:
        await relay_until(5, consumer)
        await consumer.quiet(0.3)
        got = [mids[m] for m in consumer.message_ids]
        assert [i for i in got if i in by_key["b"]] == by_key["b"]
        assert sorted(i for i in got if i in by_key[None]) == by_key[None]
        assert not set(got) & set(by_key["a"])
        status = orjson.loads(cli(settings, "status", "--json"))
        assert status["dead"] == 1 and status["blocked_keys"] == 1 and status["pending"] == 2

        cli(settings, "dead", "retry", "--id", str(by_key["a"][0]))
        await relay_until(8, consumer)
        await consumer.quiet(0.3)
        got = [mids[m] for m in consumer.message_ids]
    assert [i for i in got if i in by_key["a"]] == by_key["a"]
    assert len(got) == 8
    assert support.count(settings) == 0


async def test_two_relays_publish_each_key_in_id_order(schema: str, queue: str) -> None:
    settings = support.make_settings(schema, batch_size=50)
    keys: list[str | None] = [f"k{i % 20}" if i % 7 else None for i in range(3000)]
    insert(settings, keys, routing_key=queue)
    rows = execute(settings, "SELECT message_id::text, id, ordering_key FROM {}.outbox")
    where = {m: (i, k) for m, i, k in rows}
    relays = [support.start_relay(settings) for _ in range(2)]
    try:
        async with support.Collector([queue]) as consumer:
            await consumer.reached(len(keys), timeout=60)
            await consumer.quiet(0.3)
    finally:
        codes = [support.stop_process(p) for p in relays]
    assert codes == [0, 0]
    seen: dict[str, list[int]] = defaultdict(list)
    for m in dict.fromkeys(consumer.message_ids):  # first deliveries, in arrival order
        i, k = where[m]
        if k is not None:
            seen[k].append(i)
    assert len(seen) == 20
    for k, got in seen.items():
        assert got == sorted(got), f"key {k} out of order"
    assert sum(map(len, seen.values())) == sum(1 for k in keys if k)
    assert support.count(settings) == 0

