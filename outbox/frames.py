"""Everything that reads aiormq's private parts: a batch's frames marshalled and written at once,
its confirms awaited, and the connection signals aiormq does not expose (reader died, blocked).

No other module of outbox touches aiormq's internals; `bench.throughput` measures the broker's
ceiling with this same `publish_pipelined`.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Sequence
from typing import Any

import aiormq
import pamqp.frame
from aiormq import exceptions as amqp_exc
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp import encode as amqp_encode

from outbox.exceptions import Unframable


def reader_died(conn: aiormq.abc.AbstractConnection) -> bool:
    """True when aiormq's frame reader has ended: the connection is dead, whatever it says."""
    reader = getattr(conn, "_reader_task", None)
    return isinstance(reader, asyncio.Task) and reader.done()

def blocked(conn: aiormq.abc.AbstractConnection) -> bool:
    """True while the broker blocks publishers (``connection.blocked``: memory/disk alarm)."""
    unblocked = getattr(conn, "_Connection__connection_unblocked", None)
    return isinstance(unblocked, asyncio.Event) and not unblocked.is_set()


Message = tuple[bytes, str, str, spec.Basic.Properties]
"""body, exchange, routing key, properties"""


class Pipelined:
    """The confirms of one pipelined write: one future per message, in order."""

    __slots__ = ("_tags", "channel", "futures")

    def __init__(self, channel: Any, futures: list[asyncio.Future[Any]],
                 tags: dict[str, int]) -> None:
        self.channel = channel
        self.futures = futures
        self._tags = tags

    async def wait(self, timeout: float | None) -> set[asyncio.Future[Any]]:
        """Wait for every confirm, at most ``timeout`` seconds; returns the pending futures.

        Confirms resolve in delivery-tag order, so this waits for the last pending one (one
        callback, not one per message) or for the channel to close, whichever comes first. A
        closed channel fails every pending future with its error, as aiormq does for its own."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        channel = self.channel
        closing = channel.closing
        try:
            while True:
                pending = [f for f in self.futures if not f.done()]
                if not pending:
                    return set()
                if closing.done():
                    reason = _close_reason(channel)
                    for future in pending:
                        future.set_exception(reason)
                    return set()
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return set(pending)
                await asyncio.wait((pending[-1], closing), timeout=remaining,
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            if closing is not channel._closing:  # our observer, not the channel's own future
                closing.cancel()

    def forget(self) -> None:
        """Drop the channel's message-id → delivery-tag entries of these messages (aiormq
        uses them to match returns; they are no longer needed once the confirms are in)."""
        ids: dict[str, int] = self.channel.message_id_delivery_tag
        for message_id, tag in self._tags.items():
            if ids.get(message_id) == tag:
                del ids[message_id]


def _close_reason(channel: Any) -> BaseException:
    closed = channel._closing
    exc = closed.exception() if closed.done() and not closed.cancelled() else None
    if isinstance(exc, Exception):
        return exc  # e.g. ChannelNotFoundEntity (404), or the connection's error
    return ConnectionError("the channel was closed")  # our own close or a cancellation


_FRAME_HEAD = struct.Struct(">BHI")
_HEADER_HEAD = struct.Struct(">HHQH")
_FRAME_END = b"\xce"
_ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "shortstr": amqp_encode.short_string, "table": amqp_encode.field_table,
    "octet": amqp_encode.octet, "timestamp": amqp_encode.timestamp,
}
_PROPERTIES = [(name, spec.Basic.Properties.flags[name],
                _ENCODERS[getattr(spec.Basic.Properties, f"_{name}")])
               for name in spec.Basic.Properties.__slots__]
_publish_frames: dict[tuple[int, str, str], bytes] = {}


def _publish_frame(number: int, exchange: str, routing_key: str) -> bytes:
    """The marshalled ``basic.publish`` method frame (mandatory), cached: it only depends on
    the channel, the exchange and the routing key."""
    key = (number, exchange, routing_key)
    frame = _publish_frames.get(key)
    if frame is None:
        if len(_publish_frames) >= 4096:
            _publish_frames.clear()
        frame = _publish_frames[key] = pamqp.frame.marshal(spec.Basic.Publish(
            exchange=exchange, routing_key=routing_key, mandatory=True), number)
    return frame


def _header_frame(number: int, props: spec.Basic.Properties, body_size: int) -> bytes:
    """The content header frame: what ``pamqp.frame.marshal(ContentHeader(...))`` produces
    (tests/unit/test_publish_frames.py compares them), without its per-property dispatch."""
    flags = 0
    parts = []
    for name, flag, encode in _PROPERTIES:
        value = getattr(props, name)
        if value is not None and value != "":
            flags |= flag
            parts.append(encode(value))
    payload = _HEADER_HEAD.pack(60, 0, body_size, flags) + b"".join(parts)
    return _FRAME_HEAD.pack(2, number, len(payload)) + payload + _FRAME_END


def marshal_message(number: int, body: bytes, exchange: str, routing_key: str,
                    props: spec.Basic.Properties, max_size: int) -> bytes:
    """The frames of one ``basic.publish`` with its content, as bytes on the wire.

    Raises `Unframable` for a header frame larger than the connection's frame_max
    (``max_size`` + 8): the broker would close the whole connection for it (501)."""
    header = _header_frame(number, props, len(body))
    if len(header) > max_size + 8:
        raise Unframable(f"headers: a header frame of {len(header):,} bytes, over the "
                         f"connection's frame_max of {max_size + 8:,}")
    frames = [_publish_frame(number, exchange, routing_key), header]
    for i in range(0, len(body), max_size):
        part = body[i:i + max_size]
        frames += (_FRAME_HEAD.pack(3, number, len(part)), part, _FRAME_END)
    return b"".join(frames)


def _unframable(exc: Exception) -> Unframable:
    if isinstance(exc, Unframable):
        return exc
    error = Unframable(f"cannot be encoded as AMQP: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


async def publish_pipelined(
    channel: aiormq.abc.AbstractChannel, messages: Sequence[Message],
) -> Pipelined:
    """Write every message (``mandatory=True``) on a confirm-mode channel, in order, as ONE
    frame buffer, and return one confirm future per message, resolved by aiormq's confirm
    handling (ack → result; nack → DeliveryError; return → PublishError) or, when the channel
    closes, failed by `Pipelined.wait` with the channel's error. A message whose frames cannot
    be encoded (any error of the encoder) gets a future failed with `Unframable` and is not
    sent. The benchmark's ceiling uses this same function.

    This is what ``Channel.basic_publish(wait=False)`` does per message — register a
    confirmation future under the next delivery tag (and the message id, for returns), queue
    the marshalled frames — done once per batch: basic_publish costs a coroutine (a Task, to
    pipeline), the channel lock, a write-queue slot, a socket write and three done-callbacks
    per message."""
    ch: Any = channel
    if not isinstance(ch, aiormq.Channel) or not ch.publisher_confirms:
        raise TypeError("publish_pipelined needs an aiormq.Channel in confirm mode")
    if ch.is_closed:
        raise amqp_exc.ChannelInvalidStateError("the channel is closed")
    loop = asyncio.get_running_loop()
    number = ch.number
    max_size = ch.max_content_size
    futures: list[asyncio.Future[Any]] = []
    tags: dict[str, int] = {}
    chunks: list[bytes] = []
    async with ch.lock:
        first = tag = ch.delivery_tag
        confirmations = ch.confirmations
        ids = ch.message_id_delivery_tag
        try:
            for body, exchange, routing_key, props in messages:
                try:
                    data = marshal_message(number, body, exchange, routing_key, props, max_size)
                except Exception as exc:  # an unencodable row fails alone: poison
                    # (whatever the encoder raised: RecursionError, struct.error, OverflowError…)
                    failed = loop.create_future()
                    failed.set_exception(_unframable(exc))
                    futures.append(failed)
                    continue
                tag += 1
                future = loop.create_future()
                confirmations[tag] = future
                message_id = props.message_id or ""
                ids[message_id] = tags[message_id] = tag
                chunks.append(data)
                futures.append(future)
            ch.delivery_tag = tag
            if chunks:
                await ch.write_queue.put(ChannelFrame(payload=b"".join(chunks),
                                                      should_close=False))
        except BaseException:
            # Nothing reached the broker: give the delivery tags back, as basic_publish does.
            ch.delivery_tag = first
            for t in range(first + 1, tag + 1):
                pending = confirmations.pop(t, None)
                if pending is not None:
                    pending.cancel()
            for message_id, t in tags.items():
                if ids.get(message_id) == t:
                    del ids[message_id]
            raise
    return Pipelined(ch, futures, tags)
