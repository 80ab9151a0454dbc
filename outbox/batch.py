"""The publishing of one batch: its frames written at once, its confirms awaited under one
deadline, the outcome of each row, and the isolation of a row that closes a channel or a
connection.

aiormq's sharp edges, handled here:

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
aiormq's private parts; the connection and the lanes' channels are `outbox.supervisor`'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import aiormq
from aiormq import exceptions as amqp_exc
from pamqp import commands as spec

from outbox import frames, limits
from outbox.exceptions import BrokerUnavailable, Unframable
from outbox.limits import parse_headers
from outbox.rows import Outcome, Result, Row
from outbox.settings import Settings
from outbox.supervisor import Supervisor, close_politely

# the publisher's logger, as before the split: operators filter on it
log = logging.getLogger("outbox.publisher")

_CONFIRMED = Result.confirmed()
# the broker closes the connection for what a frame holds: one row's content may be the cause
_CONTENT_CLOSE = (amqp_exc.ConnectionFrameError, amqp_exc.ConnectionSyntaxError,
                  amqp_exc.ConnectionUnexpectedFrame)


def properties(row: Row, app_id: str) -> spec.Basic.Properties:
    """The AMQP properties of a row (DESIGN.md, "What is published")."""
    return spec.Basic.Properties(
        content_type=row.content_type,
        delivery_mode=2,
        message_id=str(row.message_id),
        timestamp=row.created_at,
        message_type=row.message_type,
        correlation_id=row.correlation_id,
        app_id=app_id,
        headers=parse_headers(row.headers) if row.headers is not None else None,
    )


class Batch:
    """One lane's batch on its way to the broker; `results` holds each row's outcome once
    known (None: unsettled)."""

    def __init__(self, broker: Supervisor, settings: Settings, rows: Sequence[Row], lane: int,
                 timeout: float) -> None:
        self.broker = broker
        self.settings = settings
        self.rows = rows
        self.lane = lane
        self.timeout = timeout
        self.deadline = asyncio.get_running_loop().time() + timeout
        self.results: list[Result | None] = [None] * len(rows)

    async def publish(self) -> list[Result]:
        """Publish every row and await the confirms; one `Result` per row."""
        await self.publish_into(list(range(len(self.rows))))
        unsettled = Result(Outcome.UNSETTLED, "not published", "connection")
        return [r or unsettled for r in self.results]

    async def publish_into(self, indices: list[int], isolation: Isolation | None = None
                           ) -> None:
        """Publish the rows at ``indices`` (on the private ``isolation`` connection if given),
        recording their outcomes in `results`."""
        rows, results, broker = self.rows, self.results, self.broker
        loop = asyncio.get_running_loop()
        remaining = self.deadline - loop.time()
        if remaining <= 0:
            return  # UNSETTLED: tried again in a later batch, no attempt counted
        try:
            if isolation is None:
                channel = await broker.channel(self.lane)
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
                props = properties(row, self.settings.app_id)
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
            elif not broker.blocked:
                broker.drop(channel.connection, "cannot write to the broker within the deadline")
            return
        except (amqp_exc.AMQPError, ConnectionError):
            return  # UNSETTLED
        tasks = dict(zip(sendable, pipelined.futures, strict=True))
        pending = await pipelined.wait(self.deadline - loop.time())
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
                              if broker.blocked else
                              Result(Outcome.FAILED, f"no confirm within {self.timeout:g}s",
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
            broker.renew_channel(self.lane, channel)
        if stalled and isolation is not None:
            await isolation.close()
            return
        if stalled and not broker.blocked:
            broker.drop(channel.connection, "no confirms within the deadline")
            return
        if collateral:
            if isolation is None:
                broker.forget_channel(self.lane)
            if len(indices) == 1:
                results[indices[0]] = Result(
                    Outcome.FAILED, f"channel closed by the broker: {channel_error}", "channel")
                return
            # One of these closed the channel and took the others' confirms with it: bisect.
            half = (len(collateral) + 1) // 2
            for part in (collateral[:half], collateral[half:]):
                if part:
                    await self.publish_into(part, isolation)
        if suspects:
            await self._isolate(suspects, sendable, isolation, connection_error)

    async def _isolate(self, suspects: list[int], sent: list[int], isolation: Isolation | None,
                       error: str) -> None:
        """The broker closed a connection for a frame's content while ``suspects`` were in
        flight (``sent`` were published together). On the shared connection the culprit may
        be any lane's row, so the suspects are published again on a private connection; there,
        they are bisected until the row that closes a connection alone is found: it is poison.
        The others are confirmed as usual. Bounded by the batch's deadline."""
        if isolation is not None and len(sent) == 1:
            self.results[sent[0]] = Result(
                Outcome.POISON, f"the broker closes the connection for this row: {error}",
                "poison")
            return
        if isolation is not None:
            half = (len(suspects) + 1) // 2
            for part in (suspects[:half], suspects[half:]):
                if part:
                    await self.publish_into(part, isolation)
            return
        log.warning("the broker closed the connection for a frame's content: publishing the "
                    "rows in flight again, apart, to find the one", extra={"fields": {
                        "lane": self.lane, "rows": len(suspects), "error": error}})
        private = Isolation(self.broker.current_url or self.broker.nodes.urls[0])
        try:
            await self.publish_into(suspects, private)
        finally:
            await private.close()


def _reply(exc: amqp_exc.PublishError) -> str:
    frame = getattr(exc, "frame", None)
    code = getattr(frame, "reply_code", "")
    text = getattr(frame, "reply_text", "")
    return f"{code} {text}".strip() or str(exc)


class Isolation:
    """A private connection for rows suspected of closing a connection (`Batch._isolate`): a
    close of it can only come from them, and the lanes on the shared connection are not
    disturbed."""

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
        except Exception as exc:  # as in `outbox.amqp.connect`: every failure means "no
            # connection"
            raise BrokerUnavailable(f"cannot open a connection to isolate a row: {exc}") \
                from exc
        assert isinstance(opened, aiormq.Channel)
        self._channel = opened
        return opened

    async def close(self) -> None:
        conn, self.connection, self._channel = self.connection, None, None
        if conn is not None:
            await close_politely(conn)
