"""The least-privilege roles of sql/roles.sql, created by psql: the relay role runs a real relay
and nothing more; the producer and consumer roles do only their part."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql

from outbox import producer
from tests import support
from tests.support import as_role

pytestmark = pytest.mark.timeout(120)


def refused(conn: psycopg.Connection[Any], schema: str, *statements: str) -> None:
    """Each statement (``{}`` stands for the schema) fails for lack of privilege."""
    for text in statements:
        with pytest.raises(errors.InsufficientPrivilege), conn.transaction():
            conn.execute(sql.SQL(text).format(sql.Identifier(schema)))


async def test_relay_role_runs_the_relay_and_nothing_more(
    schema: str, queue: str, roles: dict[str, str],
) -> None:
    relay_role = roles["relay_role"]
    owner = support.make_settings(schema)
    ids = support.insert_rows(owner, 50, queue)
    settings = support.make_settings(schema, database_url=as_role(relay_role))
    async with support.Collector([queue]) as consumer:
        proc = support.start_relay(settings, "--drain")
        try:
            _, stderr = proc.communicate(timeout=60)
        finally:
            support.stop_process(proc)
        assert proc.returncode == 0, stderr.decode()[-2000:]
        await consumer.reached(len(ids), timeout=30)
        await consumer.quiet(0.3)
    assert set(consumer.message_ids) == {str(i) for i in ids}
    assert len(consumer.message_ids) == len(ids)  # no duplicates
    assert support.count(owner) == 0  # every confirmed row deleted, none left or dead

    # `outbox doctor` finds nothing missing for this role, and no excess.
    env = support.relay_env(settings)
    doctor = subprocess.run(support.outbox_cmd("doctor"), env=env, capture_output=True,
                            text=True, timeout=90)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "ok    grants" in doctor.stdout

    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        user = conn.execute("SELECT current_user").fetchone()
        assert user is not None and user[0] == relay_role
        refused(conn, schema,
                "ALTER TABLE {}.outbox ADD COLUMN x int",
                "ALTER TABLE {}.outbox DISABLE TRIGGER outbox_notify",
                "DROP TABLE {}.outbox",
                "TRUNCATE {}.outbox",
                "CREATE TABLE {}.evil (x int)",
                "CREATE INDEX evil ON {}.outbox (id)",
                "INSERT INTO {}.outbox (routing_key, payload) VALUES ('x', '{{}}')",
                "UPDATE {}.outbox SET payload = '{{}}'",
                "SELECT * FROM {}.inbox")


def test_producer_and_consumer_roles_do_only_their_part(
    schema: str, roles: dict[str, str],
) -> None:
    s = sql.Identifier(schema)
    with psycopg.connect(as_role(roles["producer_role"])) as conn:
        # the library's insert and the minimal insert of any language, both with RETURNING
        message_id = producer.enqueue(conn, "orders.created", {"id": 1}, schema=schema,
                                      ordering_key="o-1")
        row = conn.execute(sql.SQL("INSERT INTO {}.outbox (routing_key, payload) VALUES "
                                   "('orders.created', '{{\"id\": 2}}') RETURNING message_id")
                           .format(s)).fetchone()
        assert row is not None and row[0] != message_id
        conn.commit()
        refused(conn, schema,
                "SELECT payload FROM {}.outbox",
                "UPDATE {}.outbox SET dead_at = now()",
                "DELETE FROM {}.outbox",
                "INSERT INTO {}.outbox (routing_key, payload, sent_at) "
                "VALUES ('x', '{{}}', now())",
                "SELECT * FROM {}.inbox")
    assert support.count(support.make_settings(schema)) == 2

    consumer_url = as_role(roles["consumer_role"])
    with psycopg.connect(consumer_url, autocommit=True) as conn:
        record = sql.SQL("INSERT INTO {}.inbox (consumer, message_id) VALUES (%s, %s) "
                         "ON CONFLICT DO NOTHING").format(s)
        assert conn.execute(record, ("billing", message_id)).rowcount == 1
        assert conn.execute(record, ("billing", message_id)).rowcount == 0
        refused(conn, schema, "SELECT * FROM {}.outbox", "DROP TABLE {}.inbox")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    prune = subprocess.run(
        support.outbox_cmd("inbox", "prune", "--older-than", "0s", "--database-url",
                           consumer_url, "--schema", schema),
        env=env, capture_output=True, text=True, timeout=60)
    assert prune.returncode == 0, prune.stderr
    assert "deleted 1 inbox entries" in prune.stdout
