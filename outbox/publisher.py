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
import ssl
from collections.abc import Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiormq
from aiormq import exceptions as amqp_exc
from pamqp import commands as spec

from outbox import frames, limits, metrics
from outbox.exceptions import BrokerUnavailable, Unframable
from outbox.limits import parse_headers
from outbox.retry import backoff
from outbox.rows import Outcome, Result, Row
from outbox.settings import Settings, redact

log = logging.getLogger("outbox.publisher")

RECONNECT_BASE = 0.2
RECONNECT_CAP = 15.0
REFUSED_RETRY = 30.0
WATCH_INTERVAL = 1.0  # how often a live connection's reader task is checked
_CONFIRMED = Result.confirmed()
_PERMANENT = (
    amqp_exc.AuthenticationError, amqp_exc.ProbableAuthenticationError,
    amqp_exc.ConnectionNotAllowed, ssl.SSLCertVerificationError,
)
# the broker closes the connection for what a frame holds: one row's content may be the cause
_CONTENT_CLOSE = (amqp_exc.ConnectionFrameError, amqp_exc.ConnectionSyntaxError,
                  amqp_exc.ConnectionUnexpectedFrame)


def with_defaults(url: str, heartbeat: int, timeout: float) -> str:
    """Add the heartbeat and connect timeout to an AMQP URL unless it sets them itself."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("heartbeat", str(heartbeat))
    query.setdefault("timeout", str(max(1, round(timeout))))
    return urlunsplit(parts._replace(query=urlencode(query)))


def describe_refusal(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS verification failed: {exc.verify_message or exc}"
    if isinstance(exc, amqp_exc.ConnectionNotAllowed):
        return f"access refused (unknown vhost or no permission): {exc}"
    return f"authentication failed (check the user and password): {exc}"


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
        self._channel_locks: dict[int, asyncio.Lock] = {}
        self._connected = asyncio.Event()
        self._dropped = asyncio.Event()  # set when the relay itself gives up the connection
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None
        self._timeout = settings.publish_timeout

    # -- connection ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background (and reconnecting for as long as it runs)."""
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name="outbox-broker")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        await self._drop_connection()

    @property
    def ready(self) -> bool:
        conn = self.connection
        return conn is not None and not conn.is_closed and not self.blocked

    @property
    def blocked(self) -> bool:
        """True while the broker blocks publishers (``connection.blocked``: memory/disk alarm)."""
        conn = self.connection
        return conn is not None and frames.blocked(conn)

    async def wait_ready(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._connected.wait()
                conn = self.connection
                if conn is not None:
                    await conn.ready()
        ready = self.ready
        metrics.BROKER_BLOCKED.set(1 if self.blocked else 0)
        return ready

    async def _supervise(self) -> None:
        failures = 0
        index = 0
        while True:
            url = self.urls[index % len(self.urls)]
            try:
                async with asyncio.timeout(self.settings.db_timeout + 1):
                    conn = await aiormq.connect(url)
            except _PERMANENT as exc:
                self._set_problem(f"broker {redact(url)}: {describe_refusal(exc)}")
                index += 1
                await asyncio.sleep(REFUSED_RETRY)
                continue
            except Exception as exc:  # aiormq also raises StopAsyncIteration,
                # RuntimeError… when the peer closes during the handshake: all mean "no connection"
                failures += 1
                self._set_problem(f"broker {redact(url)}: cannot connect ({exc or type(exc)})")
                index += 1
                await asyncio.sleep(backoff(failures, RECONNECT_BASE, RECONNECT_CAP, self._rng))
                continue
            failures = 0
            self._dropped.clear()
            self.connection = conn
            self.current_url = url
            self.problem = ""
            self._connected.set()
            metrics.CONNECTED.labels("broker").set(1)
            log.info("broker connected", extra={"fields": {"url": redact(url)}})
            # aiormq's close of a stalled connection can hang (it waits for the peer), and its
            # closing future then never resolves: _drop_connection wakes us up as well
            closing = conn.closing
            dropped = asyncio.ensure_future(self._dropped.wait())
            try:
                while not (closing.done() or dropped.done() or frames.reader_died(conn)):
                    await asyncio.wait([closing, dropped], timeout=WATCH_INTERVAL,
                                       return_when=asyncio.FIRST_COMPLETED)
            finally:
                dropped.cancel()
            if not closing.done() and not dropped.done():
                # aiormq's reader is gone but its own clean-up hangs (seen after a reset under
                # uvloop), so nothing would ever resolve `closing`: give the connection up
                await self._drop_connection()
            self._connected.clear()
            self._channels.clear()
            metrics.CONNECTED.labels("broker").set(0)
            reason = closing.exception() if (
                closing.done() and not closing.cancelled()) else "given up by the relay"
            closing.cancel()  # only stops this observer
            self._set_problem(f"broker {redact(url)}: connection lost ({reason})")
            self.connection = None
            index += 1  # try the next node first: the one we lost may be down

    def _set_problem(self, problem: str) -> None:
        if problem != self.problem:
            log.error("broker unavailable", extra={"fields": {"error": problem}})
        self.problem = problem

    async def _drop_connection(self) -> None:
        conn, self.connection = self.connection, None
        self._channels.clear()
        if conn is not None:
            self._dropped.set()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await conn.close()

    async def _channel(self, lane: int) -> aiormq.Channel:
        channel = self._channels.get(lane)
        if channel is not None and not channel.is_closed:
            return channel
        conn = self.connection
        if conn is None or conn.is_closed:
            raise BrokerUnavailable("not connected to the broker")
        try:
            async with asyncio.timeout(self._timeout):
                opened = await conn.channel(publisher_confirms=True, on_return_raises=True)
            assert isinstance(opened, aiormq.Channel)
            channel = opened
        except (amqp_exc.AMQPError, ConnectionError, TimeoutError) as exc:
            raise BrokerUnavailable(f"cannot open a channel: {exc}") from exc
        self._channels[lane] = channel
        return channel

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
                log.warning("cannot write to the broker within the deadline: reconnecting")
                await self._drop_connection()
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
        if stalled and isolation is not None:
            await isolation.close()
            return
        if stalled and not self.blocked:
            log.warning("no confirms within the deadline: reconnecting")
            await self._drop_connection()
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
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await conn.close()
