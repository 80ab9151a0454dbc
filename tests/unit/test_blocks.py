"""Rows without a key are claimed by blocks of ids (outbox/queries.sql): a lane's batch holds
its blocks until it is settled, and a claim passes over them. The relay must not leave ready
rows in such a block to the safety poll."""

from __future__ import annotations

import pytest

from outbox import wakeup
from outbox.relay import Relay
from outbox.settings import Settings
from outbox.testing import InMemoryStore
from tests.support import GatedPublisher, running, until


async def test_a_row_in_a_block_a_batch_held_is_claimed_when_the_batch_ends(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Lane A holds block 0 (row 1) while row 2 commits into it and row 4 into block 1. Lane B,
    woken, passes over block 0 and takes row 4, so the probe has seen the newest id. When
    both batches end, A must look again for row 2 (B's claim came back short while A held its
    block): no wake-up would report it, and the safety poll is a minute away (nor is the flag
    raised again, with its own wake-up, in the test's time)."""
    monkeypatch.setattr(wakeup, "IDLE_AFTER", 60.0)
    store, pub = InMemoryStore(), GatedPublisher()
    store.block = 4
    settings = Settings.load({"concurrency": 2, "poll_interval": 30}, environ={})
    async with running(Relay(settings, store, pub)) as relay:
        await until(lambda: len(relay._sleeping) == 2, 5)
        store.insert("rk", {"i": 1})  # its NOTIFY wakes lane A
        await until(lambda: len(pub.held) == 1 and store.wakeups_wanted is False, 5)
        store.insert("rk", {"i": 2})  # the flag is lowered: no NOTIFY
        store.next_block()
        store.insert("rk", {"i": 5})
        relay._wake()  # as the probe would, had every lane been asleep
        await until(lambda: len(pub.held) == 2, 5)
        assert pub.held == [[1], [4]]  # lane B passed over block 0, which lane A holds
        pub.gate.set()
        await until(lambda: len(pub.published) == 3, 5)
        assert sorted(r.id for r in pub.published) == [1, 2, 4]
