"""The fault suite's machinery, importable by the tests (through their fixtures in conftest.py)
and by the chaos run (`python -m tests.chaos`): relay processes, the steps every fault test
takes (a drain under way, recovery, a last drain), the ledger that counts every row, and
producers that keep committing rows while faults happen. The consumer (`Collector`) and the one
wait (`until`) are `tests.support`'s, shared with the other tiers.

Every fault test ends with ``await ledger.account()``: over all rows it committed, delivered
(distinct message ids a consumer saw) + dead must equal committed, lost must be 0, and the
duplicates are printed (and summarised at the end of the run).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from psycopg import sql

from outbox.settings import Settings
from tests import support
from tests.proxy import FaultProxy
from tests.rabbit_node import RabbitNode
from tests.support import Collector, until

PG_PORT = 5432
AMQP_PORT = 5672
FAST = dict(poll_interval=0.2, retry_base=0.05, retry_max=0.2, publish_timeout=2.0,
            db_timeout=3.0, http_port=0, stats_interval=1.0)
TALLIES: list[tuple[str, Tally]] = []


# -- relay processes --

class RelayProcess:
    """An `outbox relay` subprocess (tests.support.start_relay) whose log is read as it runs.

    A thread drains stderr (the JSON log) into `lines`, so the pipe never fills up and blocks
    the relay, and a test can await a log line.
    """

    def __init__(self, settings: Settings, *args: str, **env: str) -> None:
        self.proc = support.start_relay(settings, *args, **env)
        self.lines: list[str] = []
        self.started = time.monotonic()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def logged(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [line for line in list(self.lines) if rx.search(line)]

    async def wait_log(self, pattern: str, timeout: float) -> str:
        found: list[str] = await until(lambda: self.logged(pattern), timeout,
                                       f"relay log line matching {pattern!r}")
        return found[0]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        code: int = await asyncio.to_thread(self.proc.wait, timeout)
        self._reader.join(5)
        return code

    def stop(self) -> None:
        """Kill it if it still runs (fixture teardown)."""
        if self.alive:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._reader.join(5)

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.lines[-n:])


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    """GET /readyz of a relay: (status, body); (0, {}) while nothing listens."""
    status, body = support.http_get(port, "/readyz", timeout=2)
    return status, orjson.loads(body) if status else {}


def rabbitmqctl(node: RabbitNode, *args: str, timeout: float = 60) -> str:
    """Run ``rabbitmqctl -n <node> ...`` (as the rabbitmq user, which holds the Erlang cookie)."""
    cmd = ["rabbitmqctl", "-n", node.nodename, *args]
    kwargs: dict[str, Any] = {}
    env = dict(os.environ)
    if os.geteuid() == 0:
        kwargs.update(user="rabbitmq", group="rabbitmq")
        env["HOME"] = "/var/lib/rabbitmq"
    out = subprocess.run(["/usr/lib/rabbitmq/bin/rabbitmqctl", *cmd[1:]], env=env,
                         capture_output=True, timeout=timeout, cwd="/tmp", **kwargs)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.decode()[-500:]}")
    return str(out.stdout.decode())


# -- the database --

def fault_settings(schema: str, **changes: Any) -> Settings:
    return support.make_settings(schema, **{**FAST, **changes})


def via(proxy: FaultProxy, url: str) -> str:
    return proxy.url(url)


def sessions(ports: Sequence[int], application: str = "outbox-relay") -> list[tuple[int, str]]:
    """(pid, state) of the PostgreSQL sessions that came through a proxy's upstream ports."""
    if not ports:
        return []
    with psycopg.connect(support.DATABASE_URL, autocommit=True) as conn:
        return [(int(r[0]), str(r[1])) for r in conn.execute(
            "SELECT pid, state FROM pg_stat_activity WHERE client_port = ANY(%s) "
            "AND application_name = %s", (list(ports), application)).fetchall()]


def terminate(ports: Sequence[int], application: str | None = None) -> int:
    """pg_terminate_backend on the sessions that came through a proxy's upstream ports."""
    if not ports:
        return 0
    with psycopg.connect(support.DATABASE_URL, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE client_port = ANY(%s) "
            "AND (%s::text IS NULL OR application_name = %s)",
            (list(ports), application, application)).fetchall()
    return len(rows)


def execute(settings: Settings, query: str, params: Sequence[Any] = (),
            url: str = support.DATABASE_URL) -> list[tuple[Any, ...]]:
    """Run SQL on the test schema (``{}`` in the query is the quoted schema)."""
    q = sql.SQL(query).format(sql.Identifier(settings.schema))  # type: ignore[arg-type,unused-ignore]
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(q, params)
        return cur.fetchall() if cur.description else []


def status(settings: Settings) -> dict[str, object]:
    """`outbox status --json`, run against the database directly."""
    direct = settings.replace(database_url=support.DATABASE_URL)
    out = subprocess.run(support.outbox_cmd("status", "--json"), env=support.relay_env(direct),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    data: dict[str, object] = orjson.loads(out.stdout)
    return data


async def under_way(relays: Callable[..., RelayProcess], ledger: Ledger, consumer: Collector,
                    settings: Settings, queue: str, rows: int, *, delivered: int) -> RelayProcess:
    """Commit ``rows`` rows for ``queue``, start a relay, and return it once more than
    ``delivered`` messages arrived: the fault then strikes mid-drain."""
    ledger.insert(settings, rows, queue)
    relay = relays(settings)
    await until(lambda: len(consumer.received) > delivered, 30, "the drain under way")
    return relay


async def recovered(relay: RelayProcess, ledger: Ledger, settle: float = 60) -> Tally:
    """After the fault: every row settles while the same relay keeps running; then count."""
    await ledger.wait_settled(settle)
    assert relay.alive, relay.log_tail()
    return await ledger.account()


async def finish(relays: Callable[..., RelayProcess], settings: Settings,
                 timeout: float = 60) -> None:
    """A last relay drains whatever the ones before it left (their claims released) and exits 0."""
    last = relays(settings, "--drain")
    assert await last.wait(timeout) == 0, last.log_tail()


# -- the ledger --

@dataclass
class Tally:
    committed: int
    delivered: int
    dead: int
    lost: int
    pending: int
    duplicates: int
    dead_and_delivered: int
    unexpected: int

    def line(self) -> str:
        return (f"committed={self.committed} delivered={self.delivered} dead={self.dead} "
                f"lost={self.lost} pending={self.pending} duplicates={self.duplicates} "
                f"dead_and_delivered={self.dead_and_delivered}")


@dataclass
class Ledger:
    """What a test committed and what its consumers saw; `account` checks nothing is lost."""

    name: str
    settings: Settings | None = None
    url: str = support.DATABASE_URL  # where the test reads the outbox (a pair's multi-host URL)
    committed: set[str] = field(default_factory=set)
    collectors: list[Collector] = field(default_factory=list)
    tally: Tally | None = None

    def insert(self, settings: Settings, n: int, routing_key: str, **kw: Any) -> list[str]:
        """Insert n rows (tests.support.insert_rows) and remember their message ids."""
        self.settings = settings = settings.replace(database_url=support.DATABASE_URL)
        ids = [str(m) for m in support.insert_rows(settings, n, routing_key, **kw)]
        self.committed.update(ids)
        return ids

    def add(self, message_ids: Sequence[Any]) -> None:
        self.committed.update(str(m) for m in message_ids)

    def received(self) -> list[str]:
        return [m for c in self.collectors for m in c.received]

    def delivered(self) -> set[str]:
        return set().union(*(c.seen for c in self.collectors))

    def _rows(self) -> tuple[set[str], set[str]]:
        assert self.settings is not None
        rows = execute(self.settings, "SELECT message_id::text, dead_at IS NOT NULL FROM {}.outbox "
                                      "WHERE sent_at IS NULL", url=self.url)
        dead = {r[0] for r in rows if r[1]}
        pending = {r[0] for r in rows if not r[1]}
        return dead, pending

    def pending(self) -> set[str]:
        """Message ids of the committed rows neither sent (nor deleted) nor dead."""
        return self._rows()[1] & self.committed

    def settled(self) -> bool:
        """Every committed row is delivered or dead, and nothing is pending."""
        dead, pending = self._rows()
        return not pending and self.committed <= (self.delivered() | dead)

    def _progress(self) -> tuple[int, int]:
        """(rows in the table neither sent nor dead, distinct message ids delivered): one count
        query, cheap enough to poll while a consumer reads tens of thousands of messages."""
        assert self.settings is not None
        rows = execute(self.settings, "SELECT count(*) FROM {}.outbox "
                                      "WHERE sent_at IS NULL AND dead_at IS NULL", url=self.url)
        return int(rows[0][0]), sum(len(c.seen) for c in self.collectors)

    async def wait_settled(self, timeout: float) -> None:
        """Wait until every row is delivered or dead; fail once nothing moved for ``timeout``
        seconds (no row left the pending ones, no new message id arrived).

        Driven by progress, not by a budget for the whole drain: on a loaded machine the
        consumer alone may need minutes for 20,000 messages while the relay drained the table
        long before. The poll is one count query, run off the event loop, so it does not slow
        the consumers it waits for; the full comparison of message ids runs only once nothing
        is pending."""
        loop = asyncio.get_running_loop()
        seen: tuple[int, int] | None = None
        moved_at = loop.time()
        while True:
            now = await asyncio.to_thread(self._progress)
            if now[0] == 0:  # the table holds only dead rows now: a small query
                dead, pending = await asyncio.to_thread(self._rows)
                if not pending and self.committed <= (self.delivered() | dead):
                    return
            if now != seen:
                seen, moved_at = now, loop.time()
            elif loop.time() - moved_at > timeout:
                raise AssertionError(
                    f"nothing moved for {timeout:g}s waiting for every row delivered or dead: "
                    f"{now[0]} rows pending in the table, {now[1]} distinct message ids "
                    f"delivered, {len(self.committed)} committed")
            await asyncio.sleep(0.2)

    async def quiet(self, seconds: float = 0.5) -> None:
        """Wait until no message arrived for ``seconds`` (late duplicates are counted too)."""
        seen = -1
        while seen != len(self.received()):
            seen = len(self.received())
            await asyncio.sleep(seconds)

    def count(self) -> tuple[Tally, dict[str, int]]:
        """Count now, asserting nothing: the tally and the duplicated message ids."""
        dead, pending = self._rows()
        received = self.received()
        delivered = set(received)
        lost = self.committed - delivered - dead
        dups = {m: n - 1 for m, n in Counter(received).items() if n > 1}
        tally = Tally(
            committed=len(self.committed), delivered=len(delivered & self.committed),
            dead=len(dead & self.committed), lost=len(lost),
            pending=len(pending & self.committed), duplicates=sum(dups.values()),
            dead_and_delivered=len(dead & delivered), unexpected=len(delivered - self.committed))
        return tally, dups

    async def account(self, *, wait: float = 60.0, quiet: float = 0.5) -> Tally:
        """Wait until every row is delivered or dead, then count; assert nothing is lost."""
        with contextlib.suppress(AssertionError):
            await self.wait_settled(wait)
        await self.quiet(quiet)
        tally, dups = self.count()
        self.tally = tally
        TALLIES.append((self.name, tally))
        print(f"\n[ledger] {self.name}: {tally.line()}")
        if dups:
            print(f"[ledger] duplicated message ids ({len(dups)}): "
                  f"{sorted(dups.items())[:20]}{' ...' if len(dups) > 20 else ''}")
        assert not tally.lost, f"{tally.lost} rows lost"
        assert not tally.pending, f"{tally.pending} rows still pending"
        assert tally.delivered + tally.dead - tally.dead_and_delivered == tally.committed
        assert tally.unexpected == 0
        return tally


@contextlib.asynccontextmanager
async def collecting(ledger: Ledger, queues: Sequence[str],
                     urls: Sequence[str] = (support.AMQP_URL,),
                     **arguments: Any) -> AsyncIterator[Collector]:
    async with Collector(queues, urls, arguments or None) as c:
        ledger.collectors.append(c)
        yield c


# -- producing while faults happen --

Columns = dict[str, Any]
"""One row to insert: column name -> value (plain SQL, as any producer would write it)."""


@dataclass
class Committed:
    """A committed row: where the ledger and the order checks find it."""

    id: int
    key: str | None
    poison: str | None  # the poison class, for a row the relay must park


class Producers:
    """Concurrent producers that commit rows, a few per transaction, until `stop`, as an
    application does while the relay runs.

    They are paced by progress, not by time: a producer waits while more than ``backlog`` good
    rows are committed but not yet delivered, so rows keep coming through every fault on a
    machine of any speed, and the backlog stays bounded. Each producer writes its own keys only
    (``keys[p]``), so the writers of a key never overlap and a key's ids follow its commits
    (docs/ordering.md, "Transactions that commit out of id order"); transactions of different
    producers do overlap, which holds keyed rows back behind the ordering horizon.
    ``make_row(rng, key)`` returns the columns of one good row; ``poison(rng)``, when given, an
    occasional poison row as (class, columns), inserted in a transaction of its own.
    """

    def __init__(self, ledger: Ledger, settings: Settings, consumer: Collector,
                 keys: Sequence[Sequence[str | None]],
                 make_row: Callable[[Any, str | None], Columns],
                 *, seed: int, backlog: int = 2000, per_transaction: int = 8,
                 poison: Callable[[Any], tuple[str, Columns]] | None = None,
                 poison_every: int = 0) -> None:
        import random

        self.ledger = ledger
        self.settings = settings.replace(database_url=support.DATABASE_URL)
        ledger.settings = self.settings
        self.consumer = consumer
        self.keys = keys
        self.make_row = make_row
        self.backlog = backlog
        self.per_transaction = per_transaction
        self.poison = poison
        self.poison_every = poison_every
        self.rows: dict[str, Committed] = {}  # message id -> the row
        self.poisoned: dict[str, int] = Counter()  # committed poison rows by class
        self.refused: dict[str, int] = Counter()  # poison rows the database refused at insert
        self.transactions = 0
        self._rngs = [random.Random(seed * 1000 + p) for p in range(len(keys))]
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._poison_rows = 0

    @property
    def good(self) -> int:
        return len(self.rows) - self._poison_rows

    @property
    def committed(self) -> int:
        return len(self.rows)

    def start(self) -> Producers:
        self._tasks = [asyncio.create_task(self._produce(p), name=f"producer-{p}")
                       for p in range(len(self.keys))]
        return self

    async def stop(self) -> None:
        """Stop after the transactions under way commit; re-raise a producer's failure."""
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def check(self) -> None:
        """Raise a producer's failure now (rather than at `stop`)."""
        for t in self._tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]

    async def burst(self, routing_key: str, keys: Sequence[str | None]) -> int:
        """Commit one row per entry of ``keys`` in one statement (payload ``{"n": i}``); returns
        how many. The caller is the only writer of these keys (see the class docstring)."""
        q = sql.SQL(
            "INSERT INTO {}.outbox (routing_key, payload, ordering_key) "
            "SELECT %s, jsonb_build_object('n', g.n), g.k "
            "FROM unnest(%s::text[]) WITH ORDINALITY AS g(k, n) ORDER BY g.n "
            "RETURNING message_id::text, id, ordering_key").format(
                sql.Identifier(self.settings.schema))
        async with await psycopg.AsyncConnection.connect(support.DATABASE_URL,
                                                         autocommit=True) as conn:
            cur = await conn.execute(q, (routing_key, list(keys)))
            got = await cur.fetchall()
        for mid, row_id, key in got:
            self.rows[str(mid)] = Committed(int(row_id), key, None)
            self.ledger.committed.add(str(mid))
        return len(got)

    async def _room(self) -> None:
        """Wait until the backlog of good rows has room (progress by the relays)."""
        while self.good - self.consumer.count >= self.backlog and not self._stop.is_set():
            self.consumer.arrived.clear()
            stop = asyncio.ensure_future(self._stop.wait())
            try:
                async with asyncio.timeout(120):
                    await asyncio.wait([stop, asyncio.ensure_future(self.consumer.arrived.wait())],
                                       return_when=asyncio.FIRST_COMPLETED)
            except TimeoutError:
                raise AssertionError("no row delivered for 120s: the relays made no progress"
                                     ) from None
            finally:
                stop.cancel()

    async def _produce(self, p: int) -> None:
        rng = self._rngs[p]
        table = sql.Identifier(self.settings.schema)
        async with await psycopg.AsyncConnection.connect(
                support.DATABASE_URL, autocommit=True, application_name="outbox-chaos") as conn:
            while not self._stop.is_set():
                await self._room()
                if self._stop.is_set():
                    break
                if self.poison is not None and self.poison_every and \
                        rng.randrange(self.poison_every) == 0:
                    kind, columns = self.poison(rng)
                    await self._insert_poison(conn, table, kind, columns)
                    continue
                batch = [self.make_row(rng, rng.choice(self.keys[p]))
                         for _ in range(rng.randint(1, self.per_transaction))]
                async with conn.transaction():
                    got = [await self._insert(conn, table, row) for row in batch]
                    # the application's own work in the same transaction: transactions of
                    # different producers overlap, as they do in production
                    await asyncio.sleep(rng.choice((0.0, 0.0, 0.001, 0.005)))
                for (mid, row_id), row in zip(got, batch, strict=True):
                    self.rows[mid] = Committed(row_id, row.get("ordering_key"), None)
                    self.ledger.committed.add(mid)
                self.transactions += 1

    async def _insert(self, conn: psycopg.AsyncConnection[Any], table: sql.Identifier,
                      columns: Columns) -> tuple[str, int]:
        q = sql.SQL("INSERT INTO {}.outbox ({}) VALUES ({}) RETURNING message_id::text, id").format(
            table, sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(sql.Placeholder() * len(columns)))
        cur = await conn.execute(q, list(columns.values()))
        row = await cur.fetchone()
        assert row is not None
        return str(row[0]), int(row[1])

    async def _insert_poison(self, conn: psycopg.AsyncConnection[Any], table: sql.Identifier,
                             kind: str, columns: Columns) -> None:
        try:
            async with conn.transaction():
                mid, row_id = await self._insert(conn, table, columns)
        except (psycopg.errors.CheckViolation, psycopg.errors.DataError,
                psycopg.errors.ProgramLimitExceeded) as exc:
            # refused at insert (a constraint says so): never committed, nothing to park
            self.refused[f"{kind} ({type(exc).__name__})"] += 1
            return
        self.rows[mid] = Committed(row_id, columns.get("ordering_key"), kind)
        self.ledger.committed.add(mid)
        self.poisoned[kind] += 1
        self._poison_rows += 1


def order_violations(received: Sequence[str], rows: dict[str, Committed]
                     ) -> dict[str, list[tuple[int, int]]]:
    """Per key, the pairs of first deliveries (in arrival order) whose ids went backwards."""
    last: dict[str, int] = {}
    wrong: dict[str, list[tuple[int, int]]] = {}
    for m in dict.fromkeys(received):  # first deliveries, in arrival order
        row = rows.get(m)
        if row is None or row.key is None:
            continue
        before = last.get(row.key)
        if before is not None and before >= row.id:
            wrong.setdefault(row.key, []).append((before, row.id))
        last[row.key] = row.id
    return wrong
