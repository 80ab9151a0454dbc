"""A long chaos run: random faults, driven by progress, while producers keep committing rows.

    python -m tests.chaos --iterations 100 --seed 7      (or: make chaos)

Relay processes publish to a private RabbitMQ node (`tests.rabbit_node`: the shared broker is
never touched) through a fault proxy, and reach PostgreSQL through another
(`tests.proxy.FaultProxy`). Producers commit keyed and unkeyed rows throughout, a few per
transaction, with a poison row now and then. Each iteration commits a burst of rows, waits until
the consumer has seen the next few hundred (so the fault lands mid-burst, on a machine of any
speed), then applies one fault at random:

    sigkill       a relay is killed, and started again
    sigterm       a relay is stopped (it must exit 0 within its shutdown deadline), and started
    broker_cut    every relay's broker connection is cut
    broker_stall  the broker link goes silent (both ways, or only the confirms) until a relay
                  gives it up by its own deadline (its log says so); then it comes back
    db_cut        every relay's database session is terminated and its socket cut; half the
                  time new connections are refused until a relay reports the database gone
    node_restart  the RabbitMQ node is killed (or stopped cleanly) and started again

It ends by stopping the producers, restoring every link, waiting until every committed row is
delivered or dead, and counting. It prints ``name: value`` lines; it exits 1 when an invariant
fails (lost, pending, dead_unexpected, order_violations, relay_exits_unexpected,
sigterm_bad_exits must all be 0) and 2 when the overall deadline passes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from psycopg.types.json import Jsonb

from outbox.settings import Settings
from tests import support
from tests.faults.harness import (
    Collector,
    Columns,
    Ledger,
    Producers,
    RelayProcess,
    execute,
    fault_settings,
    order_violations,
    terminate,
    until,
)
from tests.proxy import FaultProxy
from tests.rabbit_node import RabbitNode

MAX_BODY = 8192  # OUTBOX_MAX_BODY_BYTES of the relays
FRAME_MAX = 131_072  # RabbitMQ's default frame_max, which the private node negotiates
MISSING_EXCHANGE = "chaos_no_such_exchange"

POISON: dict[str, Callable[[str], Columns]] = {
    "oversized_body": lambda q: {"routing_key": q, "payload": Jsonb({"blob": "x" * MAX_BODY})},
    "missing_exchange": lambda q: {"routing_key": q, "exchange": MISSING_EXCHANGE,
                                   "payload": Jsonb({"poison": True})},
    "headers_over_frame_max": lambda q: {"routing_key": q, "payload": Jsonb({"poison": True}),
                                         "headers": Jsonb({"big": "h" * (FRAME_MAX + 1000)})},
    "created_before_1970": lambda q: {"routing_key": q, "payload": Jsonb({"poison": True}),
                                      "created_at": "1969-07-20 20:17:40+00"},
    "headers_nested_2000": lambda q: {"routing_key": q, "payload": Jsonb({"poison": True}),
                                      "headers": '{"a":' * 2000 + "1" + "}" * 2000},
    "routing_key_over_255": lambda q: {"routing_key": "r" * 300,
                                       "payload": Jsonb({"poison": True})},
    "header_int_over_64_bits": lambda q: {"routing_key": q, "payload": Jsonb({"poison": True}),
                                          "headers": '{"n": 36893488147419103232}'},  # 2**65
}
HANDLED = ("oversized_body", "missing_exchange")  # parked by the relay before issue 13
FAULTS = {"sigkill": 3, "sigterm": 2, "broker_cut": 2, "broker_stall": 2, "db_cut": 2,
          "node_restart": 1}  # kind -> weight
MUST_BE_ZERO = ("lost", "pending", "dead_unexpected", "order_violations",
                "relay_exits_unexpected", "sigterm_bad_exits")


class Failed(Exception):
    """An iteration could not go on (no progress, a fault that did not take): the run fails."""


class Chaos:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = workdir
        self.schema = support.unique("chaos")
        self.queue = support.unique("chaos_q")
        self.node = RabbitNode(workdir)
        self.amqp = FaultProxy(self.node.port)
        self.db = FaultProxy(5432)
        self.ledger = Ledger("chaos")
        self.relays: list[RelayProcess] = []
        self.retired: list[RelayProcess] = []
        self.faults: Counter[str] = Counter()
        self.figures: dict[str, int] = Counter()
        self.iteration = 0
        self.settings: Settings | None = None
        self.dropped: list[str] = []

    # -- setup and teardown ----------------------------------------------------------------------

    async def start(self) -> Settings:
        support.create_schema(self.schema)
        if not self.args.insert_checks:
            self.dropped = self.drop_insert_checks()
        await asyncio.to_thread(self.node.start)
        self.amqp.start()
        self.db.start()
        await support.declare_queue(self.queue, self.node.url)
        self.settings = fault_settings(
            self.schema, amqp_url=self.amqp.url(self.node.url),
            database_url=self.db.url(support.DATABASE_URL), batch_size=100,
            max_body_bytes=MAX_BODY, max_attempts=8, shutdown_timeout=5.0)
        self.relays = [RelayProcess(self.settings) for _ in range(self.args.relays)]
        return self.settings

    def drop_insert_checks(self) -> list[str]:
        """Disable the trigger that refuses rows AMQP cannot carry at insert (revision 0003): like
        a table that holds rows from before it, every poison row then reaches the relay, which
        must park it."""
        settings = support.make_settings(self.schema)
        names = [str(r[0]) for r in execute(
            settings, "SELECT tgname FROM pg_trigger WHERE tgrelid = "
                      "(quote_ident(%s) || '.outbox')::regclass "
                      "AND tgname = 'outbox_refuse_unframable'", (self.schema,))]
        for name in names:
            execute(settings, f'ALTER TABLE {{}}.outbox DISABLE TRIGGER "{name}"')
        return names

    def close(self, failed: bool) -> None:
        for r in [*self.relays, *self.retired]:
            r.stop()
            if failed:
                path = self.workdir / f"relay-{r.pid}.log"
                path.write_text("\n".join(r.lines) + "\n")
        if failed:
            print(f"relay logs: {self.workdir}/relay-*.log", file=sys.stderr)
        self.amqp.close()
        self.db.close()
        self.node.close()
        support.drop_schema(self.schema)

    # -- the run ---------------------------------------------------------------------------------

    async def run(self) -> None:
        settings = await self.start()
        poison_kinds = self.args.poison
        keys: list[list[str | None]] = [
            [*(f"p{p}k{k}" for k in range(20)), *([None] * 14)] for p in range(3)]
        burst_keys: list[str | None] = [*(f"b{k}" for k in range(10)), None, None, None]
        serial = iter(range(1 << 62))

        def make_row(rng: random.Random, key: str | None) -> Columns:
            return {"routing_key": self.queue, "payload": Jsonb({"n": rng.randrange(1 << 30)}),
                    "ordering_key": key}

        def poison(rng: random.Random) -> tuple[str, Columns]:
            kind = rng.choice(poison_kinds)
            columns = POISON[kind](self.queue)
            if rng.random() < 0.5:  # a key of its own: the dead row blocks nobody else
                columns["ordering_key"] = f"poison{next(serial)}"
            return kind, columns

        t0 = time.monotonic()
        async with Collector([self.queue], [self.node.url]) as consumer:
            self.ledger.collectors.append(consumer)
            producers = Producers(self.ledger, settings, consumer, keys, make_row,
                                  seed=self.args.seed, backlog=1500, poison=poison if
                                  poison_kinds else None, poison_every=25).start()
            try:
                for i in range(1, self.args.iterations + 1):
                    self.iteration = i
                    burst = self.rng.randrange(100, 400)
                    await producers.burst(self.queue,
                                          [self.rng.choice(burst_keys) for _ in range(burst)])
                    target = producers.good - burst + self.rng.randrange(20, burst // 2)
                    await consumer.reached(target, 90, f"progress before iteration "
                                                       f"{self.iteration}")
                    producers.check()
                    kind = self.rng.choices(list(FAULTS), weights=list(FAULTS.values()))[0]
                    undelivered = producers.good - consumer.count
                    await self.fault(kind)
                    self.faults[kind] += 1
                    self.check_relays()
                    print(f"[{self.iteration}/{self.args.iterations}] {kind:<12} "
                          f"delivered={consumer.count} committed={producers.committed} "
                          f"undelivered_at_fault={undelivered} "
                          f"t={time.monotonic() - t0:.1f}s", flush=True)
            finally:
                await producers.stop()  # the last fault has happened: no more rows
            self.amqp.restore()
            self.db.restore()
            print(f"draining: {producers.committed - consumer.count} rows to go", flush=True)
            try:
                # nothing pending first (a row wrongly deleted is never delivered: waiting for
                # it would only delay the count), then the deliveries still on their way
                await until(lambda: not self.ledger.pending(), self.args.drain_timeout,
                            "no row pending", interval=0.2)
                with contextlib.suppress(AssertionError):
                    await self.ledger.wait_settled(30)
            except AssertionError:
                left = execute(self.ledger.settings or settings,
                               "SELECT count(*), min(id), max(attempts), min(last_error) "
                               "FROM {}.outbox WHERE sent_at IS NULL AND dead_at IS NULL")
                print(f"drain: not settled after {self.args.drain_timeout:g}s; pending rows "
                      f"(count, min id, max attempts, an error): {left[0]}", file=sys.stderr)
                for r in self.relays:
                    print(f"--- relay {r.pid}, last lines:\n{r.log_tail(5)}", file=sys.stderr)
            await self.ledger.quiet(1.0)
            self.check_relays()
            self.count(producers, consumer)
            self.figures["elapsed_seconds"] = round(time.monotonic() - t0)

    def count(self, producers: Producers, consumer: Collector) -> None:
        tally, _ = self.ledger.count()
        assert self.ledger.settings is not None
        dead = {r[0] for r in execute(
            self.ledger.settings, "SELECT message_id::text FROM {}.outbox "
                                  "WHERE dead_at IS NOT NULL")}
        poison = {m for m, r in producers.rows.items() if r.poison is not None}
        wrong = order_violations(consumer.received, producers.rows)
        f = self.figures
        f["chaos_iterations"] = self.iteration
        f["rows_committed"] = tally.committed
        f["delivered"] = tally.delivered
        f["lost"] = tally.lost
        f["pending"] = tally.pending
        f["duplicates"] = tally.duplicates
        f["dead_expected"] = len(dead & poison)
        f["dead_unexpected"] = len(dead - poison)
        f["poison_delivered"] = len(poison & consumer.seen)
        f["order_violations"] = sum(len(v) for v in wrong.values())
        f["relay_exits_unexpected"] = self.figures["relay_exits_unexpected"]
        f["sigterm_bad_exits"] = self.figures["sigterm_bad_exits"]
        f["insert_checks_dropped"] = len(self.dropped)
        f["keys"] = len({r.key for r in producers.rows.values() if r.key is not None})
        f["producer_transactions"] = producers.transactions
        for kind in POISON:
            f[f"poison_committed_{kind}"] = producers.poisoned.get(kind, 0)
        for kind, n in sorted(producers.refused.items()):
            f[f"refused_at_insert_{kind.split(' ')[0]}"] += n
        for kind in FAULTS:
            f[f"faults_{kind}"] = self.faults[kind]
        if wrong:
            print(f"order violations (key: [(earlier id, later id)]): "
                  f"{dict(list(wrong.items())[:5])}", file=sys.stderr)
        lost = self.ledger.committed - self.ledger.delivered() - dead
        if lost:
            print(f"lost rows: {sorted(lost)[:10]}", file=sys.stderr)

    # -- faults ----------------------------------------------------------------------------------

    def check_relays(self) -> None:
        """A relay that exited without being told to is a failure; it is started again."""
        assert self.settings is not None
        for i, r in enumerate(self.relays):
            if not r.alive:
                self.figures["relay_exits_unexpected"] += 1
                print(f"relay {r.pid} exited by itself ({r.proc.returncode}):\n{r.log_tail(10)}",
                      file=sys.stderr)
                self.retired.append(r)
                self.relays[i] = RelayProcess(self.settings)

    def logged(self, pattern: str) -> int:
        return sum(len(r.logged(pattern)) for r in self.relays)

    async def logs_anew(self, pattern: str, timeout: float, before: int | None = None) -> None:
        """Wait until the relays logged more lines matching ``pattern`` than ``before`` (by
        default, than they have now)."""
        had = self.logged(pattern) if before is None else before
        try:
            await until(lambda: self.logged(pattern) > had, timeout,
                        f"a relay to log {pattern!r}")
        except AssertionError as exc:
            raise Failed(str(exc)) from None

    async def fault(self, kind: str) -> None:
        assert self.settings is not None
        if kind in ("sigkill", "sigterm"):
            i = self.rng.randrange(len(self.relays))
            victim = self.relays[i]
            sig = signal.SIGKILL if kind == "sigkill" else signal.SIGTERM
            if sig == signal.SIGTERM:
                # its handlers are installed before its broker connection is made: a relay
                # just started would die of the signal's default action (exit -15)
                await victim.wait_log(r"broker connected", 60)
            victim.kill(sig)
            code = await victim.wait(self.settings.shutdown_timeout + 15)
            if kind == "sigterm" and code != 0:
                self.figures["sigterm_bad_exits"] += 1
                print(f"relay {victim.pid} exited {code} after SIGTERM:\n{victim.log_tail(10)}",
                      file=sys.stderr)
            self.retired.append(victim)
            self.relays[i] = RelayProcess(self.settings)
        elif kind == "broker_cut":
            self.amqp.cut()
        elif kind == "broker_stall":
            direction = self.rng.choice(("both", "down"))
            before = self.logged(r"within the deadline: reconnecting")
            self.amqp.stall(direction)  # type: ignore[arg-type]
            try:
                # until a relay gives the link up by its own publish deadline
                await self.logs_anew(r"within the deadline: reconnecting", 30, before)
            finally:
                self.amqp.restore()
        elif kind == "db_cut":
            refuse = self.rng.random() < 0.5
            if refuse:
                self.db.refuse()
            terminate(self.db.upstream_ports())
            self.db.cut()
            if refuse:
                try:
                    await self.logs_anew(r"database unavailable", 30)
                finally:
                    self.db.refuse(False)
        elif kind == "node_restart":
            if self.rng.random() < 0.5:
                await asyncio.to_thread(self.node.restart)  # a crash
            else:
                await asyncio.to_thread(self.node.stop)  # a clean shutdown
                await asyncio.to_thread(self.node.start)
        else:
            raise ValueError(kind)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.chaos", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    p.add_argument("--iterations", type=int, default=100, help="faults to apply (default 100)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a random one)")
    p.add_argument("--relays", type=int, default=2, help="relay processes (default 2)")
    p.add_argument("--poison", default="all",
                   help="poison classes mixed in: 'all', 'handled' (those parked before issue "
                        f"13: {', '.join(HANDLED)}), 'none' or a comma-separated list of "
                        f"{', '.join(POISON)} (default all)")
    p.add_argument("--insert-checks", action="store_true",
                   help="keep the trigger that refuses some poison classes at insert (the "
                        "refused rows are counted as refused_at_insert_*); by default it is "
                        "disabled, so that every poison row reaches the relay")
    p.add_argument("--deadline", type=float, default=None,
                   help="overall deadline in seconds; the run fails when it passes "
                        "(default 300 + 15 per iteration)")
    p.add_argument("--drain-timeout", type=float, default=180.0,
                   help="seconds for the final drain (default 180)")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    if args.deadline is None:
        args.deadline = 300 + 15 * args.iterations
    choice = {"all": list(POISON), "handled": list(HANDLED), "none": []}
    args.poison = choice.get(args.poison) or args.poison.split(",")
    unknown = set(args.poison) - set(POISON)
    if unknown:
        p.error(f"unknown poison classes: {', '.join(sorted(unknown))}")
    return args


async def main(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="outbox-chaos-"))
    chaos = Chaos(args, workdir)
    print(f"chaos: seed {args.seed}, {args.iterations} iterations, {args.relays} relays, poison "
          f"{','.join(args.poison) or 'none'}, deadline {args.deadline:g}s", flush=True)
    code, failed = 1, ["iteration"]
    main_task = asyncio.current_task()
    assert main_task is not None
    for signum in (signal.SIGINT, signal.SIGTERM):  # end cleanly: no relay or node left behind
        asyncio.get_running_loop().add_signal_handler(signum, main_task.cancel)
    try:
        async with asyncio.timeout(args.deadline):
            await chaos.run()
        failed = [name for name in MUST_BE_ZERO if chaos.figures[name]]
        code = 1 if failed else 0
    except TimeoutError:
        print(f"chaos: FAILED: the overall deadline of {args.deadline:g}s passed during "
              f"iteration {chaos.iteration}", file=sys.stderr)
        code, failed = 2, ["deadline"]
    except (Failed, AssertionError) as exc:
        print(f"chaos: FAILED during iteration {chaos.iteration}: {exc}", file=sys.stderr)
    except asyncio.CancelledError:
        print(f"chaos: interrupted during iteration {chaos.iteration}", file=sys.stderr)
        failed = ["interrupted"]
    finally:
        chaos.figures.setdefault("chaos_iterations", chaos.iteration)
        first = ("chaos_iterations", "rows_committed", "delivered", *MUST_BE_ZERO[:2],
                 "duplicates", "dead_expected", *MUST_BE_ZERO[2:])
        for name in sorted(chaos.figures, key=lambda n: first.index(n) if n in first
                           else len(first)):
            print(f"{name}: {chaos.figures[name]}")
        chaos.close(failed=code != 0)
    if code == 0:
        shutil.rmtree(workdir, ignore_errors=True)
        print("chaos: every invariant held")
    else:
        print(f"chaos: FAILED: {', '.join(failed)} (seed {args.seed})", file=sys.stderr)
    return code


def run(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # the consumer's and the proxies' reconnect chatter is expected here, not news
    logging.basicConfig(level=logging.CRITICAL)
    return asyncio.run(main(args))


if __name__ == "__main__":
    sys.exit(run())
