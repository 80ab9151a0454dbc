"""What the benchmark phases share: servers, the message, queues, schemas, relay processes."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiormq
import psutil
import psycopg
from psycopg import sql

from outbox import migrate
from outbox.settings import Settings

# The server the phases use: `python -m bench` points it at a private stock cluster unless told
# otherwise (bench/postgres_node.py); imported piecemeal, the phases use the machine's server.
DATABASE_URL = os.environ.get("OUTBOX_BENCH_DATABASE_URL",
                              "postgresql://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("OUTBOX_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PAD = 177  # {"n": 12345, "pad": "xx…"} is then about 200 bytes, as jsonb prints it


def body(n: int) -> bytes:
    """The benchmark message: the same text PostgreSQL prints for the rows' jsonb payload."""
    return f'{{"n": {n}, "pad": "{"x" * PAD}"}}'.encode()


def progress(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Figures:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def __setitem__(self, name: str, value: Any) -> None:
        self.values[name] = value
        progress(f"{name}: {fmt(value)}")

    def print(self) -> None:
        for name, value in self.values.items():
            print(f"{name}: {fmt(value)}")


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)


def spread(values: list[float]) -> str:
    return "[" + " ".join(fmt(v) for v in values) + "]"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], p: float) -> float:
    """The value below which a share ``p`` of ``values`` falls (nan when there are none)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")


def tree_cpu(pids: Sequence[int]) -> float:
    """CPU seconds used so far by these processes and everything they started (a RabbitMQ
    node's beam, PostgreSQL's backends: an ended one's time is in its parent's children_*)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    total += (times.user + times.system + times.children_user
                              + times.children_system)
    return total


def connect() -> psycopg.Connection[Any]:
    """An autocommit connection to the benchmark's database."""
    return psycopg.connect(DATABASE_URL, autocommit=True)


async def aconnect(autocommit: bool = True) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(DATABASE_URL, autocommit=autocommit)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def own_database() -> Iterator[None]:
    """A fresh database on the benchmark's server for the block (`DATABASE_URL` names it
    meanwhile): its count of transactions (pg_stat_database) is then the block's own, without
    autovacuum's work on what earlier phases wrote."""
    global DATABASE_URL
    name = unique("bench_db")
    with connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = DATABASE_URL
    DATABASE_URL = urlunsplit(urlsplit(base)._replace(path="/" + name))
    try:
        yield
    finally:
        DATABASE_URL = base
        with connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def settings_for(schema: str, **changes: Any) -> Settings:
    base: dict[str, Any] = dict(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema,
                                http_port=0, log_level="warning")
    base.update(changes)
    return Settings.load(base, environ={})


class Schema:
    """A dedicated schema migrated with `outbox.migrate.upgrade`, dropped on exit; ``changes``
    are settings of its relays (e.g. ``amqp_url``)."""

    def __init__(self, **changes: Any) -> None:
        self.name = unique("bench")
        self.settings = settings_for(self.name, **changes)

    def __enter__(self) -> Schema:
        with connect() as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.name)))
        migrate.upgrade(self.settings)
        return self

    def __exit__(self, *exc: object) -> None:
        with connect() as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(self.name)))

    def table(self) -> sql.Composed:
        return sql.SQL("{}.outbox").format(sql.Identifier(self.name))

    def fill(self, n: int, routing_key: str, keys: int = 0, traced: bool = False) -> None:
        """Insert n rows in one statement; ``keys`` > 0 spreads them over as many ordering keys;
        ``traced`` gives each a ``traceparent`` header, as a traced producer does."""
        key = (sql.SQL("'k' || (g %% {})").format(sql.Literal(keys)) if keys
               else sql.SQL("NULL"))
        headers = (sql.SQL("jsonb_build_object('traceparent', '00-' || md5(g::text) || '-' || "
                           "left(md5('s' || g), 16) || '-01')") if traced
                   else sql.SQL("'{}'::jsonb"))
        q = sql.SQL(
            "INSERT INTO {} (routing_key, payload, ordering_key, headers) "
            "SELECT %s, jsonb_build_object('n', g, 'pad', repeat('x', {})), {}, {} "
            "FROM generate_series(1, %s) g").format(self.table(), sql.Literal(PAD), key,
                                                   headers)
        with connect() as conn:
            conn.execute(q, (routing_key, n))
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(self.table()))
            if keys:
                self._wait_visible_to_all(conn)

    def _wait_visible_to_all(self, conn: psycopg.Connection[Any], timeout: float = 60) -> None:
        # A keyed row is claimable only once every transaction older than its own has ended
        # (ordering); other sessions on a shared server can hold one open for a while.
        q = sql.SQL("SELECT pg_snapshot_xmin(pg_current_snapshot()) > max(xact_id) FROM {}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = conn.execute(q.format(self.table())).fetchone()
            if rec is None or rec[0] is not False:
                return
            time.sleep(0.1)
        progress(f"an older transaction kept the keyed rows waiting for over {timeout:g} s")

    def pending(self) -> int:
        with connect() as conn:
            rec = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE sent_at IS NULL")
                               .format(self.table())).fetchone()
        assert rec is not None
        return int(rec[0])


class Queue:
    """A fresh durable queue on the default exchange, deleted on exit. ``url`` (a node list
    like OUTBOX_AMQP_URL's: the first node is used) and ``arguments`` (``x-queue-type``…)
    default to the benchmark's broker and a classic queue."""

    def __init__(self, url: str | None = None,
                 arguments: dict[str, Any] | None = None) -> None:
        self.name = unique("bench")
        self.url = (url or AMQP_URL).split(",")[0]
        self.arguments = arguments

    async def __aenter__(self) -> Queue:
        conn = await aiormq.connect(self.url)
        try:
            ch = await conn.channel()
            await ch.queue_declare(self.name, durable=True, arguments=self.arguments)
        finally:
            await conn.close()
        return self

    async def depth(self) -> int:
        """Messages in the queue now."""
        conn = await aiormq.connect(self.url)
        try:
            ch = await conn.channel()
            ok = await ch.queue_declare(self.name, passive=True)
            return int(ok.message_count or 0)
        finally:
            await conn.close()

    async def __aexit__(self, *exc: object) -> None:
        await delete_queues(self.url, [self.name])


async def delete_queues(amqp_url: str, names: Iterable[str]) -> None:
    """Delete queues (the benchmark's, and the tests' through `tests.support`)."""
    conn = await aiormq.connect(amqp_url)
    try:
        ch = await conn.channel()
        for name in names:
            await ch.queue_delete(name)
    finally:
        await conn.close()


def relay_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update({
        "OUTBOX_DATABASE_URL": settings.database_url, "OUTBOX_AMQP_URL": settings.amqp_url,
        "OUTBOX_SCHEMA": settings.schema, "OUTBOX_HTTP_PORT": "0", "OUTBOX_LOG_LEVEL": "warning",
    })
    env.update(extra)
    return env


class RelayProcess:
    """A long-running `outbox relay` subprocess (stopped with SIGTERM, by its pid)."""

    def __init__(self, schema: Schema, **env: str) -> None:
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen([sys.executable, "-m", "outbox", "relay"],
                                     env=relay_env(schema.settings, **env),
                                     stdout=subprocess.DEVNULL, stderr=self._err)
        self.ps = psutil.Process(self.proc.pid)
        self.peak_rss_mb = 0.0
        self.log = ""  # its stderr, once stopped

    def sample_rss(self) -> None:
        self.peak_rss_mb = max(self.peak_rss_mb, self.ps.memory_info().rss / 2**20)

    def cpu_seconds(self) -> float:
        """CPU (user and system) the relay used so far."""
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> float:
        """SIGTERM, wait; returns the sampled peak RSS in MB."""
        self.sample_rss()
        self.proc.send_signal(signal.SIGTERM)
        _, status, _ = os.wait4(self.proc.pid, 0)
        self.proc.returncode = code = os.waitstatus_to_exitcode(status)
        self._err.seek(0)
        self.log = self._err.read().decode(errors="replace")
        self._err.close()
        if code != 0:
            progress(f"relay exited {code}: {self.log[-2000:]}")
        return self.peak_rss_mb


@dataclass
class ProcessRun:
    """Wall time, CPU seconds and peak RSS of one finished relay process."""

    wall: float
    cpu: float
    peak_rss_mb: float
    returncode: int
    published: int = 0


def run_drain(settings: Settings, module: str = "outbox", **env: str) -> ProcessRun:
    """Run `python -m outbox relay --drain` (or ``module``, bench.traced) to the end, measured by
    the kernel (wait4)."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", module, "relay", "--drain"],
                                env=relay_env(settings, **env), stdout=subprocess.DEVNULL,
                                stderr=err)
        # Peak RSS is sampled: the kernel's ru_maxrss of a child also counts the pages it
        # shared with this (large) process between fork and exec.
        ps, peak = psutil.Process(proc.pid), 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            with contextlib.suppress(psutil.Error):
                peak = max(peak, ps.memory_info().rss)
            time.sleep(0.05)
        wall = time.perf_counter() - start
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            progress(f"relay exited {code}: {err.read().decode(errors='replace')[-2000:]}")
    return ProcessRun(wall, usage.ru_utime + usage.ru_stime, peak / 2**20, code)
