"""The RabbitMQ publisher: aiormq, publisher confirms pipelined per batch, ``mandatory=True``.

One connection (to the first reachable of the configured URLs, failing over on loss) and one
confirm-mode channel per lane. A batch is written in full, then its confirms are awaited under one
deadline. aiormq's sharp edges, handled here:

* when the broker closes a channel (a missing exchange: 404; bad properties: 406/505) every
  pending confirm of that channel fails with the same error, so the culprit is not known. The
  unconfirmed rows are bisected on fresh channels until the row that closes a channel alone is
  found; it fails, the others are confirmed.
* returns are matched to confirms by ``message_id`` (ours are unique per row).
* a row AMQP cannot carry (a property over 255 bytes, a timestamp before 1970, headers too deep,
  of a number AMQP has no type for, or larger than the connection's frame_max: `outbox.limits`)
  is poison before anything is sent, and so is a row whose frames fail to encode for any other
  reason; the batch goes on.
* when the broker closes the whole connection for a frame's content (501 frame error, 502 syntax
  error, 505 unexpected frame), the rows in flight are published again on a private connection,
  in halves, until the row that closes a connection alone is found: it is poison.

The frames themselves are marshalled and written by `outbox.frames`, the one module that reads
aiormq's private parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from typing import Any, TypeVar

import aiormq
from aiormq import exceptions as amqp_exc
from pamqp import commands as spec

from outbox import frames, limits, metrics
from outbox.amqp import describe_connect_error, describe_refusal, refusal, with_defaults
from outbox.exceptions import BrokerUnavailable, OutboxError, Unframable, UnsupportedClient
from outbox.limits import parse_headers
from outbox.retry import RECONNECT_BASE, RECONNECT_CAP, REFUSED_RETRY, backoff
from outbox.rows import Outcome, Result, Row
from outbox.settings import Settings, redact

log = logging.getLogger("outbox.publisher")
T = TypeVar("T")

WATCH_INTERVAL = 1.0  # how often a live connection's reader task is checked
CLOSE_TIMEOUT = 1.0  # a connection given up is closed politely for this long at most
_CONFIRMED = Result.confirmed()
# what a dying connection raises into a request in flight (besides CancelledError)
_CONNECTION_ERRORS = (amqp_exc.AMQPError, OSError, EOFError, TimeoutError)
# the broker closes the connection for what a frame holds: one row's content may be the cause
_CONTENT_CLOSE = (amqp_exc.ConnectionFrameError, amqp_exc.ConnectionSyntaxError,
                  amqp_exc.ConnectionUnexpectedFrame)


class AmqpPublisher:
    """Implements `outbox.relay.Publisher` on aiormq."""

    def __init__(self, settings: Settings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.urls = [with_defaults(u, settings.heartbeat, settings.db_timeout)
                     for u in settings.amqp_urls]
        self.problem = ""
        self.connection: aiormq.Connection | None = None
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

    # -- connection ------------------------------------------------------------------------------
    #
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

    def _check(self, conn: aiormq.abc.AbstractConnection, channel: Any = None) -> None:
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
        return (conn is not None and _usable(conn) and self.fatal is None
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
            if conn is not None and not _usable(conn):
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
        failures = 0
        index = 0
        while True:
            url = self.urls[index % len(self.urls)]
            try:
                async with asyncio.timeout(self.settings.db_timeout + 1):
                    conn = await aiormq.connect(url)
            except Exception as exc:  # aiormq also raises StopAsyncIteration,
                # RuntimeError… when the peer closes during the handshake: all mean "no connection"
                if refusal(exc) is not None:
                    self._set_problem(f"broker {redact(url)}: {describe_refusal(exc, url)}")
                    index += 1
                    await asyncio.sleep(REFUSED_RETRY)
                    continue
                failures += 1
                self._set_problem(f"broker {redact(url)}: {describe_connect_error(exc)}")
                index += 1
                await asyncio.sleep(backoff(failures, RECONNECT_BASE, RECONNECT_CAP, self._rng))
                continue
            failures = 0
            self._check(conn)  # before anyone uses it: a moved private part stops the relay
            error: Exception | None = None
            try:
                reason = await self._hold(conn, url)
            except Exception as exc:
                error, reason = exc, f"unexpected error: {type(exc).__name__}: {exc}"
            finally:
                self._lose(conn)
                self._retire(conn)
            problem = f"broker {redact(url)}: connection lost ({reason})"
            index += 1  # try the next node first: the one we lost may be down
            if error is None:
                self._set_problem(problem)
                continue
            # A bug here must not leave the relay without a broker for good: say it (once per
            # kind of error), count it, and connect again after a pause.
            metrics.TASK_ERRORS.labels("broker").inc()
            if problem != self.problem:
                log.error("unexpected error while holding the broker connection",
                          exc_info=error)
            self._set_problem(problem)
            failures += 1
            await asyncio.sleep(backoff(failures, RECONNECT_BASE, RECONNECT_CAP, self._rng))

    async def _hold(self, conn: aiormq.Connection, url: str
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

    def _use(self, conn: aiormq.Connection, url: str) -> None:
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

    def _retire(self, conn: aiormq.abc.AbstractConnection) -> None:
        """Close a connection given up, in the background: reconnecting does not wait for it."""
        if conn.is_closed:
            return
        task = asyncio.create_task(_close(conn), name="outbox-broker-close")
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    def _set_problem(self, problem: str) -> None:
        if problem != self.problem:
            log.error("broker unavailable", extra={"fields": {"error": problem}})
        self.problem = problem

    def _drop_connection(self, conn: aiormq.abc.AbstractConnection, why: str) -> None:
        """A lane found the connection its batch was on unusable (stalled): reconnect. Only
        that connection is given up; if the supervisor has replaced it already, the fresh one
        (and every other lane's batch on it) is left alone."""
        if self._lose(conn):
            log.warning("%s: reconnecting", why)

    async def _channel(self, lane: int) -> aiormq.Channel:
        channel = self._channels.get(lane)
        if channel is not None and not channel.is_closed:
            return channel
        conn = self.connection
        if conn is None or not _usable(conn):
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
            if not isinstance(exc, _CONNECTION_ERRORS) and _usable(conn):
                raise  # not the connection's fault: the lane reports it
            raise BrokerUnavailable(
                f"cannot open a channel: {exc or type(exc).__name__}") from exc
        assert isinstance(opened, aiormq.Channel)
        self._check(conn, opened)
        if conn is not self.connection:
            raise BrokerUnavailable("the connection was given up while a channel was opening")
        self._channels[lane] = opened
        return opened

    # -- publishing ------------------------------------------------------------------------------

    def properties(self, row: Row) -> spec.Basic.Properties:
        """The AMQP properties of a row (DESIGN.md, "What is published")."""
        return spec.Basic.Properties(
            content_type=row.content_type,
            delivery_mode=2,
            message_id=str(row.message_id),
            timestamp=row.created_at,
            message_type=row.message_type,
            correlation_id=row.correlation_id,
            app_id=self.settings.app_id,
            headers=parse_headers(row.headers) if row.headers is not None else None,
        )

    async def publish(self, rows: Sequence[Row], lane: int) -> list[Result]:
        results: list[Result | None] = [None] * len(rows)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        await self._publish_into(rows, list(range(len(rows))), lane, results, deadline)
        unsettled = Result(Outcome.UNSETTLED, "not published", "connection")
        return [r or unsettled for r in results]

    async def _publish_into(
        self, rows: Sequence[Row], indices: list[int], lane: int,
        results: list[Result | None], deadline: float, isolation: _Isolation | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            return  # UNSETTLED: tried again in a later batch, no attempt counted
        try:
            if isolation is None:
                channel = await self._channel(lane)
            else:
                channel = await isolation.channel(remaining)
        except BrokerUnavailable:
            return
        frame_max = channel.connection.connection_tune.frame_max
        sendable: list[int] = []
        messages: list[frames.Message] = []
        for i in indices:
            row = rows[i]
            try:
                props = self.properties(row)
                reason = limits.problem(row, props.headers, frame_max, self.settings.app_id)
            except Exception as exc:  # not only ValueError: RecursionError, OverflowError…
                reason = str(exc) if isinstance(exc, Unframable) else (
                    f"cannot be encoded as AMQP: {type(exc).__name__}: {exc}")
            if reason:
                results[i] = Result(Outcome.POISON, reason, "poison")
                continue
            sendable.append(i)
            messages.append((row.body, row.exchange, row.routing_key, props))
        if not messages:
            return
        try:
            async with asyncio.timeout(remaining):
                pipelined = await frames.publish_pipelined(channel, messages)
        except TimeoutError:
            # The write queue stayed full: nothing was sent (UNSETTLED). Unless the broker
            # blocks publishers, the connection is stalled: start over on a new one.
            if isolation is not None:
                await isolation.close()
            elif not self.blocked:
                self._drop_connection(channel.connection,
                                      "cannot write to the broker within the deadline")
            return
        except (amqp_exc.AMQPError, ConnectionError):
            return  # UNSETTLED
        tasks = dict(zip(sendable, pipelined.futures, strict=True))
        pending = await pipelined.wait(deadline - loop.time())
        pipelined.forget()
        collateral: list[int] = []
        channel_error = ""
        suspects: list[int] = []  # in flight when the broker closed the connection for content
        connection_error = ""
        stalled = False
        nacked = False
        for i, task in tasks.items():
            if task in pending:
                task.cancel()
                stalled = True
                results[i] = (Result(Outcome.UNSETTLED, "broker blocked publishing", "blocked")
                              if self.blocked else
                              Result(Outcome.FAILED, f"no confirm within {self._timeout:g}s",
                                     "timeout"))
                continue
            if task.cancelled():
                continue  # UNSETTLED: aiormq cancels the confirms of a closed connection
            error = task.exception()
            if error is None:
                results[i] = _CONFIRMED
            elif isinstance(error, amqp_exc.PublishError):
                results[i] = Result(Outcome.FAILED, f"returned by the broker: {_reply(error)}",
                                    "returned")
            elif isinstance(error, amqp_exc.DeliveryError):
                results[i] = Result(Outcome.FAILED, "nacked by the broker", "nack")
                nacked = True
            elif isinstance(error, amqp_exc.ChannelClosed | amqp_exc.ChannelInvalidStateError):
                collateral.append(i)
                channel_error = str(error)
            elif isinstance(error, Unframable):
                results[i] = Result(Outcome.POISON, str(error), "poison")
            elif isinstance(error, _CONTENT_CLOSE):
                suspects.append(i)
                connection_error = str(error)
            elif isinstance(error, amqp_exc.AMQPConnectionError | ConnectionError):
                pass  # UNSETTLED
            else:
                # counted, so that even an error nobody foresaw ends in dead after N attempts
                log.error("unexpected publish error", exc_info=error)
                results[i] = Result(Outcome.FAILED, f"unexpected publish error: {error!r}",
                                    "other")
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if nacked and isolation is None:
            self._renew_channel(lane, channel)
        if stalled and isolation is not None:
            await isolation.close()
            return
        if stalled and not self.blocked:
            self._drop_connection(channel.connection, "no confirms within the deadline")
            return
        if collateral:
            if isolation is None:
                self._channels.pop(lane, None)
            if len(indices) == 1:
                results[indices[0]] = Result(
                    Outcome.FAILED, f"channel closed by the broker: {channel_error}", "channel")
                return
            # One of these closed the channel and took the others' confirms with it: bisect.
            half = (len(collateral) + 1) // 2
            for part in (collateral[:half], collateral[half:]):
                if part:
                    await self._publish_into(rows, part, lane, results, deadline, isolation)
        if suspects:
            await self._isolate(rows, suspects, sendable, lane, results, deadline, isolation,
                                connection_error)

    def _renew_channel(self, lane: int, channel: aiormq.Channel) -> None:
        """Give up a lane's channel after the broker nacked rows on it: the next batch opens a
        new one. A channel opened on a node in the moment before a quorum queue elects its new
        leader goes on nacking every publish to that queue for a minute or more, while a new
        channel gets acks; after a plain nack (a full queue rejecting publishes) a new channel
        costs one round trip. Closed in the background, off the lane's path."""
        if self._channels.get(lane) is channel:
            del self._channels[lane]
        task = asyncio.create_task(_close(channel), name="outbox-channel-close")
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    async def _isolate(
        self, rows: Sequence[Row], suspects: list[int], sent: list[int], lane: int,
        results: list[Result | None], deadline: float, isolation: _Isolation | None,
        error: str,
    ) -> None:
        """The broker closed a connection for a frame's content while ``suspects`` were in
        flight (``sent`` were published together). On the shared connection the culprit may
        be any lane's row, so the suspects are published again on a private connection; there,
        they are bisected until the row that closes a connection alone is found: it is poison.
        The others are confirmed as usual. Bounded by the batch's deadline."""
        if isolation is not None and len(sent) == 1:
            results[sent[0]] = Result(
                Outcome.POISON, f"the broker closes the connection for this row: {error}",
                "poison")
            return
        if isolation is not None:
            half = (len(suspects) + 1) // 2
            for part in (suspects[:half], suspects[half:]):
                if part:
                    await self._publish_into(rows, part, lane, results, deadline, isolation)
            return
        log.warning("the broker closed the connection for a frame's content: publishing the "
                    "rows in flight again, apart, to find the one", extra={"fields": {
                        "lane": lane, "rows": len(suspects), "error": error}})
        private = _Isolation(self.current_url or self.urls[0])
        try:
            await self._publish_into(rows, suspects, lane, results, deadline, private)
        finally:
            await private.close()


def _usable(conn: aiormq.abc.AbstractConnection) -> bool:
    """Open, and its frame reader still runs (a connection whose reader died is dead, even
    while aiormq's own close of it has not finished)."""
    return not conn.is_closed and not frames.reader_died(conn)


async def _close(closable: aiormq.abc.AbstractConnection | aiormq.abc.AbstractChannel) -> None:
    # With an explicit reason: aiormq's default throws CancelledError into every request
    # still in flight on it, which a lane would take for its own cancellation.
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await closable.close(amqp_exc.ConnectionClosed(320, "closed by the relay"))


def _reply(exc: amqp_exc.PublishError) -> str:
    frame = getattr(exc, "frame", None)
    code = getattr(frame, "reply_code", "")
    text = getattr(frame, "reply_text", "")
    return f"{code} {text}".strip() or str(exc)


class _Isolation:
    """A private connection for rows suspected of closing a connection (`_isolate`): a close of
    it can only come from them, and the lanes on the shared connection are not disturbed."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection: aiormq.abc.AbstractConnection | None = None
        self._channel: aiormq.Channel | None = None

    async def channel(self, timeout: float) -> aiormq.Channel:
        """A confirm-mode channel on the private connection, connecting (again) if need be;
        raises BrokerUnavailable."""
        if self._channel is not None and not self._channel.is_closed:
            return self._channel
        try:
            async with asyncio.timeout(timeout):
                if self.connection is None or self.connection.is_closed:
                    await self.close()
                    self.connection = await aiormq.connect(self.url)
                opened = await self.connection.channel(
                    publisher_confirms=True, on_return_raises=True)
        except Exception as exc:  # as in _supervise: every failure means "no connection"
            raise BrokerUnavailable(f"cannot open a connection to isolate a row: {exc}") \
                from exc
        assert isinstance(opened, aiormq.Channel)
        self._channel = opened
        return opened

    async def close(self) -> None:
        conn, self.connection, self._channel = self.connection, None, None
        if conn is not None:
            await _close(conn)
