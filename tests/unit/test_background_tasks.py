"""The relay's lanes and background tasks against connection states and errors (the fakes):
no lane spins while the broker is away, every helper survives any error or fails the relay
loudly, never silently."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import pytest

from outbox import metrics
from outbox.exceptions import OutboxError, SchemaMissing
from outbox.http import HealthServer
from outbox.ports import Stats
from outbox.relay import Relay
from outbox.retry import Failures
from outbox.settings import Settings
from outbox.testing import InMemoryStore, StubPublisher
from tests.support import until

SETTINGS = Settings.load({"batch_size": 10, "poll_interval": 0.05, "stats_interval": 0.5},
                         environ={})


def task_errors(task: str) -> float:
    return metrics.REGISTRY.get_sample_value("outbox_task_errors_total", {"task": task}) or 0.0


class Ticker:
    """A task that counts the event loop's turns: it only advances when the loop is free."""

    def __init__(self) -> None:
        self.ticks = 0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.ticks += 1
            await asyncio.sleep(0.001)

    def close(self) -> None:
        self._task.cancel()


class NeverReady(StubPublisher):
    """A broker that is away, behind a publisher whose wait_ready gives up at once (without
    awaiting): what AmqpPublisher.wait_ready did while its connection was dropped, closed or
    dying but `_connected` still set."""

    def __init__(self, ticker: Ticker) -> None:
        super().__init__()
        self.connected = False
        self.ticker = ticker
        self.calls_since_tick = 0
        self._last_tick = -1

    async def wait_ready(self, timeout: float) -> bool:
        if self.ticker.ticks != self._last_tick:
            self._last_tick, self.calls_since_tick = self.ticker.ticks, 0
        self.calls_since_tick += 1
        if self.calls_since_tick > 1000:  # nothing else ran meanwhile: the lane spins
            raise AssertionError("a lane calls wait_ready in a loop without yielding")
        return False


async def test_a_lane_never_spins_while_the_broker_is_away() -> None:
    """Even with a publisher that returns from wait_ready at once, a lane waiting for the broker
    leaves the loop to the other tasks (the supervisor, the HTTP server, the signal handlers),
    and a stop ends it."""
    ticker = Ticker()
    store = InMemoryStore()
    store.insert("rk", {"n": 1})
    pub = NeverReady(ticker)
    relay = Relay(SETTINGS, store, pub)
    task = asyncio.create_task(relay.run())
    try:
        start = ticker.ticks
        await until(lambda: ticker.ticks > start + 20 or task.done(), timeout=10)
        assert not task.done(), task.exception()
        relay.stop()
        await asyncio.wait_for(task, 5)
    finally:
        ticker.close()
        task.cancel()
    assert pub.published == []  # nothing was claimed for a broker that is away


class StoreBeforeMigrate(InMemoryStore):
    """A store whose tables are created while the relay runs (`outbox migrate` after start)."""

    def __init__(self, missing_for: int) -> None:
        super().__init__()
        self.missing_for = missing_for
        self.stats_calls = 0

    async def stats(self) -> Stats:
        self.stats_calls += 1
        if self.stats_calls <= self.missing_for:
            raise SchemaMissing()
        return await super().stats()


async def test_backlog_gauges_survive_a_relay_started_before_migrate() -> None:
    store = StoreBeforeMigrate(missing_for=2)
    for i in range(7):
        store.insert("rk", {"n": i})
    pub = StubPublisher()
    pub.connected = False  # the rows stay pending: the gauge must show them
    metrics.PENDING.set(-1)
    relay = Relay(SETTINGS, store, pub)
    task = asyncio.create_task(relay.run())
    try:
        await until(lambda: metrics.REGISTRY.get_sample_value("outbox_pending") == 7
                         or task.done(), timeout=10)
        assert not task.done(), task.exception()
        assert store.stats_calls > store.missing_for
    finally:
        relay.stop()
        await asyncio.wait_for(task, 5)


class FlakyListener(InMemoryStore):
    """LISTEN fails once with an error nobody foresaw, then works."""

    def __init__(self) -> None:
        super().__init__()
        self.listens = 0

    async def listen(self, wake: Callable[[], None]) -> None:
        self.listens += 1
        if self.listens == 1:
            raise RuntimeError("the listener broke")
        await super().listen(wake)


async def test_the_listener_survives_an_unexpected_error_says_so_once_and_listens_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FlakyListener()
    relay = Relay(SETTINGS, store, StubPublisher())
    before = task_errors("listen")
    task = asyncio.create_task(relay.run())
    try:
        await until(lambda: (store.listens >= 2 and relay._listening) or task.done(),
                         timeout=10)
        assert not task.done(), task.exception()
    finally:
        relay.stop()
        await asyncio.wait_for(task, 5)
    assert task_errors("listen") == before + 1
    logged = [r for r in caplog.records if "listening for notifications failed" in r.message]
    assert len(logged) == 1 and logged[0].levelno == logging.ERROR


async def test_a_background_task_that_ends_stops_the_relay_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A helper that ends for a reason its own loop did not catch (a bug) must not leave the
    relay running degraded in silence: not-ready, counted, one critical line, run() raises."""
    store = InMemoryStore()
    relay = Relay(SETTINGS, store, StubPublisher())
    started = asyncio.Event()

    async def broken_stats() -> None:
        started.set()
        raise RuntimeError("stats bug")

    relay._refresh_stats = broken_stats  # type: ignore[method-assign]
    before = task_errors("stats")
    task = asyncio.create_task(relay.run())
    try:
        async with asyncio.timeout(10):
            with pytest.raises(OutboxError, match="the stats task ended: RuntimeError"):
                await task
    finally:
        task.cancel()
    assert started.is_set()
    assert not relay.ready
    assert task_errors("stats") == before + 1
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and "stopping the relay" in critical[0].message


async def test_an_error_behind_an_http_request_is_logged_once_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def health() -> tuple[bool, dict[str, object]]:
        raise RuntimeError("health bug")

    server = HealthServer(0, health, host="127.0.0.1")
    await server.start()
    before = task_errors("http")
    try:
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /readyz HTTP/1.1\r\n\r\n")
            await writer.drain()
            async with asyncio.timeout(5):
                await reader.read()  # the server closes the connection
            writer.close()
        # the server goes on: another endpoint still answers
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            assert (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        await server.close()
    assert task_errors("http") == before + 2
    assert len([r for r in caplog.records if "HTTP request" in r.message]) == 1


def test_a_tasks_failures_are_said_once_counted_and_backed_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The one helper of every background task: an unexpected error is counted each time and
    logged once until the task works again; an expected one (the database away) only backs
    off; the delays grow to the cap and start over after a success."""
    log = logging.getLogger("outbox.test")
    failures = Failures(log, "test_helper", "the helper failed", base=1.0, cap=4.0,
                        expected=(SchemaMissing,), rng=random.Random(0))
    before = task_errors("test_helper")
    with caplog.at_level(logging.ERROR, logger="outbox.test"):
        delays = [failures.failed(RuntimeError("bug")) for _ in range(4)]
        delays.append(failures.failed(SchemaMissing()))
        failures.failed(RuntimeError("another bug"))
        failures.succeeded()
        again = failures.failed(RuntimeError("bug"))
    assert 0.5 <= delays[0] <= 1.0
    assert all(2.0 <= d <= 4.0 for d in delays[2:])  # capped at 4, jittered to half of it
    assert 0.5 <= again <= 1.0  # started over
    assert task_errors("test_helper") == before + 6  # every unexpected error, not the expected
    said = [(r.getMessage(), r.exc_info is not None) for r in caplog.records
            if r.name == "outbox.test"]
    assert said == [("the helper failed", True)] * 3  # bug, another bug, bug after a success
