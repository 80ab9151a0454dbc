"""The relay core's decisions, against the in-memory fakes."""

from __future__ import annotations

import asyncio
import random

import pytest

from outbox import wakeup
from outbox.exceptions import WakeupFlagUnavailable
from outbox.ports import BLOCKED
from outbox.relay import Relay, decide, oversized
from outbox.retry import backoff
from outbox.rows import Outcome, Result, Row
from outbox.settings import Settings
from outbox.testing import InMemorySession, InMemoryStore, StoredRow, StubPublisher
from tests.support import GatedPublisher, running, until

SETTINGS = Settings.load({"max_attempts": 3, "retry_base": 1, "retry_max": 8, "batch_size": 10,
                          "poll_interval": 0.05}, environ={})


def rows(store: InMemoryStore, n: int, **kw: object) -> list[Row]:
    return [store.insert("rk", {"i": i}, **kw).as_row() for i in range(n)]


def test_backoff_doubles_is_capped_and_jittered() -> None:
    rng = random.Random(1)
    delays = [backoff(a, 1.0, 8.0, rng) for a in range(1, 8)]
    assert all(0.5 * min(8, 2 ** (a - 1)) <= d <= min(8, 2 ** (a - 1))
               for a, d in zip(range(1, 8), delays, strict=True))
    assert max(delays) <= 8.0
    assert len({backoff(3, 1.0, 8.0, rng) for _ in range(20)}) > 1  # jitter spreads retries


def test_decide_maps_each_outcome() -> None:
    store = InMemoryStore()
    batch = rows(store, 5)
    batch[3].attempts = 2  # its next failure is the third and last allowed
    batch[4].attempts = 2
    results = [Result.confirmed(), Result(Outcome.FAILED, "nacked", "nack"),
               Result(Outcome.POISON, "too big", "poison"),
               Result(Outcome.FAILED, "returned", "returned"),
               Result(Outcome.UNSETTLED)]
    s = decide(batch, results, SETTINGS, random.Random(0))
    assert s.sent == [batch[0].id]
    assert [r.id for r in s.retries] == [batch[1].id] and 0.5 <= s.retries[0].delay <= 1.0
    assert s.retries[0].error == "nacked"
    assert [p.id for p in s.parked] == [batch[2].id, batch[3].id]
    # poison is parked without counting a publish attempt
    assert [p.counted for p in s.parked] == [False, True]
    assert s.parked[0].error == "too big"
    assert "attempt 3 of 3" in s.parked[1].error
    assert s.unsettled == 1


def test_oversized_rows_are_poison() -> None:
    store = InMemoryStore()
    batch = rows(store, 2)
    big = store.insert("rk", b"x" * 100).as_row()
    found = oversized([*batch, big], limit=50)
    assert list(found) == [2] and found[2].outcome is Outcome.POISON
    assert "exceeds the limit of 50" in found[2].reason


async def test_relay_publishes_everything_and_deletes_it() -> None:
    store = InMemoryStore()
    rows(store, 25)
    pub = StubPublisher()
    relay = Relay(SETTINGS, store, pub, drain=True)
    counts = await asyncio.wait_for(relay.run(), 5)
    assert counts.published == 25 and not store.rows
    assert [r.id for r in pub.published] == sorted(r.id for r in pub.published)


async def test_mark_mode_keeps_rows_marked_sent() -> None:
    store = InMemoryStore(on_sent="mark")
    rows(store, 3)
    await asyncio.wait_for(Relay(SETTINGS, store, StubPublisher(), drain=True).run(), 5)
    assert all(r.sent for r in store.rows.values()) and len(store.rows) == 3


async def test_a_failing_row_retries_with_backoff_then_dies_without_stopping_others() -> None:
    now = [1000.0]
    store = InMemoryStore(clock=lambda: now[0])
    bad = store.insert("nowhere", {"x": 1})
    rows(store, 20)
    pub = StubPublisher(lambda r: Result(Outcome.FAILED, "returned: NO_ROUTE", "returned")
                        if r.routing_key == "nowhere" else Result.confirmed())
    relay = Relay(SETTINGS, store, pub)
    task = asyncio.create_task(relay.run())
    await until(lambda: len(store.rows) == 1, 5)
    assert bad.attempts == 1 and bad.available_at > now[0]  # pushed back, not spinning
    published_before = len(pub.published)
    claims = store.claims
    await until(lambda: store.claims >= claims + 3, 5)  # the relay looked again, and
    assert len(pub.published) == published_before  # found nothing due: no retry before its time
    for _ in range(SETTINGS.max_attempts):
        now[0] += SETTINGS.retry_max + 1
        await until(lambda: bad.dead or bad.available_at > now[0], 5)
    relay.stop()
    await asyncio.wait_for(task, 5)
    assert bad.dead and bad.attempts == SETTINGS.max_attempts
    assert "NO_ROUTE" in (bad.last_error or "")
    assert relay.counts.published == 20


async def test_no_claims_while_the_broker_is_unavailable() -> None:
    store = InMemoryStore()
    rows(store, 5)
    pub = StubPublisher()
    pub.connected = False
    relay = Relay(SETTINGS, store, pub)
    task = asyncio.create_task(relay.run())
    # every lane has asked the broker more than once: the point where it would have claimed
    await until(lambda: pub.waits >= 3 * SETTINGS.concurrency, 5)
    assert store.claims == 0 and pub.published == []
    assert all(r.locked_by is None for r in store.rows.values())
    assert not relay.ready
    pub.connected = True
    await until(lambda: not store.rows, 5)
    relay.stop()
    await asyncio.wait_for(task, 5)


async def test_readiness_says_which_side_is_down_and_why() -> None:
    """/readyz's answer comes from the relay and the Publisher protocol alone: the broker's
    problem (a lost connection, a blocking broker) and the database's, each under its name."""
    store = InMemoryStore()
    pub = StubPublisher()
    relay = Relay(SETTINGS, store, pub)
    async with running(relay):
        await until(lambda: relay.readiness()[0], 5)
        assert relay.readiness() == (True, {"database": True, "broker": True, "blocked": False,
                                            "problems": {}})
        pub.blocked = True
        ready, body = relay.readiness()
        assert not ready and body["broker"] is False and body["blocked"] is True
        assert body["problems"] == {"broker": BLOCKED}
        pub.blocked, pub.connected = False, False
        ready, body = relay.readiness()
        assert not ready and (body["broker"], body["blocked"]) == (False, False)
        assert body["problems"] == {"broker": "not connected to the broker (stub)"}
        pub.connected = True
        store.down = True
        await until(lambda: not relay.health.database, 5)
        ready, body = relay.readiness()
        assert not ready and body["database"] is False
        assert "in-memory store is down" in str(body["problems"])
        store.down = False


async def test_lost_database_is_retried_and_unsettled_rows_stay_pending() -> None:
    store = InMemoryStore()
    rows(store, 5)
    pub = StubPublisher(lambda r: Result(Outcome.UNSETTLED))
    relay = Relay(SETTINGS, store, pub)
    task = asyncio.create_task(relay.run())
    await until(lambda: len(pub.published) >= 10, 5)
    assert len(store.rows) == 5 and all(r.attempts == 0 for r in store.rows.values())
    store.down = True
    await until(lambda: not relay.health.database, 5)
    store.down = False
    pub.rule = lambda r: Result.confirmed()
    await until(lambda: not store.rows, 10)
    await until(lambda: relay.health.database, 10)
    relay.stop()
    await asyncio.wait_for(task, 5)


async def test_stop_settles_the_batch_in_flight() -> None:
    store = InMemoryStore()
    rows(store, 5)
    gate = asyncio.Event()

    class SlowPublisher(StubPublisher):
        async def publish(self, batch, lane):  # type: ignore[no-untyped-def]
            gate.set()
            await asyncio.sleep(0.2)
            return await super().publish(batch, lane)

    relay = Relay(SETTINGS, store, SlowPublisher())
    task = asyncio.create_task(relay.run())
    await asyncio.wait_for(gate.wait(), 5)
    relay.stop()
    await asyncio.wait_for(task, 5)
    assert not store.rows  # the batch in flight was confirmed and settled before exiting


async def test_an_unexpected_error_rolls_the_batch_back_and_the_relay_goes_on() -> None:
    store = InMemoryStore()
    rows(store, 3)
    calls = [0]

    class Flaky(StubPublisher):
        async def publish(self, batch, lane):  # type: ignore[no-untyped-def]
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("a bug")
            return await super().publish(batch, lane)

    relay = Relay(SETTINGS, store, Flaky())
    task = asyncio.create_task(relay.run())
    await until(lambda: not store.rows, 10)
    assert not task.done()
    relay.stop()
    await asyncio.wait_for(task, 5)


async def test_a_wake_up_rouses_one_sleeping_lane_and_a_full_batch_another(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Waking every lane per NOTIFY made all but one claim nothing; a full batch means more
    rows wait, so the lane that got it rouses another (a bulk insert notifies only once). The rows
    span three blocks of 10 ids (outbox.testing), so two lanes can claim at once."""
    claims: list[tuple[int, int]] = []  # (session, rows claimed)
    claim = InMemorySession.claim

    async def counted(self: InMemorySession, limit: int) -> list[Row]:
        got = await claim(self, limit)
        claims.append((id(self), len(got)))
        return got

    monkeypatch.setattr(InMemorySession, "claim", counted)
    store, pub = InMemoryStore(), GatedPublisher()
    pub.gate.set()
    store.block = 10
    settings = Settings.load({"batch_size": 10, "concurrency": 3, "poll_interval": 30},
                             environ={})
    relay = Relay(settings, store, pub)
    async with running(relay):
        await until(lambda: len(claims) == 3)  # every lane found nothing and sleeps
        claims.clear()
        store.insert("rk", {"i": 0})
        await until(lambda: len(pub.published) == 1 and len(relay._sleeping) == 3)
        # one lane claimed its row; none claimed in vain, not even that lane after its batch
        # (no wake-up came since, so no row can be waiting)
        assert [n for _, n in claims] == [1]
        claims.clear()
        pub.gate.clear()  # the first batch is held until the lane it roused has claimed
        store.insert_many("rk", [{"i": i} for i in range(25)])
        await until(lambda: len([n for _, n in claims if n]) == 2)
        pub.gate.set()
        await until(lambda: len(pub.published) == 26 and len(relay._sleeping) == 3)
        # ids 2-9 and 10-11 (full: it rouses a lane), 20-26 (block 1 is held), then 12-19
        assert [n for _, n in claims if n] == [10, 7, 8]
        assert len({s for s, n in claims if n}) >= 2


async def test_rows_committed_during_every_lanes_claim_are_claimed_once_more_by_one_lane(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A wake-up while no lane sleeps: the claims under way began before the row committed, so
    one of them must be made again (poll_interval is 30 s: nothing else would find the row in
    time), and only one: a claim begun after the wake-up sees the row. Its lane then looks once
    more after its batch, as the other two claims came back empty while it held the row (in
    PostgreSQL they could have passed over its block of rows), and nobody else claims."""
    claims: list[int] = []
    hold = asyncio.Event()
    claim = InMemorySession.claim

    async def held(self: InMemorySession, limit: int) -> list[Row]:
        got = await claim(self, limit)  # the rows it sees are fixed when it begins
        claims.append(len(got))
        await asyncio.wait_for(hold.wait(), 5)
        return got

    monkeypatch.setattr(InMemorySession, "claim", held)
    store, pub = InMemoryStore(), StubPublisher()
    settings = Settings.load({"concurrency": 3, "poll_interval": 30}, environ={})
    async with running(Relay(settings, store, pub)) as relay:
        await until(lambda: len(claims) == 3)  # every lane is inside an empty claim
        store.insert("rk", {"i": 0})
        hold.set()
        await until(lambda: len(pub.published) == 1 and len(relay._sleeping) == 3, 5)
        # the three empty claims, one made again, which got the row, and its lane's look after
        assert claims == [0, 0, 0, 1, 0]


async def test_without_a_listener_a_lane_claims_again_after_each_batch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A lane sleeps after a batch only while inserts wake it; with LISTEN not in place, a row
    committed during the batch must be found by the next claim, not by the poll (30 s here)."""
    async def never_in_place(self: InMemoryStore, wake: object) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(InMemoryStore, "listen", never_in_place)
    store, pub = InMemoryStore(), GatedPublisher()
    settings = Settings.load({"concurrency": 1, "poll_interval": 30}, environ={})
    async with running(Relay(settings, store, pub)) as relay:
        await until(lambda: relay._sleeping, 5)
        store.insert("rk", {"i": 0})
        relay._wake()  # a wake-up from elsewhere (the flag's re-claim): the lane claims
        await until(lambda: pub.held, 5)
        store.insert("rk", {"i": 1})  # no listener: nobody hears of it
        pub.gate.set()
        await until(lambda: len(pub.published) == 2, 5)


async def test_rows_committed_during_a_batch_are_claimed_at_once_without_a_probe(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The settle's look at the newest id (`StoreSession.settle`) says that a row came during
    the batch: the lane claims again at once, with no probe round trip and no wake-up."""
    store, pub = InMemoryStore(), GatedPublisher()
    settings = Settings.load({"concurrency": 1, "poll_interval": 30}, environ={})
    relay = Relay(settings, store, pub)
    claim = InMemorySession.claim
    probes_at_claims: list[tuple[int, int]] = []  # (probes made so far, rows claimed)

    async def noted(self: InMemorySession, limit: int) -> list[Row]:
        probes = relay._flag.probes
        rows = await claim(self, limit)
        probes_at_claims.append((probes, len(rows)))
        return rows

    monkeypatch.setattr(InMemorySession, "claim", noted)
    async with running(relay):
        await until(lambda: relay._sleeping, 5)
        store.insert("rk", {"i": 0})  # its NOTIFY wakes the lane
        await until(lambda: pub.held, 5)
        await until(lambda: store.wakeups_wanted is False, 5)  # the probe is on from now
        store.insert("rk", {"i": 1})  # no NOTIFY: the flag is lowered
        probes, claims = relay._flag.probes, len(probes_at_claims)
        pub.gate.set()
        await until(lambda: len(pub.published) == 2, 5)
        # the claim after row 0's batch got row 1, before any further probe
        assert probes_at_claims[claims] == (probes, 1)


async def test_the_flag_is_lowered_while_rows_come_and_raised_once_idle(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An active relay needs no NOTIFY (each one costs the producers' commits): it lowers the
    flag at its first claimed row, and raises it after IDLE_AFTER without one; when raising it
    changed it, a lane claims once more: a row committed while it was lowered sent no wake-up
    (poll_interval is 30 s here, so only that claim or the probe can find it in time). Stopping
    leaves it raised."""
    monkeypatch.setattr(wakeup, "IDLE_AFTER", 0.3)
    store, pub = InMemoryStore(), GatedPublisher()
    raise_flag = InMemorySession.want_wakeups
    late: list[StoredRow] = []

    async def producer_commits_meanwhile(self: InMemorySession, wanted: bool) -> bool:
        if wanted and not store.wakeups_wanted and not late:
            late.append(store.insert("rk", {"late": True}))  # no wake-up: the flag is down
        return await raise_flag(self, wanted)

    monkeypatch.setattr(InMemorySession, "want_wakeups", producer_commits_meanwhile)
    settings = Settings.load({"concurrency": 1, "poll_interval": 30}, environ={})
    relay = Relay(settings, store, pub)
    async with running(relay):
        store.insert("rk", {"i": 0})
        await until(lambda: pub.held, 5)
        await until(lambda: not store.wakeups_wanted, 5)  # active: lowered
        pub.gate.set()
        await until(lambda: len(pub.published) == 2 and not store.rows, 5)
        await until(lambda: store.wakeups_wanted, 5)  # idle again: raised
        assert late and store.wakeup_changes[:2] == [False, True]
    assert store.wakeups_wanted


async def test_an_active_relay_finds_rows_by_its_probe_without_a_notify(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """While the flag is lowered no insert wakes a lane: the probe of the newest id does, long
    before the poll (30 s here), and it wakes one lane, not all."""
    claims: list[int] = []
    claim = InMemorySession.claim

    async def counted(self: InMemorySession, limit: int) -> list[Row]:
        got = await claim(self, limit)
        claims.append(len(got))
        return got

    monkeypatch.setattr(InMemorySession, "claim", counted)
    monkeypatch.setattr(wakeup, "IDLE_AFTER", 30.0)  # stays active for the whole test
    store, pub = InMemoryStore(), StubPublisher()
    settings = Settings.load({"concurrency": 3, "poll_interval": 30}, environ={})
    relay = Relay(settings, store, pub)
    async with running(relay):
        store.insert("rk", {"i": 0})
        await until(lambda: len(pub.published) == 1 and not store.wakeups_wanted, 5)
        await until(lambda: len(relay._sleeping) == 3, 5)
        for i in range(1, 4):
            claims.clear()
            probes = relay._flag.probes
            store.insert("rk", {"i": i})  # sends no wake-up: the flag is lowered
            await until(lambda: len(pub.published) == i + 1, 5)  # noqa: B023
            await until(lambda: len(relay._sleeping) == 3, 5)
            assert relay._flag.probes > probes and claims == [1]


async def test_a_flag_another_relay_lowered_is_raised_at_the_next_poll() -> None:
    """A relay that lowered the flag and died leaves it down: the others notice when their
    sleep ends at the poll interval rather than by a wake-up, and raise it."""
    store, pub = InMemoryStore(), StubPublisher()
    relay = Relay(SETTINGS, store, pub)
    async with running(relay):
        await until(lambda: relay._sleeping, 5)
        store.wakeups_wanted = False
        store.insert("rk", {"i": 0})  # sends no wake-up; found by the poll
        await until(lambda: store.wakeups_wanted, 5)
        await until(lambda: len(pub.published) == 1, 5)
        assert store.wakeup_changes == [True]


async def test_without_the_flag_the_relay_warns_once_and_goes_on(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async def unavailable(self: InMemorySession, wanted: bool) -> bool:
        raise WakeupFlagUnavailable("no outbox_wakeup table")

    monkeypatch.setattr(InMemorySession, "want_wakeups", unavailable)
    store, pub = InMemoryStore(), StubPublisher()
    relay = Relay(SETTINGS, store, pub)
    async with running(relay):
        for i in range(3):
            store.insert("rk", {"i": i})
            await until(lambda: len(pub.published) == i + 1, 5)  # noqa: B023
        warnings = [r for r in caplog.records if "no outbox_wakeup table" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
        assert relay.health.database


async def test_failed_rows_are_logged_once_per_batch_and_kind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker that nacks everything wrote one warning per row (thousands a second): now one
    line per batch and kind of failure, with the count and a few row ids."""
    store = InMemoryStore()
    returned = store.insert("nowhere", {"x": 1})
    rows(store, 9)
    pub = StubPublisher(lambda r: Result(Outcome.FAILED, "returned: NO_ROUTE", "returned")
                        if r.routing_key == "nowhere" else
                        Result(Outcome.FAILED, "nacked by the broker", "nack"))
    relay = Relay(SETTINGS, store, pub)
    with caplog.at_level("WARNING", logger="outbox.relay"):
        async with running(relay):
            await until(lambda: relay.counts.batches >= 1 and relay.counts.failed, 5)
    first = [r for r in caplog.records if r.getMessage() == "publish failed"][:2]
    fields = {f["kind"]: f for f in (getattr(r, "fields", {}) for r in first)}
    assert set(fields) == {"nack", "returned"}
    assert fields["nack"]["rows"] == 9 and len(fields["nack"]["row_ids"]) == 5
    assert fields["returned"]["rows"] == 1 and fields["returned"]["row_ids"] == [returned.id]
    assert fields["nack"]["reasons"] == ["nacked by the broker"]
    batches = relay.counts.batches
    assert len([r for r in caplog.records if r.getMessage() == "publish failed"]) <= 2 * batches


async def test_a_batch_released_whole_is_said_once_until_one_gets_through(
        caplog: pytest.LogCaptureFixture) -> None:
    """Unsettled rows count no attempt and raise no failure: without this line a relay whose
    every batch goes back (a broker that takes no publish) would be silent."""
    released = Result(Outcome.UNSETTLED, "not published", "connection")
    store = InMemoryStore()
    pub = StubPublisher(rule=lambda row: released)
    relay = Relay(SETTINGS, store, pub)
    async with running(relay):
        store.insert("rk", {"i": 0})
        await until(lambda: len(pub.published) >= 3, 5)  # released, claimed again, ...
        pub.rule = lambda row: Result.confirmed()
        await until(lambda: not store.rows, 5)
    lines = [r for r in caplog.records if r.getMessage().startswith("batch released")]
    assert len(lines) == 1 and lines[0].levelname == "WARNING"
