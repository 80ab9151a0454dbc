"""Per-key order with several relay processes that are killed and restarted at random while the
broker connection is cut (docs/ordering.md).

The relays reach the shared broker through `tests.proxy.FaultProxy`, so cutting their
connections does not touch anyone else's; the consumer reads the queue directly and records the
first delivery of each row, in arrival order.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import time
from collections import defaultdict
from collections.abc import Callable

import pytest

from tests import support
from tests.faults.conftest import Ledger, RelayProcess, collecting, execute, fault_settings, until
from tests.proxy import FaultProxy

pytestmark = pytest.mark.faults

RELAYS = 3
KEYS = 100
ROWS = 20_000


async def test_each_key_arrives_in_id_order_through_kills_and_a_cut_broker(
    schema: str, queue: str, ledger: Ledger, amqp_proxy: FaultProxy,
    relays: Callable[..., RelayProcess],
) -> None:
    seed = random.randrange(1 << 30)
    print(f"\nseed {seed}")
    rng = random.Random(seed)
    settings = fault_settings(schema, amqp_url=amqp_proxy.url(support.AMQP_URL), batch_size=100)
    keys: list[str | None] = [f"k{rng.randrange(KEYS)}" for _ in range(ROWS)]
    async with collecting(ledger, [queue]) as consumer:
        ledger.insert(settings, ROWS, queue, keys=keys)
        where = {m: (i, k) for m, i, k in execute(
            settings, "SELECT message_id::text, id, ordering_key FROM {}.outbox")}
        assert len(where) == ROWS and len({k for _, k in where.values()}) == KEYS
        procs = [relays(settings) for _ in range(RELAYS)]
        await until(lambda: len(consumer.distinct) > 500, 30, "publishing under way")

        kills, cut, t0 = 0, False, time.monotonic()
        while ((kills < 5 or not cut) and len(consumer.distinct) < ROWS
               and time.monotonic() - t0 < 30):
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            if not cut and len(consumer.distinct) > 0.2 * ROWS:
                amqp_proxy.cut()  # every relay loses its broker connection mid-batch
                cut = True
                continue
            victim = rng.randrange(RELAYS)
            procs[victim].kill(signal.SIGKILL)
            assert await procs[victim].wait(10) == -signal.SIGKILL
            procs[victim] = relays(settings)
            kills += 1
        during = len(consumer.distinct)
        print(f"{kills} SIGKILLs, broker cut: {cut}, {during} rows delivered during the chaos")

        await ledger.wait_settled(60)
        for p in procs:
            assert p.alive, p.log_tail()
        tally = await ledger.account()

    assert kills >= 3 and cut
    assert during < ROWS, "the faults came after the last row: nothing was tested"
    assert tally.delivered == ROWS and tally.dead == 0
    first: dict[str, list[int]] = defaultdict(list)
    for m in dict.fromkeys(consumer.received):  # first deliveries, in arrival order
        i, k = where[m]
        assert k is not None
        first[k].append(i)
    assert len(first) == KEYS
    for k, got in first.items():
        wrong = [(a, b) for a, b in itertools.pairwise(got) if a >= b]
        assert not wrong, f"key {k}: first deliveries out of id order at {wrong[:5]}"
