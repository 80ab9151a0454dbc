"""Broker faults on private RabbitMQ nodes (tests.rabbit_node): killed, blocked, failed over.

One node is shared by the module (booting one takes ~5 s); the failover test starts a second.
The relay reaches the database through a `FaultProxy`, so its sessions can be found and cut.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from outbox.settings import Settings
from tests import support
from tests.faults.harness import (
    Ledger,
    RelayProcess,
    collecting,
    fault_settings,
    rabbitmqctl,
    recovered,
    sessions,
    status,
    under_way,
    until,
)
from tests.proxy import FaultProxy
from tests.rabbit_node import RabbitNode

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    with RabbitNode(tmp_path_factory.mktemp("rabbit")) as n:
        yield n


@pytest.fixture
async def running(node: RabbitNode) -> RabbitNode:
    """The module's node, started again if an earlier test left it down."""
    if not node.running:
        await asyncio.to_thread(node.start)
    return node


def on_node(schema: str, amqp_url: str, db: FaultProxy, **changes: object) -> Settings:
    return fault_settings(schema, amqp_url=amqp_url,
                          database_url=db.url(support.DATABASE_URL), **changes)


async def no_transaction_held(db_proxy: FaultProxy, release: float, hold: float,
                              when: str) -> None:
    """The relay's batch in flight is released within ``release`` seconds, then no transaction
    of the relay opens for ``hold`` seconds: it claims nothing while the broker cannot take it."""

    def open_transactions() -> list[tuple[int, str]]:
        return [s for s in sessions(db_proxy.upstream_ports()) if s[1] == "idle in transaction"]

    await until(lambda: not open_transactions(), release, "the batch in flight released")
    end = time.monotonic() + hold
    while time.monotonic() < end:
        assert not open_transactions(), f"a transaction is open {when}"
        await asyncio.sleep(0.1)


async def test_broker_killed_for_10s_and_database_cut_mid_drain(
    schema: str, running: RabbitNode, db_proxy: FaultProxy, ledger: Ledger,
    relays: Callable[..., RelayProcess],
) -> None:
    """SIGKILL the broker mid-batch, cut the database while it is down: the relay never exits,
    `outbox status` shows the backlog, and everything drains by itself once both are back."""
    node = running
    queue = support.unique("q")
    settings = on_node(schema, node.url, db_proxy, batch_size=200)
    async with collecting(ledger, [queue], [node.url]) as consumer:
        relay = await under_way(relays, ledger, consumer, settings, queue, 20_000,
                                delivered=1000)
        killed_at = time.monotonic()
        await asyncio.to_thread(node.kill)
        await relay.wait_log(r"broker unavailable", 15)
        await no_transaction_held(db_proxy, settings.publish_timeout + 5, 2,
                                  "while the broker is down")
        db_proxy.refuse()
        backlog = status(settings)
        print(f"\nstatus with the broker and the database down: {backlog}")
        assert isinstance(backlog["pending"], int) and backlog["pending"] > 0
        # the outage itself lasts 10 s (a scenario, not a synchronisation)
        await asyncio.sleep(max(0.0, 10 - (time.monotonic() - killed_at)))
        assert relay.alive, relay.log_tail()
        await asyncio.to_thread(node.start)
        await relay.wait_log(r"database unavailable", 30)
        assert relay.alive, relay.log_tail()
        db_proxy.restore()
        tally = await recovered(relay, ledger, 90)
    assert tally.dead == 0


async def test_memory_alarm_stops_claiming_and_holds_no_transaction(
    schema: str, running: RabbitNode, db_proxy: FaultProxy, ledger: Ledger,
    relays: Callable[..., RelayProcess],
) -> None:
    node = running
    queue = support.unique("q")
    settings = on_node(schema, node.url, db_proxy, batch_size=100)
    async with collecting(ledger, [queue], [node.url]) as consumer:
        ledger.insert(settings, 300, queue)
        relay = relays(settings)
        await ledger.wait_settled(30)
        try:
            await asyncio.to_thread(rabbitmqctl, node, "set_vm_memory_high_watermark",
                                    "0.0000001")
            seen = len(consumer.received)
            # the broker blocks a connection when it next publishes: give the relay rows
            ledger.insert(settings, 500, queue, start=300)
            await relay.wait_log(r"was blocked", 30)
            # the batch caught by the block is released at its publish deadline; while
            # blocked: nothing claimed, nothing published, no transaction open
            await no_transaction_held(db_proxy, settings.publish_timeout + 5, 3, "while blocked")
            assert len(consumer.received) == seen
            assert support.count(settings.replace(database_url=support.DATABASE_URL),
                                 "sent_at IS NULL AND attempts = 0") == 500
            assert relay.alive
        finally:
            await asyncio.to_thread(rabbitmqctl, node, "set_vm_memory_high_watermark", "0.4")
        await relay.wait_log(r"was unblocked", 30)
        await ledger.wait_settled(30)
        tally = await ledger.account()
    assert tally.dead == 0


async def test_failover_to_the_other_node_when_the_one_in_use_dies(
    schema: str, running: RabbitNode, db_proxy: FaultProxy, ledger: Ledger,
    relays: Callable[..., RelayProcess], tmp_path: Path,
) -> None:
    other = await asyncio.to_thread(RabbitNode(tmp_path).start)
    try:
        nodes = {n.port: n for n in (running, other)}
        queue = support.unique("q")
        settings = on_node(schema, f"{running.url},{other.url}", db_proxy, batch_size=200)
        async with collecting(ledger, [queue], [running.url, other.url]) as consumer:
            relay = await under_way(relays, ledger, consumer, settings, queue, 10_000,
                                    delivered=500)
            line = await relay.wait_log(r"broker connected", 5)
            port = int(re.findall(r"127\.0\.0\.1:(\d+)", line)[0])
            in_use = nodes[port]
            spare = next(n for n in nodes.values() if n is not in_use)
            await asyncio.to_thread(in_use.kill)
            moved = await relay.wait_log(rf"broker connected.*:{spare.port}/", 30)
            print(f"\nfailed over: {moved}")
            direct = settings.replace(database_url=support.DATABASE_URL)
            await until(lambda: support.count(direct, "sent_at IS NULL") == 0, 60,
                        "the backlog drained through the other node")
            # messages the dead node confirmed are on its disk: the consumer reads them back
            await asyncio.to_thread(in_use.start)
            tally = await ledger.account()
            assert relay.alive, relay.log_tail()
        assert tally.dead == 0
    finally:
        await asyncio.to_thread(other.close)
