"""When a drain ends (`Relay(..., drain=True)`): only on a claim that found nothing ready while no
other lane's transaction was open, since a claim that overlaps another lane's can come back empty
with rows ready."""

from __future__ import annotations

import asyncio

from outbox.relay import Relay
from outbox.rows import Row, Settlement
from outbox.settings import Settings
from outbox.testing import InMemorySession, InMemoryStore, StubPublisher

SETTINGS = Settings.load({"max_attempts": 3, "retry_base": 0, "retry_max": 0, "batch_size": 10,
                          "concurrency": 2, "poll_interval": 0.05}, environ={})


class RacingStore(InMemoryStore):
    """Plays, once, what PostgreSQL does to a claim (READ COMMITTED, FOR UPDATE SKIP LOCKED)
    that began while another lane held a row and reaches it after that lane rescheduled it: the
    row is locked, then rechecked against this claim's `now()`, older than its new available_at;
    the recheck fails, so the claim returns nothing but keeps the row locked until its
    transaction ends."""

    def __init__(self) -> None:
        super().__init__(on_sent="mark")
        self.raced = False
        self.holder: RacingSession | None = None
        self.rescheduled = asyncio.Event()  # the other lane committed a retry
        self.relocked = asyncio.Event()  # ... and the stale claim then locked the row
        self.looked = asyncio.Event()  # another claim ran while the stale lock was held

    async def session(self) -> InMemorySession:
        self.check()
        return RacingSession(self)


class RacingSession(InMemorySession):
    store: RacingStore

    async def claim(self, limit: int) -> list[Row]:
        held = [r for r in self.store.rows.values() if r.locked_by not in (None, self)]
        if not self.store.raced and held:
            self.store.raced = True
            self.store.claims += 1
            await self.store.rescheduled.wait()
            assert held[0].locked_by is None
            held[0].locked_by = self
            self.claimed = [held[0].id]
            self.store.holder = self
            self.store.relocked.set()
            return []
        if self.store.holder not in (None, self):
            self.store.looked.set()
        return await super().claim(limit)

    async def settle(self, s: Settlement) -> int:
        newest = await super().settle(s)
        if s.retries and not self.store.rescheduled.is_set():
            self.store.rescheduled.set()
            await self.store.relocked.wait()
        return newest

    async def release(self) -> None:
        if self.store.holder is self:
            await self.store.looked.wait()  # the other lane claims while the lock is held
            self.store.holder = None
        await super().release()


async def test_a_drain_ends_only_when_a_claim_that_overlapped_no_other_finds_nothing() -> None:
    """Two lanes: one publishes a row that comes back (retried at once: retry_base 0) while the
    other's claim, begun before the retry was written, locks the row without returning it. Each
    lane's claim then comes back empty for the other's transaction; neither may end the drain
    on it: the row is published again until it is dead (3 attempts)."""
    store = RacingStore()
    row = store.insert("nowhere", {"x": 1})
    pub = StubPublisher(routable=set())  # every row comes back: NO_ROUTE
    await asyncio.wait_for(Relay(SETTINGS, store, pub, drain=True).run(), 5)
    assert store.raced
    assert (row.dead, row.attempts) == (True, 3), (
        f"the drain ended with the row pending after {row.attempts} attempts")
    assert len(pub.published) == 3
