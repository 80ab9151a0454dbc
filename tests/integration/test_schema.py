"""The producer contract: the table refuses bad rows with a named constraint; migrations."""

from __future__ import annotations

import subprocess

import psycopg
import pytest
from psycopg import errors, sql

from outbox import migrate
from outbox.settings import Settings
from tests import support


def insert(settings: Settings, columns: str, *values: object) -> None:
    marks = ", ".join(["%s"] * len(values))
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL(f"INSERT INTO {{}}.outbox ({columns}) VALUES ({marks})").format(
            sql.Identifier(settings.schema)), values)


def test_the_minimal_insert_from_any_language_works(settings: Settings) -> None:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(f"""INSERT INTO "{settings.schema}".outbox (routing_key, payload) """
                     """VALUES ('orders.created', '{"id": 1}')""")
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(sql.SQL(
            "SELECT exchange, headers, message_id IS NOT NULL, available_at <= now(), "
            "created_at <= now() FROM {}.outbox").format(sql.Identifier(settings.schema))
        ).fetchone()
    assert row == ("", {}, True, True, True)


@pytest.mark.parametrize(("columns", "values", "constraint"), [
    ("routing_key", ("rk",), "outbox_exactly_one_payload"),
    ("routing_key, payload, payload_bytes", ("rk", "{}", b"\x01"),
     "outbox_exactly_one_payload"),
    ("routing_key, payload, headers", ("rk", "{}", "[1, 2]"), "outbox_headers_is_object"),
    ("routing_key, payload, headers", ("rk", "{}", '"text"'), "outbox_headers_is_object"),
    ("routing_key, payload", ("", "{}"), "outbox_routing_key_not_empty"),
    ("routing_key, payload, ordering_key", ("rk", "{}", ""),
     "outbox_ordering_key_not_empty"),
    # what AMQP cannot carry (alembic/versions/0003)
    ("routing_key, payload", ("é" * 128, "{}"), "outbox_routing_key_at_most_255_bytes"),
    ("routing_key, payload, exchange", ("rk", "{}", "x" * 256),
     "outbox_exchange_at_most_255_bytes"),
    ("routing_key, payload, content_type", ("rk", "{}", "x" * 256),
     "outbox_content_type_at_most_255_bytes"),
    ("routing_key, payload, message_type", ("rk", "{}", "x" * 256),
     "outbox_message_type_at_most_255_bytes"),
    ("routing_key, payload, correlation_id", ("rk", "{}", "x" * 256),
     "outbox_correlation_id_at_most_255_bytes"),
    ("routing_key, payload, created_at", ("rk", "{}", "1969-12-31 23:59:59+00"),
     "outbox_created_at_from_1970"),
    ("routing_key, payload, created_at", ("rk", "{}", "infinity"),
     "outbox_created_at_from_1970"),
    ("routing_key, payload, created_at", ("rk", "{}", "-infinity"),
     "outbox_created_at_from_1970"),
    ("routing_key, payload, created_at", ("rk", "{}", "9999-01-01 00:00:00+00"),
     "outbox_created_at_from_1970"),
    ("routing_key, payload, headers", ("rk", "{}", '{"a":' * 101 + "1" + "}" * 101),
     "outbox_headers_at_most_100_deep"),
    ("routing_key, payload, headers", ("rk", "{}", '{"a":' + "[" * 100 + "1" + "]" * 100 + "}"),
     "outbox_headers_at_most_100_deep"),
])
def test_bad_rows_are_refused_by_a_named_constraint(settings: Settings, columns: str,
                                                    values: tuple[object, ...],
                                                    constraint: str) -> None:
    with pytest.raises(errors.CheckViolation) as err:
        insert(settings, columns, *values)
    assert err.value.diag.constraint_name == constraint


def test_rows_at_the_amqp_limits_are_accepted(settings: Settings) -> None:
    insert(settings, "routing_key, payload, exchange, content_type, message_type, "
           "correlation_id, created_at, headers", "é" * 127 + "x", "{}", "x" * 255, "x" * 255,
           "x" * 255, "x" * 255, "1970-01-01 00:00:00+00",
           '{"a":' * 100 + "1" + "}" * 100)
    insert(settings, "routing_key, payload, headers", "rk", "{}",
           '{"a":' + "[" * 99 + "{}" + "]" * 99 + "}")  # an empty container at level 100


def test_revision_0003_keeps_old_rows_and_downgrades(schema: str) -> None:
    """Only inserts are checked: rows written before revision 0003 stay, and the relay can
    still park or reschedule them (and `outbox dead retry` put them back). The downgrade
    removes exactly what 0003 added."""
    settings = support.make_settings(schema)
    migrate.downgrade(settings, "0002")
    insert(settings, "routing_key, payload, created_at", "k" * 300, "{}", "-infinity")
    before, after = migrate.upgrade(settings)
    assert (before, after) == ("0002", migrate.head_revision())
    with pytest.raises(errors.CheckViolation):
        insert(settings, "routing_key, payload", "k" * 300, "{}")
    assert support.count(settings) == 1
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        outbox = sql.SQL("{}.outbox").format(sql.Identifier(settings.schema))
        for change in ("attempts = attempts + 1, available_at = now()",  # schedule_retry
                       "dead_at = now(), last_error = 'parked'",  # park_dead
                       "dead_at = NULL, attempts = 0"):  # dead_retry
            conn.execute(sql.SQL("UPDATE {} SET " + change).format(outbox))
    migrate.downgrade(settings, "0002")
    insert(settings, "routing_key, payload", "k" * 300, "{}")
    migrate.upgrade(settings)
    assert support.count(settings) == 2


def test_missing_routing_key_and_duplicate_message_id_are_refused(settings: Settings) -> None:
    with pytest.raises(errors.NotNullViolation):
        insert(settings, "payload", "{}")
    mid = "7d444840-9dc0-11d1-b245-5ffdce74fad2"
    insert(settings, "routing_key, payload, message_id", "rk", "{}", mid)
    with pytest.raises(errors.UniqueViolation) as err:
        insert(settings, "routing_key, payload, message_id", "rk", "{}", mid)
    assert err.value.diag.constraint_name == "outbox_message_id_key"


def test_inserts_notify_only_while_the_wakeup_flag_is_raised(settings: Settings) -> None:
    """The trigger reads outbox_wakeup (alembic/versions/0002). Notifications arrive in commit
    order, so a sentinel NOTIFY after each insert shows whether the insert sent one."""
    schema = sql.Identifier(settings.schema)
    insert = sql.SQL("INSERT INTO {}.outbox (routing_key, payload) VALUES ('rk', '{{}}')").format(
        schema)
    flag = sql.SQL("UPDATE {}.outbox_wakeup SET wanted = %s").format(schema)
    with psycopg.connect(settings.database_url, autocommit=True) as listener, \
            psycopg.connect(settings.database_url, autocommit=True) as producer:
        channel = f"{settings.schema}.outbox"
        listener.execute(sql.SQL("LISTEN {}; LISTEN sentinel").format(sql.Identifier(channel)))
        for wanted in (True, False, True):
            producer.execute(flag, (wanted,))
            producer.execute(insert)
            producer.execute("NOTIFY sentinel")
        seen: list[str] = []
        for note in listener.notifies(timeout=10, stop_after=5):
            seen.append("insert" if note.channel == channel else "sentinel")
    assert seen == ["insert", "sentinel", "sentinel", "insert", "sentinel"]


def test_migrate_twice_is_a_no_op_and_the_schema_is_configurable() -> None:
    schema = support.unique("mig")
    env = support.relay_env(support.make_settings(schema))
    try:
        first = subprocess.run(support.outbox_cmd("migrate"), env=env, capture_output=True,
                               text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        assert f"schema '{schema}' migrated from nothing to" in first.stdout
        second = subprocess.run(support.outbox_cmd("migrate"), env=env, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        assert "is up to date" in second.stdout
        with psycopg.connect(support.DATABASE_URL) as conn:
            tables = {r[0] for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (schema,))}
        assert {"outbox", "inbox", "outbox_schema_version", "outbox_wakeup"} <= tables
    finally:
        support.drop_schema(schema)


def test_migrate_works_from_an_installed_wheel(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Build the wheel, install it in a fresh venv without the checkout, and migrate."""
    import sys
    import venv
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    wheel_dir = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheel_dir), str(root)], check=True, timeout=300,
                   capture_output=True)
    wheel = next(wheel_dir.glob("outbox-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "outbox/_alembic/env.py" in names
    assert any(n.startswith("outbox/_alembic/versions/0001") for n in names)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=False, with_pip=False)
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    # the dependencies come from this venv; only outbox itself comes from the wheel
    (site / "deps.pth").write_text(
        "\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    zipfile.ZipFile(wheel).extractall(site)
    schema = support.unique("whl")
    env = support.relay_env(support.make_settings(schema))
    try:
        proc = subprocess.run([str(env_dir / "bin" / "python"), "-m", "outbox", "migrate"],
                              env=env, capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "migrated from nothing" in proc.stdout
    finally:
        support.drop_schema(schema)
