"""Relay processes that die or are stopped mid-batch, and several relays racing for the rows."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable

import orjson
import pytest

from tests import support
from tests.faults.harness import (
    Ledger,
    RelayProcess,
    collecting,
    fault_settings,
    finish,
    under_way,
)

pytestmark = pytest.mark.faults


async def test_relay_sigkill_at_random_points_loses_nothing(
    schema: str, queue: str, ledger: Ledger, relays: Callable[..., RelayProcess],
) -> None:
    """20 relays, each SIGKILLed at a random moment of its drain: claims go back, none lost."""
    settings = fault_settings(schema, batch_size=200, concurrency=2)
    rng = random.Random(7)
    iterations = 20
    async with collecting(ledger, [queue]) as consumer:
        ledger.insert(settings, 3000, queue)
        for i in range(iterations):
            if support.count(settings, "sent_at IS NULL AND dead_at IS NULL") < 1500:
                ledger.insert(settings, 1500, queue, start=10_000 * (i + 1))
            relay = relays(settings)
            # kill at a random point of its drain, measured in rows delivered rather than in
            # seconds (which a faster machine would spend past the last row): mid-batch, usually
            await consumer.reached(consumer.count + rng.randrange(1, 2 * settings.batch_size),
                                   15, "the relay publishing")
            relay.kill(signal.SIGKILL)
            assert await relay.wait(10) == -signal.SIGKILL
        # the killed relays' claims are released (their transactions rolled back): a last relay
        # finishes everything
        await finish(relays, settings)
        tally = await ledger.account()
    assert tally.dead == 0
    # a duplicate needs a kill between confirm and commit: at most the batches in flight
    assert tally.duplicates <= iterations * settings.batch_size * settings.concurrency


async def test_sigterm_during_large_drain_exits_0_and_next_relay_finishes(
    schema: str, queue: str, ledger: Ledger, relays: Callable[..., RelayProcess],
) -> None:
    settings = fault_settings(schema, batch_size=500, shutdown_timeout=5.0)
    async with collecting(ledger, [queue]) as consumer:
        relay = await under_way(relays, ledger, consumer, settings, queue, 20_000,
                                delivered=2000)
        t0 = time.monotonic()
        relay.kill(signal.SIGTERM)
        code = await relay.wait(settings.shutdown_timeout + 5)
        took = time.monotonic() - t0
        assert code == 0, relay.log_tail()
        assert took < settings.shutdown_timeout + 2, f"exit took {took:.1f}s"
        print(f"\nSIGTERM -> exit 0 in {took:.2f}s with "
              f"{support.count(settings, 'sent_at IS NULL')} rows left")
        assert support.count(settings, "sent_at IS NULL") > 0, "the drain was over already"
        await finish(relays, settings)
        tally = await ledger.account()
    assert tally.dead == 0
    # a clean stop settles its batches: nothing is published twice
    assert tally.duplicates == 0


async def test_second_sigterm_exits_at_once_and_loses_nothing(
    schema: str, queue: str, ledger: Ledger, relays: Callable[..., RelayProcess],
) -> None:
    settings = fault_settings(schema, batch_size=500, shutdown_timeout=30.0)
    async with collecting(ledger, [queue]) as consumer:
        relay = await under_way(relays, ledger, consumer, settings, queue, 10_000,
                                delivered=1000)
        relay.kill(signal.SIGTERM)
        relay.kill(signal.SIGTERM)
        t0 = time.monotonic()
        code = await relay.wait(10)
        assert time.monotonic() - t0 < 5
        assert code in (0, 1), relay.log_tail()
        await finish(relays, settings)
        await ledger.account()


async def test_several_relays_racing_publish_each_row_once_in_key_order(
    schema: str, queue: str, ledger: Ledger, relays: Callable[..., RelayProcess],
) -> None:
    settings = fault_settings(schema, batch_size=100, concurrency=2)
    keys = [f"k{i % 20}" if i % 2 else None for i in range(6000)]
    async with collecting(ledger, [queue]) as consumer:
        racing = [relays(settings) for _ in range(3)]
        ledger.insert(settings, 6000, queue, keys=keys)
        await ledger.wait_settled(60)
        assert all(r.alive for r in racing)
        tally = await ledger.account()
        # per-key order: the consumer (one queue) sees each key's rows in insertion order
        last: dict[str, int] = {}
        for mid in consumer.received:
            n = orjson.loads(consumer.bodies[mid])["n"]
            key = keys[n]
            if key is not None:
                assert n > last.get(key, -1), f"key {key}: row {n} after row {last[key]}"
                last[key] = n
        for r in racing:
            r.kill(signal.SIGTERM)
        for r in racing:
            assert await r.wait(15) == 0, r.log_tail()
    assert tally.duplicates == 0
    assert tally.dead == 0
