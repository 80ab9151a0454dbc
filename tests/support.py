"""Helpers shared by the test tiers: services, schemas, rows, consumers and relay processes."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiormq
import psycopg
from psycopg import sql

import bench.common
from outbox import migrate
from outbox.frames import reader_died
from outbox.rows import Result, Row
from outbox.settings import Settings
from outbox.testing import StubPublisher

ROOT = Path(__file__).resolve().parents[1]  # the repository
DATABASE_URL = os.environ.get("OUTBOX_TEST_DATABASE_URL",
                              "postgresql://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("OUTBOX_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


@contextlib.asynccontextmanager
async def running(relay: Any) -> AsyncIterator[Any]:
    """Run an in-process relay for the block, then stop it and wait for it to end."""
    task = asyncio.create_task(relay.run())
    try:
        yield relay
    finally:
        relay.stop()
        await asyncio.wait_for(task, 5)


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``path`` from a relay's HTTP port: (status, body); (0, b"") while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()
    except OSError:
        return 0, b""


async def until(cond: Callable[[], Any | Awaitable[Any]], timeout: float = 10.0,
                what: str = "the condition", interval: float = 0.05) -> Any:
    """The tests' one wait: poll ``cond`` (sync or async) until it is truthy and return its
    value; fail with an AssertionError naming ``what`` after ``timeout`` seconds.

    For a condition that has no event to await. It is polled every 10 ms at first, backing off
    to ``interval``: a cheap condition is seen at once, a query is not run in a tight loop.
    """
    deadline = time.monotonic() + timeout
    pause = min(0.01, interval)
    while True:
        value = cond()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(pause)
        pause = min(pause * 2, interval)


def eventually(cond: Callable[[], Any], timeout: float = 10.0, what: str = "the condition",
               interval: float = 0.05) -> Any:
    """`until`, for a synchronous test (no event loop running)."""
    return asyncio.run(until(cond, timeout, what, interval))


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


class Collector:
    """The tests' one AMQP consumer: consumes queues on one or more brokers (reconnecting after
    a broker dies), acks every message and records it, so a test can await "n distinct
    arrived" and count duplicates."""

    def __init__(self, queues: Sequence[str], urls: Sequence[str] = (AMQP_URL,),
                 arguments: dict[str, Any] | None = None) -> None:
        self.queues = list(queues)
        self.urls = list(urls)
        self.arguments = arguments
        self.messages: list[Received] = []
        self.received: list[str] = []  # message ids, as they came (duplicates too)
        self.seen: set[str] = set()  # distinct message ids, kept as they come
        self.bodies: dict[str, bytes] = {}
        self.arrived = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._conns: list[aiormq.abc.AbstractConnection] = []
        self._ready: list[asyncio.Event] = []

    async def __aenter__(self) -> Collector:
        for url in self.urls:
            ev = asyncio.Event()
            self._ready.append(ev)
            self._tasks.append(asyncio.create_task(self._consume(url, ev)))
        async with asyncio.timeout(30):
            await asyncio.gather(*(ev.wait() for ev in self._ready))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in self._conns:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await c.close()

    async def _consume(self, url: str, ready: asyncio.Event) -> None:
        while True:
            try:
                async with asyncio.timeout(10):
                    conn = await aiormq.connect(url + "?heartbeat=5")
                self._conns.append(conn)
                ch = await conn.channel()
                await ch.basic_qos(prefetch_count=1000)
                for q in self.queues:
                    await ch.queue_declare(q, durable=True, arguments=self.arguments)
                    await ch.basic_consume(q, self._on_message)
                ready.set()
                # aiormq's `closing` may never resolve after a reset (its reader died, its
                # clean-up hangs): watch the reader too, as the relay's publisher does
                closing = conn.closing
                while not (closing.done() or reader_died(conn)):
                    await asyncio.wait([closing], timeout=1.0)
                closing.cancel()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await conn.close()
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.3)

    async def _on_message(self, msg: aiormq.abc.DeliveredMessage) -> None:
        mid = msg.header.properties.message_id or ""
        self.messages.append(Received(msg.body, msg.header.properties,
                                      msg.delivery.routing_key or "",
                                      bool(msg.delivery.redelivered)))
        self.received.append(mid)
        self.seen.add(mid)
        self.bodies[mid] = msg.body
        self.arrived.set()
        tag = getattr(msg.delivery, "delivery_tag", None)
        if isinstance(tag, int):
            with contextlib.suppress(Exception):
                await msg.channel.basic_ack(tag)

    @property
    def message_ids(self) -> list[str]:
        """Every message id received, in order, duplicates included."""
        return self.received

    @property
    def distinct(self) -> set[str]:
        return set(self.seen)

    @property
    def count(self) -> int:
        """How many distinct message ids arrived."""
        return len(self.seen)

    async def reached(self, n: int, timeout: float = 30.0, what: str = "") -> None:
        """Wait until ``n`` distinct message ids arrived; fail after ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while len(self.seen) < n:
                    self.arrived.clear()
                    await self.arrived.wait()
        except TimeoutError:
            about = f": {what}" if what else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {n} distinct "
                                 f"deliveries ({len(self.seen)} arrived){about}") from None

    async def quiet(self, seconds: float = 0.5, timeout: float = 30.0) -> None:
        """Wait until nothing arrived for ``seconds`` (to count late duplicates); fail if the
        messages never stop coming within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self.arrived.clear()
                    try:
                        await asyncio.wait_for(self.arrived.wait(), seconds)
                    except TimeoutError:
                        return
        except TimeoutError:
            raise AssertionError(f"messages kept arriving for {timeout:g}s") from None


async def declare_queue(name: str, url: str = AMQP_URL, **arguments: Any) -> None:
    conn = await aiormq.connect(url)
    try:
        ch = await conn.channel()
        await ch.queue_declare(name, durable=True, arguments=arguments or None)
    finally:
        await conn.close()


async def delete_queues(names: Iterable[str], url: str = AMQP_URL) -> None:
    await bench.common.delete_queues(url, names)


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


class GatedPublisher(StubPublisher):
    """Holds each batch until the test opens ``gate`` (closed at first); ``held`` has the row ids
    of every batch it was given, as it arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.held: list[list[int]] = []

    async def publish(self, rows: Sequence[Row], lane: int) -> list[Result]:
        self.held.append([r.id for r in rows])
        await asyncio.wait_for(self.gate.wait(), 10)
        return await super().publish(rows, lane)
