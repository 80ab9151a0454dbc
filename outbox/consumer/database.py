"""The consumer's database side: one transaction per batch (inbox rows, the handler for the new
messages, commit), on psycopg or on SQLAlchemy.

Both adapters classify errors alike: the inbox statement's as `outbox.store.translation` makes
them (an unavailable database holds the batch, no attempt counted); any later one (handler, commit)
by the state of the connection (`_connection_lost`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import psycopg

from outbox import tracing
from outbox.consumer.message import BatchHandler, Handler, Message, describe
from outbox.exceptions import OutboxError, StoreUnavailable
from outbox.settings import Settings, redact
from outbox.sql import as_uuid, for_schema
from outbox.store import connect, session_settings, translate_errors, translation


class _HandlerFailed(Exception):
    """The handler (or its commit) raised: the message is retried or dead-lettered."""


def consumer_session_settings(settings: Settings, handler_timeout: float) -> dict[str, str]:
    """The relay's session settings (`outbox.store.session_settings`), adapted to a transaction
    that runs the user's handler.

    * ``statement_timeout`` and ``lock_timeout`` are the handler's deadline, not ``db_timeout``:
      a handler's statements may rightly take longer than the relay's short queries. The client
      gives up at the same deadline; the server-side one ends a statement whose client went
      silent.
    * ``synchronous_commit`` stays the server's (on): the message is acked once the commit
      returns, so a commit lost in a crash of the server would lose the effect for good (the
      relay can lower it: a lost mark there only causes a duplicate).
    * ``idle_in_transaction_session_timeout`` allows the whole deadline: a handler may wait on
      something else between its statements.
    * ``jit`` stays off, as for the relay: short transactional statements gain less from it than
      its compilation at each execution costs.
    """
    values = session_settings(settings)
    deadline_ms = str(int(handler_timeout * 1000))
    values["statement_timeout"] = deadline_ms
    values["lock_timeout"] = deadline_ms
    values["idle_in_transaction_session_timeout"] = str(
        int((handler_timeout + settings.db_timeout) * 1000))
    del values["synchronous_commit"]
    return values


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
            with tracing.processing(m):  # the handler's spans nest under the message's
                await self.handler(target, m)

    async def run(self, consumer: str, messages: Sequence[Message], *,
                  pipeline: bool) -> list[Message]:
        """Returns the messages that were duplicates. Raises `_HandlerFailed` for an error of the
        handler or of the commit, `OutboxError` when the database is unavailable."""
        raise NotImplementedError

    async def close(self) -> None:
        return None


class _PsycopgDatabase(_Database):
    def __init__(self, settings: Settings, handler: Handler | None,
                 batch_handler: BatchHandler | None, timeout: float,
                 connect: Callable[[], Awaitable[psycopg.AsyncConnection[Any]]] | None) -> None:
        super().__init__(handler, batch_handler, timeout)
        self.settings = settings
        self.q = for_schema(settings.schema)
        self._connect = connect  # the user's; by default `outbox.store.connect`
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        conn = self.conn
        if conn is not None and not _connection_lost(conn):
            return conn
        self.conn = None
        if self._connect is None:
            conn = await connect(self.settings, autocommit=True, purpose="consumer",
                                 session=consumer_session_settings(self.settings, self.timeout))
        else:
            with translate_errors(f"connecting to {redact(self.settings.database_url)}"):
                async with asyncio.timeout(self.settings.db_timeout + 1):
                    conn = await self._connect()
                    await conn.set_autocommit(True)
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
                raise StoreUnavailable(f"database connection lost: {describe(exc)}") from exc
            await self._discard_if_unusable(conn)
            raise _HandlerFailed(describe(exc)) from exc

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
                raise StoreUnavailable(f"database connection lost: {describe(exc)}") from exc
            raise _HandlerFailed(describe(exc)) from exc
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
        ids = {as_uuid(r[0]) for r in result.all()}
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

