"""Readiness when the broker takes publishes but confirms none (`outbox.confirms`)."""

from __future__ import annotations

from outbox.confirms import STALLED_AFTER, ConfirmWatch
from outbox.relay import Relay
from outbox.rows import Outcome, Result
from outbox.settings import Settings
from outbox.testing import InMemoryStore, StubPublisher
from tests.support import running, until

SETTINGS = Settings.load({"max_attempts": 1000, "retry_base": 0.01, "retry_max": 0.02,
                          "batch_size": 10, "poll_interval": 0.05, "concurrency": 1},
                         environ={})
TIMEOUT = Result(Outcome.FAILED, "no confirm within 2s", "timeout")


def test_one_timeout_alone_is_not_a_stall() -> None:
    w = ConfirmWatch()
    w.timed_out(100.0)
    assert not w.stalled and w.problem(110.0) == ""


def test_timeouts_in_a_row_say_since_when_and_how_many() -> None:
    w = ConfirmWatch()
    for started in (100.0, 102.5, 105.0):
        w.timed_out(started)
    assert w.stalled and STALLED_AFTER <= 3
    assert w.problem(135.4) == ("no publish confirmed for 35 s (3 timeouts): "
                                "a quorum queue without a majority?")


def test_since_is_the_earliest_publish_of_the_run_whatever_the_order_they_end_in() -> None:
    w = ConfirmWatch()
    w.timed_out(105.0)  # lanes overlap: an earlier publish may time out later
    w.timed_out(100.0)
    assert w.problem(110.0).startswith("no publish confirmed for 10 s (2 timeouts)")


def test_an_answer_ends_the_stall_and_starts_the_count_again() -> None:
    w = ConfirmWatch()
    w.timed_out(100.0)
    w.timed_out(101.0)
    w.answered()
    assert not w.stalled and w.problem(200.0) == ""
    w.timed_out(150.0)
    assert not w.stalled  # one timeout after an answer is one, not three
    w.timed_out(151.0)
    assert w.problem(160.0).startswith("no publish confirmed for 10 s (2 timeouts)")


async def test_the_relay_is_not_ready_while_publishes_time_out_and_ready_after_a_confirm() -> None:
    """The lanes go on publishing while not ready (so the next confirm can come at all); nothing
    that timed out is marked sent."""
    store = InMemoryStore()
    for i in range(5):
        store.insert("rk", {"i": i})
    answer = [TIMEOUT]
    pub = StubPublisher(lambda row: answer[0])
    async with running(Relay(SETTINGS, store, pub)) as relay:
        await until(lambda: relay.health.database and relay.confirms.stalled, 5,
                    "connected, and the broker answering nothing")
        assert not relay.ready and pub.ready  # the publisher stays usable: the lanes go on
        assert "no publish confirmed for" in relay.unconfirmed
        assert len(store.rows) == 5 and not any(r.sent for r in store.rows.values())
        answer[0] = Result.confirmed()
        await until(lambda: not store.rows, 5, "every row sent")
        assert relay.ready and relay.unconfirmed == ""


async def test_a_nack_is_an_answer() -> None:
    store = InMemoryStore()
    store.insert("rk", {"i": 0})
    answer = [TIMEOUT]
    pub = StubPublisher(lambda row: answer[0])
    async with running(Relay(SETTINGS, store, pub)) as relay:
        await until(lambda: relay.confirms.stalled, 5, "publishes timing out")
        answer[0] = Result(Outcome.FAILED, "nacked by the broker", "nack")
        await until(lambda: not relay.confirms.stalled, 5, "the nack taken as an answer")
        assert relay.ready
