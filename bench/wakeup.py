"""What the wake-up path costs the application and the database (outbox/wakeup.py).

* the producers' commits per second with the relay running and keeping up, the table as
  installed, against the same with every trigger of the table disabled (the same publishing work,
  no wake-up cost) and against a bare copy of the table with no relay;
* a row after a quiet spell: commit to confirm;
* what an idle relay costs (database transactions per second, CPU), alone and ten on one table;
* ten busy relays on one table against one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from bench.common import (
    PAD,
    Queue,
    RelayProcess,
    Schema,
    aconnect,
    median,
    own_database,
    progress,
    tree_cpu,
)
from bench.load import confirm_times


async def commit_rate(table: sql.Composable, routing_key: str, seconds: float,
                      workers: int) -> float:
    """Commits per second of ``workers`` connections inserting one row per transaction as fast
    as they can (autocommit, synchronous_commit on: what an application does)."""
    insert = sql.SQL(
        "INSERT INTO {} (routing_key, payload) "
        "VALUES (%s, jsonb_build_object('n', 1, 'pad', repeat('x', {})))").format(
            table, sql.Literal(PAD))
    commits = 0

    async def worker(stop: float) -> None:
        nonlocal commits
        async with await aconnect() as conn:
            while time.perf_counter() < stop:
                await conn.execute(insert, (routing_key,), prepare=True)
                commits += 1

    stop = time.perf_counter() + seconds
    await asyncio.gather(*(worker(stop) for _ in range(workers)))
    return commits / seconds


@dataclass
class ProducerFigures:
    """Medians of rounds taken in turn: the table as installed with a relay running, the same
    with every trigger of the table disabled, and a bare copy of the table with no relay."""

    installed: float
    no_wakeup: float
    bare: float


async def producer_commits(seconds: float = 4.0, workers: int = 8,
                           rounds: int = 3) -> ProducerFigures:
    rates: dict[str, list[float]] = {"installed": [], "no_wakeup": [], "bare": []}
    async with Queue() as queue:
        with Schema() as schema:
            bare = sql.SQL("{}.bare").format(sql.Identifier(schema.name))
            async with await aconnect() as conn:
                await conn.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(
                    bare, schema.table()))
                toggle = sql.SQL("ALTER TABLE {} {} TRIGGER ALL").format
                for r in range(rounds):
                    relay = RelayProcess(schema)
                    try:
                        await _wait_connected(1, schema)
                        for name, trigger in (("installed", "ENABLE"), ("no_wakeup", "DISABLE")):
                            await conn.execute(toggle(schema.table(), sql.SQL(trigger)))
                            rates[name].append(await commit_rate(
                                schema.table(), queue.name, seconds, workers))
                            progress(f"  round {r + 1}: {name} {rates[name][-1]:.0f} commits/s")
                    finally:
                        relay.stop()
                        await conn.execute(toggle(schema.table(), sql.SQL("ENABLE")))
                    rates["bare"].append(await commit_rate(bare, queue.name, seconds, workers))
                    progress(f"  round {r + 1}: bare table, no relay {rates['bare'][-1]:.0f} "
                             "commits/s")
                    await conn.execute(sql.SQL("TRUNCATE {}, {}").format(schema.table(), bare))
    return ProducerFigures(**{name: median(r) for name, r in rates.items()})


async def _wait_connected(relays: int, schema: Schema, timeout: float = 30.0,
                          lanes: int = 0) -> None:
    """Until ``relays`` relays of ``lanes`` lanes each (0: the schema's setting) have every
    connection open (lanes, listener, wake-up task)."""
    lanes = lanes or schema.settings.concurrency
    async with await aconnect() as conn:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name IN "
                "('outbox-relay', 'outbox-listen')")
            rec = await cur.fetchone()
            if rec is not None and rec[0] >= relays * (lanes + 2):
                return
            await asyncio.sleep(0.1)
    progress(f"  {relays} relays did not connect within {timeout:g} s")


async def _transactions(conn: psycopg.AsyncConnection[Any]) -> int:
    """Transactions of the database so far (as flushed by the backends: each flushes its counts
    at most once a second, and within 10 s when idle, so the window must be long)."""
    cur = await conn.execute(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database "
        "WHERE datname = current_database()")
    rec = await cur.fetchone()
    assert rec is not None
    return int(rec[0])


@dataclass
class IdleFigures:
    transactions_per_s: float
    cpu_percent: float  # of one core, summed over the relays


async def idle_cost(relays: int, seconds: float, settle: float = 3.0) -> IdleFigures:
    """``relays`` relays on one empty table: database transactions per second (the count of a
    database of their own over the window, less this function's two reads) and their CPU."""
    async with Queue():
        with own_database(), Schema() as schema:
            procs = [RelayProcess(schema) for _ in range(relays)]
            try:
                await _wait_connected(relays, schema)
                await asyncio.sleep(settle)  # past the start-up claims
                async with await aconnect() as conn:
                    for p in procs:
                        p.ps.cpu_percent(None)
                    await asyncio.sleep(1.0)
                    before = await _transactions(conn)
                    await asyncio.sleep(seconds)
                    after = await _transactions(conn)
                    cpu = sum(p.ps.cpu_percent(None) for p in procs)
            finally:
                for p in procs:
                    p.stop()
    return IdleFigures((after - before - 1) / seconds, cpu * seconds / (seconds + 1.0))


async def first_after_idle(quiet: float, rounds: int = 3) -> float:
    """Commit to confirm (ms) of one row inserted after ``quiet`` seconds without any: the
    median of ``rounds``."""
    delays: list[float] = []
    async with Queue() as queue:
        with Schema() as schema:
            relay = RelayProcess(schema, OUTBOX_LOG_LEVEL="debug")
            committed: dict[int, float] = {}
            try:
                await _wait_connected(1, schema)
                async with await aconnect() as conn:
                    insert = sql.SQL("INSERT INTO {} (routing_key, payload) VALUES (%s, '{{}}') "
                                     "RETURNING id").format(schema.table())
                    for _ in range(rounds):
                        await asyncio.sleep(quiet)
                        cur = await conn.execute(insert, (queue.name,))
                        committed[(await cur.fetchone() or [0])[0]] = time.time()
                    await asyncio.sleep(1.0)
            finally:
                relay.stop()
    confirmed = confirm_times(relay.log)
    delays = [(confirmed[i] - t) * 1000 for i, t in committed.items() if i in confirmed]
    if len(delays) < rounds:
        progress(f"  {rounds - len(delays)} rows after a quiet spell were not confirmed")
    return median(delays) if delays else float("nan")


@dataclass
class BusyDrain:
    """One drain of `busy_drain`: its rate, the messages the queue then held (more than the rows:
    duplicates) and the relays' warning lines (publish timeouts, nacks)."""

    rate: float
    delivered: int
    warnings: int
    timeouts: int  # of the warnings: "no confirms within the deadline"
    cpu: float  # seconds of CPU the relays used from the commit until the table was empty
    watched: dict[str, float]  # the same of each group of processes `busy_drain` watched


async def busy_rate(relays: int, rows: int, url: str | None = None,
                    arguments: dict[str, Any] | None = None,
                    env: Mapping[str, str] | None = None) -> float:
    """Messages per second of `busy_drain`."""
    return (await busy_drain(relays, rows, url, arguments, env=env)).rate


async def busy_drain(relays: int, rows: int, url: str | None = None,
                     arguments: dict[str, Any] | None = None,
                     env: Mapping[str, str] | None = None,
                     watch: Mapping[str, Sequence[int]] | None = None) -> BusyDrain:
    """``relays`` relays, already connected, draining ``rows`` rows committed in one statement:
    the rate from the commit until the table is empty. ``url`` (a node list, as
    OUTBOX_AMQP_URL) and ``arguments`` (`Queue`): another broker and queue type; ``watch``:
    groups of processes (a broker's nodes, a PostgreSQL server) whose CPU over the same span
    to report; ``env``: the relays' other settings (OUTBOX_BATCH_SIZE…)."""
    watch, env = watch or {}, env or {}
    async with Queue(url, arguments) as queue:
        with Schema(**({"amqp_url": url} if url else {})) as schema:
            procs = [RelayProcess(schema, **env) for _ in range(relays)]
            try:
                await _wait_connected(relays, schema,
                                      lanes=int(env.get("OUTBOX_CONCURRENCY", 0)))
                async with await aconnect() as conn:
                    await conn.execute(sql.SQL(
                        "INSERT INTO {} (routing_key, payload) "
                        "SELECT %s, jsonb_build_object('n', g, 'pad', repeat('x', {})) "
                        "FROM generate_series(1, %s) g").format(
                            schema.table(), sql.Literal(PAD)), (queue.name, rows))
                    start = time.perf_counter()  # the drain starts at the commit
                    cpu = -sum(p.cpu_seconds() for p in procs)
                    watched = {name: -tree_cpu(pids) for name, pids in watch.items()}
                    # one step down the primary key: a count(*) every 20 ms took a fifth of a
                    # core from the servers the drain measures
                    left = sql.SQL("SELECT id FROM {} ORDER BY id LIMIT 1").format(
                        schema.table())
                    deadline = start + 300
                    while time.perf_counter() < deadline:
                        if await (await conn.execute(left)).fetchone() is None:
                            break
                        await asyncio.sleep(0.02)
                    else:
                        progress(f"  {relays} relays left rows after 300 s: the rate is of a "
                                 "drain that did not finish")
                    rate = rows / (time.perf_counter() - start)
                    cpu += sum(p.cpu_seconds() for p in procs)
                    watched = {name: t + tree_cpu(watch[name]) for name, t in watched.items()}
            finally:
                for p in procs:
                    p.stop()
            delivered = await queue.depth()
            warned = [line for p in procs for line in p.log.splitlines()
                      if '"level":"warning"' in line or '"level":"error"' in line]
            timeouts = sum("no confirms within the deadline" in line for line in warned)
            if warned or delivered != rows:
                progress(f"  {relays} relays: {delivered} messages queued for {rows} rows, "
                         f"{len(warned)} warnings ({timeouts} confirm timeouts)"
                         + (f", the first: {warned[0][:300]}" if warned else ""))
            return BusyDrain(rate, delivered, len(warned), timeouts, cpu, watched)

