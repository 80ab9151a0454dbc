"""A 3-node RabbitMQ cluster (tests.rabbit_cluster) with quorum queues under the relay.

One cluster is shared by the module (it boots once; a test that killed nodes has them started
again by the next). The relay's OUTBOX_AMQP_URL lists the three nodes; the consumer reads from one
node the test does not kill, so the arrival order of first deliveries is the queue's order.
Faults are triggered by the number of rows delivered.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import aiormq
import pytest

from outbox.publisher import AmqpPublisher
from outbox.rows import Outcome, Row
from outbox.settings import Settings
from tests import support
from tests.faults.harness import (
    Collector,
    Ledger,
    RelayProcess,
    collecting,
    fault_settings,
    readyz,
    until,
)
from tests.proxy import FaultProxy
from tests.rabbit_cluster import RabbitCluster, ctl, in_parallel
from tests.rabbit_node import RabbitNode

# Not in `make test`: the module boots its own cluster and restarts it, which would lengthen
# `make test` by minutes; CI runs it next, with `make test-cluster`.
pytestmark = [pytest.mark.faults, pytest.mark.cluster]

QUORUM = {"x-queue-type": "quorum"}
ROWS = 10_000
KEYS = 40


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    c = RabbitCluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start()
        yield c
    finally:
        c.close()


@pytest.fixture
async def up(cluster: RabbitCluster) -> RabbitCluster:
    """The module's cluster with every node running (an earlier test may have killed some)."""
    if not all(n.running for n in cluster.nodes):
        await asyncio.to_thread(cluster.start)
    await asyncio.to_thread(cluster.wait_formed)
    return cluster


async def declare_quorum(url: str, queue: str) -> None:
    conn = await aiormq.connect(url)
    try:
        ch = await conn.channel()
        await ch.queue_declare(queue, durable=True, arguments=QUORUM)
    finally:
        await conn.close()


def connected_node(cluster: RabbitCluster, line: str) -> RabbitNode:
    """The node a relay's "broker connected" log line names."""
    return cluster.node_by_port(int(re.findall(r"127\.0\.0\.1:(\d+)", line)[-1]))


def keyed_rows(ledger: Ledger, settings: Settings, queue: str,
               n: int = ROWS) -> dict[str, tuple[int, str]]:
    """Insert n rows over KEYS ordering keys in one statement; message id -> (position, key).
    (The relay may already be deleting them: the ids are taken from the insert, in whose order
    the rows' ids are assigned.)"""
    rng = random.Random(n)
    keys = [f"k{rng.randrange(KEYS)}" for _ in range(n)]
    ids = ledger.insert(settings, n, queue, keys=keys)
    return {m: (i, k) for i, (m, k) in enumerate(zip(ids, keys, strict=True))}


def assert_key_order(consumer: Collector, where: dict[str, tuple[int, str]]) -> None:
    """Per key, the first delivery of each row arrives in row-id order."""
    first: dict[str, list[int]] = defaultdict(list)
    for m in dict.fromkeys(consumer.received):
        i, k = where[m]
        first[k].append(i)
    assert len(first) == KEYS
    for k, got in first.items():
        wrong = [(a, b) for a, b in itertools.pairwise(got) if a >= b]
        assert not wrong, f"key {k}: first deliveries out of id order at {wrong[:5]}"


async def fault_mid_drain(
    ledger: Ledger, relay: RelayProcess, settings: Settings, queue: str, reader: RabbitNode,
    fault: Callable[[], object], then: Callable[[Collector, int, float], Awaitable[str]], *,
    rows: int = ROWS,
) -> None:
    """Insert ``rows`` keyed rows; once a fifth are delivered (read from ``reader``), run
    ``fault`` (in a thread), await ``then(consumer, at, t0)`` (what shows the relay coped, given
    the rows delivered before the fault and when it began; it returns a line to print), and count
    every row: all delivered, none dead or lost, per-key order of first deliveries kept. A row
    marked sent without a confirm would be missing from the queue: lost."""
    async with collecting(ledger, [queue], [reader.url], **QUORUM) as consumer:
        where = keyed_rows(ledger, settings, queue, rows)
        await until(lambda: len(consumer.distinct) > rows // 5, 60, "the drain under way")
        at = len(consumer.distinct)
        t0 = time.monotonic()
        await asyncio.to_thread(fault)
        print(f"\nfault at {at} delivered; {await then(consumer, at, t0)}")
        tally = await ledger.account(wait=120)
        assert relay.alive, relay.log_tail()
        assert not relay.logged("unexpected error"), relay.log_tail()
    assert tally.delivered == rows and tally.dead == 0
    assert_key_order(consumer, where)


def state(cluster: RabbitCluster, settings: Settings, queue: str) -> str:
    """Where the rows are, for a failure message: pending in the table, and the queue as each
    running node reports it (messages ready, unacknowledged, consumers, leader)."""
    direct = settings.replace(database_url=support.DATABASE_URL)
    where = [f"{support.count(direct, 'sent_at IS NULL')} rows pending"]
    for node in [n for n in cluster.nodes if n.running]:
        try:
            out = ctl(node, "list_queues", "-q", "--no-table-headers", "name", "messages_ready",
                      "messages_unacknowledged", "consumers", "leader", timeout=15)
            where.append(f"{node.nodename}: " + " | ".join(
                line for line in out.splitlines() if line.startswith(queue)))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            where.append(f"{node.nodename}: {str(exc)[-200:]}")
    return "; ".join(where)


def row(queue: str, i: int) -> Row:
    return Row(id=i, message_id=uuid.uuid4(), exchange="", routing_key=queue, body=b"{}",
               content_type="application/json", headers=None, ordering_key=None,
               message_type=None, correlation_id=None, created_at=datetime.now(UTC), attempts=0)


async def test_channel_opened_before_the_new_leader_is_elected_is_replaced(
    up: RabbitCluster,
) -> None:
    """RabbitMQ 3.10: a confirm channel opened on a surviving node in the moment before a quorum
    queue elects its new leader nacks every publish to that queue for a minute or more (a new
    channel on the same connection gets acks). The publisher opens its lane channels at exactly
    that moment after a failover; after a nacked batch it must open a new one."""
    queue = support.unique("qq")
    await declare_quorum(up.urls[0], queue)
    leader = await asyncio.to_thread(up.leader, queue)
    follower = next(n for n in up.nodes if n is not leader)
    pub = AmqpPublisher(support.make_settings("unused", amqp_url=follower.url,
                                              publish_timeout=2.0))
    await pub.start()
    try:
        assert await pub.wait_ready(10), pub.problem
        assert [r.outcome for r in await pub.publish([row(queue, 0)], 0)] == [Outcome.CONFIRMED]
        await asyncio.to_thread(leader.kill)
        # lane 1's channel is opened now, before the election
        t0 = time.monotonic()
        outcomes: list[str] = []
        for i in itertools.count(1):
            results = await pub.publish([row(queue, 10 * i + j) for j in range(10)], 1)
            outcomes.append("".join(r.outcome.value[0] for r in results))
            if all(r.outcome is Outcome.CONFIRMED for r in results):
                break
            assert time.monotonic() - t0 < 15, f"still not confirmed after 15 s: {outcomes[-5:]}"
            await asyncio.sleep(0.1)
        print(f"\nconfirmed again {time.monotonic() - t0:.2f}s after the leader was killed, "
              f"batches before: {outcomes[:-1][:10]}")
    finally:
        await pub.close()


async def test_connected_node_killed_mid_drain(
    schema: str, up: RabbitCluster, ledger: Ledger, relays: Callable[..., RelayProcess],
) -> None:
    """The node the relay publishes through dies: the relay fails over through the node list,
    the quorum queue (a majority left) goes on, nothing is lost and per-key order holds."""
    queue = support.unique("qq")
    await declare_quorum(up.urls[0], queue)
    settings = fault_settings(schema, amqp_url=up.url, batch_size=200)
    relay = relays(settings)
    victim = connected_node(up, await relay.wait_log(r"broker connected", 30))
    reader = next(n for n in up.nodes if n is not victim)

    async def moved(consumer: Collector, at: int, t0: float) -> str:
        line = await relay.wait_log(rf"broker connected.*127\.0\.0\.1:(?!{victim.port}/)", 30)
        return (f"killed {victim.nodename}; relay reconnected after "
                f"{time.monotonic() - t0:.2f}s: {line}")

    await fault_mid_drain(ledger, relay, settings, queue, reader, victim.kill, moved)


async def test_node_cut_off_from_the_relay_silently(
    schema: str, up: RabbitCluster, ledger: Ledger, relays: Callable[..., RelayProcess],
) -> None:
    """The relay's node stays in the cluster but the network between them goes silent (the
    proxy holds every byte): the relay notices by its publish deadline, moves to the next node of
    its list, and the rows it could not get confirmed are published again there."""
    queue = support.unique("qq")
    await declare_quorum(up.urls[0], queue)
    first, *rest = up.nodes
    with FaultProxy(first.port) as proxy:
        settings = fault_settings(schema, amqp_url=",".join(
            [proxy.url(first.url), *(n.url for n in rest)]), batch_size=200)
        relay = relays(settings)
        line = await relay.wait_log(r"broker connected", 30)
        assert f":{proxy.port}/" in line, line

        async def moved(consumer: Collector, at: int, t0: float) -> str:
            line = await relay.wait_log(rf"broker connected.*127\.0\.0\.1:(?!{proxy.port}/)", 30)
            return f"cut off; relay on another node {time.monotonic() - t0:.2f}s later: {line}"

        await fault_mid_drain(ledger, relay, settings, queue, rest[-1], proxy.stall, moved)


async def test_quorum_leader_killed_mid_drain(
    schema: str, up: RabbitCluster, ledger: Ledger, relays: Callable[..., RelayProcess],
) -> None:
    """The node that leads the quorum queue dies while the relay publishes through another
    node: the queue elects a new leader, the relay's unconfirmed rows are published again."""
    queue = support.unique("qq")
    await declare_quorum(up.urls[0], queue)
    leader = await asyncio.to_thread(up.leader, queue)
    others = [n for n in up.nodes if n is not leader]
    # the relay through one follower, the consumer on the other
    settings = fault_settings(schema, amqp_url=others[0].url, batch_size=200)
    relay = relays(settings)

    async def going_on(consumer: Collector, at: int, t0: float) -> str:
        await until(lambda: len(consumer.distinct) > at + 1000, 30, "deliveries going on")
        new = await asyncio.to_thread(up.leader, queue, others[0])
        return (f"killed the leader {leader.nodename}; 1000 more delivered "
                f"{time.monotonic() - t0:.2f}s later; new leader {new.nodename}")

    await fault_mid_drain(ledger, relay, settings, queue, others[1], leader.kill, going_on)


async def test_whole_cluster_restarts_mid_drain(
    schema: str, up: RabbitCluster, ledger: Ledger, relays: Callable[..., RelayProcess],
) -> None:
    """Every node killed mid-drain and started again: the relay waits (nothing marked sent
    without a confirm), reconnects and drains once the queue has a leader again; the quorum
    queue keeps what it confirmed. The attempts are generous so that a slow recovery cannot park
    rows dead (the test asserts none is); a row marked sent without a confirm would be lost."""
    queue = support.unique("qq")
    await declare_quorum(up.urls[0], queue)
    settings = fault_settings(schema, amqp_url=up.url, batch_size=200, max_attempts=1000)
    relay = relays(settings)

    def crash() -> None:
        # The queue was declared seconds ago: written out, as an older queue would be, or the
        # nodes forget it (see RabbitCluster.flush). The messages need no such help: a quorum
        # queue confirms only what a majority has synced to disk.
        up.flush()
        up.restart_all()

    async def recovered(consumer: Collector, at: int, t0: float) -> str:
        booted = time.monotonic() - t0
        leader = await asyncio.to_thread(up.wait_leader, queue, 60)
        elected = time.monotonic() - t0
        try:
            await until(lambda: len(consumer.distinct) > at + 100, 60,
                        "deliveries after the restart")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {await asyncio.to_thread(state, up, settings, queue)}"
                                 ) from None
        return (f"whole cluster flushed, killed and booted in {booted:.1f}s; {leader.nodename} "
                f"led the queue by {elected:.1f}s and 100 more rows were delivered by "
                f"{time.monotonic() - t0:.1f}s")

    # the restart itself takes most of this test's time
    await fault_mid_drain(ledger, relay, settings, queue, up.nodes[2], crash, recovered,
                          rows=ROWS // 2)


async def test_minority_rows_wait_and_nothing_is_marked_sent(
    schema: str, up: RabbitCluster, ledger: Ledger, relays: Callable[..., RelayProcess],
) -> None:
    """Two of three nodes down: the quorum queue has no majority, so no publish is confirmed.
    The relay marks nothing sent; the rows wait (their attempts count: OUTBOX_MAX_ATTEMPTS and
    the backoff bound how long a minority may last before rows are parked dead); /readyz says
    not ready and why; once the majority is back the rows drain and the relay is ready again."""
    queue = support.unique("qq")
    await declare_quorum(up.urls[0], queue)
    port = support.free_port()
    settings = fault_settings(schema, amqp_url=up.url, batch_size=100, max_attempts=1000,
                              http_port=port)
    relay = relays(settings)
    line = await relay.wait_log(r"broker connected", 30)
    survivor = connected_node(up, line)
    down = [n for n in up.nodes if n is not survivor]
    rows = 2_000
    async with collecting(ledger, [queue], [survivor.url], **QUORUM) as consumer:
        await asyncio.to_thread(in_parallel, [n.kill for n in down])
        where = keyed_rows(ledger, settings, queue, rows)
        direct = settings.replace(database_url=support.DATABASE_URL)
        await until(lambda: len(relay.logged("publish failed")) >= 3, 60, "publishes failing")
        status, body = await until(lambda: unconfirmed(port), 60, "/readyz saying why")
        kinds = sorted({k for line in relay.logged("publish failed")
                        for k in re.findall(r'"kind":"(\w+)"', line)})
        pending = support.count(direct, "sent_at IS NULL")
        print(f"\nin minority: failure kinds {kinds}, {pending} of {rows} pending, "
              f"{len(consumer.distinct)} delivered, /readyz {status} {body}")
        assert pending == rows and not consumer.distinct
        assert status == 503 and body["ready"] is False, body
        assert "a quorum queue without a majority?" in body["problems"]["confirms"], body
        assert relay.logged("not ready: the broker confirms nothing"), relay.log_tail()
        t0 = time.monotonic()
        await asyncio.to_thread(up.start)
        await until(lambda: len(consumer.distinct) > 0, 90, "deliveries with a majority back")
        first = time.monotonic() - t0
        status, body = await until(lambda: (r := readyz(port))[0] == 200 and r, 60,
                                   "/readyz ready again")
        print(f"majority back: first delivery {first:.1f}s after the nodes were started; "
              f"/readyz {status} {time.monotonic() - t0:.1f}s after: {body}")
        assert "confirms" not in body["problems"], body
        tally = await ledger.account(wait=90)
        assert relay.alive, relay.log_tail()
    assert tally.delivered == rows and tally.dead == 0
    assert_key_order(consumer, where)


def unconfirmed(port: int) -> tuple[int, dict[str, Any]] | None:
    """/readyz while it reports that publishes go unconfirmed, else None."""
    status, body = readyz(port)
    return (status, body) if "confirms" in body.get("problems", {}) else None
