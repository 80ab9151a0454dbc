"""`outbox doctor`: checks a deployment end to end and prints one actionable line per finding.

Settings, database reachability and the relay's privileges, schema revision against this
version's head, the indexes, trigger and autovacuum settings the migration creates, the NOTIFY
path through the configured connection (LISTEN on one connection, ``pg_notify`` from another:
behind a transaction-mode pooler the notification never arrives and the relay silently falls
back to polling), writing or prepared transactions open longer than a limit (they hold keyed
rows back), broker reachability, and a confirmed ``mandatory`` publish of a probe message (proves
write permission without delivering anything on the default exchange).

Exit status: 0 when no finding is a FAIL, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

import aiormq
import psycopg
from aiormq import exceptions as amqp_exc
from pamqp import commands as spec

from outbox import amqp, logs, migrate
from outbox.exceptions import BrokerUnavailable, ConfigError, OutboxError, PermanentRefusal
from outbox.settings import Settings, redact
from outbox.sql import channel_name, for_schema
from outbox.store import READ_ONLY, connect, session_settings, translate_errors

# What migration 0001 creates; doctor reports anything missing or different.
EXPECTED_INDEXES = {
    "outbox_pkey": "outbox", "outbox_message_id_key": "outbox",
    "outbox_pending_idx": "outbox", "outbox_ordering_key_idx": "outbox",
    "outbox_dead_idx": "outbox", "outbox_sent_idx": "outbox",
    "inbox_pkey": "inbox", "inbox_processed_at_idx": "inbox",
}
EXPECTED_RELOPTIONS = {
    "autovacuum_vacuum_scale_factor": "0",
    "autovacuum_vacuum_threshold": "5000",
    "autovacuum_vacuum_insert_scale_factor": "0",
    "autovacuum_vacuum_insert_threshold": "20000",
    "autovacuum_analyze_scale_factor": "0",
    "autovacuum_analyze_threshold": "20000",
    "autovacuum_vacuum_cost_delay": "0",
}
PROBE_TYPE = "outbox.doctor.probe"
NOTIFY_WAIT = 3.0
# A writing transaction open this long holds every keyed row written since (docs/ordering.md).
MAX_TRANSACTION_AGE = 60.0
_LOCAL_HOSTS = ("", "localhost", "127.0.0.1", "::1")


class Level(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Finding:
    """One result of a check; ``fix`` says what to do about a warn or a FAIL."""

    level: Level
    check: str
    message: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.level.value:<4}  {self.check:<9} {self.message}"
        return logs.scrub(f"{text} -> fix: {self.fix}" if self.fix else text)


@dataclass
class Doctor:
    """Runs the checks in order; a failed prerequisite skips the checks that depend on it."""

    settings: Settings
    exchanges: Sequence[str] = ()
    notify_wait: float = NOTIFY_WAIT
    max_transaction_age: float = MAX_TRANSACTION_AGE
    findings: list[Finding] = field(default_factory=list)

    def add(self, level: Level, check: str, message: str, fix: str = "") -> None:
        self.findings.append(Finding(level, check, message, fix))

    async def run(self) -> list[Finding]:
        try:
            psycopg.conninfo.conninfo_to_dict(self.settings.database_url)
        except psycopg.Error as exc:
            self.add(Level.FAIL, "settings", f"OUTBOX_DATABASE_URL is not a valid libpq URL: "
                     f"{str(exc).strip()}",
                     "see the libpq connection URI parameters (sslmode, sslrootcert…)")
        else:
            self.check_database_security()
            await self.check_database()
        self.check_broker_security()
        await self.check_broker()
        return self.findings

    # -- settings --------------------------------------------------------------------------------

    def check_database_security(self) -> None:
        s = self.settings
        db = psycopg.conninfo.conninfo_to_dict(s.database_url)
        host = str(db.get("host") or "")
        sslmode = str(db.get("sslmode") or "prefer")
        if host.startswith("/") or host in _LOCAL_HOSTS:
            self.add(Level.OK, "settings", "database on this host (TLS not needed)")
        elif sslmode in ("verify-full", "verify-ca"):
            self.add(Level.OK, "settings", f"database TLS: sslmode={sslmode}")
        else:
            self.add(Level.WARN, "settings",
                     f"database connection to {host} is not verified TLS (sslmode={sslmode})",
                     "add ?sslmode=verify-full&sslrootcert=/path/ca.crt to the database URL")

    def check_broker_security(self) -> None:
        for url in self.settings.amqp_urls:
            parts = urlsplit(url)
            query = parse_qs(parts.query)
            if parts.scheme == "amqps" and query.get("no_verify_ssl", ["0"])[0] != "0":
                self.add(Level.WARN, "settings",
                         f"broker {redact(url)}: TLS without certificate verification",
                         "drop no_verify_ssl and give cafile=/path/ca.crt")
            elif parts.scheme == "amqp" and (parts.hostname or "") not in _LOCAL_HOSTS:
                self.add(Level.WARN, "settings", f"broker {redact(url)}: not TLS",
                         "use amqps://host:5671/vhost?cafile=/path/ca.crt")
            else:
                self.add(Level.OK, "settings", f"broker {redact(url)}")

    # -- database --------------------------------------------------------------------------------

    async def check_database(self) -> None:
        s = self.settings
        where = redact(s.database_url)
        try:
            conn = await connect(s, autocommit=True, purpose="doctor")
        except OutboxError as exc:
            if str(exc) == READ_ONLY:  # it names its own fix
                self.add(Level.FAIL, "database", f"{where}: {exc}")
            else:
                self.add(Level.FAIL, "database", str(exc),
                         "check the host, port, credentials and sslmode of OUTBOX_DATABASE_URL")
            return
        try:
            user, version, version_num, autovacuum = await self._one(conn, "doctor_server", {})
            self.add(Level.OK, "database",
                     f"connected to {where} as {user} (PostgreSQL {version})")
            if version_num < 130000:
                self.add(Level.FAIL, "database", f"PostgreSQL {version} is too old",
                         "use PostgreSQL 13 or newer (xid8 and pg_current_snapshot)")
            await self.check_session(conn)
            if not autovacuum:
                self.add(Level.WARN, "vacuum", "autovacuum is off on this server: the outbox "
                         "table will bloat", "set autovacuum = on in postgresql.conf")
            await self.check_horizon(conn)
            if await self.check_schema(conn):
                await self.check_privileges(conn)
                await self.check_indexes(conn)
                await self.check_notify(conn)
        except OutboxError as exc:
            self.add(Level.FAIL, "database", str(exc))
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _all(self, conn: psycopg.AsyncConnection[Any], name: str,
                   params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        with translate_errors(f"doctor query {name}"):
            async with asyncio.timeout(self.settings.db_timeout):
                cur = await conn.execute(for_schema(self.settings.schema)[name], params)
                return await cur.fetchall()

    async def _one(self, conn: psycopg.AsyncConnection[Any], name: str,
                   params: Mapping[str, Any]) -> tuple[Any, ...]:
        rows = await self._all(conn, name, params)
        return rows[0]

    async def check_session(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """The relay bounds every query with session settings sent at connect time (libpq
        ``options``); a pooler that drops startup parameters silently removes those bounds."""
        expected = session_settings(self.settings)
        timeout_ms = expected["statement_timeout"]
        actual = dict(await self._all(conn, "doctor_session", {}))
        wrong = {k: actual.get(k) for k, v in expected.items() if actual.get(k) != v}
        if not wrong:
            self.add(Level.OK, "database", "session settings applied (statement_timeout "
                     f"{timeout_ms}ms, synchronous_commit off, jit off)")
            return
        shown = ", ".join(f"{k}={v}" for k, v in wrong.items())
        role = "ALTER ROLE <relay role> SET"
        self.add(Level.WARN, "database", f"the relay's session settings were not applied "
                 f"({shown}): a pooler that drops startup parameters? Queries lose their "
                 "server-side deadline", "connect directly, or set them on the role: "
                 + "; ".join(f"{role} {k} = '{v}'" for k, v in expected.items()))

    async def check_horizon(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """A transaction that has written and stays open (a forgotten BEGIN, a long migration, a
        prepared transaction nobody finished) holds back every keyed row written after it
        began, in every database of the cluster: the claim waits for it (docs/ordering.md)."""
        writers = await self._all(conn, "doctor_horizon", {})
        limit = self.max_transaction_age
        old = [w for w in writers if w[6] is not None and w[6] >= limit]
        undated = sum(1 for w in writers if w[6] is None)
        for pid, database, role, application, state, prepared, age in old[:5]:
            if prepared is not None:
                self.add(Level.WARN, "horizon", f"prepared transaction {prepared!r} (database "
                         f"{database}, owner {role}) was prepared {age:.0f}s ago and is not "
                         "finished: keyed rows written since are held back",
                         f"COMMIT PREPARED '{prepared}' or ROLLBACK PREPARED '{prepared}' "
                         f"in database {database}")
            else:
                self.add(Level.WARN, "horizon", f"pid {pid} (database {database}, role {role}"
                         + (f", application {application}" if application else "")
                         + f", {state}) has written and stayed open {age:.0f}s: keyed rows "
                         "written since are held back",
                         f"end it (commit or roll back; SELECT pg_terminate_backend({pid}) "
                         "as a last resort); `outbox status` shows the rows it holds back")
        if len(old) > 5:
            self.add(Level.WARN, "horizon", f"{len(old) - 5} more writing transactions open "
                     f"longer than {limit:g}s")
        if not old:
            hidden = (f" ({undated} of other roles not dated: PostgreSQL hides their age "
                      "from this role without pg_read_all_stats)") if undated else ""
            self.add(Level.OK, "horizon", f"no writing or prepared transaction open longer "
                     f"than {limit:g}s{hidden}")

    async def check_schema(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Reports the revision; True when the tables are there to check further."""
        schema = self.settings.schema
        tables = dict(await self._all(conn, "doctor_tables", {"schema": schema}))
        head = migrate.head_revision()
        if "outbox" not in tables:
            self.add(Level.FAIL, "schema", f"no outbox table in schema {schema!r} "
                     f"(not migrated; this version's head is {head})",
                     f"run `outbox migrate` (with OUTBOX_SCHEMA={schema}) as the tables' owner")
            return False
        current = None
        if "outbox_schema_version" in tables:
            try:
                rows = await self._all(conn, "doctor_revision", {})
                current = rows[0][0] if rows else None
            except OutboxError as exc:
                self.add(Level.WARN, "schema", f"cannot read the revision: {exc}",
                         "GRANT SELECT ON outbox_schema_version to this role (sql/roles.sql)")
                self.check_reloptions(tables["outbox"])
                return True
        known = migrate_revisions()
        if current == head:
            self.add(Level.OK, "schema", f"schema {schema!r} at revision {head} (head)")
        elif current is None:
            self.add(Level.FAIL, "schema", f"schema {schema!r} has an outbox table but no "
                     "migration revision", "run `outbox migrate`, or check OUTBOX_SCHEMA")
        elif current in known:
            self.add(Level.FAIL, "schema", f"schema {schema!r} at revision {current}, "
                     f"this version needs {head}", "run `outbox migrate`")
        else:
            self.add(Level.WARN, "schema", f"schema {schema!r} at revision {current}, "
                     f"unknown to this version (head {head}): migrated by a newer outbox?",
                     "run the same outbox version as the migration Job")
        if "inbox" not in tables:
            self.add(Level.WARN, "schema", f"no inbox table in schema {schema!r}",
                     "run `outbox migrate` if consumers use the inbox")
        self.check_reloptions(tables["outbox"])
        return True

    def check_reloptions(self, reloptions: Iterable[str]) -> None:
        actual = dict(opt.split("=", 1) for opt in reloptions)
        wrong = {k: v for k, v in EXPECTED_RELOPTIONS.items() if actual.get(k) != v}
        if not wrong:
            self.add(Level.OK, "vacuum", "outbox table has its autovacuum settings")
            return
        table = f"{self.settings.schema}.outbox"
        settings = ", ".join(f"{k} = {v}" for k, v in wrong.items())
        self.add(Level.WARN, "vacuum",
                 f"outbox table lacks autovacuum settings {', '.join(wrong)}: a queue table "
                 "bloats under the default thresholds", f"ALTER TABLE {table} SET ({settings})")

    async def check_privileges(self, conn: psycopg.AsyncConnection[Any]) -> None:
        rows = await self._all(conn, "doctor_privileges", {"schema": self.settings.schema})
        can_select, can_delete, can_settle, owner, superuser, can_flag = rows[0]
        missing = [what for what, ok in (("SELECT", can_select), ("DELETE", can_delete),
                                         ("UPDATE of the bookkeeping columns", can_settle))
                   if not ok]
        if missing:
            self.add(Level.FAIL, "grants", f"this role lacks {', '.join(missing)} on outbox",
                     "run sql/roles.sql and connect as the relay role it creates")
        elif superuser or owner:
            self.add(Level.WARN, "grants", "the relay connects as "
                     f"{'a superuser' if superuser else 'the owner of the outbox table'} "
                     "(it can run DDL)", "use the least-privilege relay role of sql/roles.sql")
        elif can_flag is False:
            self.add(Level.WARN, "grants", "this role cannot UPDATE outbox_wakeup, so the relay "
                     "cannot spare the producers a NOTIFY while it is busy (notifying commits "
                     "are serialised by the server)", "run sql/roles.sql again")
        else:
            self.add(Level.OK, "grants", "role has the relay's privileges and no ownership")

    async def check_indexes(self, conn: psycopg.AsyncConnection[Any]) -> None:
        schema = self.settings.schema
        found = dict(await self._all(conn, "doctor_indexes", {"schema": schema}))
        problems = False
        for name, table in EXPECTED_INDEXES.items():
            if name not in found:
                if table == "inbox" and not any(n.startswith("inbox") for n in found):
                    continue  # no inbox table: reported by the schema check
                problems = True
                self.add(Level.FAIL, "indexes", f"index {name} on {table} is missing",
                         "recreate it as in alembic/versions/0001 (or migrate a fresh schema)")
            elif not found[name]:
                problems = True
                self.add(Level.FAIL, "indexes", f"index {name} is invalid (a failed "
                         "concurrent build?)", f"REINDEX INDEX {schema}.{name}")
        trigger = await self._all(conn, "doctor_trigger", {"schema": schema})
        if not trigger:
            problems = True
            self.add(Level.FAIL, "indexes", "trigger outbox_notify is missing: inserts wake "
                     "no relay (it polls)", "recreate it (alembic/versions/0001)")
        elif trigger[0][0] == "D":
            problems = True
            self.add(Level.FAIL, "indexes", "trigger outbox_notify is disabled",
                     f"ALTER TABLE {schema}.outbox ENABLE TRIGGER outbox_notify")
        if not problems:
            self.add(Level.OK, "indexes", f"{len(EXPECTED_INDEXES)} indexes valid, "
                     "NOTIFY trigger enabled")

    async def check_notify(self, listener: psycopg.AsyncConnection[Any]) -> None:
        s = self.settings
        channel = channel_name(s.schema)
        with translate_errors("LISTEN"):
            async with asyncio.timeout(s.db_timeout):
                await listener.execute(for_schema(s.schema)["listen"])
        try:
            sender = await connect(s, autocommit=True, purpose="doctor-notify")
        except OutboxError as exc:
            self.add(Level.FAIL, "notify", f"second connection failed: {exc}")
            return
        try:
            await self._all(sender, "doctor_notify", {"channel": channel})
        finally:
            with contextlib.suppress(Exception):
                await sender.close()
        arrived = False
        with translate_errors("waiting for a notification"):
            async for note in listener.notifies(timeout=self.notify_wait):
                if note.channel == channel:
                    arrived = True
                    break
        if arrived:
            self.add(Level.OK, "notify", f"LISTEN/NOTIFY on {channel!r} works through this "
                     "connection")
        else:
            self.add(Level.FAIL, "notify", f"a NOTIFY on {channel!r} did not arrive within "
                     f"{self.notify_wait:g}s: an idle relay would find rows only by its "
                     f"safety poll (every {2 * s.poll_interval:g}s). A transaction-mode pooler "
                     "(PgBouncer "
                     "pool_mode=transaction) drops LISTEN",
                     "connect the relay to PostgreSQL directly or through a session-mode pool")

    # -- broker ----------------------------------------------------------------------------------

    async def check_broker(self) -> None:
        s = self.settings
        connected: aiormq.abc.AbstractConnection | None = None
        failures: list[tuple[str, str]] = []
        try:
            for url in s.amqp_urls:
                full = amqp.with_defaults(url, s.heartbeat, s.db_timeout)
                try:
                    conn = await amqp.connect(full, s.db_timeout + 1)
                except (BrokerUnavailable, PermanentRefusal) as exc:
                    # reported against the URL as configured, not with the defaults added
                    failures.append((url, amqp.describe_connect_error(exc.__cause__ or exc, url)))
                    continue
                props = conn.server_properties or {}
                product = f"{_text(props.get('product'))} {_text(props.get('version'))}"
                self.add(Level.OK, "broker", f"connected to {redact(url)} ({product.strip()})")
                if connected is None:
                    connected = conn
                else:
                    await amqp.close_quietly(conn)
            level = Level.WARN if connected is not None else Level.FAIL
            for url, problem in failures:
                self.add(level, "broker", f"{redact(url)}: {problem}",
                         "check the host, port, credentials, vhost and TLS of OUTBOX_AMQP_URL")
            if connected is not None:
                if not connected.publisher_confirms:
                    self.add(Level.FAIL, "broker", "the broker does not offer publisher "
                             "confirms", "use RabbitMQ (or a broker with confirm.select)")
                    return
                for exchange in self.exchanges or [""]:
                    await self.probe_publish(connected, exchange)
        finally:
            if connected is not None:
                await amqp.close_quietly(connected)

    async def probe_publish(self, conn: aiormq.abc.AbstractConnection, exchange: str) -> None:
        """Publish one empty, already-expired probe with ``mandatory`` and await its confirm."""
        s = self.settings
        name = f"exchange {exchange!r}" if exchange else "the default exchange"
        routing_key = f"outbox-doctor.{uuid.uuid4().hex}"  # no queue has this name
        check = "publish"
        try:
            async with asyncio.timeout(s.publish_timeout):
                channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
                if exchange:
                    await channel.exchange_declare(exchange, passive=True)
                await channel.basic_publish(
                    b"", exchange=exchange, routing_key=routing_key, mandatory=True,
                    properties=spec.Basic.Properties(
                        message_id=str(uuid.uuid4()), message_type=PROBE_TYPE,
                        app_id=s.app_id, delivery_mode=1, expiration="0"))
        except amqp_exc.PublishError:
            self.add(Level.OK, check, f"the broker accepted and confirmed a publish to {name} "
                     "(returned as unroutable, as intended: write permission ok)")
            return
        except amqp_exc.ChannelAccessRefused as exc:
            self.add(Level.FAIL, check, f"no write permission on {name}: {exc}",
                     "rabbitmqctl set_permissions -p VHOST USER '^$' '^(EXCHANGES)$' '^$' "
                     "(docs/operations.md)" + ("" if exchange else "; if every row names an "
                                               "exchange, rerun with --exchange NAME"))
            return
        except amqp_exc.ChannelNotFoundEntity:
            self.add(Level.FAIL, check, f"{name} does not exist: its rows would be parked dead",
                     "declare the exchange (your topology, not the relay, owns it)")
            return
        except amqp_exc.DeliveryError:
            self.add(Level.FAIL, check, f"the broker nacked a publish to {name}",
                     "check the broker's logs (queue limits, internal errors)")
            return
        except TimeoutError:
            self.add(Level.FAIL, check, f"no confirm for a publish to {name} within "
                     f"{s.publish_timeout:g}s", "check the broker's memory and disk alarms "
                     "(rabbitmq-diagnostics alarms)")
            return
        except Exception as exc:  # any other failure of the channel or connection
            self.add(Level.FAIL, check, f"publishing to {name} failed: "
                     f"{exc or type(exc).__name__}")
            return
        self.add(Level.OK, check, f"the broker confirmed a publish to {name}; it was routed "
                 f"to a queue (a consumer may see one empty message of type {PROBE_TYPE})")


def migrate_revisions() -> set[str]:
    """Every revision this version of outbox knows."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(migrate.script_location()))
    return {rev.revision for rev in script.walk_revisions()}


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


async def diagnose(overrides: Mapping[str, Any], exchanges: Sequence[str] = (),
                   environ: Mapping[str, str] | None = None,
                   notify_wait: float = NOTIFY_WAIT,
                   max_transaction_age: float = MAX_TRANSACTION_AGE) -> list[Finding]:
    """Load the settings (flags ``overrides``, environment) and run every check."""
    try:
        settings = Settings.load(overrides, environ)
    except ConfigError as exc:
        return [Finding(Level.FAIL, "settings", str(exc), "fix the setting; `outbox relay "
                        "--help` lists every one with its variable")]
    doctor = Doctor(settings, exchanges, notify_wait, max_transaction_age)
    doctor.add(Level.OK, "settings", f"loaded (schema {settings.schema!r}, "
               f"{len(settings.amqp_urls)} broker URL(s))")
    return await doctor.run()


def report(findings: Sequence[Finding], out: TextIO | None = None) -> int:
    """Print one line per finding and a summary; returns the exit status (1 on any FAIL)."""
    stream = out or sys.stdout
    for finding in findings:
        print(finding.line(), file=stream)
    counts = {level: sum(f.level is level for f in findings) for level in Level}
    print(f"doctor: {counts[Level.OK]} ok, {counts[Level.WARN]} warn, "
          f"{counts[Level.FAIL]} FAIL", file=stream)
    return 1 if counts[Level.FAIL] else 0
