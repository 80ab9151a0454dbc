"""Latency under a steady load offered from outside the measuring process.

Three processes besides the servers, none of them the one that measures:

* **the producers**: `pgbench` at a fixed rate (``-R``), a few connections each committing
  one-row transactions, as an application would. Each row carries in its payload its id (``n``),
  the server's clock when it was inserted (``i``, ``clock_timestamp()``) and its transaction
  (``x``). pgbench says how many transactions it committed and at what rate: the offered load is
  reported as measured, never assumed.
* **the relay**: `outbox relay` as a user runs it, with its debug log on, whose line per batch
  ("batch published") says when the broker's confirms of which row ids reached it.
* **the consumer**: bench/receiver.py, which notes when each message reached it.

Figures, per row, all on the machine's one wall clock (PostgreSQL's timestamps and `time.time`):

* **commit-to-confirm**: from the producer's commit (the server's commit timestamp, with
  ``track_commit_timestamp`` on: `python -m bench` starts its server so) to the broker's confirm
  reaching the relay. Without commit timestamps, from the insert instead (an upper bound: the
  commit follows the insert in the same one-row transaction).
* **insert-to-receive**: from the insert to the consumer receiving the message (the issue's
  reference figure).

The measuring process only starts the others, waits for the consumer to count every row, and
computes the figures afterwards.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from psycopg import sql

from bench import common
from bench.common import PAD, Queue, RelayProcess, Schema, aconnect, percentile, progress
from bench.load import Receiver, confirm_times
from bench.postgres_node import binaries

# the payload's extra fields ("i", "x") take about this many characters of the pad
EXTRA_CHARS = 40


@dataclass
class Offered:
    """What pgbench committed: transactions, their rate, how far behind its schedule it started
    them (ms), and how long one took on average from its start to its commit returning (ms: the
    producer's own cost, its WAL flush included)."""

    transactions: int
    rate: float
    lag_avg_ms: float
    lag_max_ms: float
    transaction_ms: float


@dataclass
class OutsideFigures:
    """Per-row latencies in ms (see the module docstring); ``commit_timestamps`` says whether
    ``confirm_*`` start at the commit (True) or at the insert."""

    confirm_p50_ms: float
    confirm_p99_ms: float
    receive_p50_ms: float
    receive_p99_ms: float
    commit_timestamps: bool
    offered: Offered
    confirmed: int
    received: int
    relay_cpu_percent: float  # of one core, while the load ran


def script(schema: Schema, routing_key: str) -> str:
    """pgbench's transaction: one row, its own id and insert time and transaction in its payload
    (the id is drawn first so that the payload can name it)."""
    return sql.SQL(
        "INSERT INTO {table} (id, routing_key, payload) OVERRIDING SYSTEM VALUE "
        "SELECT n, {key}, jsonb_build_object('n', n, 'i', extract(epoch FROM clock_timestamp()), "
        "'x', pg_current_xact_id()::text, 'pad', repeat('x', {pad})) "
        "FROM (SELECT nextval(pg_get_serial_sequence({table_name}, 'id')) AS n) AS s;\n").format(
            table=schema.table(), key=sql.Literal(routing_key),
            pad=sql.Literal(PAD - EXTRA_CHARS),
            table_name=sql.Literal(schema.table().as_string(None))).as_string(None)


def parse_pgbench(output: str) -> Offered:
    """The committed transactions, the rate and the schedule lag of pgbench's summary."""
    def number(pattern: str) -> float:
        m = re.search(pattern, output)
        if m is None:
            raise RuntimeError(f"pgbench's summary has no {pattern!r}:\n{output[-2000:]}")
        return float(m.group(1))
    lag = re.search(r"rate limit schedule lag: avg ([\d.]+) \(max ([\d.]+)\) ms", output)
    lag_avg = float(lag.group(1)) if lag else 0.0
    return Offered(
        transactions=int(number(r"number of transactions actually processed: (\d+)")),
        rate=number(r"tps = ([\d.]+)"),
        lag_avg_ms=lag_avg if lag else float("nan"),
        lag_max_ms=float(lag.group(2)) if lag else float("nan"),
        # with --rate, pgbench's latency counts from the scheduled start: the lag is taken out
        transaction_ms=number(r"latency average = ([\d.]+) ms") - lag_avg)


async def pgbench(script_text: str, *options: str) -> str:
    """Run pgbench (prepared statements) with ``script_text`` as its transaction; its output."""
    with tempfile.TemporaryDirectory(prefix="outbox-bench-") as tmp:
        path = Path(tmp) / "insert.sql"
        path.write_text(script_text)
        proc = await asyncio.create_subprocess_exec(
            str(binaries() / "pgbench"), "--no-vacuum", "--protocol=prepared",
            f"--file={path}", *options, common.DATABASE_URL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench exited {proc.returncode}:\n{text[-2000:]}")
    return text


async def offer(script_text: str, rate: float, seconds: float, clients: int) -> Offered:
    """pgbench at ``rate`` transactions/s for ``seconds`` (whole seconds: pgbench's unit), on
    ``clients`` connections and two threads (the machine's cores)."""
    return parse_pgbench(await pgbench(
        script_text, f"--rate={rate:g}", f"--time={max(1, round(seconds))}",
        f"--client={clients}", f"--jobs={min(2, clients)}"))


async def commit_times(xids: set[str]) -> dict[str, float] | None:
    """Transaction -> its commit timestamp (epoch seconds), or None when the server does not
    keep them (``track_commit_timestamp`` off)."""
    async with await aconnect() as conn:
        cur = await conn.execute("SELECT current_setting('track_commit_timestamp') = 'on'")
        rec = await cur.fetchone()
        if not (rec and rec[0]):
            return None
        cur = await conn.execute(
            "SELECT x, extract(epoch FROM pg_xact_commit_timestamp(x::xid8::xid))::float8 "
            "FROM unnest(%s::text[]) AS x", (sorted(xids),))
        return {x: t for x, t in await cur.fetchall() if t is not None}


async def outside_latency(rate: float, seconds: float, clients: int = 4) -> OutsideFigures:
    """pgbench offers ``rate`` one-row transactions/s for ``seconds`` while a relay runs and a
    consumer receives (module docstring)."""
    async with Queue() as queue, Receiver(queue.name) as receiver:
        with Schema() as schema:
            relay = RelayProcess(schema, OUTBOX_LOG_LEVEL="debug")
            try:
                text = script(schema, queue.name)
                # one row first: the relay is connected and publishing before the load starts
                await pgbench(text, "--transactions=1")
                if not await receiver.wait_for(1, 30):
                    raise RuntimeError("the relay did not publish the warm-up row within 30 s")
                receiver.forget()
                cpu = -relay.cpu_seconds()
                began = time.perf_counter()
                offered = await offer(text, rate, seconds, clients)
                busy = time.perf_counter() - began
                cpu += relay.cpu_seconds()
                if not await receiver.wait_for(offered.transactions, 30):
                    progress(f"  only {receiver.count} of {offered.transactions} rows reached "
                             "the consumer within 30 s")
            finally:
                relay.stop()
    confirmed_at = confirm_times(relay.log)
    rows = {n: d for n, d in receiver.details.items() if len(d) == 3}
    committed = await commit_times({d[2] for d in rows.values()})
    start = ({n: committed[d[2]] for n, d in rows.items() if d[2] in committed}
             if committed is not None else {n: float(d[1]) for n, d in rows.items()})
    confirm = [(confirmed_at[n] - t) * 1000 for n, t in start.items() if n in confirmed_at]
    receive = [(float(d[0]) - float(d[1])) * 1000 for d in rows.values()]
    return OutsideFigures(
        confirm_p50_ms=percentile(confirm, 0.50), confirm_p99_ms=percentile(confirm, 0.99),
        receive_p50_ms=percentile(receive, 0.50), receive_p99_ms=percentile(receive, 0.99),
        commit_timestamps=committed is not None, offered=offered, confirmed=len(confirm),
        received=len(receive), relay_cpu_percent=cpu / busy * 100)

