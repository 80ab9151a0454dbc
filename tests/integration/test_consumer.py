"""The inbox consumer (outbox.consumer) against the real PostgreSQL and RabbitMQ.

Every test ends by counting effect rows per message id: exactly one each, whatever the number of
deliveries. Faults are injected by overriding one method of the real consumer (the ack), by
cutting its connection, or by killing a private RabbitMQ node (tests/rabbit_node.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiormq
import psycopg
import pytest
from pamqp import commands as spec
from psycopg import sql

from outbox.consumer import ATTEMPT_HEADER, DEAD_REASON_HEADER, Consumer, Message
from outbox.consumer.message import _Delivery, _Subscription
from outbox.settings import Settings
from tests import support
from tests.rabbit_node import RabbitNode

pytestmark = pytest.mark.timeout(120)


# -- helpers ---------------------------------------------------------------------------------------

def create_effects(settings: Settings) -> None:
    """The consumer's business table: no unique key, so a second effect would show."""
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {}.effects (message_id uuid NOT NULL, n int)").format(
            sql.Identifier(settings.schema)))


def effects(settings: Settings) -> Counter[uuid.UUID]:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        rows = conn.execute(sql.SQL("SELECT message_id FROM {}.effects").format(
            sql.Identifier(settings.schema))).fetchall()
    return Counter(r[0] for r in rows)


def effect_handler(schema: str, calls: Counter[uuid.UUID] | None = None) -> Any:
    query = sql.SQL("INSERT INTO {}.effects (message_id, n) VALUES (%s, %s)").format(
        sql.Identifier(schema))

    async def handle(conn: psycopg.AsyncConnection[Any], message: Message) -> None:
        if calls is not None:
            calls[message.message_id] += 1
        await conn.execute(query, (message.message_id, message.json()["n"]))

    return handle


class _Absent(str):
    """aiormq fills in a missing message_id; an empty string that is truthy gets past that
    check, and pamqp then leaves the property out of the frame: the consumer sees none."""

    def __bool__(self) -> bool:
        return True


async def publish(url: str, queue: str, ids: Iterable[uuid.UUID | str | None],
                  **props: Any) -> None:
    """Publish one persistent message per id (None: no message_id), with confirms."""
    conn = await aiormq.connect(url)
    try:
        ch = await conn.channel(publisher_confirms=True)
        confirms = [
            ch.basic_publish(
                b'{"n": %d}' % i, routing_key=queue,
                properties=spec.Basic.Properties(
                    message_id=_Absent("") if mid is None else str(mid), delivery_mode=2,
                    content_type="application/json", **props))
            for i, mid in enumerate(ids)]
        await asyncio.gather(*confirms)
    finally:
        await conn.close()


async def drain_queue(url: str, queue: str) -> list[aiormq.abc.DeliveredMessage]:
    """Every message now in ``queue`` (basic.get until empty, acked)."""
    conn = await aiormq.connect(url)
    out = []
    try:
        ch = await conn.channel()
        while True:
            msg = await ch.basic_get(queue, no_ack=True)
            if msg.delivery.__class__ is spec.Basic.GetEmpty:
                return out
            out.append(msg)
    finally:
        await conn.close()


async def queue_depth(url: str, queue: str) -> int:
    conn = await aiormq.connect(url)
    try:
        ch = await conn.channel()
        ok = await ch.queue_declare(queue, passive=True)
        return int(ok.message_count or 0)
    finally:
        await conn.close()


def make_consumer(settings: Settings, queue: str, handler: Any, **options: Any) -> Consumer:
    base: dict[str, Any] = dict(name="test", settings=settings, retry_base=0.05, retry_max=0.2,
                                batch_size=50, prefetch=200)
    base.update(options)
    return Consumer(queue, handler, **base)


DRIVERS = ["psycopg", "sqlalchemy"]  # the handler's tx: a connection, or a session


class Tx:
    """Runs SQL on a handler's ``tx`` of either driver: ``execute`` queues a statement (psycopg's
    pipeline mode may send it later), ``fetch`` waits for its rows (and so for all before it)."""

    def __init__(self, driver: str) -> None:
        self.driver = driver

    async def execute(self, tx: Any, statement: str) -> None:
        if self.driver == "sqlalchemy":
            from sqlalchemy import text

            await tx.execute(text(statement))
        else:
            await tx.execute(statement)

    async def fetch(self, tx: Any, statement: str) -> list[Any]:
        if self.driver == "sqlalchemy":
            from sqlalchemy import text

            return list((await tx.execute(text(statement))).all())
        return list(await (await tx.execute(statement)).fetchall())


@contextlib.asynccontextmanager
async def driver_consumer(driver: str, settings: Settings, queue: str, handler: Any, *,
                          options: str = "", **opts: Any) -> AsyncIterator[Consumer]:
    """A running consumer whose handler gets a psycopg connection or a SQLAlchemy session;
    ``options``: libpq options of its database connections."""
    if driver == "psycopg":
        async def connect() -> psycopg.AsyncConnection[Any]:
            return await psycopg.AsyncConnection.connect(settings.database_url, options=options)

        extra = {"connect": connect} if options else {}
        async with make_consumer(settings, queue, handler, **extra, **opts) as consumer:
            yield consumer
        return
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from outbox.migrate import sqlalchemy_url

    engine = create_async_engine(sqlalchemy_url(settings.database_url),
                                 connect_args={"options": options} if options else {})
    try:
        async with make_consumer(settings, queue, handler,
                                 session_factory=async_sessionmaker(engine), **opts) as consumer:
            yield consumer
    finally:
        await engine.dispose()


def effect_sql(schema: str, message: Message) -> str:
    return (f'INSERT INTO "{schema}".effects (message_id, n) '
            f"VALUES ('{message.message_id}', {int(message.json()['n'])})")


@pytest.fixture
async def topology(queue: str) -> AsyncIterator[str]:
    """The test queue; afterwards also deletes the consumer's delay and dead-letter queues."""
    yield queue
    conn = await aiormq.connect(support.AMQP_URL)
    try:
        ch = await conn.channel()
        for ms in (50, 100, 200):
            await ch.queue_delete(f"{queue}.retry.{ms}")
        await ch.queue_delete(f"{queue}.dead")
    finally:
        await conn.close()


@pytest.fixture
def fx(settings: Settings) -> Settings:
    create_effects(settings)
    return settings


# -- exactly one effect per message, whatever the deliveries ---------------------------------------

async def test_published_twice_has_one_effect(fx: Settings, topology: str) -> None:
    ids = [uuid.uuid4() for _ in range(600)]
    await publish(support.AMQP_URL, topology, ids + ids[:200])  # 200 published twice
    async with make_consumer(fx, topology, effect_handler(fx.schema)) as consumer:
        await consumer.wait_for(lambda c: c.applied + c.duplicates >= 800)
    assert effects(fx) == Counter(dict.fromkeys(ids, 1))
    assert consumer.counts.applied == 600
    assert consumer.counts.duplicates == 200
    assert await queue_depth(support.AMQP_URL, topology) == 0


async def test_published_twice_by_the_relay_has_one_effect(fx: Settings, topology: str) -> None:
    """The relay publishes a slice again, as after a lost confirm or a lost mark."""
    from outbox.runner import run_relay

    settings = fx.replace(on_sent="mark")
    ids = support.insert_rows(settings, 400, topology)
    async with make_consumer(fx, topology, effect_handler(fx.schema)) as consumer:
        assert (await run_relay(settings, drain=True)).published == 400
        with psycopg.connect(fx.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("UPDATE {}.outbox SET sent_at = NULL WHERE mod(id, 4) = 0").format(
                sql.Identifier(fx.schema)))
        assert (await run_relay(settings, drain=True)).published == 100
        await consumer.wait_for(lambda c: c.applied >= 400 and c.duplicates >= 100)
    assert effects(fx) == Counter(dict.fromkeys(ids, 1))
    assert consumer.counts.received == 500


@pytest.mark.parametrize("driver", DRIVERS)
async def test_database_outage_holds_the_batch(fx: Settings, topology: str, driver: str) -> None:
    """While the database is unreachable no attempt is counted and nothing is dead-lettered."""
    refusals = 3

    async def connect() -> psycopg.AsyncConnection[Any]:
        nonlocal refusals
        if refusals:
            refusals -= 1
            raise psycopg.OperationalError("connection refused (simulated outage)")
        return await psycopg.AsyncConnection.connect(fx.database_url)

    ids = [uuid.uuid4() for _ in range(50)]
    await publish(support.AMQP_URL, topology, ids)
    if driver == "psycopg":
        consumer = make_consumer(fx, topology, effect_handler(fx.schema), connect=connect)
        async with consumer:
            await consumer.wait_for(lambda c: c.applied >= 50)
    else:
        from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

        from outbox.migrate import sqlalchemy_url

        engine = create_async_engine(sqlalchemy_url(fx.database_url), async_creator=connect)
        run = Tx(driver)

        async def handle(session: Any, message: Message) -> None:
            await run.execute(session, effect_sql(fx.schema, message))

        try:
            consumer = make_consumer(fx, topology, handle,
                                     session_factory=async_sessionmaker(engine))
            async with consumer:
                await consumer.wait_for(lambda c: c.applied >= 50)
        finally:
            await engine.dispose()
    assert refusals == 0
    assert consumer.counts.retried == consumer.counts.dead_lettered == 0
    assert effects(fx) == Counter(dict.fromkeys(ids, 1))


class RequeueOnce(Consumer):
    """Fault: the first time each batch is settled, requeue it instead of acking (after commit)."""

    seen: set[int]

    async def _settle(self, sub: _Subscription, deliveries: Sequence[_Delivery]) -> None:
        first = [d for d in deliveries if not d.raw.delivery.redelivered]
        if first:
            self.requeued = getattr(self, "requeued", 0) + len(deliveries)
            for d in deliveries:
                await sub.channel.basic_nack(d.tag, requeue=True)
            return
        await super()._settle(sub, deliveries)


class CutBeforeAck(Consumer):
    """Fault: close the whole connection after the commit, before the ack, for the first
    ``cuts`` batches."""

    cuts = 3

    async def _settle(self, sub: _Subscription, deliveries: Sequence[_Delivery]) -> None:
        if self.cuts > 0:
            self.cuts -= 1
            await sub.channel.connection.close()
            return
        await super()._settle(sub, deliveries)


@pytest.mark.parametrize("fault", [RequeueOnce, CutBeforeAck])
async def test_redelivered_after_commit_has_one_effect(
        fx: Settings, topology: str, fault: type[Consumer]) -> None:
    ids = [uuid.uuid4() for _ in range(500)]
    await publish(support.AMQP_URL, topology, ids + ids[:100])  # and some published twice
    consumer = fault(topology, effect_handler(fx.schema), name="test", settings=fx,
                     batch_size=50, prefetch=200, retry_base=0.05, retry_max=0.2)
    async with consumer:
        # every one of the 600 messages acked once (a requeued one is acked later)
        await consumer.wait_for(lambda c: c.acked >= 600, timeout=60)
    assert await queue_depth(support.AMQP_URL, topology) == 0
    assert effects(fx) == Counter(dict.fromkeys(ids, 1))
    assert consumer.counts.applied == 500
    assert consumer.counts.duplicates >= 100  # the twice-published, plus every redelivery
    assert consumer.counts.received > 600


async def test_sqlalchemy_session_has_one_effect(fx: Settings, topology: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

    from outbox.migrate import sqlalchemy_url

    engine = create_async_engine(sqlalchemy_url(fx.database_url))
    insert = text(f'INSERT INTO "{fx.schema}".effects (message_id, n) VALUES (:m, :n)')

    ids = [uuid.uuid4() for _ in range(300)]
    poison = ids[123]

    async def handle(session: AsyncSession, message: Message) -> None:
        await session.execute(insert, {"m": message.message_id, "n": message.json()["n"]})
        if message.message_id == poison:
            raise KeyError("no such customer")

    await publish(support.AMQP_URL, topology, ids + ids[:50])
    try:
        consumer = make_consumer(fx, topology, handle, max_attempts=2,
                                 session_factory=async_sessionmaker(engine))
        async with consumer:
            await consumer.wait_for(lambda c: c.applied + c.duplicates >= 349 and
                                    c.dead_lettered >= 1)
    finally:
        await engine.dispose()
    assert effects(fx) == Counter({m: 1 for m in ids if m != poison})
    assert consumer.counts.duplicates == 50
    assert consumer.counts.retried == 1
    dead = await drain_queue(support.AMQP_URL, f"{topology}.dead")
    assert [m.header.properties.message_id for m in dead] == [str(poison)]
    assert "KeyError" in dead[0].header.properties.headers[DEAD_REASON_HEADER]


# -- handler errors: retried with a delay, then dead-lettered --------------------------------------

async def test_failing_handler_is_retried_then_dead_lettered(fx: Settings, topology: str) -> None:
    ids = [uuid.uuid4() for _ in range(100)]
    poison, flaky = ids[10], ids[20]
    attempts: dict[uuid.UUID, set[int]] = {poison: set(), flaky: set()}
    inner = effect_handler(fx.schema)

    async def handle(conn: psycopg.AsyncConnection[Any], message: Message) -> None:
        await inner(conn, message)  # its effect must be rolled back when we raise
        if message.message_id in attempts:
            attempts[message.message_id].add(message.attempt)
        if message.message_id == poison:
            raise ValueError("cannot bill order 10")
        if message.message_id == flaky and message.attempt < 3:
            raise ConnectionRefusedError("payment service down")

    await publish(support.AMQP_URL, topology, ids)
    consumer = make_consumer(fx, topology, handle, max_attempts=4)
    async with consumer:
        await consumer.wait_for(lambda c: c.dead_lettered >= 1 and c.applied >= 99)
    dead = await drain_queue(support.AMQP_URL, f"{topology}.dead")
    assert [m.header.properties.message_id for m in dead] == [str(poison)]
    headers = dead[0].header.properties.headers
    assert "ValueError: cannot bill order 10" in headers[DEAD_REASON_HEADER]
    assert "failed 4 times" in headers[DEAD_REASON_HEADER]
    assert headers[ATTEMPT_HEADER] == 4
    assert dead[0].body == b'{"n": 10}'
    assert attempts == {poison: {1, 2, 3, 4}, flaky: {1, 2, 3}}
    assert effects(fx) == Counter({m: 1 for m in ids if m != poison})
    assert consumer.counts.retried == 3 + 2
    assert await queue_depth(support.AMQP_URL, topology) == 0


async def test_retry_survives_a_consumer_crash(fx: Settings, topology: str) -> None:
    """The retry copy is confirmed before the original is acked: a consumer that dies in between
    leaves two copies (the inbox absorbs one), never none."""
    ids = [uuid.uuid4() for _ in range(5)]
    failing = {ids[2]}

    class DiesAfterRepublish(Consumer):
        async def _retry_or_dead_letter(self, sub: _Subscription, d: _Delivery,
                                        reason: str) -> None:
            await super()._retry_or_dead_letter(sub, d, reason)
            await sub.channel.connection.close()  # the ack of the original never goes out

    async def handle(conn: psycopg.AsyncConnection[Any], message: Message) -> None:
        if message.message_id in failing:
            failing.clear()
            raise RuntimeError("first attempt fails")
        await effect_handler(fx.schema)(conn, message)

    await publish(support.AMQP_URL, topology, ids)
    consumer = DiesAfterRepublish(topology, handle, name="test", settings=fx, batch_size=1,
                                  prefetch=1, retry_base=0.05, retry_max=0.05)
    async with consumer:
        await consumer.wait_for(lambda c: c.applied == 5 and c.duplicates >= 1)
    assert effects(fx) == Counter(dict.fromkeys(ids, 1))


async def test_message_without_valid_id_is_dead_lettered(fx: Settings, topology: str) -> None:
    good = [uuid.uuid4() for _ in range(20)]
    await publish(support.AMQP_URL, topology, [*good[:10], None, "order-17", *good[10:]])
    async with make_consumer(fx, topology, effect_handler(fx.schema)) as consumer:
        await consumer.wait_for(lambda c: c.applied >= 20 and c.invalid >= 2)
        assert consumer.subscribed.is_set()  # still running
    dead = await drain_queue(support.AMQP_URL, f"{topology}.dead")
    reasons = sorted(m.header.properties.headers[DEAD_REASON_HEADER] for m in dead)
    assert reasons == ["message_id is not a UUID: 'order-17'",
                       "no message_id: cannot be deduplicated"]
    assert effects(fx) == Counter(dict.fromkeys(good, 1))


# -- broker restart and basic.cancel ---------------------------------------------------------------

async def test_survives_broker_restart(fx: Settings, tmp_path: Path) -> None:
    node = await asyncio.to_thread(RabbitNode(tmp_path).start)
    try:
        settings = fx.replace(amqp_url=node.url, db_timeout=2.0, publish_timeout=2.0,
                              heartbeat=2)
        ids = [uuid.uuid4() for _ in range(3000)]
        consumer = make_consumer(settings, "orders", effect_handler(fx.schema), batch_size=100,
                                 prefetch=300)
        async with consumer:
            async with asyncio.timeout(20):
                await consumer.subscribed.wait()
            await publish(node.url, "orders", ids[:2000])
            await consumer.wait_for(lambda c: c.applied >= 300)
            await asyncio.to_thread(node.restart)  # SIGKILL mid-stream, then start again
            await publish(node.url, "orders", ids[2000:])
            await consumer.wait_for(lambda c: c.applied >= 3000, timeout=60)
        assert consumer.counts.connections >= 2
        assert effects(fx) == Counter(dict.fromkeys(ids, 1))
    finally:
        await asyncio.to_thread(node.kill)


@pytest.mark.parametrize("declare", [True, False])
async def test_basic_cancel_leads_to_resubscription(
        fx: Settings, topology: str, declare: bool) -> None:
    """Deleting the queue makes the broker send basic.cancel; the consumer subscribes again to the
    queue declared anew (by itself with ``declare``, else by the test)."""
    consumer = make_consumer(fx, topology, effect_handler(fx.schema), declare=declare)
    first, second = [uuid.uuid4() for _ in range(50)], [uuid.uuid4() for _ in range(50)]
    async with consumer:
        await publish(support.AMQP_URL, topology, first)
        await consumer.wait_for(lambda c: c.applied >= 50)
        await support.delete_queues([topology])  # the broker cancels our consumer
        await support.declare_queue(topology)
        await publish(support.AMQP_URL, topology, second)
        await consumer.wait_for(lambda c: c.applied >= 100)
        assert consumer.counts.connections == 1  # the same connection, a new subscription
    assert effects(fx) == Counter(dict.fromkeys(first + second, 1))


# -- make demo -------------------------------------------------------------------------------------

def test_demo_runs_and_skips_duplicates() -> None:
    schema = support.unique("demo")
    env = {**os.environ, "OUTBOX_DATABASE_URL": support.DATABASE_URL,
           "OUTBOX_AMQP_URL": support.AMQP_URL, "OUTBOX_DEMO_SCHEMA": schema,
           "OUTBOX_DEMO_EVENTS": "2000"}
    try:
        proc = subprocess.run([sys.executable, "-m", "outbox.demo"], env=env,
                              capture_output=True, text=True, timeout=90)
    finally:
        support.drop_schema(schema)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"duplicates skipped:\s+(\d+)", proc.stdout)
    assert m and int(m.group(1)) > 0, proc.stdout
    assert re.search(r"effects applied:\s+2000\b", proc.stdout), proc.stdout


# -- database errors: a failed statement is a handler error, a lost connection is waited out -------
#
# The same handler code runs on both drivers (psycopg connection or SQLAlchemy session) and the
# same assertions hold for both. Every error is provoked for real on the real PostgreSQL.

@contextlib.asynccontextmanager
async def locks_table(
        settings: Settings) -> AsyncIterator[tuple[str, psycopg.AsyncConnection[Any]]]:
    """A table ``locks`` with rows 1 and 2, and a second connection (autocommit) to compete with
    the handler's transaction."""
    table = f'"{settings.schema}".locks'
    async with await psycopg.AsyncConnection.connect(settings.database_url,
                                                     autocommit=True) as other:
        await other.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, n int NOT NULL)")
        await other.execute(f"INSERT INTO {table} VALUES (1, 0), (2, 0)")
        yield table, other


async def wait_lock_wait(watch: psycopg.AsyncConnection[Any], pid: int) -> None:
    """Until backend ``pid`` waits for a lock (no event tells it: poll, under a deadline)."""
    async def waiting() -> bool:
        cur = await watch.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,))
        row = await cur.fetchone()
        return row is not None and row[0] == "Lock"

    await support.until(waiting, 10, f"backend {pid} waiting for a lock", interval=0.01)


Provoke = Callable[[Any, Tx], Awaitable[None]]


@contextlib.asynccontextmanager
async def statement_timeout(settings: Settings) -> AsyncIterator[tuple[Provoke, str, str]]:
    async def provoke(tx: Any, run: Tx) -> None:
        await run.execute(tx, "SET LOCAL statement_timeout = '50ms'")
        await run.fetch(tx, "SELECT pg_sleep(30)")

    yield provoke, "canceling statement due to statement timeout", ""


@contextlib.asynccontextmanager
async def deadlock(settings: Settings) -> AsyncIterator[tuple[Provoke, str, str]]:
    """The handler locks row 1 then row 2; the other transaction row 2 then row 1. The handler's
    backend runs the deadlock check first (a shorter deadlock_timeout), so it is the victim."""
    async with locks_table(settings) as (table, other), \
            await psycopg.AsyncConnection.connect(settings.database_url,
                                                  autocommit=True) as watch:
        async def provoke(tx: Any, run: Tx) -> None:
            await other.execute("BEGIN")
            await other.execute("SET LOCAL deadlock_timeout = '1min'")
            await other.execute(f"UPDATE {table} SET n = n + 1 WHERE id = 2")
            await run.fetch(tx, f"UPDATE {table} SET n = n + 1 WHERE id = 1 RETURNING n")
            blocked = asyncio.ensure_future(
                other.execute(f"UPDATE {table} SET n = n + 1 WHERE id = 1"))
            try:
                await wait_lock_wait(watch, other.info.backend_pid)
                await run.execute(tx, "SET LOCAL deadlock_timeout = '10ms'")
                await run.fetch(tx, f"UPDATE {table} SET n = n + 1 WHERE id = 2 RETURNING n")
            finally:
                # The victim's locks are released when its statement fails, before its ROLLBACK.
                async with asyncio.timeout(10):
                    await blocked
                await other.execute("ROLLBACK")

        yield provoke, "deadlock detected", ""


@contextlib.asynccontextmanager
async def serialization_failure(settings: Settings) -> AsyncIterator[tuple[Provoke, str, str]]:
    """The consumer's transactions are SERIALIZABLE; another transaction updates the row the
    handler read, and commits, before the handler updates it."""
    async with locks_table(settings) as (table, other):
        async def provoke(tx: Any, run: Tx) -> None:
            await run.fetch(tx, f"SELECT n FROM {table} WHERE id = 1")
            await other.execute(f"UPDATE {table} SET n = n + 1 WHERE id = 1")
            await run.fetch(tx, f"UPDATE {table} SET n = n + 1 WHERE id = 1 RETURNING n")

        yield (provoke, "could not serialize access",
               "-c default_transaction_isolation=serializable")


@contextlib.asynccontextmanager
async def lock_timeout(settings: Settings) -> AsyncIterator[tuple[Provoke, str, str]]:
    """Another connection holds row 1 for the whole test; the handler waits 50 ms for it."""
    async with locks_table(settings) as (table, other):
        await other.execute("BEGIN")
        await other.execute(f"SELECT n FROM {table} WHERE id = 1 FOR UPDATE")

        async def provoke(tx: Any, run: Tx) -> None:
            await run.execute(tx, "SET LOCAL lock_timeout = '50ms'")
            await run.fetch(tx, f"SELECT n FROM {table} WHERE id = 1 FOR UPDATE")

        yield provoke, "canceling statement due to lock timeout", ""
        await other.execute("ROLLBACK")


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("failure", [statement_timeout, deadlock, serialization_failure,
                                     lock_timeout])
async def test_statement_that_always_fails_is_dead_lettered(
        fx: Settings, topology: str, driver: str, failure: Any) -> None:
    """A statement that fails on a live connection is a handler error, with either driver: its
    batch is run again one message per transaction, each failure counts an attempt, the message is
    retried and dead-lettered after max_attempts, and every other message is applied once."""
    ids = [uuid.uuid4() for _ in range(120)]
    poison = ids[10]  # in the first batch of 50
    attempts: list[int] = []
    run = Tx(driver)
    async with failure(fx) as (provoke, error, options):
        async def handle(tx: Any, message: Message) -> None:
            await run.execute(tx, effect_sql(fx.schema, message))  # rolled back with the failure
            if message.message_id == poison:
                attempts.append(message.attempt)
                await provoke(tx, run)

        await publish(support.AMQP_URL, topology, ids)
        async with driver_consumer(driver, fx, topology, handle, options=options,
                                   max_attempts=3) as consumer:
            await consumer.wait_for(lambda c: c.dead_lettered >= 1 and c.applied >= 119,
                                    timeout=30)
    dead = await drain_queue(support.AMQP_URL, f"{topology}.dead")
    assert [m.header.properties.message_id for m in dead] == [str(poison)]
    reason = dead[0].header.properties.headers[DEAD_REASON_HEADER]
    assert "failed 3 times" in reason and error in reason, reason
    # first in its batch, then alone (the batch was split); a retry may come back in a batch too
    assert attempts[:2] == [1, 1] and sorted(set(attempts)) == [1, 2, 3], attempts
    assert consumer.counts.retried == 2
    assert consumer.counts.applied == 119
    assert effects(fx) == Counter({m: 1 for m in ids if m != poison})
    assert await queue_depth(support.AMQP_URL, topology) == 0


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("swallowed", [False, True])
async def test_lost_connection_is_retried_without_an_attempt(
        fx: Settings, topology: str, driver: str, swallowed: bool) -> None:
    """The handler's own backend is terminated mid-transaction: the batch is held and run again
    on a new connection, no attempt counted, nothing retried or dead-lettered. Also when the
    handler catches that error and goes on (its next statement fails differently)."""
    ids = [uuid.uuid4() for _ in range(120)]
    victim = ids[10]
    attempts: list[int] = []
    run = Tx(driver)

    async def handle(tx: Any, message: Message) -> None:
        await run.execute(tx, effect_sql(fx.schema, message))
        if message.message_id == victim:
            attempts.append(message.attempt)
            if len(attempts) <= 2:  # the second time alone, if the batch was wrongly split
                try:
                    await run.fetch(tx, "SELECT pg_terminate_backend(pg_backend_pid())")
                except Exception:
                    if not swallowed:
                        raise
                await run.fetch(tx, "SELECT 1")

    await publish(support.AMQP_URL, topology, ids)
    async with driver_consumer(driver, fx, topology, handle, max_attempts=3) as consumer:
        await consumer.wait_for(lambda c: c.applied >= 120, timeout=30)
    assert attempts == [1, 1, 1]  # the whole batch again, as the same attempt
    assert consumer.counts.retried == consumer.counts.dead_lettered == 0
    assert effects(fx) == Counter(dict.fromkeys(ids, 1))
    assert await queue_depth(support.AMQP_URL, topology) == 0
