"""Lanes asleep: whatever happens to the wake-ups, something always wakes them (outbox.wakeup,
`Relay._sleep`), and a relay whose lanes stopped claiming while rows are ready says so."""

from __future__ import annotations

import asyncio
import logging

import pytest

from outbox import metrics, wakeup
from outbox.ports import Stats
from outbox.relay import Relay
from outbox.rows import Row
from outbox.settings import Settings
from outbox.testing import InMemorySession, InMemoryStore, StubPublisher
from tests.support import running, until


async def listener_never_in_place(self: InMemoryStore, wake: object) -> None:
    """LISTEN that never gets in place and never fails (a listener stuck in its reconnect
    backoff after a database outage looks the same to the lanes)."""
    await asyncio.Event().wait()


async def test_a_lane_asleep_without_a_timer_is_woken_after_the_probe_stops(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A lane that went to sleep without a timer while the probe covered it (flag lowered, or
    raised less than GRACE ago) must still be woken once the probe stops and no LISTEN is in
    place: the safety poll wakes it, or a row committed then waits for the listener's next
    retry (up to 15 s), or forever when LISTEN never gets in place."""
    monkeypatch.setattr(InMemoryStore, "listen", listener_never_in_place)
    monkeypatch.setattr(wakeup, "IDLE_AFTER", 0.2)
    store, pub = InMemoryStore(), StubPublisher()
    settings = Settings.load({"concurrency": 2, "poll_interval": 0.05}, environ={})
    store.insert("rk", {"i": 0})
    async with running(Relay(settings, store, pub)) as relay:
        await until(lambda: len(pub.published) == 1, 5)
        # active (the flag lowered: the probe covers the lanes), then idle again: the flag is
        # raised, its GRACE ends, and no LISTEN covers the lanes
        await until(lambda: store.wakeup_changes == [False, True]
                         and not relay._flag.probing, 5)
        await until(lambda: len(relay._sleeping) == settings.concurrency, 5)
        store.insert("rk", {"i": 1})  # its NOTIFY reaches nobody
        # the safety poll comes every two poll intervals (0.1 s); a relay without it never
        await until(lambda: len(pub.published) == 2, 5)


async def test_a_relay_that_stopped_claiming_while_rows_are_ready_says_so(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Rows are ready, the relay is connected, and no lane has begun a claim for longer than a
    working relay ever waits (here: the one lane hangs in a claim): one warning and a growing
    gauge, not silence; the gauge falls back once a lane claims again."""
    hang = asyncio.Event()
    go_on = asyncio.Event()
    claim = InMemorySession.claim

    async def hanging(self: InMemorySession, limit: int) -> list[Row]:
        if hang.is_set():
            await go_on.wait()
        return await claim(self, limit)

    refreshes = 0
    stats = InMemoryStore.stats

    async def counted(self: InMemoryStore) -> Stats:
        nonlocal refreshes
        refreshes += 1
        return await stats(self)

    monkeypatch.setattr(InMemorySession, "claim", hanging)
    monkeypatch.setattr(InMemoryStore, "stats", counted)
    store, pub = InMemoryStore(), StubPublisher()
    settings = Settings.load({"concurrency": 1, "poll_interval": 0.05, "stats_interval": 0.5},
                             environ={})
    relay = Relay(settings, store, pub)
    monkeypatch.setattr(relay, "_stalled_after", lambda: 0.5)
    caplog.set_level(logging.WARNING, "outbox.relay")

    def said() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "no lane has claimed" in r.message]

    def gauge() -> float:
        return float(metrics.REGISTRY.get_sample_value("outbox_seconds_since_claim") or 0)

    async with running(relay):
        await until(lambda: relay._sleeping and relay.ready, 5)
        assert not said() and gauge() < 0.5
        hang.set()
        store.insert("rk", {"i": 0})  # wakes the lane, whose claim hangs
        await until(said, 5)
        assert gauge() >= 0.5
        seen = refreshes
        await until(lambda: refreshes >= seen + 2, 5)  # checked twice more: still one line
        hang.clear()
        go_on.set()
        await until(lambda: len(pub.published) == 1, 5)
        await until(lambda: gauge() < 0.5, 5)
    assert len(said()) == 1
    assert said()[0].__dict__["fields"]["ready_rows"] == 1
