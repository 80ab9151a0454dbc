"""The ordering horizon in sight (docs/ordering.md, "The price of the horizon"): a transaction that
has written and stays open holds back every keyed row written after it began. `outbox status`
names it and counts the rows it holds, a running relay's gauges say the same, `outbox doctor`
warns about it, and all of it clears once it commits (then the rows flow, in id order).

On a shared server another session's writing transaction may be the oldest for a moment: checks
that name our transaction poll (with a deadline) until it is the oldest; the held-back count
does not depend on which transaction is oldest (every row of ours was written after ours began).
"""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import sql

from bench.postgres_node import PostgresNode
from outbox import migrate
from outbox.doctor import Doctor, Level
from outbox.settings import Settings
from outbox.store import PgStore, connect
from tests import support
from tests.integration.test_http import metric
from tests.support import as_role

pytestmark = pytest.mark.timeout(180)

HELD = 3  # keyed rows written (and committed) while the long transaction is open
WAIT = 60.0


def outbox(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(support.outbox_cmd(*args), env=support.relay_env(settings),
                          capture_output=True, text=True, timeout=90)


def status(settings: Settings) -> dict[str, Any]:
    proc = outbox(settings, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = orjson.loads(proc.stdout)
    return data


def poll_status(settings: Settings, want: Any) -> dict[str, Any]:
    """`outbox status --json` until ``want(data)``; the last answer, or TimeoutError."""
    last: dict[str, Any] = {}

    def check() -> bool:
        nonlocal last
        last = status(settings)
        return bool(want(last))

    try:
        support.eventually(check, WAIT, "the expected status", interval=0.2)
    except AssertionError:
        raise AssertionError(f"status never showed what was expected; last: {last}") from None
    return last


def horizon_lines(settings: Settings, threshold: float) -> list[str]:
    proc = outbox(settings, "doctor", f"--max-transaction-age={threshold:.3f}s")
    assert proc.stdout.splitlines()[-1].startswith("doctor: "), proc.stdout + proc.stderr
    return [line for line in proc.stdout.splitlines() if line.split()[1:2] == ["horizon"]]


def test_a_long_writing_transaction_is_shown_counted_warned_about_and_clears(
        settings: Settings, queue: str) -> None:
    insert = sql.SQL("INSERT INTO {}.outbox (routing_key, payload, ordering_key) "
                     "VALUES (%s, '1', 'order-7') RETURNING message_id::text").format(
        sql.Identifier(settings.schema))
    port = support.free_port()
    relay = support.start_relay(settings, OUTBOX_HTTP_PORT=str(port),
                                OUTBOX_STATS_INTERVAL="0.5")
    writer = psycopg.connect(settings.database_url, application_name="forgotten-begin")
    try:
        # T1 writes the key's first row and stays open (a forgotten BEGIN)
        first = writer.execute(insert, (queue,)).fetchone()
        pid = writer.info.backend_pid
        with psycopg.connect(settings.database_url, autocommit=True) as other:
            later = [other.execute(insert, (queue,)).fetchone() for _ in range(HELD)]
        assert first and all(later)

        mine = poll_status(settings, lambda d: (d["oldest_writer"] or {}).get("pid") == pid)
        assert mine["held_back_rows"] == HELD and mine["pending"] == HELD
        w = mine["oldest_writer"]
        db, role = writer.info.dbname, writer.info.user
        assert w["database"] == db and w["role"] == role and w["prepared"] is None
        assert w["application_name"] == "forgotten-begin" and w["state"] == "idle in transaction"
        assert w["age_seconds"] > 0 and mine["horizon_age_seconds"] >= w["age_seconds"] * 0.99
        assert w["xids_since"] >= HELD  # each later insert took a transaction id

        text = outbox(settings, "status")
        assert text.returncode == 0, text.stderr
        print(text.stdout)  # the report shows it
        assert f"held back    {HELD} keyed rows" in text.stdout
        assert f"pid {pid} (database {db}, role {role}, application forgotten-begin" \
            in text.stdout

        # the running relay publishes none of them, and its gauges say why
        support.eventually(lambda: metric(port, "outbox_held_back_rows") == HELD, WAIT)
        support.eventually(lambda: metric(port, "outbox_horizon_age_seconds") > 0, WAIT)
        assert support.count(settings) == HELD

        # our transaction is at least this old now (an age only grows): doctor must name it
        threshold = status(settings)["oldest_writer"]["age_seconds"] or 0.0
        lines = horizon_lines(settings, threshold)
        assert any(line.startswith("warn") and f"pid {pid} " in line
                   and "pg_terminate_backend" in line for line in lines), lines

        writer.commit()
        cleared = poll_status(settings, lambda d: d["held_back_rows"] == 0
                              and (d["oldest_writer"] or {}).get("pid") != pid)
        assert cleared["pending"] in range(HELD + 2)  # the relay may have published some
        support.eventually(lambda: metric(port, "outbox_held_back_rows") == 0, WAIT)
        assert not [line for line in horizon_lines(settings, threshold) if f"pid {pid} " in line]

        # and the key flows, in id order, the held transaction's row first
        async def consume() -> list[str]:
            async with support.Collector([queue]) as consumer:
                await consumer.reached(HELD + 1, WAIT)
                await consumer.quiet(0.3)
                return consumer.message_ids
        assert asyncio.run(consume()) == [first[0], *(r[0] for r in later if r)]
    finally:
        writer.close()
        code = support.stop_process(relay)
    assert code == 0



def test_the_relay_role_sees_the_writer_but_not_its_age(
        settings: Settings, roles: dict[str, str]) -> None:
    """The least-privilege relay role of sql/roles.sql: PostgreSQL hides another role's
    xact_start from it, so the writer is named without an age, the gauge's age falls back to the
    oldest held-back row's, and doctor says how many writers it could not date."""
    as_relay = settings.replace(database_url=as_role(roles["relay_role"]))
    insert = sql.SQL("INSERT INTO {}.outbox (routing_key, payload, ordering_key) "
                     "VALUES ('r', '1', 'k')").format(sql.Identifier(settings.schema))
    writer = psycopg.connect(settings.database_url)  # as the owner, another role
    try:
        writer.execute(insert)
        pid = writer.info.backend_pid
        with psycopg.connect(settings.database_url, autocommit=True) as other:
            other.execute(insert)
            other.execute(insert)
        data = poll_status(as_relay, lambda d: (d["oldest_writer"] or {}).get("pid") == pid)
        assert data["held_back_rows"] == 2
        assert data["oldest_writer"]["age_seconds"] is None
        assert data["oldest_writer"]["database"] == writer.info.dbname
        assert data["horizon_age_seconds"] > 0  # the oldest held-back row's age
        text = outbox(as_relay, "status").stdout
        assert "age hidden from this role: grant it pg_read_all_stats" in text, text
        lines = horizon_lines(as_relay, 0.0)
        assert [line for line in lines if line.startswith("ok")
                and "of other roles not dated" in line], lines
    finally:
        writer.close()


async def test_a_forgotten_prepared_transaction_is_named_and_warned_about() -> None:
    """A prepared (two-phase) transaction that nobody commits holds keyed rows back like an open
    one, but has no session. The shared server allows none (max_prepared_transactions = 0), so
    this runs on a private cluster, where nothing else writes."""
    with PostgresNode(settings={"max_prepared_transactions": "2"}) as node:
        settings = support.make_settings("public", database_url=node.url)
        migrate.upgrade(settings)
        insert = "INSERT INTO outbox (routing_key, payload, ordering_key) VALUES ('r', '1', 'k')"
        with psycopg.connect(node.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE ledger (n int)")
            # (not the outbox: its trigger's NOTIFY cannot be part of a prepared transaction)
            conn.execute("BEGIN")
            conn.execute("INSERT INTO ledger VALUES (1)")
            conn.execute("PREPARE TRANSACTION 'forgotten-2pc'")
            conn.execute(insert)
            conn.execute(insert)
        store = PgStore(settings)
        stats = await store.stats()
        assert stats.held_back_rows == 2
        w = stats.oldest_writer
        assert w is not None and w.prepared == "forgotten-2pc" and w.pid is None
        assert w.state == "prepared" and w.database == "postgres" and w.role == "postgres"
        assert w.age_seconds is not None and stats.horizon_age_seconds == w.age_seconds
        assert "prepared transaction 'forgotten-2pc' (database postgres" in \
            outbox(settings, "status").stdout

        found = Doctor(settings, max_transaction_age=0.0)
        conn = await connect(settings, autocommit=True, purpose="test")
        try:
            await found.check_horizon(conn)
        finally:
            await conn.close()
        [finding] = found.findings
        assert finding.level is Level.WARN and "'forgotten-2pc'" in finding.message
        assert "COMMIT PREPARED 'forgotten-2pc'" in finding.fix

        with psycopg.connect(node.url, autocommit=True) as conn:
            conn.execute("COMMIT PREPARED 'forgotten-2pc'")
        stats = await store.stats()
        assert stats.held_back_rows == 0 and stats.oldest_writer is None
        assert stats.horizon_age_seconds == 0 and stats.pending == 2
