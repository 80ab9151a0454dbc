"""`Consumer`: subscribes, batches deliveries, runs them through the database, acks.

The guarantees are in the package's docstring (`outbox.consumer`); the database side is in
`outbox.consumer.database`, the queues in `outbox.consumer.topology`, retries and dead letters
in `outbox.consumer.retries`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from uuid import UUID

import aiormq
import psycopg

from outbox import tracing
from outbox.amqp import Nodes, close_quietly
from outbox.consumer.database import (
    _Database,
    _HandlerFailed,
    _PsycopgDatabase,
    _SqlAlchemyDatabase,
)
from outbox.consumer.message import (
    BatchHandler,
    ConsumerCounts,
    Handler,
    Message,
    _Delivery,
    _Subscription,
    describe,
    parse,
)
from outbox.consumer.retries import BROKER_ERRORS, Retries
from outbox.consumer.topology import Topology
from outbox.exceptions import BrokerUnavailable, OutboxError, PermanentRefusal
from outbox.retry import RECONNECT_BASE, RECONNECT_CAP, REFUSED_RETRY, backoff
from outbox.settings import Settings, redact

log = logging.getLogger("outbox.consumer")


class _Abandoned(Exception):
    """The batch cannot be settled any more (its channel closed, or the consumer stops)."""


class Consumer:
    """Consumes ``queue`` with inbox dedupe; see `outbox.consumer` for the guarantees.

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
        connect: makes the psycopg connection (default: `outbox.store.connect` to
            ``settings.database_url``, with `outbox.consumer.database.consumer_session_settings`).
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
        self.topology = Topology(
            queue=queue, max_attempts=max_attempts, retry_base=retry_base, retry_max=retry_max,
            dead_letter_exchange=dead_letter_exchange,
            dead_letter_routing_key=dead_letter_routing_key or f"{queue}.dead",
            queue_arguments=dict(queue_arguments) if queue_arguments else None)
        self.queue = queue
        self.name = name or queue
        self.settings = settings or Settings.load()
        self.prefetch = prefetch
        self.batch_size = min(batch_size, prefetch)
        self.declare = declare
        # Pipelining pays off for one statement per message; a batch handler sends few.
        self.pipeline = pipeline and session_factory is None and batch_handler is None
        self.counts = ConsumerCounts()
        self._nodes = Nodes(self.settings.amqp_urls, self.settings.heartbeat,
                            self.settings.db_timeout)
        self.urls = self._nodes.urls
        self.db: _Database = (
            _SqlAlchemyDatabase(self.settings, session_factory, handler, batch_handler,
                                handler_timeout)
            if session_factory is not None else
            _PsycopgDatabase(self.settings, handler, batch_handler, handler_timeout, connect))
        self.subscribed = asyncio.Event()
        self._rng = rng or random.Random()
        self.retries = Retries(self.topology, self.name, self.settings.publish_timeout,
                               self.counts, self._sleep, self._rng)
        self._stopping = asyncio.Event()
        self._changed = asyncio.Event()
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._consumed = False  # subscribed since the last failure (resets the backoff)

    # -- public API ------------------------------------------------------------------------------

    @property
    def max_attempts(self) -> int:
        return self.topology.max_attempts

    @property
    def retry_base(self) -> float:
        return self.topology.retry_base

    @property
    def retry_max(self) -> float:
        return self.topology.retry_max

    @property
    def dead_letter_exchange(self) -> str:
        return self.topology.dead_letter_exchange

    @property
    def dead_letter_routing_key(self) -> str:
        return self.topology.dead_letter_routing_key

    @property
    def queue_arguments(self) -> Mapping[str, Any] | None:
        return self.topology.queue_arguments

    def retry_delay(self, attempt: int) -> float:
        """Seconds before retry number ``attempt`` (1 for the first retry)."""
        return self.topology.retry_delay(attempt)

    def retry_queue(self, attempt: int) -> str:
        """The delay queue of retry number ``attempt``."""
        return self.topology.retry_queue(attempt)

    async def run(self) -> None:
        """Consume until `stop`; reconnect after any loss of the broker."""
        failures = 0
        refused = ""  # the refusal last logged
        try:
            while not self._stopping.is_set():
                try:
                    conn, url = await self._nodes.connect()
                except PermanentRefusal as exc:
                    # the same URL fails the same way until someone fixes it: said once, retried
                    # slowly, as by the relay
                    if str(exc) != refused:
                        log.error("broker unavailable", extra={"fields": {
                            "queue": self.queue, "error": str(exc)}})
                    refused = str(exc)
                    await self._sleep(REFUSED_RETRY)
                    continue
                except BrokerUnavailable as exc:
                    failures += 1
                    refused = ""
                    log.error("broker unavailable", extra={"fields": {
                        "queue": self.queue, "error": str(exc), "attempt": failures}})
                    await self._sleep(backoff(failures, RECONNECT_BASE, RECONNECT_CAP,
                                              self._rng))
                    continue
                refused = ""
                self._connection = conn
                self.counts.connections += 1
                try:
                    while not self._stopping.is_set() and not conn.is_closed:
                        self._consumed = False
                        try:
                            await self._subscription(conn)
                        except BROKER_ERRORS as exc:
                            if conn.is_closed:
                                raise
                            failures = 0 if self._consumed else failures + 1
                            log.warning("subscription ended; subscribing again", extra={
                                "fields": {"queue": self.queue, "error": describe(exc)}})
                            await self._sleep(backoff(failures + 1, RECONNECT_BASE,
                                                      RECONNECT_CAP, self._rng))
                except BROKER_ERRORS as exc:
                    log.warning("broker connection lost", extra={"fields": {
                        "queue": self.queue, "url": redact(url), "error": describe(exc)}})
                except Exception:
                    # A bug must not stop the consumer for good: log it, reconnect, carry on.
                    log.exception("unexpected consumer error; reconnecting", extra={
                        "fields": {"queue": self.queue}})
                finally:
                    self.subscribed.clear()
                    self._connection = None
                    await close_quietly(conn)
                if not self._stopping.is_set():
                    # backoff grows only while we fail to get back to consuming
                    failures = 1 if self._consumed else failures + 1
                    self._nodes.lost()
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

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    async def _subscription(self, conn: aiormq.abc.AbstractConnection) -> None:
        """Consume on fresh channels until the broker cancels us, a channel closes, or stop."""
        async with asyncio.timeout(self.settings.publish_timeout + self.settings.db_timeout):
            channel = await conn.channel(publisher_confirms=False)
            if self.declare:
                channel = await self.topology.declare(channel, conn)
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
                await close_quietly(ch)

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
        deliveries = [parse(m) for m in raw]
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
        spans = tracing.start_processing(self.queue, self.name, valid)  # None: tracing off
        try:
            if valid and not await self._apply(sub, valid):
                return  # the channel closed while the database was away: all of it comes back
            await self._settle(sub, deliveries)
        finally:
            tracing.end_processing(spans)
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
        tracing.duplicates(dups)
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
                refused = isinstance(exc, PermanentRefusal)  # said once, retried slowly
                if failures == 1 or (failures % 10 == 0 and not refused):
                    log.error("database unavailable; holding the batch", extra={"fields": {
                        "queue": self.queue, "error": str(exc), "size": len(messages),
                        "attempt": failures}})
                await self._sleep(REFUSED_RETRY if refused else
                                  backoff(failures, RECONNECT_BASE, RECONNECT_CAP, self._rng))
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

    # -- retries and dead letters (`outbox.consumer.retries`) -----------------------------------

    async def _retry_or_dead_letter(self, sub: _Subscription, d: _Delivery, reason: str) -> None:
        if d.message is not None:
            tracing.failed(d.message, reason)
        await self.retries.retry_or_dead_letter(sub, d, reason)

    async def _dead_letter(self, sub: _Subscription, d: _Delivery, reason: str, *,
                           invalid: bool = False) -> None:
        await self.retries.dead_letter(sub, d, reason, invalid=invalid)
