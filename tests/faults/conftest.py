"""Fixtures of the fault suite: relay processes, proxies, a reconnecting consumer, the ledger.

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
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiormq
import psycopg
import pytest
from psycopg import sql

from outbox.frames import reader_died
from outbox.settings import Settings
from tests import support
from tests.proxy import FaultProxy
from tests.rabbit_node import RabbitNode

PG_PORT = 5432
AMQP_PORT = 5672
FAST = dict(poll_interval=0.2, retry_base=0.05, retry_max=0.2, publish_timeout=2.0,
            db_timeout=3.0, http_port=0, stats_interval=1.0)
TALLIES: list[tuple[str, Tally]] = []


# -- waiting --

async def until(cond: Callable[[], Any | Awaitable[Any]], timeout: float, what: str,
                interval: float = 0.05) -> Any:
    """Poll ``cond`` (sync or async) until it is truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


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


@pytest.fixture
def relays(request: pytest.FixtureRequest) -> Iterator[Callable[..., RelayProcess]]:
    """Start relay processes (``relays(settings, *args, **env)``); all killed afterwards (and
    their last log lines printed when the test failed)."""
    started: list[RelayProcess] = []

    def start(settings: Settings, *args: str, **env: str) -> RelayProcess:
        r = RelayProcess(settings, *args, **env)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()
        if getattr(request.node, "_fault_failed", False):
            path = Path(tempfile.gettempdir()) / f"outbox-relay-{r.pid}.log"
            path.write_text("\n".join(r.lines) + "\n")
            print(f"\n--- relay {r.pid} (exit {r.proc.returncode}): whole log in {path}; "
                  f"last lines ---\n{r.log_tail(25)}")


# -- proxies and private nodes --

@pytest.fixture
def db_proxy() -> Iterator[FaultProxy]:
    """A proxy in front of the shared PostgreSQL (the relay's only way to the database)."""
    with FaultProxy(PG_PORT) as proxy:
        yield proxy


@pytest.fixture
def amqp_proxy() -> Iterator[FaultProxy]:
    """A proxy in front of the shared RabbitMQ."""
    with FaultProxy(AMQP_PORT) as proxy:
        yield proxy


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


def execute(settings: Settings, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run SQL on the test schema (``{}`` in the query is the quoted schema)."""
    q = sql.SQL(query).format(sql.Identifier(settings.schema))  # type: ignore[arg-type,unused-ignore]
    with psycopg.connect(support.DATABASE_URL, autocommit=True) as conn:
        cur = conn.execute(q, params)
        return cur.fetchall() if cur.description else []


# -- consuming --

class Collector:
    """Consumes queues on one or more brokers, reconnecting after a broker dies; records every
    message id it receives (and acks it)."""

    def __init__(self, queues: Sequence[str], urls: Sequence[str] = (support.AMQP_URL,),
                 arguments: dict[str, Any] | None = None) -> None:
        self.queues = list(queues)
        self.urls = list(urls)
        self.arguments = arguments
        self.received: list[str] = []
        self.bodies: dict[str, bytes] = {}
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
        self.received.append(mid)
        self.bodies[mid] = msg.body
        tag = getattr(msg.delivery, "delivery_tag", None)
        if isinstance(tag, int):
            with contextlib.suppress(Exception):
                await msg.channel.basic_ack(tag)

    @property
    def distinct(self) -> set[str]:
        return set(self.received)


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
        return set(self.received())

    def _rows(self) -> tuple[set[str], set[str]]:
        assert self.settings is not None
        rows = execute(self.settings, "SELECT message_id::text, dead_at IS NOT NULL FROM {}.outbox "
                                      "WHERE sent_at IS NULL")
        dead = {r[0] for r in rows if r[1]}
        pending = {r[0] for r in rows if not r[1]}
        return dead, pending

    def settled(self) -> bool:
        """Every committed row is delivered or dead, and nothing is pending."""
        dead, pending = self._rows()
        return not pending and self.committed <= (self.delivered() | dead)

    async def wait_settled(self, timeout: float) -> None:
        await until(self.settled, timeout, "every row delivered or dead", interval=0.2)

    async def account(self, *, wait: float = 60.0, quiet: float = 0.5) -> Tally:
        """Wait until every row is delivered or dead, then count; assert nothing is lost."""
        with contextlib.suppress(AssertionError):
            await self.wait_settled(wait)
        # late duplicates: wait until no message arrived for ``quiet`` seconds
        seen = -1
        while seen != len(self.received()):
            seen = len(self.received())
            await asyncio.sleep(quiet)
        dead, pending = self._rows()
        received = self.received()
        delivered = set(received)
        lost = self.committed - delivered - dead
        counts = Counter(received)
        dups = {m: n - 1 for m, n in counts.items() if n > 1}
        tally = Tally(
            committed=len(self.committed), delivered=len(delivered & self.committed),
            dead=len(dead & self.committed), lost=len(lost),
            pending=len(pending & self.committed), duplicates=sum(dups.values()),
            dead_and_delivered=len(dead & delivered), unexpected=len(delivered - self.committed))
        self.tally = tally
        TALLIES.append((self.name, tally))
        print(f"\n[ledger] {self.name}: {tally.line()}")
        if dups:
            print(f"[ledger] duplicated message ids ({len(dups)}): "
                  f"{sorted(dups.items())[:20]}{' ...' if len(dups) > 20 else ''}")
        assert not lost, f"{len(lost)} rows lost, e.g. {sorted(lost)[:5]}"
        assert not tally.pending, f"{tally.pending} rows still pending"
        assert tally.delivered + tally.dead - tally.dead_and_delivered == tally.committed
        assert tally.unexpected == 0
        return tally


@pytest.fixture
def ledger(request: pytest.FixtureRequest) -> Iterator[Ledger]:
    led = Ledger(request.node.name)
    yield led
    if led.tally is None and not getattr(request.node, "_fault_failed", False):
        pytest.fail("the test did not account for its rows (await ledger.account())")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        item._fault_failed = True  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def collecting(ledger: Ledger, queues: Sequence[str],
                     urls: Sequence[str] = (support.AMQP_URL,),
                     **arguments: Any) -> AsyncIterator[Collector]:
    async with Collector(queues, urls, arguments or None) as c:
        ledger.collectors.append(c)
        yield c


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TALLIES:
        return
    terminalreporter.section("fault suite: rows accounted")
    for name, t in TALLIES:
        terminalreporter.write_line(f"{name}: {t.line()}")


def node_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    return tmp_path_factory.mktemp(name)
