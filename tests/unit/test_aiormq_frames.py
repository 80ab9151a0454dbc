"""Real AMQP frames through a real aiormq connection and channel, without a network.

`Broker` is a scripted broker on the far end of a socketpair, plugged in through aiormq's public
``transport_factory``: aiormq does its own handshake, frame reading and dispatch, and every frame
the test sends is marshalled by pamqp, as RabbitMQ's would be on the wire. The relay's outcome of
each row is read from `AmqpPublisher.publish`, so the classification (confirmed, returned, nacked,
channel closed and bisected) is covered on the pinned aiormq (pyproject.toml): run this file when
bumping aiormq or pamqp. The second half checks that every private part of aiormq that outbox
reads fails loudly when it is gone (`frames.check_internals`, `reader_died`, `blocked`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiormq
import pamqp.frame
import pytest
from aiormq.connection import TransportFactory
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from outbox import frames
from outbox.exceptions import UnsupportedClient
from outbox.publisher import AmqpPublisher
from outbox.rows import Outcome, Result, Row
from outbox.settings import Settings
from tests.support import until

FRAME_MAX = 131_072
DEADLINE = 10.0  # every wait of this file; a pass takes milliseconds


@dataclass
class Published:
    """One basic.publish (method, header and body) as the broker received it."""

    channel: int
    tag: int
    method: spec.Basic.Publish
    header: ContentHeader
    body: bytes = b""

    @property
    def message_id(self) -> str:
        return str(self.header.properties.message_id)


@dataclass
class _Channel:
    tag: int = 0
    closing: bool = False  # the broker sent Channel.Close: it ignores the channel until CloseOk
    partial: Published | None = None


@dataclass
class Broker:
    """A broker that does the handshake, opens channels in confirm mode and queues what is
    published; the test decides every reply (`send`)."""

    published: asyncio.Queue[Published] = field(default_factory=asyncio.Queue)
    channels: dict[int, _Channel] = field(default_factory=dict)
    closed_ok: list[int] = field(default_factory=list)  # channels whose close the client acked
    writer: asyncio.StreamWriter | None = None
    task: asyncio.Task[None] | None = None

    async def take(self, n: int) -> list[Published]:
        async with asyncio.timeout(DEADLINE):
            return [await self.published.get() for _ in range(n)]

    async def send(self, channel: int, *frames_: Any) -> None:
        assert self.writer is not None
        if any(isinstance(f, spec.Channel.Close) for f in frames_):
            self.channels[channel].closing = True
        self.writer.write(b"".join(pamqp.frame.marshal(f, channel) for f in frames_))
        await self.writer.drain()

    async def returned(self, channel: int, message: Published, code: int = 312,
                       text: str = "NO_ROUTE") -> None:
        """basic.return with the message's header and body, as RabbitMQ sends it."""
        await self.send(channel, spec.Basic.Return(
            reply_code=code, reply_text=text, exchange=message.method.exchange,
            routing_key=message.method.routing_key), message.header, ContentBody(message.body))

    def cut(self) -> None:
        """The broker goes away: its end of the socket closes."""
        assert self.writer is not None
        self.writer.transport.abort()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        assert await reader.readexactly(8) == b"AMQP\x00\x00\x09\x01"
        await self.send(0, spec.Connection.Start(
            server_properties={"product": "fake", "capabilities": {
                "publisher_confirms": True, "basic.nack": True, "connection.blocked": True}},
            mechanisms="PLAIN", locales="en_US"))
        assert isinstance(await self._read(reader), spec.Connection.StartOk)
        await self.send(0, spec.Connection.Tune(channel_max=2047, frame_max=FRAME_MAX,
                                                heartbeat=0))
        assert isinstance(await self._read(reader), spec.Connection.TuneOk)
        assert isinstance(await self._read(reader), spec.Connection.Open)
        await self.send(0, spec.Connection.OpenOk())
        while True:
            number, frame = await self._frame(reader)
            await self._on_frame(number, frame)

    async def _on_frame(self, number: int, frame: Any) -> None:
        if isinstance(frame, Heartbeat):
            return
        if isinstance(frame, spec.Connection.Close):
            await self.send(0, spec.Connection.CloseOk())
            return
        if isinstance(frame, spec.Channel.Open):
            self.channels[number] = _Channel()
            await self.send(number, spec.Channel.OpenOk())
            return
        ch = self.channels[number]
        if isinstance(frame, spec.Channel.CloseOk):
            self.closed_ok.append(number)
            del self.channels[number]
        elif isinstance(frame, spec.Channel.Close):
            del self.channels[number]
            await self.send(number, spec.Channel.CloseOk())
        elif ch.closing:
            pass  # as RabbitMQ: everything on a closing channel is dropped until CloseOk
        elif isinstance(frame, spec.Confirm.Select):
            await self.send(number, spec.Confirm.SelectOk())
        elif isinstance(frame, spec.Basic.Publish):
            ch.partial = Published(number, 0, frame, ContentHeader())
        elif isinstance(frame, ContentHeader):
            assert ch.partial is not None
            ch.partial.header = frame
            self._complete(ch)
        elif isinstance(frame, ContentBody):
            assert ch.partial is not None
            ch.partial.body += frame.value
            self._complete(ch)
        else:
            raise AssertionError(f"unexpected frame {frame!r}")

    def _complete(self, ch: _Channel) -> None:
        message = ch.partial
        assert message is not None
        if len(message.body) == message.header.body_size:
            ch.tag += 1
            message.tag = ch.tag
            ch.partial = None
            self.published.put_nowait(message)

    @staticmethod
    async def _frame(reader: asyncio.StreamReader) -> tuple[int, Any]:
        head = await reader.readexactly(7)
        _, number, size = struct.unpack(">BHI", head)
        _, number, frame = pamqp.frame.unmarshal(head + await reader.readexactly(size + 1))
        return number, frame

    async def _read(self, reader: asyncio.StreamReader) -> Any:
        return (await self._frame(reader))[1]


class Wire(TransportFactory):
    """aiormq's transport: one end of a socketpair, the broker on the other."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def create(self, url: Any, **kwargs: Any) -> tuple[asyncio.StreamReader,
                                                             asyncio.StreamWriter]:
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=theirs)
        self.broker.task = asyncio.create_task(self.broker.serve(reader, writer))
        return await asyncio.open_connection(sock=ours)


async def connect(broker: Broker) -> aiormq.Connection:
    conn = aiormq.Connection("amqp://guest:guest@fake/?heartbeat=0", transport_factory=Wire(broker))
    await conn.connect()
    return conn


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    b = Broker()
    yield b
    if b.task is not None:
        b.task.cancel()
        await asyncio.gather(b.task, return_exceptions=True)


@pytest.fixture
async def conn(broker: Broker) -> AsyncIterator[aiormq.Connection]:
    c = await connect(broker)
    yield c
    with contextlib.suppress(Exception):
        async with asyncio.timeout(DEADLINE):
            await c.close()


@pytest.fixture
def connections(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The publisher's `aiormq.connect` reaches the scripted broker; yields what it connected."""
    made: list[Any] = []

    async def fake_connect(url: str) -> aiormq.Connection:
        c = await connect(broker)
        made.append(c)
        return c

    monkeypatch.setattr(aiormq, "connect", fake_connect)
    yield made


@pytest.fixture
async def publisher(connections: list[Any]) -> AsyncIterator[AmqpPublisher]:
    p = AmqpPublisher(Settings.load({"publish_timeout": DEADLINE}, environ={}))
    await p.start()
    yield p
    async with asyncio.timeout(DEADLINE):
        await p.close()


def rows(n: int, **changes: Any) -> list[Row]:
    made = [Row(id=i + 1, message_id=uuid.uuid4(), exchange="", routing_key="orders",
                body=b'{"n": %d}' % i, content_type="application/json", headers=None,
                ordering_key=None, message_type="order.created", correlation_id=None,
                created_at=datetime.now(UTC), attempts=0) for i in range(n)]
    for i, change in changes.items():
        for name, value in change.items():
            setattr(made[int(i.removeprefix("row"))], name, value)
    return made


CONFIRMED = Result.confirmed()


# -- the relay's outcome of each row, from real frames ------------------------------------------

async def test_acks_nacks_and_returns_decide_each_row(publisher: AmqpPublisher,
                                                      broker: Broker) -> None:
    assert await publisher.wait_ready(DEADLINE)
    batch = rows(8)
    task = asyncio.create_task(publisher.publish(batch, lane=0))
    sent = await broker.take(8)
    # written in order on one channel, mandatory, as the rows say
    assert [m.message_id for m in sent] == [str(r.message_id) for r in batch]
    assert [m.tag for m in sent] == list(range(1, 9))
    assert {m.channel for m in sent} == {sent[0].channel}
    assert all(m.method.mandatory and m.method.routing_key == "orders" for m in sent)
    assert [m.body for m in sent] == [r.body for r in batch]
    ch = sent[0].channel
    channel = publisher.broker._channels[0]
    await broker.send(ch, spec.Basic.Ack(delivery_tag=2, multiple=True))  # rows 0 and 1
    await broker.returned(ch, sent[2])  # unroutable: returned, then acked (RabbitMQ does both)
    await broker.send(ch, spec.Basic.Ack(delivery_tag=3))
    await broker.send(ch, spec.Basic.Nack(delivery_tag=4))
    await broker.send(ch, spec.Basic.Ack(delivery_tag=5))
    await broker.returned(ch, sent[5], 313, "NO_CONSUMERS")  # returned, acked by a multiple ack
    await broker.send(ch, spec.Basic.Ack(delivery_tag=8, multiple=True))
    async with asyncio.timeout(DEADLINE):
        results = await task
    assert [(r.outcome, r.kind) for r in results] == [
        (Outcome.CONFIRMED, ""), (Outcome.CONFIRMED, ""),
        (Outcome.FAILED, "returned"), (Outcome.FAILED, "nack"),
        (Outcome.CONFIRMED, ""), (Outcome.FAILED, "returned"),
        (Outcome.CONFIRMED, ""), (Outcome.CONFIRMED, ""),
    ], results
    assert results[2].reason == "returned by the broker: 312 NO_ROUTE"
    assert results[5].reason == "returned by the broker: 313 NO_CONSUMERS"
    # the channel forgot the batch: nothing left to match a later return or confirm against
    # (and, since the broker nacked a row on it, the lane will open a new one)
    assert publisher.broker._channels.get(0) is not channel
    assert channel.confirmations == {} or all(
        isinstance(f, aiormq.channel.Returning) for f in channel.confirmations.values())
    assert channel.message_id_delivery_tag == {}


async def test_a_returned_message_is_never_confirmed_whatever_acks_it(
        publisher: AmqpPublisher, broker: Broker) -> None:
    assert await publisher.wait_ready(DEADLINE)
    for ack in (spec.Basic.Ack(delivery_tag=1), spec.Basic.Ack(delivery_tag=1, multiple=True)):
        task = asyncio.create_task(publisher.publish(rows(1), lane=0))
        [message] = await broker.take(1)
        await broker.returned(message.channel, message)
        await broker.send(message.channel, spec.Basic.Ack(delivery_tag=message.tag,
                                                          multiple=ack.multiple))
        async with asyncio.timeout(DEADLINE):
            [result] = await task
        assert (result.outcome, result.kind) == (Outcome.FAILED, "returned"), result


async def test_a_channel_close_is_bisected_to_the_row_that_caused_it(
        publisher: AmqpPublisher, broker: Broker) -> None:
    assert await publisher.wait_ready(DEADLINE)
    batch = rows(4, row2={"exchange": "missing"})
    task = asyncio.create_task(publisher.publish(batch, lane=0))
    close = spec.Channel.Close(reply_code=404, reply_text="NOT_FOUND - no exchange 'missing'",
                               class_id=60, method_id=40)
    first = await broker.take(4)
    ch = first[0].channel
    await broker.send(ch, spec.Basic.Ack(delivery_tag=2, multiple=True), close)
    # the two unconfirmed rows are tried again one by one, each on a fresh channel (its
    # delivery tags start again at 1; aiormq may reuse the number the broker closed)
    [again] = await broker.take(1)
    assert (again.message_id, again.tag) == (str(batch[2].message_id), 1)
    await broker.send(again.channel, close)
    [last] = await broker.take(1)
    assert (last.message_id, last.tag) == (str(batch[3].message_id), 1)
    await broker.send(last.channel, spec.Basic.Ack(delivery_tag=1))
    async with asyncio.timeout(DEADLINE):
        results = await task
    assert results[0] == results[1] == results[3] == CONFIRMED, results
    assert (results[2].outcome, results[2].kind) == (Outcome.FAILED, "channel"), results
    assert "NOT_FOUND - no exchange 'missing'" in results[2].reason
    await until(lambda: broker.closed_ok == [ch, again.channel], DEADLINE)


async def test_pipelined_confirms_without_the_publisher(conn: aiormq.Connection,
                                                        broker: Broker) -> None:
    """`publish_pipelined` + `Pipelined.wait` alone, as the benchmark uses them."""
    channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
    props = [spec.Basic.Properties(message_id=f"m{i}", delivery_mode=2) for i in range(3)]
    pipelined = await frames.publish_pipelined(
        channel, [(b"x" * (FRAME_MAX * 2), "", "q", props[0]),  # a body over several frames
                  (b"", "", "q", props[1]), (b"y", "", "q", props[2])])
    sent = await broker.take(3)
    assert [len(m.body) for m in sent] == [FRAME_MAX * 2, 0, 1]
    await broker.returned(sent[0].channel, sent[0])
    await broker.send(sent[0].channel, spec.Basic.Nack(delivery_tag=2),
                      spec.Basic.Ack(delivery_tag=3, multiple=True))
    assert await pipelined.wait(DEADLINE) == set()
    pipelined.forget()
    first, second, third = pipelined.futures
    assert isinstance(first.exception(), aiormq.exceptions.PublishError)
    assert isinstance(second.exception(), aiormq.exceptions.DeliveryError)
    assert third.exception() is None
    assert channel.message_id_delivery_tag == {}


# -- the connection signals ---------------------------------------------------------------------

async def test_reader_died_when_the_broker_goes_away(conn: aiormq.Connection,
                                                     broker: Broker) -> None:
    assert not frames.reader_died(conn)
    broker.cut()
    await until(lambda: frames.reader_died(conn), DEADLINE)


async def test_blocked_follows_the_brokers_blocked_and_unblocked(conn: aiormq.Connection,
                                                                 broker: Broker) -> None:
    assert not frames.blocked(conn)
    await broker.send(0, spec.Connection.Blocked(reason="low on memory"))
    await until(lambda: frames.blocked(conn), DEADLINE)
    await broker.send(0, spec.Connection.Unblocked())
    await until(lambda: not frames.blocked(conn), DEADLINE)


# -- every private part outbox reads fails loudly when gone -------------------------------------

def _assert_loud(exc: pytest.ExceptionInfo[UnsupportedClient], name: str) -> None:
    message = str(exc.value)
    assert name in message and "aiormq 7.2.4" in message and "pip install" in message, message


async def test_the_pinned_aiormq_passes_the_check(conn: aiormq.Connection) -> None:
    channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
    frames.check_internals(conn, channel)


@pytest.mark.parametrize("name", ["_reader_task", "_Connection__connection_unblocked",
                                  "write_queue"])
async def test_a_connection_without_a_private_part_fails_the_check(
        conn: aiormq.Connection, name: str) -> None:
    saved = conn.__dict__.pop(name)
    try:
        with pytest.raises(UnsupportedClient) as exc:
            frames.check_internals(conn)
        _assert_loud(exc, f"Connection.{name}")
    finally:
        conn.__dict__[name] = saved


async def test_reader_died_and_blocked_raise_instead_of_reading_false(
        conn: aiormq.Connection) -> None:
    for name, signal in (("_reader_task", frames.reader_died),
                         ("_Connection__connection_unblocked", frames.blocked)):
        saved = conn.__dict__.pop(name)
        try:
            with pytest.raises(UnsupportedClient) as exc:
                signal(conn)
            _assert_loud(exc, name)
        finally:
            conn.__dict__[name] = saved


CHANNEL_PARTS = ["confirmations", "message_id_delivery_tag", "delivery_tag", "write_queue",
                 "max_content_size", "number", "publisher_confirms", "on_return_raises"]


@pytest.mark.parametrize("name", CHANNEL_PARTS)
async def test_a_channel_without_a_private_part_fails_the_check(
        conn: aiormq.Connection, name: str) -> None:
    channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
    saved = channel.__dict__.pop(name)
    try:
        with pytest.raises(UnsupportedClient) as exc:
            frames.check_internals(conn, channel)
        _assert_loud(exc, f"Channel.{name}")
    finally:
        channel.__dict__[name] = saved


@pytest.mark.parametrize("name", ["lock", "closing", "_closing"])
async def test_a_channel_class_without_a_private_part_fails_the_check(
        conn: aiormq.Connection, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
    if name == "lock":
        monkeypatch.delattr(aiormq.Channel, name)
    else:  # defined by aiormq's Base (a property, a slot): hidden by a class attribute
        monkeypatch.setattr(aiormq.Channel, name, None, raising=False)
    with pytest.raises(UnsupportedClient) as exc:
        frames.check_internals(conn, channel)
    _assert_loud(exc, f"Channel.{name}")


async def test_a_channel_whose_returns_do_not_raise_fails_the_check(
        conn: aiormq.Connection) -> None:
    # with on_return_raises off, aiormq resolves a returned message's confirm as a success
    channel = await conn.channel(publisher_confirms=True, on_return_raises=False)
    with pytest.raises(UnsupportedClient) as exc:
        frames.check_internals(conn, channel)
    _assert_loud(exc, "Channel.on_return_raises")


async def test_the_publisher_fails_for_good_when_the_connection_lacks_a_part(
        connections: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    real = aiormq.Connection.connect

    async def moved(self: aiormq.Connection, *args: Any, **kwargs: Any) -> bool:
        ok = await real(self, *args, **kwargs)
        self.__dict__["_reader_task_moved"] = self.__dict__.pop("_reader_task")
        return bool(ok)

    monkeypatch.setattr(aiormq.Connection, "connect", moved)
    p = AmqpPublisher(Settings.load({"publish_timeout": DEADLINE}, environ={}))
    relay = asyncio.create_task(asyncio.Event().wait())  # a relay that would run forever
    await p.start()
    try:
        with pytest.raises(UnsupportedClient) as exc:
            async with asyncio.timeout(DEADLINE):
                await p.guard(relay)
        _assert_loud(exc, "Connection._reader_task")
        assert relay.cancelled()
        assert p.fatal is exc.value and not p.ready
        assert len(connections) == 1  # it did not reconnect in a loop
    finally:
        async with asyncio.timeout(DEADLINE):
            await p.close()


async def test_the_publisher_fails_for_good_when_a_channel_lacks_a_part(
        publisher: AmqpPublisher, monkeypatch: pytest.MonkeyPatch) -> None:
    assert await publisher.wait_ready(DEADLINE)
    real = aiormq.Channel.__init__

    def moved(self: aiormq.Channel, *args: Any, **kwargs: Any) -> None:
        real(self, *args, **kwargs)
        self.__dict__["tags_by_message_id"] = self.__dict__.pop("message_id_delivery_tag")

    monkeypatch.setattr(aiormq.Channel, "__init__", moved)
    relay = asyncio.create_task(publisher.publish(rows(1), lane=0))
    with pytest.raises(UnsupportedClient) as exc:
        async with asyncio.timeout(DEADLINE):
            await publisher.guard(relay)
    _assert_loud(exc, "Channel.message_id_delivery_tag")
    assert publisher.fatal is exc.value


@pytest.mark.parametrize("change", ["a new type", "a renamed type attribute"])
def test_a_pamqp_whose_property_table_changed_fails_loudly(
        change: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if change == "a new type":
        monkeypatch.setattr(spec.Basic.Properties, "_timestamp", "timestamp64")
    else:
        monkeypatch.delattr(spec.Basic.Properties, "_content_type")
    with pytest.raises(UnsupportedClient) as exc:
        frames.property_encoders()
    _assert_loud(exc, "pamqp's basic properties table changed")
