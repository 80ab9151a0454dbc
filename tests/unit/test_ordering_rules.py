"""The per-key ordering rule on the in-memory store (the same rule as the SQL claim, minus the
transaction horizon, which only PostgreSQL has): only the head of a key is claimable, where the
head is the key's first unsent row, pending, delayed, dead or in flight."""

from __future__ import annotations

from collections import defaultdict

from outbox.relay import Relay
from outbox.rows import Outcome, Result, Row, Settlement
from outbox.settings import Settings
from outbox.testing import InMemoryStore, StubPublisher

SETTINGS = Settings.load({"max_attempts": 50, "retry_base": 0.001, "retry_max": 0.002,
                          "batch_size": 7, "concurrency": 3, "poll_interval": 0.01},
                         environ={})


def ids(rows: list[Row]) -> list[int]:
    return [r.id for r in rows]


async def test_a_batch_holds_only_the_head_of_each_key() -> None:
    store = InMemoryStore()
    a1, b1, a2, n1, b2, n2 = (store.insert("rk", i, ordering_key=k)
                              for i, k in enumerate(["a", "b", "a", None, "b", None]))
    s1, s2 = await store.session(), await store.session()
    assert ids(await s1.claim(10)) == [a1.id, b1.id, n1.id, n2.id]
    assert await s2.claim(10) == []  # heads in flight block their keys; nothing else is ready
    await s1.settle(Settlement(sent=[a1.id]))  # b1 and the unkeyed rows were not settled
    assert ids(await s2.claim(10)) == [b1.id, a2.id, n1.id, n2.id]
    await s2.settle(Settlement(sent=[b1.id, a2.id]))
    assert ids(await s1.claim(10)) == [n1.id, b2.id, n2.id]


async def test_a_delayed_or_dead_head_blocks_its_key_only() -> None:
    clock = [1000.0]
    store = InMemoryStore(clock=lambda: clock[0])
    a1, b1, a2, b2 = (store.insert("rk", i, ordering_key=k)
                      for i, k in enumerate(["a", "b", "a", "b"]))
    s = await store.session()
    assert ids(await s.claim(10)) == [a1.id, b1.id]
    retry = Settlement(sent=[b1.id])
    retry.retry(a1.id, 5.0, "nacked")
    await s.settle(retry)
    assert ids(await s.claim(10)) == [b2.id]  # a1 waits for its retry; a2 waits for a1
    dead = Settlement()
    dead.park(b2.id, "returned", counted=True)
    await s.settle(dead)
    clock[0] += 10
    assert ids(await s.claim(10)) == [a1.id]
    await s.settle(Settlement(sent=[a1.id]))
    assert ids(await s.claim(10)) == [a2.id]
    await s.settle(Settlement(sent=[a2.id]))
    assert await s.claim(10) == []
    assert (await store.stats()).blocked_keys == 1
    b3 = store.insert("rk", 9, ordering_key="b")
    assert await s.claim(10) == []  # the dead b2 blocks b3 until an operator acts
    store.rows[b2.id].dead = False  # `outbox dead retry`
    assert ids(await s.claim(10)) == [b2.id]
    await s.settle(Settlement(sent=[b2.id]))
    assert ids(await s.claim(10)) == [b3.id]


async def test_relay_lanes_publish_each_key_in_id_order_despite_failures() -> None:
    """Three lanes, failing first attempts: a key's rows are first published in id order and
    never while an earlier row of the key is unconfirmed."""
    store = InMemoryStore()
    for i in range(300):
        store.insert("rk", i, ordering_key=f"k{i % 9}" if i % 4 else None)
    confirmed: set[int] = set()
    attempts: dict[int, int] = defaultdict(int)
    first: dict[str, list[int]] = defaultdict(list)

    def rule(row: Row) -> Result:
        attempts[row.id] += 1
        if row.ordering_key:
            earlier = [o for o in range(1, row.id) if o % 4 != 1 and o not in confirmed
                       and f"k{(o - 1) % 9}" == row.ordering_key]
            assert not earlier, f"row {row.id} published before {earlier}"
            if attempts[row.id] == 1:
                first[row.ordering_key].append(row.id)
        if row.id % 5 == 0 and attempts[row.id] < 3:
            return Result(Outcome.FAILED, "nacked", "nack")
        confirmed.add(row.id)
        return Result.confirmed()

    relay = Relay(SETTINGS, store, StubPublisher(rule), drain=True)
    for _ in range(200):
        if not any(not r.sent for r in store.rows.values()):
            break
        await relay.run()
    assert not store.rows
    assert len(first) == 9
    for key, got in first.items():
        assert got == sorted(got), key
