"""The publisher's connection to the broker, and the task that keeps it up.

One connection to the first reachable of the configured nodes (`outbox.amqp.Nodes`: failing over
on loss), watched until it closes, its reader dies or a lane gives it up, then replaced; and one
confirm-mode channel per lane on it. `outbox.batch` publishes on these channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any, TypeVar

import aiormq
from aiormq import exceptions as amqp_exc

from outbox import frames, metrics
from outbox.amqp import Nodes, close_quietly
from outbox.exceptions import BrokerUnavailable, OutboxError, PermanentRefusal, UnsupportedClient
from outbox.retry import RECONNECT_BASE, RECONNECT_CAP, REFUSED_RETRY, Failures
from outbox.settings import Settings, redact

# the publisher's logger, as before the split: operators filter on it
log = logging.getLogger("outbox.publisher")
T = TypeVar("T")

WATCH_INTERVAL = 1.0  # how often a live connection's reader task is checked
CLOSE_TIMEOUT = 1.0  # a connection given up is closed politely for this long at most
# what a dying connection raises into a request in flight (besides CancelledError)
_CONNECTION_ERRORS = (amqp_exc.AMQPError, OSError, EOFError, TimeoutError)


class Supervisor:
    """Keeps one connection to the broker in use, and each lane's channel on it."""

    def __init__(self, settings: Settings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.nodes = Nodes(settings.amqp_urls, settings.heartbeat, settings.db_timeout)
        self.problem = ""
        self.connection: aiormq.abc.AbstractConnection | None = None
        self.current_url = ""
        self._channels: dict[int, aiormq.Channel] = {}
        self._connected = asyncio.Event()
        self._dropped = asyncio.Event()  # set when the connection in use is given up
        self._closers: set[asyncio.Task[None]] = set()  # closes of connections given up
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None
        self._timeout = settings.publish_timeout
        self.fatal: BaseException | None = None  # why this publisher can never work
        self._failed = asyncio.Event()

    # `connection` and `_connected` change together, in `_use` and `_lose` (synchronous): while
    # no connection is in use `_connected` is clear, so whoever waits for one awaits it.

    async def start(self) -> None:
        """Start connecting in the background (and reconnecting for as long as it runs)."""
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name="outbox-broker")
            self._task.add_done_callback(self._supervisor_done)

    def _supervisor_done(self, task: asyncio.Task[None]) -> None:
        if self._task is not task:
            return  # `close` cancelled it
        exc = asyncio.CancelledError() if task.cancelled() else task.exception()
        if exc is None:
            exc = OutboxError("the broker task ended: returned")
        elif not isinstance(exc, OutboxError):
            exc = OutboxError(f"the broker task ended: {exc!r}")
        metrics.TASK_ERRORS.labels("broker").inc()
        self._fail(exc)

    def _fail(self, exc: BaseException | None) -> None:
        if self.fatal is None and exc is not None:
            self.fatal = exc
            log.error("the broker connection cannot work: stopping the relay",
                      extra={"fields": {"error": str(exc) or type(exc).__name__}})
            self._failed.set()

    def check(self, conn: aiormq.abc.AbstractConnection, channel: Any = None) -> None:
        """`frames.check_internals`, recorded as this publisher's fatal error when it fails."""
        try:
            frames.check_internals(conn, channel)
        except UnsupportedClient as exc:
            self._fail(exc)
            raise

    async def guard(self, task: asyncio.Task[T]) -> T:
        """Await ``task`` (the relay); if this publisher fails for good first (an unsupported
        aiormq, a dead supervisor), cancel the task and raise that error: the process ends loudly
        instead of running not-ready forever."""
        failed = asyncio.ensure_future(self._failed.wait())
        try:
            await asyncio.wait({task, failed}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            failed.cancel()
        if not task.done() and self.fatal is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise self.fatal
        return await task

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # never raises its error: the runner reports that
        conn = self.connection
        if conn is not None:
            self._lose(conn)
            self._retire(conn)
        if self._closers:
            await asyncio.wait(self._closers)

    @property
    def ready(self) -> bool:
        conn = self.connection
        return (conn is not None and usable(conn) and self.fatal is None
                and not frames.blocked(conn))

    @property
    def blocked(self) -> bool:
        """True while the broker blocks publishers (``connection.blocked``: memory/disk alarm)."""
        conn = self.connection
        return conn is not None and frames.blocked(conn)

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until `ready`, at most ``timeout`` seconds. Each round awaits something still
        pending (a new connection, or the broker lifting its block), so a lane that waits for
        the broker always gives the event loop back, whatever state the connection is in."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.ready:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            conn = self.connection
            if conn is not None and not usable(conn):
                self._lose(conn)  # dead before the supervisor saw it: nobody may wait on it
                conn = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    if conn is None:
                        await self._connected.wait()
                    else:
                        await conn.ready()  # connected and open, so blocked: until unblocked
        metrics.BROKER_BLOCKED.set(1 if self.blocked else 0)
        return self.ready

    async def _supervise(self) -> None:
        # A bug while holding a connection must not leave the relay without a broker for good:
        # it is said, counted, and the supervisor connects again after a pause.
        failures = Failures(log, "broker", "unexpected error while holding the broker connection",
                            base=RECONNECT_BASE, cap=RECONNECT_CAP, expected=(BrokerUnavailable,),
                            rng=self._rng)
        while True:
            try:
                conn, url = await self.nodes.connect()
            except PermanentRefusal as exc:
                self._set_problem(str(exc))
                await asyncio.sleep(REFUSED_RETRY)
                continue
            except BrokerUnavailable as exc:
                self._set_problem(str(exc))
                await asyncio.sleep(failures.failed(exc))
                continue
            failures.succeeded()
            self.check(conn)  # before anyone uses it: a moved private part stops the relay
            error: Exception | None = None
            try:
                reason = await self._hold(conn, url)
            except Exception as exc:
                error, reason = exc, f"unexpected error: {type(exc).__name__}: {exc}"
            finally:
                self._lose(conn)
                self._retire(conn)
            problem = f"broker {redact(url)}: connection lost ({reason})"
            self.nodes.lost()  # try the next node first: the one we lost may be down
            if error is None:
                self._set_problem(problem)
                continue
            delay = failures.failed(error)
            self._set_problem(problem)
            await asyncio.sleep(delay)

    async def _hold(self, conn: aiormq.abc.AbstractConnection, url: str
                    ) -> BaseException | str | None:
        """Use ``conn`` until it closes, its reader dies or it is given up; returns why."""
        self._use(conn, url)
        log.info("broker connected", extra={"fields": {"url": redact(url)}})
        # aiormq's close of a stalled connection can hang (it waits for the peer), and its
        # closing future then never resolves: `_lose` wakes us up as well
        closing = conn.closing
        dropped = asyncio.ensure_future(self._dropped.wait())
        try:
            while not (closing.done() or dropped.done() or frames.reader_died(conn)):
                await asyncio.wait([closing, dropped], timeout=WATCH_INTERVAL,
                                   return_when=asyncio.FIRST_COMPLETED)
            if closing.done() and not closing.cancelled():
                return closing.exception()
            if frames.reader_died(conn):
                # aiormq's reader is gone but its own clean-up may hang (seen after a reset
                # under uvloop), so nothing would ever resolve `closing`
                return "the connection's reader ended"
            return "given up by the relay"
        finally:
            dropped.cancel()
            closing.cancel()  # only stops this observer

    def _use(self, conn: aiormq.abc.AbstractConnection, url: str) -> None:
        self._dropped.clear()
        self.connection = conn
        self.current_url = url
        self.problem = ""
        self._connected.set()
        metrics.CONNECTED.labels("broker").set(1)

    def _lose(self, conn: aiormq.abc.AbstractConnection) -> bool:
        """Stop using ``conn`` if it is the connection in use (True then). From here on no lane
        opens a channel on it, waiters wait for the next one, and the supervisor reconnects."""
        if conn is not self.connection:
            return False
        self.connection = None
        self._connected.clear()
        self._channels.clear()
        self._dropped.set()
        metrics.CONNECTED.labels("broker").set(0)
        return True

    def _retire(self, closable: aiormq.abc.AbstractConnection | aiormq.abc.AbstractChannel
                ) -> None:
        """Close a connection or channel given up, in the background: reconnecting (or the
        lane) does not wait for it."""
        if closable.is_closed:
            return
        task = asyncio.create_task(close_politely(closable), name="outbox-broker-close")
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    def _set_problem(self, problem: str) -> None:
        if problem != self.problem:
            log.error("broker unavailable", extra={"fields": {"error": problem}})
        self.problem = problem

    def drop(self, conn: aiormq.abc.AbstractConnection, why: str) -> None:
        """A lane found the connection its batch was on unusable (stalled): reconnect. Only
        that connection is given up; if the supervisor has replaced it already, the fresh one
        (and every other lane's batch on it) is left alone."""
        if self._lose(conn):
            log.warning("%s: reconnecting", why)

    async def channel(self, lane: int) -> aiormq.Channel:
        """The lane's confirm-mode channel on the connection in use, opened if need be; raises
        BrokerUnavailable when there is no usable connection."""
        channel = self._channels.get(lane)
        if channel is not None and not channel.is_closed:
            return channel
        conn = self.connection
        if conn is None or not usable(conn):
            raise BrokerUnavailable("not connected to the broker")
        try:
            async with asyncio.timeout(self._timeout):
                opened = await conn.channel(publisher_confirms=True, on_return_raises=True)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the lane itself is cancelled (the shutdown deadline)
            # aiormq throws CancelledError into the requests in flight on a connection it
            # closes with no other reason (its reader was cancelled): a lost connection
            raise BrokerUnavailable("the connection closed while a channel was opening") \
                from None
        except Exception as exc:
            if not isinstance(exc, _CONNECTION_ERRORS) and usable(conn):
                raise  # not the connection's fault: the lane reports it
            raise BrokerUnavailable(
                f"cannot open a channel: {exc or type(exc).__name__}") from exc
        assert isinstance(opened, aiormq.Channel)
        self.check(conn, opened)
        if conn is not self.connection:
            raise BrokerUnavailable("the connection was given up while a channel was opening")
        self._channels[lane] = opened
        return opened

    def forget_channel(self, lane: int) -> None:
        """The broker closed the lane's channel: the next batch opens a new one."""
        self._channels.pop(lane, None)

    def renew_channel(self, lane: int, channel: aiormq.Channel) -> None:
        """Give up a lane's channel after the broker nacked rows on it: the next batch opens a
        new one. A channel opened on a node in the moment before a quorum queue elects its new
        leader goes on nacking every publish to that queue long after the election
        (docs/scaling.md), while a new channel gets acks; after a plain nack (a full queue
        rejecting publishes) a new channel costs one round trip. Closed in the background, off
        the lane's path."""
        if self._channels.get(lane) is channel:
            del self._channels[lane]
        self._retire(channel)


def usable(conn: aiormq.abc.AbstractConnection) -> bool:
    """Open, and its frame reader still runs (a connection whose reader died is dead, even
    while aiormq's own close of it has not finished)."""
    return not conn.is_closed and not frames.reader_died(conn)


async def close_politely(
        closable: aiormq.abc.AbstractConnection | aiormq.abc.AbstractChannel) -> None:
    """Close with an explicit reason: aiormq's default throws CancelledError into every request
    still in flight on it, which a lane would take for its own cancellation."""
    await close_quietly(closable, CLOSE_TIMEOUT,
                        amqp_exc.ConnectionClosed(320, "closed by the relay"))
