"""A broker connection that keeps being cut while rows keep coming: the relay's event loop stays
free (its HTTP endpoint answers after every cut), it reconnects each time, and SIGTERM sent in
the middle of a reconnect still ends it, exit 0, with nothing lost."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from collections.abc import Callable

import pytest

from tests import support
from tests.faults.harness import (
    Ledger,
    RelayProcess,
    collecting,
    fault_settings,
    finish,
    under_way,
    until,
)
from tests.proxy import FaultProxy

pytestmark = pytest.mark.faults

CUTS = 25
ROWS_PER_CUT = 200


def healthz(port: int) -> bool:
    """GET /healthz: answered only while the relay's event loop is free (a lane spinning
    without awaiting keeps every other task from running: no answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return bool(response.status == 200)
    except TimeoutError:
        return False


async def test_sigterm_is_obeyed_while_the_broker_connection_flaps(
    schema: str, queue: str, ledger: Ledger, amqp_proxy: FaultProxy,
    relays: Callable[..., RelayProcess],
) -> None:
    port = support.free_port()
    settings = fault_settings(schema, amqp_url=amqp_proxy.url(support.AMQP_URL), http_port=port,
                              concurrency=4, batch_size=50, shutdown_timeout=5.0)
    async with collecting(ledger, [queue]) as consumer:
        relay = await under_way(relays, ledger, consumer, settings, queue, 1000,
                                delivered=100)
        for cut in range(CUTS):
            delivered = len(consumer.distinct)
            amqp_proxy.cut()
            ledger.insert(settings, ROWS_PER_CUT, queue, start=1000 + cut * ROWS_PER_CUT)
            assert await asyncio.to_thread(healthz, port), \
                f"no answer to /healthz after cut {cut + 1}: the event loop is stuck"
            await until(lambda: amqp_proxy.connections > 0, 20, "the relay reconnected")
            await until(lambda d=delivered: len(consumer.distinct) > d, 30,
                        "rows delivered on the new connection")
            assert relay.alive, relay.log_tail()
        amqp_proxy.cut()  # SIGTERM while the relay reconnects
        t0 = time.monotonic()
        relay.kill(signal.SIGTERM)
        code = await relay.wait(settings.shutdown_timeout + 10)
        took = time.monotonic() - t0
        print(f"\n{CUTS + 1} cuts; SIGTERM -> exit {code} in {took:.2f}s")
        assert code == 0, relay.log_tail()
        assert took < settings.shutdown_timeout + 3
        await finish(relays, settings)
        await ledger.account()
