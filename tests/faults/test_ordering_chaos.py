"""Per-key order with several relay processes that are killed and restarted while the broker
connection is cut and producers keep committing keyed rows (docs/ordering.md).

The faults are driven by progress, never by the clock, so the test holds on a machine of any
speed: before each fault a burst of keyed rows is committed, and the fault fires once the
consumer has seen the next few hundred rows, i.e. in the middle of that burst. Producers commit
throughout (their transactions overlap, which holds keyed rows behind the ordering horizon), and
stop only after the last fault. The relays reach the shared broker through
`tests.proxy.FaultProxy`, so cutting their connections does not touch anyone else's; the
consumer reads the queue directly and records the first delivery of each row, in arrival order.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Callable
from typing import Any

import pytest
from psycopg.types.json import Jsonb

from tests import support
from tests.faults.harness import (
    Ledger,
    Producers,
    RelayProcess,
    collecting,
    fault_settings,
    order_violations,
)
from tests.proxy import FaultProxy

pytestmark = pytest.mark.faults

RELAYS = 3
PRODUCERS = 3
KEYS_PER_PRODUCER = 30
BURST_KEYS = 10  # written by the test's own bursts; KEYS in all = 3 * 30 + 10
BURST = 1000  # keyed rows committed before each fault
KILLS = 5


async def test_each_key_arrives_in_id_order_through_kills_and_a_cut_broker(
    schema: str, queue: str, ledger: Ledger, amqp_proxy: FaultProxy,
    relays: Callable[..., RelayProcess],
) -> None:
    seed = random.randrange(1 << 30)
    print(f"\nseed {seed}")
    rng = random.Random(seed)
    settings = fault_settings(schema, amqp_url=amqp_proxy.url(support.AMQP_URL), batch_size=100)
    keys = [[f"p{p}k{k}" for k in range(KEYS_PER_PRODUCER)] for p in range(PRODUCERS)]
    burst_keys = [f"b{k}" for k in range(BURST_KEYS)]

    def make_row(_: Any, key: str | None) -> dict[str, Any]:
        return {"routing_key": queue, "payload": Jsonb({"k": key}), "ordering_key": key}

    faults = ["kill"] * KILLS + ["cut"]
    rng.shuffle(faults)
    async with collecting(ledger, [queue]) as consumer:
        producers = Producers(ledger, settings, consumer, keys, make_row, seed=seed,
                              backlog=2 * BURST).start()
        procs = [relays(settings) for _ in range(RELAYS)]
        pending_at: list[int] = []  # rows committed and not yet delivered, at each fault
        try:
            for fault in faults:
                await producers.burst(queue, [rng.choice(burst_keys) for _ in range(BURST)])
                # mid-burst: at most BURST - 50 rows committed so far are undelivered
                await consumer.reached(producers.committed - BURST + rng.randrange(50, BURST // 2),
                                       60, f"progress before fault {len(pending_at) + 1}")
                producers.check()
                pending_at.append(producers.committed - consumer.count)
                if fault == "cut":
                    amqp_proxy.cut()  # every relay loses its broker connection mid-batch
                else:
                    victim = rng.randrange(RELAYS)
                    procs[victim].kill(signal.SIGKILL)
                    assert await procs[victim].wait(10) == -signal.SIGKILL
                    procs[victim] = relays(settings)
        finally:
            await producers.stop()  # the last fault has happened: no more rows
        print(f"faults {faults}; rows undelivered at each: {pending_at}; "
              f"{producers.committed} rows committed in {producers.transactions} producer "
              f"transactions and {len(faults)} bursts")

        await ledger.wait_settled(120)
        for p in procs:
            assert p.alive, p.log_tail()
        tally = await ledger.account()

    assert len(pending_at) == KILLS + 1, "not every kill and cut happened"
    assert all(n > 0 for n in pending_at), "a fault came after the last row: nothing was tested"
    assert tally.delivered == producers.committed and tally.dead == 0
    keyed = {r.key for r in producers.rows.values()}
    assert keyed <= {producers.rows[m].key for m in consumer.seen}
    assert len(keyed) > BURST_KEYS, "the producers committed no keyed row"
    wrong = order_violations(consumer.received, producers.rows)
    assert not wrong, f"first deliveries out of id order: {dict(list(wrong.items())[:5])}"
