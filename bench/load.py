"""Live-load phases: commit-to-receive latency under a steady offered load, an idle relay's CPU,
and the outbox table's size after a sustained run (the bloat soak)."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field

import orjson
from psycopg import sql

from bench.common import (
    AMQP_URL,
    PAD,
    Queue,
    RelayProcess,
    Schema,
    aconnect,
    percentile,
)


class Receiver:
    """Consumes the queue in a child process (bench/receiver.py) and notes when each message
    number arrived there (``received``: its perf_counter; ``details``: the rest of its line, the
    wall clock then the body's ``i`` and ``x`` when it has them)."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.received: dict[int, float] = {}
        self.details: dict[int, list[str]] = {}
        self.count = 0
        self._changed = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Receiver:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.receiver", AMQP_URL, self.queue,
            stdout=asyncio.subprocess.PIPE)
        assert self._proc.stdout is not None
        async with asyncio.timeout(30):
            line = await self._proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"bench.receiver did not start (it said {line!r})")
        self._reader = asyncio.create_task(self._read(self._proc.stdout))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            await self._proc.wait()

    async def _read(self, stdout: asyncio.StreamReader) -> None:
        while line := await stdout.readline():
            n, t, *rest = line.decode().split()
            self.received[int(n)] = float(t)
            if rest:
                self.details[int(n)] = rest
            self.count += 1
            self._changed.set()

    def forget(self) -> None:
        self.received.clear()
        self.details.clear()
        self.count = 0

    async def wait_for(self, n: int, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while self.count < n:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True


@dataclass
class Producers:
    """``workers`` connections each committing ``rows`` rows per statement at a steady pace so that
    together they offer ``rate`` messages per second."""

    schema: Schema
    routing_key: str
    rate: float
    workers: int = 4
    rows: int = 1
    committed: dict[int, float] = field(default_factory=dict)  # n -> perf_counter at commit
    ids: dict[int, int] = field(default_factory=dict)  # outbox row id -> n
    late: int = 0  # statements that started over 10 ms behind schedule (the offered load slipped)
    _next: int = 1_000_000

    async def run(self, seconds: float) -> None:
        await asyncio.gather(*(self._worker(w, seconds) for w in range(self.workers)))

    async def _worker(self, worker: int, seconds: float) -> None:
        insert = sql.SQL(
            "INSERT INTO {} (routing_key, payload) "
            "SELECT %s, jsonb_build_object('n', g, 'pad', repeat('x', {})) "
            "FROM generate_series(%s::int, %s::int) g "
            "RETURNING id, (payload->>'n')::int").format(
                self.schema.table(), sql.Literal(PAD))
        interval = self.workers * self.rows / self.rate
        async with await aconnect() as conn:
            loop = asyncio.get_running_loop()
            start = loop.time() + worker * interval / self.workers
            k = 0
            while True:
                due = start + k * interval
                if due - start > seconds:
                    return
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -0.01:
                    self.late += 1
                first = self._next
                self._next += self.rows
                cur = await conn.execute(
                    insert, (self.routing_key, first, first + self.rows - 1), prepare=True)
                done = time.perf_counter()
                self.ids.update(await cur.fetchall())
                for n in range(first, first + self.rows):
                    self.committed[n] = done
                k += 1


async def _warm_up(schema: Schema, receiver: Receiver, queue: str) -> None:
    warm = Producers(schema, queue, rate=100, workers=1)
    warm._next = 1  # numbers below 1,000,000 are not counted
    await warm.run(0.05)
    if not await receiver.wait_for(len(warm.committed), 30):
        raise RuntimeError("the relay did not publish the warm-up rows within 30 s")
    receiver.forget()


@dataclass
class LoadFigures:
    """Latencies in ms, per message: ``p50_ms``/``p99_ms`` from the producer's commit returning
    to the broker's confirm reaching the relay (the relay's debug log "batch published" gives the
    confirm time of each row id); ``receive_*`` from the commit returning to the consumer
    receiving the message (the broker delivers it before it confirms it)."""

    p50_ms: float
    p99_ms: float
    receive_p50_ms: float
    receive_p99_ms: float
    offered: int
    offered_rate: float
    confirmed: int
    received: int
    late_statements: int
    idle_cpu_percent: float


def confirm_times(relay_log: str) -> dict[int, float]:
    """Row id -> when the relay had its confirm (time.time()), from its debug log."""
    times: dict[int, float] = {}
    for line in relay_log.splitlines():
        if '"batch published"' in line:
            entry = orjson.loads(line)
            times.update(dict.fromkeys(entry["confirmed_ids"], entry["at"]))
    return times


async def latency_and_idle(rate: float, seconds: float, idle_seconds: float,
                           workers: int = 8) -> LoadFigures:
    """Producers offer ``rate`` msg/s for ``seconds`` while a relay runs (`LoadFigures`). Then
    the relay sits idle for ``idle_seconds`` and its CPU is sampled."""
    async with Queue() as queue, Receiver(queue.name) as receiver:
        with Schema() as schema:
            relay = RelayProcess(schema, OUTBOX_LOG_LEVEL="debug")
            try:
                await _warm_up(schema, receiver, queue.name)
                # Enough producers that commits (each waits for its WAL flush) keep the pace.
                producers = Producers(schema, queue.name, rate, workers=workers)
                began = time.perf_counter()
                await producers.run(seconds)
                offered = len(producers.committed)
                offered_rate = offered / (time.perf_counter() - began)
                await receiver.wait_for(offered, 30)
                await asyncio.sleep(1.0)  # let the relay settle into idleness
                relay.ps.cpu_percent(None)
                await asyncio.sleep(idle_seconds)
                idle = relay.ps.cpu_percent(None)
            finally:
                relay.stop()
    wall_minus_perf = time.time() - time.perf_counter()
    confirmed = confirm_times(relay.log)
    committed = producers.committed
    confirm = [(confirmed[i] - wall_minus_perf - committed[n]) * 1000
               for i, n in producers.ids.items() if i in confirmed]
    receive = [(receiver.received[n] - t) * 1000
               for n, t in committed.items() if n in receiver.received]
    return LoadFigures(
        p50_ms=percentile(confirm, 0.50), p99_ms=percentile(confirm, 0.99),
        receive_p50_ms=percentile(receive, 0.50), receive_p99_ms=percentile(receive, 0.99),
        offered=offered, offered_rate=offered_rate, confirmed=len(confirm),
        received=len(receive), late_statements=producers.late, idle_cpu_percent=idle)


@dataclass
class SoakFigures:
    table_mb: float
    n_live_tup: int
    n_dead_tup: int
    autovacuum_count: int
    offered: int
    relay_peak_rss_mb: float


async def _vacuum_every(schema: Schema, seconds: float) -> None:
    """Stand-in for autovacuum when the server runs without it: VACUUM the outbox regularly."""
    async with await aconnect() as conn:
        while True:
            await asyncio.sleep(seconds)
            await conn.execute(sql.SQL("VACUUM {}").format(schema.table()))


async def autovacuum_enabled() -> bool:
    async with await aconnect() as conn:
        cur = await conn.execute("SELECT current_setting('autovacuum') = 'on'")
        rec = await cur.fetchone()
    return bool(rec and rec[0])


async def soak(rate: float, seconds: float, vacuum_every: float = 0) -> SoakFigures:
    """Producers offer ``rate`` msg/s for ``seconds`` while a relay deletes what it confirms; then
    the outbox table's total size (heap + indexes + toast) and its dead tuples. ``vacuum_every``
    > 0 runs a plain VACUUM of the table that often (for a server with autovacuum off)."""
    async with Queue() as queue, Receiver(queue.name) as receiver:
        with Schema() as schema:
            relay = RelayProcess(schema)
            try:
                await _warm_up(schema, receiver, queue.name)
                producers = Producers(schema, queue.name, rate, workers=10, rows=10)
                task = asyncio.create_task(producers.run(seconds))
                vacuum = (asyncio.create_task(_vacuum_every(schema, vacuum_every))
                          if vacuum_every > 0 else None)
                while not task.done():
                    relay.sample_rss()
                    await asyncio.wait([task], timeout=5)
                await task
                if vacuum is not None:
                    vacuum.cancel()
                await receiver.wait_for(len(producers.committed), 60)
                stats = sql.SQL(
                    "SELECT pg_total_relation_size(%s::regclass), n_live_tup, n_dead_tup, "
                    "autovacuum_count FROM pg_stat_user_tables "
                    "WHERE schemaname = %s AND relname = 'outbox'")
                async with await aconnect() as conn:
                    await asyncio.sleep(1.0)  # statistics are reported with a short delay
                    cur = await conn.execute(stats, (schema.table().as_string(conn),
                                                     schema.name))
                    rec = await cur.fetchone()
                    assert rec is not None
            finally:
                peak = relay.stop()
    size, live, dead, vacuums = rec
    return SoakFigures(size / 2**20, live, dead, vacuums, len(producers.committed), peak)
