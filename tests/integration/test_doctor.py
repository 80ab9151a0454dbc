"""`outbox doctor` against the real PostgreSQL and RabbitMQ: quiet on a healthy setup, a FAIL line
with its fix and exit 1 when something a relay needs is broken."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path
from typing import Any

import aiormq
import psycopg
import pytest
from psycopg import sql

from outbox import doctor
from outbox.doctor import Finding, Level
from outbox.settings import Settings
from outbox.store import connect
from tests import support
from tests.rabbit_node import RabbitNode

pytestmark = pytest.mark.timeout(120)

UNREACHABLE_AMQP = "amqp://guest:guest@127.0.0.1:1/"


def run_doctor(settings: Settings, *args: str, **env: str) -> tuple[int, list[str]]:
    """`outbox doctor` as a real process; returns its exit status and its output lines."""
    out = subprocess.run(support.outbox_cmd("doctor", *args),
                         env=support.relay_env(settings, **env),
                         capture_output=True, text=True, timeout=90)
    assert ":guest@" not in out.stdout + out.stderr, "a password leaked"
    lines = out.stdout.splitlines()
    assert lines and lines[-1].startswith("doctor: "), out.stdout + out.stderr
    for line in lines[:-1]:
        assert line.split()[0] in ("ok", "warn", "FAIL"), line
    return out.returncode, lines[:-1]


def levels(lines: list[str], check: str) -> list[str]:
    return [line.split()[0] for line in lines if line.split()[1] == check]


def test_healthy_setup_exits_0(settings: Settings) -> None:
    code, lines = run_doctor(settings)
    assert code == 0, "\n".join(lines)
    assert not [line for line in lines if line.startswith("FAIL")]
    for check in ("database", "schema", "indexes", "notify", "broker", "publish"):
        assert levels(lines, check) and set(levels(lines, check)) <= {"ok", "warn"}, check
    assert "ok" in levels(lines, "notify")
    assert "ok" in levels(lines, "publish")


def test_unmigrated_schema_is_a_fail(settings: Settings) -> None:
    empty = settings.replace(schema=support.unique("none"))  # never created
    code, lines = run_doctor(empty)
    assert code == 1
    (schema_line,) = [line for line in lines if line.split()[1] == "schema"]
    assert schema_line.startswith("FAIL") and "outbox migrate" in schema_line
    assert levels(lines, "broker") == ["ok"]  # the broker is still checked


def test_wrong_broker_url_is_a_fail(settings: Settings) -> None:
    code, lines = run_doctor(settings.replace(amqp_url=UNREACHABLE_AMQP))
    assert code == 1
    assert levels(lines, "broker") == ["FAIL"]
    assert "127.0.0.1:1" in next(line for line in lines if line.startswith("FAIL"))
    assert set(levels(lines, "database")) == {"ok"}
    assert levels(lines, "notify") == ["ok"]


def test_bad_setting_is_a_fail_not_a_traceback(settings: Settings) -> None:
    code, lines = run_doctor(settings, OUTBOX_BATCH_SIZE="0")
    assert code == 1
    assert lines[0].startswith("FAIL  settings") and "OUTBOX_BATCH_SIZE" in lines[0]


async def test_missing_exchange_and_broken_schema_objects_are_reported(
    settings: Settings,
) -> None:
    s = sql.Identifier(settings.schema)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP INDEX {}.outbox_pending_idx").format(s))
        conn.execute(sql.SQL("ALTER TABLE {}.outbox DISABLE TRIGGER outbox_notify").format(s))
        conn.execute(sql.SQL("ALTER TABLE {}.outbox RESET (autovacuum_vacuum_threshold)")
                     .format(s))
    missing = support.unique("no_such_exchange")
    findings = await doctor.diagnose(
        {"database_url": settings.database_url, "amqp_url": settings.amqp_url,
         "schema": settings.schema}, exchanges=["amq.direct", missing], environ={})

    def at(check: str) -> list[Finding]:
        return [f for f in findings if f.check == check]

    indexes = at("indexes")
    assert {f.level for f in indexes} == {Level.FAIL}
    assert any("outbox_pending_idx" in f.message for f in indexes)
    assert any("ENABLE TRIGGER" in f.fix for f in indexes)
    (vacuum,) = [f for f in at("vacuum") if "autovacuum_vacuum_threshold" in f.message]
    assert vacuum.level is Level.WARN and "SET (autovacuum_vacuum_threshold = 5000)" in vacuum.fix
    publish = {f.message.split(" does not exist")[0]: f.level for f in at("publish")}
    assert publish[f"exchange {missing!r}"] is Level.FAIL
    assert [f.level for f in at("publish") if "'amq.direct'" in f.message] == [Level.OK]
    out = io.StringIO()
    assert doctor.report(findings, out) == 1
    assert out.getvalue().count("\n") == len(findings) + 1


def rabbitmqctl(node: RabbitNode, *args: str) -> None:
    """``rabbitmqctl -n <node> ...`` as the rabbitmq user (it holds the Erlang cookie)."""
    kwargs: dict[str, Any] = {}
    env = dict(os.environ)
    if os.geteuid() == 0:
        kwargs.update(user="rabbitmq", group="rabbitmq")
        env["HOME"] = "/var/lib/rabbitmq"
    out = subprocess.run(["/usr/lib/rabbitmq/bin/rabbitmqctl", "-n", node.nodename, *args],
                         env=env, capture_output=True, timeout=60, cwd="/tmp", **kwargs)
    assert out.returncode == 0, out.stderr.decode()[-500:]


async def test_publish_permissions_as_documented(settings: Settings, tmp_path: Path) -> None:
    """On a private node, a user with the documented permissions (configure and read nothing,
    write on its exchanges and amq.default) passes; an exchange outside them is a FAIL."""
    with RabbitNode(tmp_path) as node:
        conn = await aiormq.connect(node.url)
        try:
            channel = await conn.channel()
            for name in ("orders", "other"):
                await channel.exchange_declare(name, exchange_type="topic", durable=True)
        finally:
            await conn.close()
        rabbitmqctl(node, "add_user", "relay", "s3cret-pw")
        rabbitmqctl(node, "set_permissions", "-p", "/", "relay", "^$",
                    r"^(orders|amq\.default)$", "^$")
        findings = await doctor.diagnose(
            {"database_url": settings.database_url, "schema": settings.schema,
             "amqp_url": f"amqp://relay:s3cret-pw@127.0.0.1:{node.port}/"},
            exchanges=["", "orders", "other"], environ={})
    publish = [f for f in findings if f.check == "publish"]
    assert [f.level for f in publish] == [Level.OK, Level.OK, Level.FAIL], publish
    assert "default exchange" in publish[0].message
    assert "no write permission on exchange 'other'" in publish[2].message
    assert "set_permissions" in publish[2].fix
    assert all("s3cret-pw" not in f.line() for f in findings)


async def test_session_settings_dropped_by_a_pooler_are_reported(settings: Settings) -> None:
    """A connection without the relay's startup options (what a pooler that drops them hands
    out) is reported with the ALTER ROLE statements that restore them."""
    checker = doctor.Doctor(settings)
    async with await psycopg.AsyncConnection.connect(settings.database_url,
                                                     autocommit=True) as plain:
        await checker.check_session(plain)
    (finding,) = checker.findings
    assert finding.level is Level.WARN and "statement_timeout=0" in finding.message
    assert "SET statement_timeout = '5000'" in finding.fix
    assert "SET jit = 'off'" in finding.fix
    checker.findings.clear()
    relay_like = await connect(settings, autocommit=True, purpose="test")
    try:
        await checker.check_session(relay_like)
    finally:
        await relay_like.close()
    assert [f.level for f in checker.findings] == [Level.OK]
