"""Consume a queue so that every message has its effect exactly once: the inbox pattern, on aiormq.

    async def handle(conn: psycopg.AsyncConnection, message: Message) -> None:
        await conn.execute("UPDATE accounts SET ... WHERE id = %s", (message.json()["id"],))

    consumer = Consumer("billing.orders", handle, name="billing", settings=Settings.load())
    await consumer.run()            # until consumer.stop(); reconnects by itself

For each message the consumer opens a database transaction, records ``(name, message_id)`` in the
``inbox`` table (``INSERT … ON CONFLICT DO NOTHING``), runs the handler only if the row was new,
commits, and only then acks. A redelivered or twice-published message finds its row and is acked
without running the handler again.

Micro-batches. Messages that arrived together (up to ``batch_size``, within the ``prefetch``
window) share one transaction: one inbox statement for the batch, the handlers' statements
pipelined (psycopg pipeline mode), one commit, one ``basic.ack(multiple=True)``. If anything in a
batch fails, the transaction is rolled back and the batch is run again one message per transaction,
so one bad message never undoes the others' effects.

Retries. A handler that raises is rolled back; the message is republished (with publisher confirms)
to a delay queue ``<queue>.retry.<ms>`` whose ``x-message-ttl`` dead-letters it back to ``<queue>``
after the delay, with the header ``x-outbox-attempt`` counting attempts; only then is the original
acked. After ``max_attempts`` the message is republished to the dead-letter exchange (default: the
queue ``<queue>.dead``) with its reason in ``x-outbox-dead-reason``. Every step is "publish,
confirm, then ack": a crash in between leaves two copies, never none, and the inbox absorbs the
second one. Each delay queue has one fixed TTL, so its messages expire in order (a per-message TTL
would wait behind longer ones).

Messages without a ``message_id``, or whose ``message_id`` is not a UUID, go to the dead-letter
exchange at once with the reason; they cannot be deduplicated.

Broker or database unavailable: the consumer reconnects with capped exponential backoff and jitter;
a batch whose database is unreachable is held (unacked, no transaction open) and retried without
counting attempts. A statement that fails on a live connection (statement or lock timeout,
deadlock, serialization failure) is a handler error, with psycopg as with SQLAlchemy.
A ``basic.cancel`` from the broker (the queue was deleted) ends the subscription and the consumer
subscribes again (declaring the queue again when ``declare`` is set).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import aiormq
import orjson
import psycopg
from aiormq import exceptions as amqp_exc
from pamqp import commands as spec

from outbox.exceptions import BrokerUnavailable, OutboxError, StoreUnavailable
from outbox.publisher import describe_refusal, with_defaults
from outbox.retry import backoff
from outbox.settings import Settings, redact
from outbox.sql import for_schema
from outbox.store import translate_errors, translation

log = logging.getLogger("outbox.consumer")

ATTEMPT_HEADER = "x-outbox-attempt"
LAST_ERROR_HEADER = "x-outbox-last-error"
DEAD_REASON_HEADER = "x-outbox-dead-reason"
DEAD_QUEUE_HEADER = "x-outbox-queue"
DEAD_CONSUMER_HEADER = "x-outbox-consumer"
RECONNECT_BASE = 0.2
RECONNECT_CAP = 15.0
_REASON_MAX = 500
_BROKER_ERRORS = (amqp_exc.AMQPError, amqp_exc.ChannelInvalidStateError, ConnectionError,
                  BrokerUnavailable, TimeoutError)

Handler = Callable[[Any, "Message"], Awaitable[object]]
BatchHandler = Callable[[Any, Sequence["Message"]], Awaitable[object]]


@dataclass(slots=True)  # not frozen: a frozen dataclass costs ~4x more to build, per message
class Message:
    """A delivered message, as the handler sees it (treat it as read-only)."""

    message_id: UUID
    body: bytes
    routing_key: str
    exchange: str
    content_type: str | None
    message_type: str | None
    correlation_id: str | None
    headers: Mapping[str, Any]
    timestamp: datetime | None
    redelivered: bool
    attempt: int
    """1 on the first delivery to a handler, then counted by ``x-outbox-attempt``."""

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)


@dataclass(slots=True)
class ConsumerCounts:
    """What one consumer did since it started."""

    received: int = 0        # deliveries taken from the broker
    applied: int = 0         # handler ran and its transaction committed
    duplicates: int = 0      # inbox row already there: acked without running the handler
    retried: int = 0         # handler failed: republished to a delay queue
    dead_lettered: int = 0   # sent to the dead-letter exchange (failed max_attempts, or invalid)
    invalid: int = 0         # no or malformed message_id (also counted in dead_lettered)
    acked: int = 0
    connections: int = 0     # broker connections made (more than 1: it reconnected)


class _HandlerFailed(Exception):
    """The handler (or its commit) raised: the message is retried or dead-lettered."""


class _PublishFailed(Exception):
    """A retry or dead-letter copy was not confirmed: the original is requeued, not acked."""


@dataclass(slots=True)
class _Delivery:
    raw: aiormq.abc.DeliveredMessage
    tag: int
    message: Message | None = None
    invalid: str = ""
    ack: bool = True


# -- the database side -------------------------------------------------------------------------


class _Database:
    """Runs one transaction: inbox rows, then the handler for the new ones, then commit."""

    def __init__(self, handler: Handler | None, batch_handler: BatchHandler | None,
                 timeout: float) -> None:
        self.handler = handler
        self.batch_handler = batch_handler
        self.timeout = timeout

    async def _apply(self, target: Any, new: Sequence[Message]) -> None:
        """Run the user's handler on the messages the inbox had not seen, in its transaction."""
        if self.batch_handler is not None:
            await self.batch_handler(target, new)
            return
        assert self.handler is not None
        for m in new:
            await self.handler(target, m)

    async def run(self, consumer: str, messages: Sequence[Message], *,
                  pipeline: bool) -> list[Message]:
        """Returns the messages that were duplicates. Raises `_HandlerFailed` for an error of the
        handler or of the commit, `OutboxError` when the database is unavailable."""
        raise NotImplementedError

    async def close(self) -> None:
        return None


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text[:_REASON_MAX]


class _PsycopgDatabase(_Database):
    def __init__(self, settings: Settings, handler: Handler | None,
                 batch_handler: BatchHandler | None, timeout: float,
                 connect: Callable[[], Awaitable[psycopg.AsyncConnection[Any]]] | None) -> None:
        super().__init__(handler, batch_handler, timeout)
        self.settings = settings
        self.q = for_schema(settings.schema)
        self._connect = connect
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        conn = self.conn
        if conn is not None and not _connection_lost(conn):
            return conn
        self.conn = None
        with translate_errors(f"connecting to {redact(self.settings.database_url)}"):
            async with asyncio.timeout(self.settings.db_timeout + 1):
                if self._connect is not None:
                    conn = await self._connect()
                    await conn.set_autocommit(True)
                else:
                    conn = await psycopg.AsyncConnection.connect(
                        self.settings.database_url, autocommit=True,
                        connect_timeout=max(1, int(self.settings.db_timeout)),
                        application_name="outbox-consumer")
        self.conn = conn
        return conn

    async def run(self, consumer: str, messages: Sequence[Message], *,
                  pipeline: bool) -> list[Message]:
        conn = await self._connection()
        try:
            async with asyncio.timeout(self.timeout):
                if pipeline:
                    async with conn.pipeline():
                        return await self._transaction(conn, consumer, messages)
                return await self._transaction(conn, consumer, messages)
        except (OutboxError, asyncio.CancelledError):
            await self._discard_if_unusable(conn)
            raise
        except TimeoutError as exc:
            await self._discard(conn)  # its state is unknown: start afresh
            raise _HandlerFailed(f"timed out after {self.timeout:g}s") from exc
        except Exception as exc:
            if _connection_lost(conn):
                self.conn = None
                raise StoreUnavailable(f"database connection lost: {_describe(exc)}") from exc
            await self._discard_if_unusable(conn)
            raise _HandlerFailed(_describe(exc)) from exc

    async def _transaction(self, conn: psycopg.AsyncConnection[Any], consumer: str,
                           messages: Sequence[Message]) -> list[Message]:
        async with conn.transaction():
            if len(messages) == 1:
                with translate_errors("recording the message in the inbox"):
                    cur = await conn.execute(self.q["inbox_record"], {
                        "consumer": consumer, "message_id": messages[0].message_id},
                        prepare=True)
                    new = list(messages) if cur.rowcount == 1 else []
            else:
                with translate_errors("recording the batch in the inbox"):
                    cur = await conn.execute(self.q["inbox_record_many"], {
                        "consumer": consumer,
                        "message_ids": [m.message_id for m in messages]}, prepare=True)
                    ids = {r[0] for r in await cur.fetchall()}
                new = [m for m in messages if m.message_id in ids]
            if new:
                await self._apply(conn, new)
        return _duplicates(messages, new)

    async def _discard_if_unusable(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if _connection_lost(conn) or conn.info.transaction_status not in (
                psycopg.pq.TransactionStatus.IDLE,):
            await self._discard(conn)

    async def _discard(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = None
        with contextlib.suppress(Exception):
            await conn.close()

    async def close(self) -> None:
        if self.conn is not None:
            await self._discard(self.conn)


class _SqlAlchemyDatabase(_Database):
    def __init__(self, settings: Settings, session_factory: Callable[[], Any],
                 handler: Handler | None, batch_handler: BatchHandler | None,
                 timeout: float) -> None:
        super().__init__(handler, batch_handler, timeout)
        q = for_schema(settings.schema)
        self.one = q.sqlalchemy("inbox_record")
        self.many = q.sqlalchemy("inbox_record_many")
        self.factory = session_factory

    async def run(self, consumer: str, messages: Sequence[Message], *,
                  pipeline: bool) -> list[Message]:
        # Classified as on the psycopg path: the inbox statement's errors as `translate_errors`
        # makes them; any later one (handler, commit) by the state of the connection.
        conn: Any = None  # the driver's connection under the session, once it has one
        try:
            async with asyncio.timeout(self.timeout):
                async with self.factory() as session, session.begin():
                    with _translate_wrapped(f"recording the {_what(messages)} in the inbox"):
                        new, conn = await self._record(session, consumer, messages)
                    if new:
                        await self._apply(session, new)
        except (OutboxError, asyncio.CancelledError):
            raise
        except TimeoutError as exc:
            raise _HandlerFailed(f"timed out after {self.timeout:g}s") from exc
        except Exception as exc:
            # connection_invalidated: SQLAlchemy's psycopg dialect made the same test when it
            # wrapped the error; the connection itself also tells when the handler went on.
            if getattr(exc, "connection_invalidated", False) or (
                    conn is not None and _connection_lost(conn)):
                raise StoreUnavailable(f"database connection lost: {_describe(exc)}") from exc
            raise _HandlerFailed(_describe(exc)) from exc
        return _duplicates(messages, new)

    async def _record(self, session: Any, consumer: str,
                      messages: Sequence[Message]) -> tuple[list[Message], Any]:
        """The inbox rows; returns the messages that are new, and the driver's connection."""
        if len(messages) == 1:
            result = await session.execute(self.one, {
                "consumer": consumer, "message_id": messages[0].message_id})
            return (list(messages) if result.rowcount == 1 else []), _driver_connection(result)
        result = await session.execute(self.many, {
            "consumer": consumer, "message_ids": [m.message_id for m in messages]})
        ids = {_uuid(r[0]) for r in result.all()}
        return [m for m in messages if m.message_id in ids], _driver_connection(result)


def _connection_lost(conn: Any) -> bool:
    """Whether a transaction failed because it lost its connection: the one test of both drivers
    for errors after the inbox statement (before it, `translate_errors` decides).

    A lost connection (reset, closed, the server shut down or terminated the backend) leaves the
    driver's connection closed or broken: the batch is held and no attempt is counted. A
    statement that failed on a live connection (statement or lock timeout, deadlock,
    serialization failure, any other error) leaves it open: a handler error (its batch is split,
    each failure of the message counts an attempt, then it is retried or dead-lettered).
    """
    return bool(getattr(conn, "closed", False) or getattr(conn, "broken", False))


@contextlib.contextmanager
def _translate_wrapped(what: str) -> Iterator[None]:
    """`translate_errors` for the driver error that SQLAlchemy wrapped (``exc.orig``)."""
    from sqlalchemy import exc as sa_exc

    try:
        yield
    except sa_exc.DBAPIError as exc:
        outbox_exc = translation(exc.orig, what) if exc.orig is not None else None
        if outbox_exc is None:
            raise  # classified like the handler's errors
        raise outbox_exc from exc


def _driver_connection(result: Any) -> Any:
    """The driver's connection (psycopg's) that ran a SQLAlchemy result, or None if it does not
    tell. Read from attributes: ``await session.connection()`` would cost two greenlet switches
    per transaction."""
    from sqlalchemy import exc as sa_exc

    try:
        return result.context.root_connection.connection.driver_connection
    except (AttributeError, sa_exc.SQLAlchemyError):
        return None  # connection_invalidated alone decides


def _what(messages: Sequence[Message]) -> str:
    return "message" if len(messages) == 1 else "batch"


def _duplicates(messages: Sequence[Message], new: Sequence[Message]) -> list[Message]:
    if len(new) == len(messages):
        return []
    fresh = {m.message_id for m in new}
    return [m for m in messages if m.message_id not in fresh]


def _uuid(value: Any) -> UUID:
    return value if isinstance(value, UUID) else UUID(str(value))


# -- the consumer ------------------------------------------------------------------------------


@dataclass
class _Subscription:
    """One channel pair and its buffer; it ends when a channel closes or the broker cancels."""

    channel: aiormq.abc.AbstractChannel
    publish: aiormq.abc.AbstractChannel
    buffer: asyncio.Queue[aiormq.abc.DeliveredMessage] = field(default_factory=asyncio.Queue)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


class Consumer:
    """Consumes ``queue`` with inbox dedupe; see the module docstring for the guarantees.

    Args:
        queue: the queue to consume.
        handler: ``async def handler(tx, message)``: ``tx`` is the psycopg ``AsyncConnection``
            inside the transaction, or the SQLAlchemy ``AsyncSession`` when ``session_factory``
            is given. It must not commit; raising rolls back and retries the message.
        name: the inbox's ``consumer`` column (default: the queue name). Keep it stable: a new name
            forgets what was processed.
        settings: ``database_url``, ``amqp_url`` (comma-separated for a cluster), ``schema`` of the
            inbox table, ``heartbeat``, ``db_timeout``, ``publish_timeout``; default: from the
            ``OUTBOX_*`` environment.
        session_factory: a SQLAlchemy ``async_sessionmaker``; the handler then gets a session.
        connect: makes the psycopg connection (default: ``settings.database_url``).
        batch_handler: instead of ``handler``, ``async def batch_handler(tx, messages)`` called
            once per transaction with the batch's new messages (the fastest way to write effects).
        prefetch: unacked messages the broker may push (basic.qos).
        batch_size: messages per transaction (1 turns micro-batching off).
        max_attempts: handler attempts before a message is dead-lettered.
        retry_base, retry_max: delay before retry n is ``retry_base * 2**(n-1)``, at most
            ``retry_max`` seconds (one delay queue per distinct delay).
        dead_letter_exchange, dead_letter_routing_key: where dead messages go; default the
            default exchange and the queue ``<queue>.dead``.
        declare: declare the queue, the delay queues and the ``<queue>.dead`` queue (durable).
        queue_arguments: arguments for declaring ``queue`` (when it does not exist yet).
        handler_timeout: deadline in seconds of one transaction (inbox, handlers, commit).
        pipeline: run a batch's statements in psycopg pipeline mode (fewer round trips).
    """

    def __init__(
        self, queue: str, handler: Handler | None = None, *, name: str | None = None,
        settings: Settings | None = None, session_factory: Callable[[], Any] | None = None,
        connect: Callable[[], Awaitable[psycopg.AsyncConnection[Any]]] | None = None,
        batch_handler: BatchHandler | None = None, prefetch: int = 1000, batch_size: int = 250,
        max_attempts: int = 5, retry_base: float = 1.0, retry_max: float = 60.0,
        dead_letter_exchange: str = "", dead_letter_routing_key: str | None = None,
        declare: bool = True, queue_arguments: Mapping[str, Any] | None = None,
        handler_timeout: float = 30.0, pipeline: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        if (handler is None) == (batch_handler is None):
            raise ValueError("give exactly one of handler and batch_handler")
        if not queue:
            raise ValueError("queue must not be empty")
        if max_attempts < 1 or prefetch < 1 or batch_size < 1:
            raise ValueError("max_attempts, prefetch and batch_size must be at least 1")
        if retry_base <= 0 or retry_max < retry_base:
            raise ValueError("need 0 < retry_base <= retry_max")
        self.queue = queue
        self.name = name or queue
        self.settings = settings or Settings.load()
        self.prefetch = prefetch
        self.batch_size = min(batch_size, prefetch)
        self.max_attempts = max_attempts
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.dead_letter_exchange = dead_letter_exchange
        self.dead_letter_routing_key = dead_letter_routing_key or f"{queue}.dead"
        self.declare = declare
        self.queue_arguments = dict(queue_arguments) if queue_arguments else None
        # Pipelining pays off for one statement per message; a batch handler sends few.
        self.pipeline = pipeline and session_factory is None and batch_handler is None
        self.counts = ConsumerCounts()
        self.urls = [with_defaults(u, self.settings.heartbeat, self.settings.db_timeout)
                     for u in self.settings.amqp_urls]
        self.db: _Database = (
            _SqlAlchemyDatabase(self.settings, session_factory, handler, batch_handler,
                                handler_timeout)
            if session_factory is not None else
            _PsycopgDatabase(self.settings, handler, batch_handler, handler_timeout, connect))
        self.subscribed = asyncio.Event()
        self._rng = rng or random.Random()
        self._stopping = asyncio.Event()
        self._changed = asyncio.Event()
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._consumed = False  # subscribed since the last failure (resets the backoff)

    # -- public API ------------------------------------------------------------------------------

    def retry_delay(self, attempt: int) -> float:
        """Seconds before retry number ``attempt`` (1 for the first retry)."""
        return float(min(self.retry_max, self.retry_base * 2 ** min(attempt - 1, 40)))

    def retry_queue(self, attempt: int) -> str:
        """The delay queue of retry number ``attempt``."""
        return f"{self.queue}.retry.{round(self.retry_delay(attempt) * 1000)}"

    async def run(self) -> None:
        """Consume until `stop`; reconnect after any loss of the broker."""
        failures = 0
        index = 0
        try:
            while not self._stopping.is_set():
                url = self.urls[index % len(self.urls)]
                try:
                    conn = await self._connect(url)
                except BrokerUnavailable as exc:
                    failures += 1
                    index += 1
                    log.error("broker unavailable", extra={"fields": {
                        "queue": self.queue, "error": str(exc), "attempt": failures}})
                    await self._sleep(backoff(failures, RECONNECT_BASE, RECONNECT_CAP,
                                              self._rng))
                    continue
                self._connection = conn
                self.counts.connections += 1
                try:
                    while not self._stopping.is_set() and not conn.is_closed:
                        self._consumed = False
                        try:
                            await self._subscription(conn)
                        except _BROKER_ERRORS as exc:
                            if conn.is_closed:
                                raise
                            failures = 0 if self._consumed else failures + 1
                            log.warning("subscription ended; subscribing again", extra={
                                "fields": {"queue": self.queue, "error": _describe(exc)}})
                            await self._sleep(backoff(failures + 1, RECONNECT_BASE,
                                                      RECONNECT_CAP, self._rng))
                except _BROKER_ERRORS as exc:
                    log.warning("broker connection lost", extra={"fields": {
                        "queue": self.queue, "url": redact(url), "error": _describe(exc)}})
                except Exception:
                    # A bug must not stop the consumer for good: log it, reconnect, carry on.
                    log.exception("unexpected consumer error; reconnecting", extra={
                        "fields": {"queue": self.queue}})
                finally:
                    self.subscribed.clear()
                    self._connection = None
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(2.0):
                            await conn.close()
                if not self._stopping.is_set():
                    # backoff grows only while we fail to get back to consuming
                    failures = 1 if self._consumed else failures + 1
                    index += 1
                    await self._sleep(backoff(failures, RECONNECT_BASE, RECONNECT_CAP,
                                              self._rng))
        finally:
            await self.db.close()

    def stop(self) -> None:
        """Finish the batch in hand, then return from `run` (unprocessed messages go back)."""
        self._stopping.set()
        self._changed.set()

    async def start(self) -> None:
        """Run in a background task (`close` stops it)."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"outbox-consumer-{self.queue}")

    async def close(self) -> None:
        """Stop and wait for the background task of `start`."""
        self.stop()
        if self._task is not None:
            task, self._task = self._task, None
            await task

    async def __aenter__(self) -> Consumer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_for(self, predicate: Callable[[ConsumerCounts], bool],
                       timeout: float = 30.0) -> ConsumerCounts:
        """Wait until ``predicate(counts)`` holds (raises TimeoutError after ``timeout``)."""
        async with asyncio.timeout(timeout):
            while not predicate(self.counts):
                self._changed.clear()
                if self._task is not None and self._task.done():
                    await self._task
                    raise RuntimeError("the consumer stopped")
                await self._changed.wait()
        return self.counts

    # -- the broker side -------------------------------------------------------------------------

    async def _connect(self, url: str) -> aiormq.abc.AbstractConnection:
        try:
            async with asyncio.timeout(self.settings.db_timeout + 1):
                return await aiormq.connect(url)
        except (amqp_exc.AuthenticationError, amqp_exc.ProbableAuthenticationError,
                amqp_exc.ConnectionNotAllowed) as exc:
            raise BrokerUnavailable(f"broker {redact(url)}: {describe_refusal(exc)}") from exc
        except (OSError, amqp_exc.AMQPError, TimeoutError, ConnectionError) as exc:
            raise BrokerUnavailable(
                f"broker {redact(url)}: cannot connect ({_describe(exc)})") from exc

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    async def _declare(self, channel: aiormq.abc.AbstractChannel,
                       conn: aiormq.abc.AbstractConnection) -> aiormq.abc.AbstractChannel:
        """Declare the topology; returns a usable channel (a refused declare closes one)."""
        try:
            await channel.queue_declare(self.queue, durable=True, arguments=self.queue_arguments)
        except amqp_exc.ChannelPreconditionFailed:
            # It exists with other arguments: use it as it is.
            channel = await conn.channel(publisher_confirms=False)
            await channel.queue_declare(self.queue, passive=True)
        delays = sorted({round(self.retry_delay(a) * 1000) for a in range(1, self.max_attempts)})
        for ms in delays:
            await channel.queue_declare(f"{self.queue}.retry.{ms}", durable=True, arguments={
                "x-message-ttl": ms, "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.queue})
        if not self.dead_letter_exchange:
            await channel.queue_declare(self.dead_letter_routing_key, durable=True)
        return channel

    async def _subscription(self, conn: aiormq.abc.AbstractConnection) -> None:
        """Consume on fresh channels until the broker cancels us, a channel closes, or stop."""
        async with asyncio.timeout(self.settings.publish_timeout + self.settings.db_timeout):
            channel = await conn.channel(publisher_confirms=False)
            if self.declare:
                channel = await self._declare(channel, conn)
            publish = await conn.channel(publisher_confirms=True, on_return_raises=True)
            await channel.basic_qos(prefetch_count=self.prefetch)
        sub = _Subscription(channel, publish)

        def on_cancel(frame: Any) -> None:
            sub.cancelled.set()

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            sub.buffer.put_nowait(message)

        channel.on_consumer_cancel_callbacks.add(on_cancel)
        closing = channel.closing
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                await channel.basic_consume(self.queue, on_message)
            self.subscribed.set()
            self._consumed = True
            log.info("consumer subscribed", extra={"fields": {
                "queue": self.queue, "consumer": self.name, "prefetch": self.prefetch}})
            while not self._stopping.is_set():
                batch = await self._next_batch(sub, closing)
                if batch is None:
                    break
                await self._process(sub, batch)
            if closing.done():
                reason = None if closing.cancelled() else closing.exception()
                raise BrokerUnavailable(f"the channel was closed ({reason or 'no reason'})")
            if sub.cancelled.is_set() and not self._stopping.is_set():
                log.warning("consumer cancelled by the broker; subscribing again", extra={
                    "fields": {"queue": self.queue}})
        finally:
            self.subscribed.clear()
            closing.cancel()
            for ch in (publish, channel):
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2.0):
                        await ch.close()

    async def _next_batch(self, sub: _Subscription,
                          closing: asyncio.Future[Any]) -> list[aiormq.abc.DeliveredMessage] | None:
        buffer = sub.buffer
        if buffer.empty():
            if sub.cancelled.is_set() or closing.done():
                return None
            getter = asyncio.ensure_future(buffer.get())
            cancelled = asyncio.ensure_future(sub.cancelled.wait())
            stopping = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait([getter, cancelled, stopping, closing],
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for f in (cancelled, stopping):
                    f.cancel()
            if not getter.done():
                getter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await getter
                return None
            if closing.done():
                return None
            batch = [getter.result()]
        else:
            if closing.done():
                return None
            batch = [buffer.get_nowait()]
        while len(batch) < self.batch_size and not buffer.empty():
            batch.append(buffer.get_nowait())
        return batch

    # -- one batch -------------------------------------------------------------------------------

    async def _process(self, sub: _Subscription,
                       raw: list[aiormq.abc.DeliveredMessage]) -> None:
        deliveries = [self._parse(m) for m in raw]
        self.counts.received += len(deliveries)
        valid: list[_Delivery] = []
        seen: set[UUID] = set()
        for d in deliveries:
            if d.message is None:
                await self._dead_letter(sub, d, d.invalid, invalid=True)
            elif d.message.message_id in seen:
                self.counts.duplicates += 1  # twice in one batch: the first one decides
            else:
                seen.add(d.message.message_id)
                valid.append(d)
        if valid and not await self._apply(sub, valid):
            return  # the channel closed while the database was away: all of it comes back
        await self._settle(sub, deliveries)
        self._changed.set()

    async def _apply(self, sub: _Subscription, valid: list[_Delivery]) -> bool:
        """Run the batch in one transaction, or one by one if that fails. False when abandoned."""
        messages = [d.message for d in valid if d.message is not None]
        try:
            dups = await self._transaction(sub, messages, pipeline=self.pipeline and
                                           len(messages) > 1)
        except _HandlerFailed as exc:
            if len(valid) == 1:
                await self._retry_or_dead_letter(sub, valid[0], str(exc))
                return True
            log.info("batch failed; running it one message per transaction", extra={
                "fields": {"queue": self.queue, "size": len(valid), "error": str(exc)}})
            for d in valid:
                assert d.message is not None
                try:
                    dups = await self._transaction(sub, [d.message], pipeline=False)
                except _HandlerFailed as one:
                    await self._retry_or_dead_letter(sub, d, str(one))
                    continue
                except _Abandoned:
                    return False
                self._count_applied([d.message], dups)
            return True
        except _Abandoned:
            return False
        self._count_applied(messages, dups)
        return True

    def _count_applied(self, messages: Sequence[Message], dups: Sequence[Message]) -> None:
        self.counts.duplicates += len(dups)
        self.counts.applied += len(messages) - len(dups)

    async def _transaction(self, sub: _Subscription, messages: Sequence[Message], *,
                           pipeline: bool) -> list[Message]:
        """One database transaction; waits out an unavailable database (no attempt counted)."""
        failures = 0
        while True:
            try:
                return await self.db.run(self.name, messages, pipeline=pipeline)
            except OutboxError as exc:
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    log.error("database unavailable; holding the batch", extra={"fields": {
                        "queue": self.queue, "error": str(exc), "size": len(messages),
                        "attempt": failures}})
                await self._sleep(backoff(failures, RECONNECT_BASE, RECONNECT_CAP, self._rng))
                if self._stopping.is_set() or sub.channel.is_closed:
                    raise _Abandoned() from exc

    async def _settle(self, sub: _Subscription, deliveries: Sequence[_Delivery]) -> None:
        """Ack (after the commit) or requeue every delivery of the batch, in tag order."""
        if all(d.ack for d in deliveries):
            await sub.channel.basic_ack(deliveries[-1].tag, multiple=len(deliveries) > 1)
            self.counts.acked += len(deliveries)
            return
        for d in deliveries:
            if d.ack:
                await sub.channel.basic_ack(d.tag)
                self.counts.acked += 1
            else:
                await sub.channel.basic_nack(d.tag, requeue=True)

    def _parse(self, raw: aiormq.abc.DeliveredMessage) -> _Delivery:
        delivery = raw.delivery
        tag = int(getattr(delivery, "delivery_tag", 0) or 0)
        props = raw.header.properties
        d = _Delivery(raw, tag)
        mid = props.message_id
        if not mid:
            d.invalid = "no message_id: cannot be deduplicated"
            return d
        try:
            message_id = UUID(mid)
        except (ValueError, TypeError, AttributeError):
            d.invalid = f"message_id is not a UUID: {str(mid)[:64]!r}"
            return d
        headers = props.headers or {}
        attempt = headers.get(ATTEMPT_HEADER, 1)
        d.message = Message(
            message_id=message_id, body=raw.body,
            routing_key=getattr(delivery, "routing_key", "") or "",
            exchange=getattr(delivery, "exchange", "") or "",
            content_type=props.content_type, message_type=props.message_type,
            correlation_id=props.correlation_id, headers=headers, timestamp=props.timestamp,
            redelivered=bool(getattr(delivery, "redelivered", False)),
            attempt=attempt if isinstance(attempt, int) and attempt >= 1 else 1,
        )
        return d

    # -- retries and dead letters ----------------------------------------------------------------

    async def _retry_or_dead_letter(self, sub: _Subscription, d: _Delivery, reason: str) -> None:
        assert d.message is not None
        attempt = d.message.attempt
        if attempt >= self.max_attempts:
            await self._dead_letter(
                sub, d, f"handler failed {attempt} times; last error: {reason}")
            return
        delay = self.retry_delay(attempt)
        try:
            await self._republish(sub, d, "", self.retry_queue(attempt), {
                ATTEMPT_HEADER: attempt + 1, LAST_ERROR_HEADER: reason[:_REASON_MAX]})
        except _PublishFailed as exc:
            await self._hold(d, f"cannot republish for a retry: {exc}")
            return
        self.counts.retried += 1
        log.warning("handler failed; retrying later", extra={"fields": {
            "queue": self.queue, "message_id": str(d.message.message_id), "attempt": attempt,
            "retry_in": delay, "error": reason}})

    async def _dead_letter(self, sub: _Subscription, d: _Delivery, reason: str, *,
                           invalid: bool = False) -> None:
        message_id = d.message.message_id if d.message is not None else None
        try:
            await self._republish(sub, d, self.dead_letter_exchange,
                                  self.dead_letter_routing_key, {
                                      DEAD_REASON_HEADER: reason[:_REASON_MAX],
                                      DEAD_QUEUE_HEADER: self.queue,
                                      DEAD_CONSUMER_HEADER: self.name})
        except _PublishFailed as exc:
            await self._hold(d, f"cannot dead-letter: {exc}")
            return
        self.counts.dead_lettered += 1
        if invalid:
            self.counts.invalid += 1
        log.error("message dead-lettered", extra={"fields": {
            "queue": self.queue, "message_id": str(message_id) if message_id else None,
            "delivery_tag": d.tag, "reason": reason,
            "dead_letter_exchange": self.dead_letter_exchange,
            "dead_letter_routing_key": self.dead_letter_routing_key}})

    async def _hold(self, d: _Delivery, problem: str) -> None:
        """The copy was not confirmed: requeue the original after a pause (no spinning)."""
        d.ack = False
        log.error("cannot move the message; requeueing it", extra={"fields": {
            "queue": self.queue, "delivery_tag": d.tag, "error": problem}})
        await self._sleep(backoff(3, RECONNECT_BASE, RECONNECT_CAP, self._rng))

    async def _republish(self, sub: _Subscription, d: _Delivery, exchange: str,
                         routing_key: str, extra_headers: Mapping[str, Any]) -> None:
        props = d.raw.header.properties
        headers = dict(props.headers or {})
        headers.update(extra_headers)
        copy = spec.Basic.Properties(
            content_type=props.content_type, content_encoding=props.content_encoding,
            headers=headers, delivery_mode=2, priority=props.priority,
            correlation_id=props.correlation_id, reply_to=props.reply_to,
            message_id=props.message_id, timestamp=props.timestamp,
            message_type=props.message_type, app_id=props.app_id)
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                if sub.publish.is_closed:  # a refused publish (404 exchange) closes it
                    sub.publish = await sub.channel.connection.channel(
                        publisher_confirms=True, on_return_raises=True)
                await sub.publish.basic_publish(d.raw.body, exchange=exchange,
                                                routing_key=routing_key, properties=copy,
                                                mandatory=True)
        except (*_BROKER_ERRORS, ValueError, TypeError) as exc:
            raise _PublishFailed(_describe(exc)) from exc


class _Abandoned(Exception):
    """The batch cannot be settled any more (its channel closed, or the consumer stops)."""
