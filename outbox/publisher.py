"""The RabbitMQ publisher: aiormq, publisher confirms pipelined per batch, ``mandatory=True``.

One connection (to the first reachable of the configured URLs, failing over on loss) and one
confirm-mode channel per lane. A batch is written in full, then its confirms are awaited under one
deadline. aiormq's sharp edges, handled here:

* when the broker closes a channel (a missing exchange: 404; bad properties: 406/505) every
  pending confirm of that channel fails with the same error, so the culprit is not known. The
  unconfirmed rows are bisected on fresh channels until the row that closes a channel alone is
  found; it fails, the others are confirmed.
* returns are matched to confirms by ``message_id`` (ours are unique per row).
* a frame that cannot be encoded (header value AMQP has no type for, a property over 255 bytes)
  raises before anything is sent: that row is poison, the batch goes on.

The frames themselves are marshalled and written by `outbox.frames`, the one module that reads
aiormq's private parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
from collections.abc import Sequence
from typing import Any, TypeVar

import aiormq
import orjson
from aiormq import exceptions as amqp_exc
from pamqp import commands as spec

from outbox import frames, metrics
from outbox.amqp import PERMANENT, describe_refusal, with_defaults
from outbox.exceptions import BrokerUnavailable, OutboxError, UnsupportedClient
from outbox.retry import RECONNECT_BASE, RECONNECT_CAP, REFUSED_RETRY, backoff
from outbox.rows import Outcome, Result, Row
from outbox.settings import Settings, redact

log = logging.getLogger("outbox.publisher")
T = TypeVar("T")

WATCH_INTERVAL = 1.0  # how often a live connection's reader task is checked
_CONFIRMED = Result.confirmed()


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
        self.fatal: BaseException | None = None  # why this publisher can never work
        self._failed = asyncio.Event()

    # -- connection ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background (and reconnecting for as long as it runs)."""
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name="outbox-broker")
            self._task.add_done_callback(self._supervisor_done)

    def _supervisor_done(self, task: asyncio.Task[None]) -> None:
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            self._fail(exc if isinstance(exc, OutboxError) else
                       OutboxError(f"the broker connection's supervisor failed: {exc!r}"))

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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        await self._drop_connection()

    @property
    def ready(self) -> bool:
        conn = self.connection
        return (conn is not None and not conn.is_closed and self.fatal is None
                and not self.blocked)

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
            except PERMANENT as exc:
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
            self._check(conn)  # before anyone uses it: a moved private part stops the relay
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
            self._check(conn, channel)
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
        results: list[Result | None], deadline: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            return  # UNSETTLED: tried again in a later batch, no attempt counted
        try:
            channel = await self._channel(lane)
        except BrokerUnavailable:
            return
        sendable: list[int] = []
        messages: list[frames.Message] = []
        for i in indices:
            row = rows[i]
            try:
                props = self.properties(row)
            except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
                results[i] = Result(Outcome.POISON, f"headers cannot be sent: {exc}", "poison")
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
            if not self.blocked:
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
            elif isinstance(error, TypeError | ValueError):
                results[i] = Result(Outcome.POISON, f"cannot be encoded as AMQP: {error}",
                                    "poison")
            elif isinstance(error, amqp_exc.AMQPConnectionError | ConnectionError):
                pass  # UNSETTLED
            else:
                log.error("unexpected publish error", exc_info=error)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if stalled and not self.blocked:
            log.warning("no confirms within the deadline: reconnecting")
            await self._drop_connection()
            return
        if collateral:
            self._channels.pop(lane, None)
            if len(indices) == 1:
                results[indices[0]] = Result(
                    Outcome.FAILED, f"channel closed by the broker: {channel_error}", "channel")
                return
            # One of these closed the channel and took the others' confirms with it: bisect.
            half = (len(collateral) + 1) // 2
            for part in (collateral[:half], collateral[half:]):
                if part:
                    await self._publish_into(rows, part, lane, results, deadline)


_LONG_DIGITS = re.compile(r"\d{19}")


def parse_headers(text: str) -> dict[str, Any]:
    """The headers jsonb as a dict; raises ValueError for an integer AMQP cannot carry.

    orjson turns an integer beyond 64 bits into a float without a word, which would publish a
    different value than the producer wrote; so text with a 19-digit run is parsed again by the
    standard library, which keeps integers exact, and the range is checked.
    """
    headers: dict[str, Any] = orjson.loads(text)
    if _LONG_DIGITS.search(text):
        headers = json.loads(text, parse_int=_amqp_int)
    return headers


def _amqp_int(text: str) -> int:
    value = int(text)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"integer {text} is outside AMQP's signed 64-bit range")
    return value


def _reply(exc: amqp_exc.PublishError) -> str:
    frame = getattr(exc, "frame", None)
    code = getattr(frame, "reply_code", "")
    text = getattr(frame, "reply_text", "")
    return f"{code} {text}".strip() or str(exc)
