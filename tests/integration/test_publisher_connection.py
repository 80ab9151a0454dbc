"""AmqpPublisher's connection lifecycle against the real broker, each test forcing one exact
window: a connection lost but still current, a channel request in flight when aiormq closes
the connection, a lane whose batch was on a connection the supervisor has replaced.

Some tests hook into aiormq's own objects (the connection's closing future, a channel's lock)
to reach the window deterministically; the publisher is driven through its own methods."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from outbox.batch import Batch
from outbox.exceptions import OutboxError
from outbox.publisher import AmqpPublisher
from outbox.rows import Outcome, Row
from outbox.runner import run_relay
from outbox.settings import Settings
from outbox.supervisor import Supervisor
from tests import support
from tests.proxy import FaultProxy


def row(routing_key: str = "nowhere") -> Row:
    return Row(1, uuid.uuid4(), "", routing_key, b"{}", "application/json", None, None, None,
               None, datetime.now(UTC), 0)


@pytest.fixture
def proxy() -> AsyncIterator[FaultProxy]:
    with FaultProxy(5672) as p:
        yield p


async def started(url: str = support.AMQP_URL, **changes: Any) -> AmqpPublisher:
    pub = AmqpPublisher(support.make_settings("public", amqp_url=url, **changes))
    await pub.start()
    assert await pub.wait_ready(10)
    return pub


async def test_wait_ready_awaits_while_a_lost_connection_is_still_current(
    proxy: FaultProxy,
) -> None:
    """The window between aiormq closing the connection and the supervisor noticing: the
    connection is closed but still `connection`, `_connected` still set. A lane calling
    wait_ready then must wait (for the next connection), not return at once: a lane that
    returns at once claims nothing, loops and calls it again, never giving the loop back."""
    pub = await started(proxy.url(support.AMQP_URL))
    try:
        conn = pub.connection
        assert conn is not None
        probes: list[asyncio.Task[tuple[bool, bool]]] = []
        window: list[bool] = []

        async def probe() -> tuple[bool, bool]:
            others: list[bool] = []
            asyncio.get_running_loop().call_soon(others.append, True)
            ready = await pub.wait_ready(10)
            return ready, bool(others)

        def closed(_: object) -> None:
            # aiormq has just resolved the connection's closing future: the supervisor's own
            # observer runs later, so the publisher still holds the connection
            window.append(pub.connection is conn)
            probes.append(asyncio.ensure_future(probe()))

        conn._closing.add_done_callback(closed)  # a lane calling wait_ready in the window
        proxy.cut()  # the broker's side of the connection is gone
        await support.until(lambda: probes, timeout=10)
        ready, yielded = await asyncio.wait_for(probes[0], 15)
        assert window == [True], "the window was not reached"
        assert yielded, "wait_ready returned without giving the event loop back"
        assert ready and pub.connection is not conn  # it waited for the next connection
    finally:
        await pub.close()


async def test_a_channel_request_in_flight_when_aiormq_closes_the_connection_is_unsettled(
    proxy: FaultProxy,
) -> None:
    """aiormq closes a connection whose reader was cancelled (a heartbeat timeout, or a close
    that could not finish) with CancelledError, which it throws into every request in flight.
    A lane opening its channel then must get an unsettled batch, not a CancelledError (which
    ended the relay)."""
    pub = await started(proxy.url(support.AMQP_URL))
    try:
        conn = pub.connection
        assert conn is not None
        proxy.stall("down")  # Channel.Open reaches the broker; its OpenOk never comes back
        publishing = asyncio.ensure_future(pub.publish([row()], lane=1))
        await support.until(lambda: conn.channels, timeout=10)  # opening the channel
        await asyncio.wait_for(conn.close(), 15)  # aiormq's default: exc=CancelledError
        [outcome] = await asyncio.wait_for(
            asyncio.gather(publishing, return_exceptions=True), 15)
        assert isinstance(outcome, list), f"publish raised {outcome!r}"
        assert [r.outcome for r in outcome] == [Outcome.UNSETTLED]
    finally:
        proxy.restore()
        await pub.close()


async def test_a_lane_cancelled_while_its_channel_opens_is_cancelled(proxy: FaultProxy) -> None:
    """The other side of the above: the shutdown deadline cancels a lane, and that cancellation
    must go through, not be taken for a lost connection."""
    pub = await started(proxy.url(support.AMQP_URL))
    try:
        conn = pub.connection
        assert conn is not None
        proxy.stall("down")
        publishing = asyncio.ensure_future(pub.publish([row()], lane=1))
        await support.until(lambda: conn.channels, timeout=10)
        publishing.cancel()
        await asyncio.wait([publishing], timeout=15)
        assert publishing.cancelled()
    finally:
        proxy.restore()
        await pub.close()


async def test_a_lane_drops_only_the_connection_its_batch_was_on() -> None:
    """Two lanes whose writes cannot start (their channels' locks are held here, as a full
    write queue would): lane 2 times out first and gives its connection up, the supervisor
    connects a new one, then lane 1 times out on the first connection. Lane 1 must leave the
    new connection alone: dropping it would make every batch in flight on it unsettled."""
    pub = await started(publish_timeout=30.0)
    try:
        first = pub.connection
        one, two = await pub.broker.channel(1), await pub.broker.channel(2)
        async with contextlib.AsyncExitStack() as held:
            await held.enter_async_context(one.lock)
            await held.enter_async_context(two.lock)
            batch1 = Batch(pub.broker, pub.settings, [row()], 1, 5.0)
            batch2 = Batch(pub.broker, pub.settings, [row()], 2, 0.2)
            lane1 = asyncio.ensure_future(batch1.publish_into([0]))
            await batch2.publish_into([0])
            assert await pub.wait_ready(10)
            second = pub.connection
            assert second is not None and second is not first
            assert not lane1.done(), "lane 1 ended before the supervisor reconnected"
            await asyncio.wait_for(lane1, 15)
        assert batch1.results == [None]  # unsettled: nothing was written
        assert pub.connection is second and pub.ready
    finally:
        await pub.close()


async def test_a_broker_supervisor_that_ends_stops_the_relay_with_one_clear_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without its supervisor the relay would wait for the broker forever, reporting nothing
    new: it must stop, and `outbox relay` exit 1 with the reason."""

    async def broken(self: Supervisor) -> None:
        raise RuntimeError("supervisor bug")

    monkeypatch.setattr(Supervisor, "_supervise", broken)
    with pytest.raises(OutboxError, match="the broker task ended: RuntimeError"):
        await asyncio.wait_for(run_relay(settings), 15)
