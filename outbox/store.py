"""The PostgreSQL store: psycopg 3 connections that run the named queries of ``queries.sql``.

Driver errors are translated here, once, into `outbox.exceptions`; every network wait has the
``db_timeout`` deadline on the client side and ``statement_timeout`` on the server side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from outbox.exceptions import (
    OutboxError,
    PermanentRefusal,
    SchemaMissing,
    StoreUnavailable,
    WakeupFlagUnavailable,
    first_line,
)
from outbox.ports import Stats, Writer
from outbox.rows import Row, Settlement
from outbox.settings import Settings, redact
from outbox.sql import Queries, for_schema
from outbox.tls import verify_failure

log = logging.getLogger("outbox.store")

_PERMANENT = re.compile(
    r"password authentication failed|role \S+ does not exist|database \S+ does not exist"
    r"|no pg_hba\.conf entry|permission denied for database",
    re.I,
)
# libpq's words for a TLS setup that fails the same way until someone fixes the certificates
_TLS_REFUSAL = re.compile(
    r"certificate verify failed|does not match host name|certificate file|private key file"
    r"|certificate present, but not private key|tlsv1 alert|sslv3 alert|tlsv13 alert", re.I)
_VERIFY_FAILED_WHY = ("the server certificate is not signed by the CA of sslrootcert, expired, "
                      "or not yet valid")
_SERVER_AT = re.compile(r'server at "([^"]+)", port (\d+)')
_SSL_REQUEST = struct.pack("!ii", 8, 80877103)  # the protocol's "may we speak TLS?" message
LISTEN_PING = 30.0  # seconds of silence before the listener pings (TCP keepalives watch too)
READ_ONLY = ("connected to a read-only standby; point OUTBOX_DATABASE_URL at the primary or add "
             "target_session_attrs=read-write")
JSON = "application/json"
OCTETS = "application/octet-stream"


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn psycopg (and timeout) errors into outbox exceptions."""
    try:
        yield
    except Exception as exc:
        outbox_exc = translation(exc, what)
        if outbox_exc is None:
            raise
        raise outbox_exc from exc


def translation(exc: BaseException, what: str) -> OutboxError | None:
    """The outbox exception for a psycopg (or timeout) error; None for any other error. Also for
    a psycopg error that SQLAlchemy wrapped (its ``orig``), so both drivers translate alike."""
    if isinstance(exc, pgerrors.UndefinedTable):
        return SchemaMissing(
            f"{what}: the outbox table is missing ({exc.diag.message_primary}); "
            "run `outbox migrate`")
    if isinstance(exc, (pgerrors.InsufficientPrivilege,
                        pgerrors.InvalidAuthorizationSpecification)):
        return PermanentRefusal(f"{what}: {first_line(exc)}")
    if isinstance(exc, pgerrors.ReadOnlySqlTransaction):
        # the same text whatever failed (a claim, LISTEN, the flag): one line in the log, and a
        # retry, since a standby may be promoted
        return StoreUnavailable(READ_ONLY)
    if isinstance(exc, psycopg.OperationalError):
        msg = first_line(exc)
        if _TLS_REFUSAL.search(msg):
            return PermanentRefusal(f"{what}: {describe_tls(msg)}")
        if _PERMANENT.search(msg):
            return PermanentRefusal(f"{what}: {msg}")
        return StoreUnavailable(f"{what}: {msg}")
    if isinstance(exc, TimeoutError):  # before OSError, of which it is a subclass
        return StoreUnavailable(f"{what}: no answer from the database within the deadline")
    if isinstance(exc, (psycopg.InterfaceError, pgerrors.AdminShutdown, pgerrors.QueryCanceled,
                        pgerrors.IdleInTransactionSessionTimeout, OSError)):
        return StoreUnavailable(f"{what}: {first_line(exc)}")
    return None


def describe_tls(msg: str, why: str | None = None) -> str:
    """libpq's line for a refused TLS connection, led by the cause: "TLS: hostname mismatch:
    server certificate for "a" does not match host name "b" (connection to server at …)".
    ``why``: OpenSSL's reason for "certificate verify failed", which libpq does not give (see
    `unverified_why`)."""
    where, _, cause = msg.rpartition(" failed: ")
    where = where.removeprefix("connection failed: ")
    cause = cause.removeprefix("SSL error: ")
    if "does not match host name" in cause:
        cause = f"hostname mismatch: {cause}"
    elif "certificate verify failed" in cause:
        cause = f"certificate verify failed: {why or _VERIFY_FAILED_WHY}"
    return f"TLS: {cause}" + (f" ({where})" if where else "")


async def unverified_why(database_url: str, msg: str, timeout: float) -> str | None:
    """Why the server in libpq's "certificate verify failed" ``msg`` was not verified
    ("certificate has expired"…), found by a TLS handshake of our own with the URL's
    sslrootcert; None when that cannot tell (no sslrootcert, another error, no answer)."""
    at = _SERVER_AT.search(msg)
    root = str(psycopg.conninfo.conninfo_to_dict(database_url).get("sslrootcert") or "")
    if at is None or not root:
        return None
    writer: asyncio.StreamWriter | None = None
    try:
        context = ssl.create_default_context(cafile=None if root == "system" else root)
        context.check_hostname = False  # libpq says a mismatch itself; this is the chain
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(at[1], int(at[2]))
            writer.write(_SSL_REQUEST)
            if await reader.readexactly(1) != b"S":
                return None
            await writer.start_tls(context)
    except ssl.SSLCertVerificationError as exc:
        return verify_failure(exc, "the server certificate is not signed by the CA of sslrootcert")
    except Exception:  # the probe only adds words: libpq's own line stands without them
        return None
    finally:
        if writer is not None:
            writer.close()
    return None


@contextlib.asynccontextmanager
async def deadline(conn: psycopg.AsyncConnection[Any], seconds: float) -> AsyncIterator[None]:
    """`asyncio.timeout` for queries on ``conn`` that stays a deadline on a silent network.

    Cancelled mid-query, psycopg sends a cancel request and waits for the query to end: up to
    10 s more when the network went silent. So the connection is closed at the deadline, just
    before the cancellation, which then ends at once (the caller drops the connection anyway).
    """
    handle = asyncio.get_running_loop().call_later(seconds, conn.pgconn.finish)
    try:
        async with asyncio.timeout(seconds + 0.01):
            yield
    finally:
        handle.cancel()


def session_settings(settings: Settings) -> dict[str, str]:
    """The server settings every relay connection asks for at connect time (libpq ``options``);
    `outbox doctor` checks that the server applied them."""
    timeout_ms = str(int(settings.db_timeout * 1000))
    return {
        "statement_timeout": timeout_ms,
        "lock_timeout": timeout_ms,
        # A claimed batch is open for at most the publish deadline plus a few queries; anything
        # longer is a hung relay, and the server ends it (its rows go back to pending).
        "idle_in_transaction_session_timeout":
            str(int((settings.publish_timeout + 4 * settings.db_timeout) * 1000)),
        "synchronous_commit": "off",  # a lost mark only causes a duplicate
        # The claim's estimated cost passes jit_above_cost once the outbox is large, and JIT
        # then compiles it at every execution, which takes far longer than running it.
        "jit": "off",
    }


def libpq_options(values: Mapping[str, str]) -> str:
    """Server settings as libpq's ``options`` connection parameter."""
    return " ".join(f"-c {name}={value}" for name, value in values.items())


async def connect(
    settings: Settings, *, autocommit: bool, purpose: str, writable: bool = True,
    session: Mapping[str, str] | None = None,
) -> psycopg.AsyncConnection[Any]:
    """Open a connection with the relay's session settings and deadlines: every connection of
    outbox is opened here. ``session`` replaces the relay's `session_settings` (the consumer's
    transactions run user code under other deadlines); unless ``writable`` is False (operator
    reads such as `outbox status`), a read-only standby is refused."""
    options = libpq_options(session_settings(settings) if session is None else session)
    what = f"connecting to {redact(settings.database_url)}"
    try:
        async with asyncio.timeout(settings.db_timeout + 1):
            conn = await psycopg.AsyncConnection.connect(
                settings.database_url, autocommit=autocommit,
                connect_timeout=max(1, int(settings.db_timeout)),
                application_name=f"outbox-{purpose}", options=options,
                # a peer gone silent is found by the kernel, with no query: the listener then
                # learns of it in seconds and pings (a transaction) only every LISTEN_PING
                keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
            )
    except Exception as exc:
        outbox_exc = translation(exc, what)
        if outbox_exc is None:
            raise
        msg = first_line(exc)
        if isinstance(outbox_exc, PermanentRefusal) and "certificate verify failed" in msg:
            why = await unverified_why(settings.database_url, msg, settings.db_timeout)
            outbox_exc = PermanentRefusal(f"{what}: {describe_tls(msg, why)}")
        raise outbox_exc from exc
    if writable and read_only(conn):
        # refused here rather than by the first claim, so the lane never reports the
        # database connected in between
        await conn.close()
        raise StoreUnavailable(READ_ONLY)
    return conn


def read_only(conn: psycopg.AsyncConnection[Any]) -> bool:
    """The server said at connect time that it is a hot standby or read-only by default
    (PostgreSQL 14+ reports both without a query; older servers fail the first write)."""
    info = conn.info
    return "on" in (info.parameter_status("in_hot_standby"),
                    info.parameter_status("default_transaction_read_only"))


def row_from_record(rec: Sequence[Any]) -> Row:
    (id_, message_id, exchange, routing_key, payload, payload_bytes, content_type, headers,
     ordering_key, message_type, correlation_id, created_at, attempts) = rec
    if payload is not None:
        body = payload.encode()
        ctype = content_type or JSON
    else:
        body = bytes(payload_bytes)
        ctype = content_type or OCTETS
    return Row(id_, message_id, exchange, routing_key, body, ctype,
               None if headers == "{}" else headers, ordering_key, message_type, correlation_id,
               created_at, attempts)


class PgSession:
    """One lane's connection; a claim opens a transaction that `settle` or `release` ends.

    The connection is in autocommit and the session sends BEGIN and COMMIT itself, in pipeline
    mode with the claim and with the settling writes: one round trip each, where psycopg's own
    transactions take two (a BEGIN before the first query, a COMMIT after the last).
    """

    def __init__(self, conn: psycopg.AsyncConnection[Any], settings: Settings) -> None:
        self.conn = conn
        self.settings = settings
        self.q: Queries = for_schema(settings.schema)
        self.on_sent = settings.on_sent

    async def claim(self, limit: int) -> list[Row]:
        with translate_errors("claiming rows"):
            async with deadline(self.conn, self.settings.db_timeout):
                async with self.conn.pipeline():
                    await self.conn.execute(self.q["begin"], prepare=True)
                    cur = await self.conn.execute(self.q["claim"], {"limit": limit},
                                                  prepare=True)
                recs = await cur.fetchall()
        return [row_from_record(r) for r in recs]

    async def settle(self, s: Settlement) -> int:
        with translate_errors("settling a batch"):
            async with deadline(self.conn, self.settings.db_timeout), self.conn.pipeline():
                if s.sent:
                    name = "delete_sent" if self.on_sent == "delete" else "mark_sent"
                    await self.conn.execute(self.q[name], {"ids": s.sent}, prepare=True)
                # one statement per kind of write, over parallel arrays (unnest)
                if s.retries:
                    await self.conn.execute(self.q["schedule_retry"], {
                        "ids": [r.id for r in s.retries],
                        "delays": [r.delay for r in s.retries],
                        "errors": [r.error for r in s.retries]})
                if s.parked:
                    await self.conn.execute(self.q["park_dead"], {
                        "ids": [p.id for p in s.parked],
                        "errors": [p.error for p in s.parked],
                        "counted": [1 if p.counted else 0 for p in s.parked]})
                await self.conn.execute(self.q["commit"], prepare=True)
                cur = await self.conn.execute(self.q["newest_id"], prepare=True)
            rec = await cur.fetchone()
        return int(rec[0]) if rec else 0

    async def release(self) -> None:
        # COMMIT, not ROLLBACK: the transaction only locked rows, so both end it the same way,
        # but psycopg forgets every prepared statement when it sees a ROLLBACK; the claim would
        # then be planned again at each execution, which costs more than running it.
        with translate_errors("releasing a batch"):
            async with deadline(self.conn, self.settings.db_timeout):
                await self.conn.execute(self.q["commit"], prepare=True)

    async def want_wakeups(self, wanted: bool) -> bool:
        with translate_errors("setting the wake-up flag"):
            async with deadline(self.conn, self.settings.db_timeout):
                try:
                    cur = await self.conn.execute(self.q["want_wakeups"], {"wanted": wanted},
                                                  prepare=True)
                except (pgerrors.UndefinedTable, pgerrors.InsufficientPrivilege) as exc:
                    raise WakeupFlagUnavailable(
                        f"the wake-up flag cannot be set ({first_line(exc)}): run `outbox "
                        "migrate`, then sql/roles.sql, to let the relay spare the producers "
                        "a NOTIFY while it is busy") from exc
        return cur.rowcount == 1

    async def newest_id(self) -> int:
        with translate_errors("probing for new rows"):
            async with deadline(self.conn, self.settings.db_timeout):
                cur = await self.conn.execute(self.q["newest_id"], prepare=True)
                rec = await cur.fetchone()
        assert rec is not None
        return int(rec[0])

    async def close(self) -> None:
        await self.conn.close()


class PgStore:
    """Opens lane sessions, listens for NOTIFY, and answers the operator's queries."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.q: Queries = for_schema(settings.schema)

    async def session(self) -> PgSession:
        conn = await connect(self.settings, autocommit=True, purpose="relay")
        return PgSession(conn, self.settings)

    async def listen(self, wake: Callable[[], None]) -> None:
        """LISTEN on the outbox channel and call ``wake`` per notification, until the
        connection fails (raises StoreUnavailable). TCP keepalives, and a ping after
        `LISTEN_PING` seconds of silence, find a dead peer."""
        conn = await connect(self.settings, autocommit=True, purpose="listen")
        try:
            with translate_errors("listening for notifications"):
                async with deadline(conn, self.settings.db_timeout):
                    await conn.execute(self.q["listen"])
                wake()  # rows may have arrived while we were not listening
                while True:
                    async for _ in conn.notifies(timeout=LISTEN_PING):
                        wake()
                    async with deadline(conn, self.settings.db_timeout):
                        await conn.execute(self.q["ping"])
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A short-lived autocommit connection for operator commands."""
        conn = await connect(self.settings, autocommit=True, purpose="admin", writable=False)
        try:
            with translate_errors("querying the outbox"):
                yield conn
        finally:
            await conn.close()

    async def stats(self) -> Stats:
        async with self.connection() as conn, deadline(conn, self.settings.db_timeout):
            cur = await conn.execute(self.q["status"])
            rec = await cur.fetchone()
        assert rec is not None
        (pending, ready, retrying, dead, blocked_keys, sent, oldest, held_back, horizon_age,
         pid, database, role, application_name, state, prepared, age, xids_since) = rec
        writer = None if xids_since is None else Writer(
            pid, database, role, application_name, state, prepared, age, xids_since)
        return Stats(pending, ready, retrying, dead, blocked_keys, sent, oldest, held_back,
                     horizon_age, writer)

    async def execute(self, name: str, params: dict[str, Any] | None = None) -> int:
        """Run one named statement in autocommit; returns the row count."""
        async with self.connection() as conn:
            cur = await conn.execute(self.q[name], params or {})
            return cur.rowcount

    async def fetch(self, name: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        async with self.connection() as conn:
            cur = await conn.execute(self.q[name], params or {})
            cols = [d.name for d in cur.description or ()]
            return [dict(zip(cols, r, strict=True)) for r in await cur.fetchall()]
