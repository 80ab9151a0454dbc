"""Helpers shared by the test tiers: services, schemas, rows, consumers and relay processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiormq
import psycopg
from psycopg import sql

from outbox import migrate
from outbox.settings import Settings

ROOT = Path(__file__).resolve().parents[1]  # the repository
DATABASE_URL = os.environ.get("OUTBOX_TEST_DATABASE_URL",
                              "postgresql://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("OUTBOX_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


async def wait_until(predicate: Callable[[], object], timeout: float = 10.0,
                     interval: float = 0.01) -> None:
    """Poll a condition that has no event to await; fails with TimeoutError after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)


def eventually(predicate: Callable[[], object], timeout: float = 10.0,
               interval: float = 0.05) -> None:
    """`wait_until` for synchronous tests."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def make_settings(schema: str, **changes: Any) -> Settings:
    base = dict(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, http_port=0,
                poll_interval=0.2, retry_base=0.05, retry_max=0.2, publish_timeout=5.0,
                db_timeout=5.0, stats_interval=1.0)
    base.update(changes)
    return Settings.load(base, environ={})


def create_schema(schema: str) -> Settings:
    settings = make_settings(schema)
    migrate.upgrade(settings)
    return settings


def drop_schema(schema: str) -> None:
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def insert_rows(settings: Settings, n: int, routing_key: str, *, exchange: str = "",
                keys: Sequence[str | None] | None = None, start: int = 0) -> list[uuid.UUID]:
    """Insert n JSON rows (payload {"n": i}) with plain SQL; returns their message ids in order."""
    q = sql.SQL(
        "INSERT INTO {}.outbox (exchange, routing_key, payload, ordering_key) "
        "SELECT %s, %s, jsonb_build_object('n', g), (%s::text[])[g - %s + 1] "
        "FROM generate_series(%s::int, %s::int) g RETURNING message_id"
    ).format(sql.Identifier(settings.schema))
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        cur = conn.execute(q, (exchange, routing_key, list(keys) if keys else None, start,
                               start, start + n - 1))
        return [r[0] for r in cur.fetchall()]


def count(settings: Settings, where: str = "true") -> int:
    q = sql.SQL("SELECT count(*) FROM {}.outbox WHERE " + where).format(
        sql.Identifier(settings.schema))
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        row = conn.execute(q).fetchone()
        assert row is not None
        return int(row[0])


@dataclass
class Received:
    body: bytes
    properties: Any
    routing_key: str
    redelivered: bool


class Consumer:
    """Collects every message of a queue (acked) so a test can await "n distinct arrived"."""

    def __init__(self, queue: str, url: str = AMQP_URL) -> None:
        self.queue = queue
        self.url = url
        self.messages: list[Received] = []
        self._changed = asyncio.Event()
        self._conn: aiormq.abc.AbstractConnection | None = None

    async def __aenter__(self) -> Consumer:
        self._conn = await aiormq.connect(self.url)
        ch = await self._conn.channel()
        await ch.queue_declare(self.queue, durable=True)
        await ch.basic_qos(prefetch_count=1000)
        await ch.basic_consume(self.queue, self._on_message)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def _on_message(self, msg: aiormq.abc.DeliveredMessage) -> None:
        self.messages.append(Received(msg.body, msg.header.properties,
                                      msg.delivery.routing_key or "",
                                      bool(msg.delivery.redelivered)))
        await msg.channel.basic_ack(msg.delivery.delivery_tag)
        self._changed.set()

    @property
    def message_ids(self) -> list[str]:
        return [m.properties.message_id for m in self.messages]

    async def wait_for(self, n_distinct: int, timeout: float = 30.0) -> None:
        """Wait until n distinct message ids have arrived (fails after ``timeout``)."""
        async with asyncio.timeout(timeout):
            while len(set(self.message_ids)) < n_distinct:
                self._changed.clear()
                await self._changed.wait()

    async def quiet(self, seconds: float = 0.5) -> None:
        """Wait until no message arrived for ``seconds`` (to count late duplicates)."""
        while True:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), seconds)
            except TimeoutError:
                return


async def declare_queue(name: str, url: str = AMQP_URL, **arguments: Any) -> None:
    conn = await aiormq.connect(url)
    try:
        ch = await conn.channel()
        await ch.queue_declare(name, durable=True, arguments=arguments or None)
    finally:
        await conn.close()


async def delete_queues(names: Iterable[str], url: str = AMQP_URL) -> None:
    conn = await aiormq.connect(url)
    try:
        ch = await conn.channel()
        for name in names:
            await ch.queue_delete(name)
    finally:
        await conn.close()


def relay_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    for key, value in settings.redacted().items():
        env[f"OUTBOX_{key.upper()}"] = str(value)
    env["OUTBOX_DATABASE_URL"] = settings.database_url
    env["OUTBOX_AMQP_URL"] = settings.amqp_url
    env.update(extra)
    return env


def outbox_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "outbox", *args]


def start_relay(settings: Settings, *args: str, **env: str) -> subprocess.Popen[bytes]:
    """Start `outbox relay` as a real process (its stderr goes to a pipe)."""
    return subprocess.Popen(outbox_cmd("relay", *args), env=relay_env(settings, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
                 timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


def as_role(role: str) -> str:
    """The test database's URL, connecting as ``role`` (no password: trust auth)."""
    parts = DATABASE_URL.split("://", 1)[1].split("@", 1)[-1]
    return f"postgresql://{role}@{parts}"
