"""Rows AMQP cannot carry, through the relay core and the fakes: the drain ends, the good rows
are published, each bad row is dead with its reason, a keyed one blocks only its key."""

from __future__ import annotations

import asyncio

import pytest

from outbox.relay import Relay
from outbox.settings import Settings
from outbox.testing import InMemoryStore, StubPublisher

SETTINGS = Settings.load({"max_attempts": 3, "batch_size": 10, "poll_interval": 0.05},
                         environ={})
BAD = {
    "headers_over_frame_max": ({"headers": {"blob": "x" * 5_000}}, "frame_max of 4,096"),
    "headers_deep": ({"headers": {"a": [[[[{"b": [[1]]}]]]]}}, "headers: nested 8 deep"),
    "created_at": ({"created_at": -1.0}, "created_at 1969-12-31T23:59:59+00:00: before 1970"),
    "routing_key": ({"routing_key": "k" * 256}, "routing_key: 256 bytes"),
    "exchange": ({"exchange": "é" * 128}, "not an AMQP 0-9-1 exchange name"),
    "header_name": ({"headers": {"n" * 129: True}}, "field-name limit of 128"),
    "header_float": ({"headers": {"f": 1e39}}, "headers.f: number 1e+39"),
}


@pytest.fixture(autouse=True)
def shallow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("outbox.limits.MAX_DEPTH", 7)  # small rows for a unit test


async def test_a_drain_parks_what_no_frame_can_carry_and_ends() -> None:
    store = InMemoryStore()
    good = [store.insert("rk", {"i": i}) for i in range(25)]
    bad = {}
    for kind, (columns, _) in BAD.items():
        fields = {"routing_key": "rk", **columns}
        bad[kind] = store.insert(fields.pop("routing_key"), {"bad": kind}, **fields)
    keyed = store.insert("rk", {"k": 1}, ordering_key="k1", created_at=-5.0)
    after = store.insert("rk", {"k": 2}, ordering_key="k1")
    pub = StubPublisher(frame_max=4_096)
    counts = await asyncio.wait_for(Relay(SETTINGS, store, pub, drain=True).run(), 5)
    assert counts.published == len(good)
    assert {r.id for r in pub.published} == {r.id for r in good}
    for kind, (_, reason) in BAD.items():
        row = store.rows[bad[kind].id]
        assert row.dead and row.attempts == 0, kind
        assert row.last_error is not None and reason in row.last_error, (kind, row.last_error)
    assert store.rows[keyed.id].dead
    assert not store.rows[after.id].dead and not store.rows[after.id].sent  # its key is blocked
    stats = await store.stats()
    assert (stats.dead, stats.blocked_keys, stats.pending) == (len(BAD) + 1, 1, 1)
