"""The relay end to end against the real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from datetime import UTC, datetime

import orjson
import psycopg
from psycopg import sql

from outbox.runner import run_relay
from outbox.settings import Settings
from tests import support


async def test_committed_rows_arrive_with_their_body_and_properties(settings: Settings,
                                                                   queue: str) -> None:
    ident = sql.Identifier(settings.schema)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        json_id = conn.execute(sql.SQL(
            "INSERT INTO {}.outbox (routing_key, payload, headers, message_type, correlation_id) "
            "VALUES (%s, %s, %s, 'order.created', 'corr-1') RETURNING message_id, created_at"
        ).format(ident), (queue, '{"id": 1, "name": "caf\u00e9"}',
                          '{"traceparent": "00-abc-def-01", "n": 3}')).fetchone()
        bytes_id = conn.execute(sql.SQL(
            "INSERT INTO {}.outbox (routing_key, payload_bytes) VALUES (%s, %s) "
            "RETURNING message_id").format(ident), (queue, b"\x00\x01proto")).fetchone()
        typed_id = conn.execute(sql.SQL(
            "INSERT INTO {}.outbox (routing_key, payload_bytes, content_type) "
            "VALUES (%s, %s, 'application/x-protobuf') RETURNING message_id").format(ident),
            (queue, b"\x08\x96\x01")).fetchone()
    assert json_id and bytes_id and typed_id
    async with support.Collector([queue]) as consumer:
        counts = await asyncio.wait_for(run_relay(settings, drain=True), 30)
        await consumer.reached(3, 10)
    assert counts.published == 3
    by_id = {m.properties.message_id: m for m in consumer.messages}
    j = by_id[str(json_id[0])]
    assert orjson.loads(j.body) == {"id": 1, "name": "caf\u00e9"}
    p = j.properties
    assert p.content_type == "application/json"
    assert p.delivery_mode == 2
    assert p.message_type == "order.created" and p.correlation_id == "corr-1"
    assert p.app_id == "outbox"
    assert p.headers == {"traceparent": "00-abc-def-01", "n": 3}
    created: datetime = json_id[1]
    assert abs(p.timestamp.replace(tzinfo=UTC).timestamp() - created.timestamp()) < 1.5
    b = by_id[str(bytes_id[0])]
    assert b.body == b"\x00\x01proto" and b.properties.content_type == "application/octet-stream"
    assert by_id[str(typed_id[0])].properties.content_type == "application/x-protobuf"
    assert support.count(settings) == 0  # confirmed rows are deleted (--on-sent delete)


async def test_many_rows_each_arrive_once_and_mark_mode_keeps_them(schema: str,
                                                                  queue: str) -> None:
    settings = support.make_settings(schema, on_sent="mark", batch_size=100)
    ids = support.insert_rows(settings, 2_000, queue)
    async with support.Collector([queue]) as consumer:
        await asyncio.wait_for(run_relay(settings, drain=True), 60)
        await consumer.reached(2_000, 20)
        await consumer.quiet(0.3)
    assert sorted(consumer.message_ids) == sorted(str(i) for i in ids)
    assert support.count(settings, "sent_at IS NOT NULL") == 2_000
    proc = subprocess.run(support.outbox_cmd("cleanup", "--older-than", "0s"),
                          env=support.relay_env(settings), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "deleted 2000 sent rows" in proc.stdout
    assert support.count(settings) == 0


async def test_rolled_back_rows_are_never_published(settings: Settings, queue: str) -> None:
    ident = sql.Identifier(settings.schema)
    with psycopg.connect(settings.database_url) as conn:
        conn.execute(sql.SQL("INSERT INTO {}.outbox (routing_key, payload) VALUES (%s, '1')")
                     .format(ident), (queue,))
        conn.rollback()
        conn.execute(sql.SQL("INSERT INTO {}.outbox (routing_key, payload) VALUES (%s, '2')")
                     .format(ident), (queue,))
        conn.commit()
    async with support.Collector([queue]) as consumer:
        await asyncio.wait_for(run_relay(settings, drain=True), 30)
        await consumer.reached(1)
        await consumer.quiet(0.5)
    assert [m.body for m in consumer.messages] == [b"2"]


async def test_an_unroutable_row_is_not_marked_sent(schema: str, queue: str) -> None:
    settings = support.make_settings(schema, retry_base=30, retry_max=60)
    nowhere = support.unique("nowhere")
    support.insert_rows(settings, 1, nowhere)
    support.insert_rows(settings, 10, queue)
    async with support.Collector([queue]) as consumer:
        counts = await asyncio.wait_for(run_relay(settings, drain=True), 30)
        await consumer.reached(10)
    assert counts.published == 10 and counts.failed == 1
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(sql.SQL(
            "SELECT attempts, sent_at, dead_at, last_error, available_at > now() "
            "FROM {}.outbox").format(sql.Identifier(schema))).fetchall()
    assert len(row) == 1
    attempts, sent_at, dead_at, last_error, later = row[0]
    assert (attempts, sent_at, dead_at, later) == (1, None, None, True)
    assert "NO_ROUTE" in last_error


def test_drain_exits_0_and_reports_what_is_left(settings: Settings) -> None:
    asyncio.run(support.declare_queue(q := support.unique("q")))
    try:
        support.insert_rows(settings, 300, q)
        support.insert_rows(settings, 1, support.unique("nowhere"))
        proc = subprocess.run(support.outbox_cmd("relay", "--drain"),
                              env=support.relay_env(settings, OUTBOX_RETRY_BASE="60",
                                                    OUTBOX_RETRY_MAX="60"),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        last = proc.stdout.strip().splitlines()[-1]
        assert last.startswith("drained: published=300 retried=1 dead=0 left_pending=1"), last
        for line in proc.stderr.strip().splitlines():
            orjson.loads(line)  # every log line is JSON
        assert "guest:guest" not in proc.stderr
    finally:
        asyncio.run(support.delete_queues([q]))


async def test_two_relays_publish_each_row_once(settings: Settings, queue: str) -> None:
    relays = [support.start_relay(settings) for _ in range(2)]
    try:
        async with support.Collector([queue]) as consumer:
            total = 0
            for start in range(0, 3_000, 300):  # steady trickle while both relays run
                support.insert_rows(settings, 300, queue, start=start)
                total += 300
                await asyncio.sleep(0.05)
            await consumer.reached(total, 60)
            await consumer.quiet(0.5)
        ids = consumer.message_ids
        assert len(ids) == total and len(set(ids)) == total  # no duplicates
        assert support.count(settings) == 0
    finally:
        codes = [support.stop_process(p) for p in relays]
    assert codes == [0, 0]


async def test_status_reports_the_backlog(settings: Settings) -> None:
    support.insert_rows(settings, 5, "somewhere")
    proc = subprocess.run(support.outbox_cmd("status", "--json"),
                          env=support.relay_env(settings), capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    data = orjson.loads(proc.stdout)
    assert data["pending"] == 5 and data["dead"] == 0 and data["blocked_keys"] == 0
    assert data["oldest_pending_age_seconds"] >= 0
    assert data["held_back_rows"] == 0 and data["horizon_age_seconds"] >= 0
    # another session of the cluster may hold the horizon at this moment
    assert data["oldest_writer"] is None or {"pid", "database", "age_seconds"} <= set(
        data["oldest_writer"])


def test_message_ids_are_uuids(settings: Settings) -> None:
    [mid] = support.insert_rows(settings, 1, "x")
    assert isinstance(mid, uuid.UUID)
