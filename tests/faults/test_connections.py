"""Connections that stall, break or refuse, between the relay and the (shared) broker and database.

The relay reaches both services only through `tests.proxy.FaultProxy`; the consumer and the
test's own SQL go to the services directly. The shared services themselves are never touched.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import orjson
import pytest

from outbox.settings import Settings
from tests import support
from tests.faults.harness import (
    Collector,
    Ledger,
    RelayProcess,
    collecting,
    execute,
    fault_settings,
    finish,
    readyz,
    recovered,
    sessions,
    status,
    terminate,
    under_way,
    until,
)
from tests.proxy import FaultProxy

pytestmark = pytest.mark.faults


def proxied(schema: str, amqp: FaultProxy | None, db: FaultProxy | None, **changes: object
            ) -> Settings:
    urls: dict[str, object] = {}
    if amqp is not None:
        urls["amqp_url"] = amqp.url(support.AMQP_URL)
    if db is not None:
        urls["database_url"] = db.url(support.DATABASE_URL)
    return fault_settings(schema, **urls, **changes)


def delivered_but_unsettled(settings: Settings, consumer: Collector) -> set[str]:
    """Message ids the consumer has whose rows are not settled (their confirm is missing)."""
    unsent = {r[0] for r in execute(
        settings, "SELECT message_id::text FROM {}.outbox WHERE sent_at IS NULL")}
    return unsent & consumer.distinct


async def stalled_then_restored(relay: RelayProcess, ledger: Ledger, proxy: FaultProxy,
                                noticed: str, *, within: float, settle: float, said: str) -> None:
    """Stall ``proxy`` mid-drain: the relay must notice (the log line ``noticed``) within
    ``within`` seconds, outlive the silence (longer than aiormq's close or a query's deadline
    waits for the peer), and resume by itself once the link is back, settling every row."""
    proxy.stall()
    t0 = time.monotonic()
    line = await relay.wait_log(noticed, 15)
    detected = time.monotonic() - t0
    print(f"\n{said} after {detected:.2f}s: {line}")
    assert detected < within
    await asyncio.sleep(3)  # the link stays silent a while longer (the scenario)
    assert relay.alive, relay.log_tail()
    proxy.restore()
    await recovered(relay, ledger, settle)


async def test_stalled_broker_fails_by_the_publish_deadline_not_the_heartbeat(
    schema: str, queue: str, ledger: Ledger, amqp_proxy: FaultProxy,
    relays: Callable[..., RelayProcess],
) -> None:
    # small batches: each must confirm within the 2 s deadline even on a busy shared broker
    settings = proxied(schema, amqp_proxy, None, heartbeat=60, publish_timeout=2.0,
                       batch_size=50)
    async with collecting(ledger, [queue]) as consumer:
        relay = await under_way(relays, ledger, consumer, settings, queue, 4000,
                                delivered=300)
        await stalled_then_restored(
            relay, ledger, amqp_proxy, r"within the deadline: reconnecting",
            within=settings.publish_timeout + 1.5, settle=90,
            said="stall detected (publish timeout 2s, heartbeat 60s)")


async def test_confirm_lost_after_the_broker_got_the_message_is_republished(
    schema: str, queue: str, ledger: Ledger, amqp_proxy: FaultProxy,
    relays: Callable[..., RelayProcess],
) -> None:
    settings = proxied(schema, amqp_proxy, None, publish_timeout=10.0, batch_size=500)
    async with collecting(ledger, [queue]) as consumer:
        relay = await under_way(relays, ledger, consumer, settings, queue, 5000,
                                delivered=0)
        amqp_proxy.stall("down")  # publishes reach the broker; its confirms do not come back
        await until(lambda: delivered_but_unsettled(settings, consumer), 10,
                    "a message at the consumer, its row unsettled")
        await consumer.quiet(timeout=10)  # whatever was confirmed before the stall is settled now
        held = delivered_but_unsettled(settings, consumer)
        assert held, "no message is waiting for its confirm"
        amqp_proxy.cut()
        amqp_proxy.restore()
        tally = await recovered(relay, ledger)
    print(f"{len(held)} messages routed and unsettled when the connection was cut")
    # the held confirms come back as duplicates (the inbox absorbs them); rows of the same batch
    # whose confirm had arrived before the stall are settled, not published again
    assert 1 <= tally.duplicates <= len(held)


async def test_db_connection_killed_after_publish_before_mark(
    schema: str, queue: str, ledger: Ledger, amqp_proxy: FaultProxy, db_proxy: FaultProxy,
    relays: Callable[..., RelayProcess],
) -> None:
    settings = proxied(schema, amqp_proxy, db_proxy, publish_timeout=10.0, batch_size=300,
                       concurrency=1)
    async with collecting(ledger, [queue]) as consumer:
        relay = await under_way(relays, ledger, consumer, settings, queue, 3000,
                                delivered=0)
        amqp_proxy.stall("down")  # hold the confirms: the batch stays published but unmarked
        await until(lambda: delivered_but_unsettled(settings, consumer), 10,
                    "a batch at the broker, its rows unmarked")
        await consumer.quiet(timeout=10)
        held = delivered_but_unsettled(settings, consumer)
        in_txn = await until(
            lambda: [s for s in sessions(db_proxy.upstream_ports())
                     if s[1] == "idle in transaction"], 5, "the batch's open transaction")
        assert terminate(db_proxy.upstream_ports(), "outbox-relay") >= len(in_txn)
        amqp_proxy.release()  # the confirms arrive; the mark cannot be written any more
        await relay.wait_log(r"database unavailable", 15)
        tally = await recovered(relay, ledger)
    print(f"marks lost for {len(held)} confirmed messages")
    assert held and tally.duplicates >= len(held)


async def test_database_gone_for_a_while_relay_reconnects_and_resumes(
    schema: str, queue: str, ledger: Ledger, db_proxy: FaultProxy,
    relays: Callable[..., RelayProcess],
) -> None:
    """A database restart, without restarting the shared one: every relay session is cut and
    reconnects are refused for a while, then the database "comes back"."""
    settings = proxied(schema, None, db_proxy, batch_size=200)
    async with collecting(ledger, [queue]) as consumer:
        relay = await under_way(relays, ledger, consumer, settings, queue, 5000,
                                delivered=200)
        # as a restart does: the server ends every session (57P01), then refuses for a while
        assert terminate(db_proxy.upstream_ports()) >= 1
        db_proxy.refuse()
        await relay.wait_log(r"database unavailable", 15)
        ledger.insert(settings, 1000, queue, start=5000)
        down_for = 4.0
        await asyncio.sleep(down_for)  # the outage itself, not a synchronisation
        assert relay.alive, relay.log_tail()
        backlog = status(settings)
        print(f"\nstatus while the database is unreachable: {backlog}")
        assert isinstance(backlog["pending"], int) and backlog["pending"] > 0
        db_proxy.restore()
        await ledger.wait_settled(60)
        assert relay.alive, relay.log_tail()
        assert relay.logged(r"database connected")
        await ledger.account()


async def test_slow_links_deliver_everything_without_failures(
    schema: str, queue: str, ledger: Ledger, amqp_proxy: FaultProxy, db_proxy: FaultProxy,
    relays: Callable[..., RelayProcess],
) -> None:
    settings = proxied(schema, amqp_proxy, db_proxy, batch_size=200)
    amqp_proxy.slow(0.02)
    db_proxy.slow(0.02)
    async with collecting(ledger, [queue]):
        ledger.insert(settings, 2000, queue)
        relay = relays(settings)
        await ledger.wait_settled(60)
        tally = await ledger.account()
        assert not relay.logged(r"publish failed"), relay.log_tail()
    assert tally.duplicates == 0 and tally.dead == 0


async def test_wrong_password_is_one_clear_line_and_the_relay_keeps_running(
    schema: str, queue: str, ledger: Ledger, relays: Callable[..., RelayProcess],
    db_proxy: FaultProxy,
) -> None:
    port = support.free_port()
    bad = fault_settings(schema, amqp_url=support.AMQP_URL.replace("guest:guest",
                                                                   "guest:wrong"),
                         http_port=port)
    async with collecting(ledger, [queue]):
        ledger.insert(settings=bad, n=10, routing_key=queue)
        relay = relays(bad)
        line = await relay.wait_log(r"broker unavailable", 15)
        record = orjson.loads(line)
        print(f"\n{line}")
        assert "authentication failed" in record["error"], line
        assert "wrong" not in line  # the password is redacted
        # retried slowly, reported once; the relay does not exit: it goes on serving its
        # readiness, not ready, with the refusal as the broker's problem
        await until(lambda: "authentication failed" in str(
            readyz(port)[1].get("problems", "")), 15, "/readyz reporting the refusal")
        assert readyz(port)[0] == 503 and relay.alive
        assert len(relay.logged(r"authentication failed")) == 1, relay.log_tail()
        assert support.count(bad, "sent_at IS NULL") == 10
        relay.kill()
        # a database that does not exist: the same, on the database side
        missing = fault_settings(schema, database_url=db_proxy.url(
            support.DATABASE_URL.rsplit("/", 1)[0] + "/no_such_database_outbox"))
        relay = relays(missing)
        line = await relay.wait_log(r"database unavailable", 15)
        print(line)
        assert 'database "no_such_database_outbox" does not exist' in orjson.loads(line)["error"]
        # every connection has been refused (the lanes', the listener's, the backlog stats'
        # and the wake-up flag's, all through the proxy): past the point where another part
        # of the relay would have reported it again
        await until(lambda: db_proxy.accepted >= missing.concurrency + 3, 15,
                    "every part of the relay's connection attempt")
        assert relay.alive
        assert len(relay.logged(r"database unavailable")) == 1, relay.log_tail()
        relay.kill()
        good = relays(fault_settings(schema), "--drain")
        assert await good.wait(30) == 0, good.log_tail()
        await ledger.account()


async def test_relay_started_while_both_services_are_unreachable_waits_then_drains(
    schema: str, queue: str, ledger: Ledger, amqp_proxy: FaultProxy, db_proxy: FaultProxy,
    relays: Callable[..., RelayProcess],
) -> None:
    settings = proxied(schema, amqp_proxy, db_proxy)
    amqp_proxy.refuse()
    db_proxy.refuse()
    async with collecting(ledger, [queue]):
        ledger.insert(settings, 1000, queue)
        relay = relays(settings)
        await relay.wait_log(r"broker unavailable", 15)
        amqp_proxy.restore()
        await relay.wait_log(r"database unavailable", 15)
        assert relay.alive, relay.log_tail()
        db_proxy.restore()
        await recovered(relay, ledger)


async def test_sigterm_with_a_stalled_broker_exits_0_at_the_shutdown_deadline(
    schema: str, queue: str, ledger: Ledger, amqp_proxy: FaultProxy,
    relays: Callable[..., RelayProcess],
) -> None:
    """The batch in flight cannot settle (its confirms never come): the shutdown deadline ends
    the relay anyway, exit 0, and its claims go back with its connections."""
    settings = proxied(schema, amqp_proxy, None, publish_timeout=30.0, shutdown_timeout=1.0,
                       batch_size=200)
    async with collecting(ledger, [queue]) as consumer:
        relay = await under_way(relays, ledger, consumer, settings, queue, 5000,
                                delivered=200)
        amqp_proxy.stall()
        relay.kill(signal.SIGTERM)
        t0 = time.monotonic()
        code = await relay.wait(15)
        took = time.monotonic() - t0
        print(f"\nSIGTERM with a stalled broker: exit {code} after {took:.2f}s")
        assert code == 0, relay.log_tail()
        assert took < settings.shutdown_timeout + 3
        amqp_proxy.restore()
        await finish(relays, settings)
        await ledger.account()


async def test_stalled_database_fails_by_the_query_deadline_and_resumes(
    schema: str, queue: str, ledger: Ledger, db_proxy: FaultProxy,
    relays: Callable[..., RelayProcess],
) -> None:
    settings = proxied(schema, None, db_proxy, db_timeout=2.0, batch_size=100)
    async with collecting(ledger, [queue]) as consumer:
        relay = await under_way(relays, ledger, consumer, settings, queue, 5000,
                                delivered=300)
        await stalled_then_restored(
            relay, ledger, db_proxy, r"database unavailable", within=settings.db_timeout + 2,
            settle=60, said="database stall detected (db timeout 2s)")
