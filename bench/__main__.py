"""`python -m bench [--long]`: every figure of DESIGN.md's Performance section, in one run.

Progress goes to stderr; stdout ends with one ``name: value`` line per figure. Nothing here
asserts a timing: figures are medians of rounds, ratios are taken within this one run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from bench import common, inbox, latency, load, postgres_node, throughput, wakeup
from bench.common import AMQP_URL, Figures, median, progress, spread
from outbox.settings import Settings


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--long", action="store_true",
                   help="add the 1M-row backlog and the bloat soak (tens of minutes)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per throughput figure")
    p.add_argument("--rows", type=int, default=50_000, help="backlog of the relay and ceiling")
    p.add_argument("--naive-rows", type=int, default=3_000, help="rows of the naive relay")
    p.add_argument("--keyed-rows", type=int, default=50_000, help="rows over 1,000 keys")
    p.add_argument("--hot-rows", type=int, default=2_000, help="rows of a single key")
    p.add_argument("--latency-rate", type=float, default=1_000.0)
    p.add_argument("--latency-seconds", type=float, default=10.0)
    p.add_argument("--idle-seconds", type=float, default=5.0)
    p.add_argument("--big-backlog", type=int, default=1_000_000, help="--long: the big backlog")
    p.add_argument("--soak-rate", type=float, default=2_000.0)
    p.add_argument("--soak-seconds", type=float, default=600.0)
    p.add_argument("--soak-vacuum-every", type=float, default=0.0,
                   help="seconds between VACUUMs of the outbox during the soak, standing in for "
                   "autovacuum on a server that runs without it (0: none)")
    postgres_node.add_database_url(p)
    p.add_argument("--traced-rows", type=int, default=30_000,
                   help="rows of each drain of the tracing cost (traced against untraced)")
    p.add_argument("--latency-5k-rate", type=float, default=5_000.0,
                   help="offered rate of the second latency figure (latency_5k_p99_ms)")
    p.add_argument("--skip", default="", help="comma-separated phases to skip: "
                   + ",".join(PHASES))
    p.add_argument("--only", default="", help="comma-separated phases to run (no others)")
    args = p.parse_args(argv)
    for option in ("skip", "only"):
        unknown = set(filter(None, getattr(args, option).split(","))) - set(PHASES)
        if unknown:
            p.error(f"--{option}: no phase {', '.join(sorted(unknown))} (phases: "
                    f"{','.join(PHASES)})")
    return args


PHASES = ("throughput", "keyed", "hot", "traced", "latency", "inprocess", "producers", "wakeup",
          "inbox", "backlog", "soak")


def relay_rounds(rounds: int, rows: int, startup: float, startup_cpu: float,
                 keys: int = 0) -> tuple[list[float], list[float], float]:
    """Rates (msg/s, startup excluded), CPU µs per message, and the peak RSS of the relay."""
    rates, cpu, rss = [], [], 0.0
    for r in range(rounds):
        wall, run = throughput.relay_drain(rows, keys)
        rates.append(run.published / max(1e-6, wall - startup))
        cpu.append((run.cpu - startup_cpu) / rows * 1e6)
        rss = max(rss, run.peak_rss_mb)
        progress(f"  relay{f' ({keys} keys)' if keys else ''}"
                 f"{f' round {r + 1}' if rounds > 1 else ''}: "
                 f"{rates[-1]:.0f} msg/s, {cpu[-1]:.0f} µs CPU/msg")
    return rates, cpu, rss


def outside_rounds(args: argparse.Namespace, rate: float,
                   clients: int) -> list[latency.OutsideFigures]:
    """Rounds of bench/latency.py: pgbench offers ``rate`` one-row transactions/s."""
    progress(f"phase: latency at {rate:g} one-row transactions/s offered by pgbench "
             f"({clients} connections) for {args.latency_seconds:g} s ({args.rounds} rounds)")
    rounds: list[latency.OutsideFigures] = []
    for r in range(args.rounds):
        lf = asyncio.run(latency.outside_latency(rate, args.latency_seconds, clients))
        rounds.append(lf)
        start = "commit" if lf.commit_timestamps else "insert (no commit timestamps)"
        progress(f"  round {r + 1}: offered {lf.offered.rate:.0f}/s (schedule lag avg "
                 f"{lf.offered.lag_avg_ms:.1f} ms, max {lf.offered.lag_max_ms:.0f} ms; "
                 f"transaction {lf.offered.transaction_ms:.1f} ms); "
                 f"{start}-to-confirm p50 {lf.confirm_p50_ms:.1f} ms, p99 "
                 f"{lf.confirm_p99_ms:.1f} ms; insert-to-receive p50 {lf.receive_p50_ms:.1f} ms, "
                 f"p99 {lf.receive_p99_ms:.1f} ms; relay CPU {lf.relay_cpu_percent:.0f} %")
    if not all(lf.commit_timestamps for lf in rounds):
        progress("  the server keeps no commit timestamps: 'commit-to-confirm' is measured from "
                 "the insert")
    return rounds


def outside_figures(rounds: list[latency.OutsideFigures]) -> dict[str, Any]:
    """Medians and spreads of `outside_rounds`, by the suffix of their names."""
    def of(name: str) -> list[float]:
        return [getattr(lf, name) for lf in rounds]
    offered = [lf.offered.rate for lf in rounds]
    return {
        "p50_ms": median(of("confirm_p50_ms")), "p99_ms": median(of("confirm_p99_ms")),
        "receive_p50_ms": median(of("receive_p50_ms")),
        "receive_p99_ms": median(of("receive_p99_ms")),
        "offered_per_s": median(offered),
        "schedule_lag_ms": median([lf.offered.lag_avg_ms for lf in rounds]),
        "producer_transaction_ms": median([lf.offered.transaction_ms for lf in rounds]),
        "relay_cpu_percent": median(of("relay_cpu_percent")),
        "p50_rounds": spread(of("confirm_p50_ms")), "p99_rounds": spread(of("confirm_p99_ms")),
        "offered_rounds": spread(offered),
        "rows_offered_confirmed_received":
            f"{sum(lf.offered.transactions for lf in rounds)} {sum(of('confirmed')):.0f} "
            f"{sum(of('received')):.0f}",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not args.database_url:
        progress("starting a private PostgreSQL with the stock configuration "
                 "(and track_commit_timestamp on)")
    # Commit timestamps give the latency phase each row's commit time (bench/latency.py).
    with postgres_node.database(args.database_url, {"track_commit_timestamp": "on"}) as node:
        common.DATABASE_URL = node.url if node else args.database_url
        run(args)
    return 0


def run(args: argparse.Namespace) -> None:
    skip = set(filter(None, args.skip.split(",")))
    if args.only:
        skip |= set(PHASES) - set(args.only.split(","))
    out = Figures()
    progress(f"database {common.DATABASE_URL}, broker {AMQP_URL}; {args.rounds} rounds of "
             f"{args.rows} messages")

    progress("phase: relay startup (drain of an empty outbox)")
    starts = [throughput.startup_seconds() for _ in range(args.rounds)]
    startup = median([s.wall for s in starts])
    startup_cpu = median([s.cpu for s in starts])
    out["relay_startup_s"] = startup

    ceiling: list[float] = []
    relay: list[float] = []
    peak = 0.0
    if "throughput" not in skip:
        all_at_once: list[float] = []
        windowed: list[float] = []
        defaults = Settings()
        cpu: list[float] = []
        naive: list[float] = []
        for r in range(args.rounds):
            progress(f"phase: throughput round {r + 1} of {args.rounds}")
            all_at_once.append(throughput.ceiling(args.rows))
            progress(f"  ceiling, all written, then all confirms: {all_at_once[-1]:.0f} msg/s")
            windowed.append(throughput.relay_like_ceiling(args.rows))
            progress(f"  ceiling, {defaults.concurrency} channels x {defaults.batch_size} "
                     f"in flight: {windowed[-1]:.0f} msg/s")
            ceiling.append(max(all_at_once[-1], windowed[-1]))
            rates, cpus, rss = relay_rounds(1, args.rows, startup, startup_cpu)
            relay += rates
            cpu += cpus
            peak = max(peak, rss)
            naive.append(asyncio.run(throughput.naive_rate(args.naive_rows)))
            progress(f"  naive: {naive[-1]:.0f} msg/s")
        out["ceiling_msgs_per_s"] = median(ceiling)
        out["relay_msgs_per_s"] = median(relay)
        out["naive_msgs_per_s"] = median(naive)
        out["relay_vs_ceiling"] = median(relay) / median(ceiling)
        out["relay_vs_naive"] = median(relay) / median(naive)
        out["relay_cpu_us_per_msg"] = median(cpu)
        out["ceiling_rounds"] = spread(ceiling)
        out["ceiling_all_at_once_rounds"] = spread(all_at_once)
        out["ceiling_windowed_rounds"] = spread(windowed)
        out["relay_rounds"] = spread(relay)
        out["naive_rounds"] = spread(naive)
        out["relay_vs_ceiling_rounds"] = spread(
            [a / b for a, b in zip(relay, ceiling, strict=True)])
        out["relay_peak_rss_mb"] = peak

    if "keyed" not in skip:
        progress(f"phase: keyed relay ({args.keyed_rows} rows over 1,000 ordering keys)")
        keyed, _, _ = relay_rounds(args.rounds, args.keyed_rows, startup, startup_cpu, keys=1000)
        out["keyed_relay_msgs_per_s"] = median(keyed)
        if relay:
            out["keyed_vs_unkeyed"] = median(keyed) / median(relay)
    if "hot" not in skip:
        progress(f"phase: one hot key ({args.hot_rows} rows of a single ordering key)")
        hot, _, _ = relay_rounds(1, args.hot_rows, startup, startup_cpu, keys=1)
        out["hot_key_msgs_per_s"] = median(hot)

    if "traced" not in skip:
        traced_rounds = min(args.rounds, 3)
        progress(f"phase: tracing cost, {args.traced_rows} rows with a traceparent, the relay "
                 f"with tracing off and on (all sampled, batch processor, an exporter that drops),"
                 f" in turn ({traced_rounds} rounds)")
        cost = throughput.traced_vs_untraced(args.traced_rows, traced_rounds)
        off, on = cost.rates["off"], cost.rates["on"]
        out["relay_untraced_msgs_per_s"] = median(off)
        out["relay_traced_msgs_per_s"] = median(on)
        out["relay_traced_vs_untraced"] = median(on) / median(off)
        out["relay_traced_vs_untraced_rounds"] = spread(
            [a / b for a, b in zip(on, off, strict=True)])
        # CPU per message: what a loaded machine blurs least
        out["relay_untraced_cpu_us_per_msg"] = median(cost.cpu_us["off"])
        out["relay_traced_cpu_us_per_msg"] = median(cost.cpu_us["on"])

    if "latency" not in skip:
        # Commit-to-confirm, the load offered by pgbench, measured outside this process
        # (bench/latency.py): the names issue 15 set. Each connection commits one transaction
        # at a time, so the connections leave room for commits of up to 8 ms at 1,000/s and
        # 3 ms at 5,000/s: the offered rate then holds on a loaded machine too.
        one = outside_figures(outside_rounds(args, args.latency_rate, 8))
        for name in ("p50_ms", "p99_ms", "receive_p50_ms", "receive_p99_ms", "offered_per_s",
                     "schedule_lag_ms", "producer_transaction_ms", "relay_cpu_percent",
                     "p50_rounds", "p99_rounds",
                     "offered_rounds", "rows_offered_confirmed_received"):
            out[f"latency_{name}"] = one[name]
        five = outside_figures(outside_rounds(args, args.latency_5k_rate, 16))
        for name in ("p50_ms", "p99_ms", "receive_p50_ms", "receive_p99_ms", "offered_per_s",
                     "schedule_lag_ms", "producer_transaction_ms", "relay_cpu_percent",
                     "p99_rounds", "offered_rounds",
                     "rows_offered_confirmed_received"):
            out[f"latency_5k_{name}"] = five[name]
        confirm_p50, confirm_p99 = asyncio.run(throughput.confirm_latency(2_000))
        out["broker_confirm_p50_ms"] = confirm_p50
        out["broker_confirm_p99_ms"] = confirm_p99

    if "inprocess" not in skip:
        progress(f"phase: latency measured in process (producers, timing and consumer's reader "
                 f"in this process) at {args.latency_rate:g} msg/s offered for "
                 f"{args.latency_seconds:g} s ({args.rounds} rounds)")
        inproc: list[load.LoadFigures] = []
        for r in range(args.rounds):
            lf = asyncio.run(load.latency_and_idle(args.latency_rate, args.latency_seconds,
                                                   args.idle_seconds))
            inproc.append(lf)
            progress(f"  round {r + 1}: commit-to-confirm p50 {lf.p50_ms:.1f} ms, p99 "
                     f"{lf.p99_ms:.1f} ms; {lf.late_statements} statements late")

        def of(name: str) -> list[float]:
            return [getattr(lf, name) for lf in inproc]
        out["inprocess_latency_p50_ms"] = median(of("p50_ms"))
        out["inprocess_latency_p99_ms"] = median(of("p99_ms"))
        out["inprocess_receive_latency_p50_ms"] = median(of("receive_p50_ms"))
        out["inprocess_receive_latency_p99_ms"] = median(of("receive_p99_ms"))
        out["inprocess_latency_offered_msgs_per_s"] = median(of("offered_rate"))
        out["inprocess_latency_late_statements"] = median(of("late_statements"))
        out["inprocess_latency_p50_rounds"] = spread(of("p50_ms"))
        out["inprocess_latency_p99_rounds"] = spread(of("p99_ms"))

    if "producers" not in skip:
        progress("phase: producers' commits per second (8 connections, one row per transaction): "
                 "the table as installed with a relay running, every trigger disabled with a "
                 "relay running, a bare copy of the table with no relay")
        pf = asyncio.run(wakeup.producer_commits())
        out["producer_commits_per_s_installed"] = pf.installed
        out["producer_commits_per_s_no_wakeup"] = pf.no_wakeup
        out["producer_commits_per_s_bare"] = pf.bare
        out["producer_commits_vs_no_wakeup"] = pf.installed / pf.no_wakeup

    if "wakeup" not in skip:
        progress("phase: a row after 10 s of quiet (3 rounds)")
        out["first_after_idle_ms"] = asyncio.run(wakeup.first_after_idle(10.0))
        progress("phase: an idle relay, then ten idle relays on one table (30 s each)")
        one = asyncio.run(wakeup.idle_cost(1, 30.0))
        out["idle_db_transactions_per_s"] = one.transactions_per_s
        out["idle_cpu_percent"] = one.cpu_percent
        ten = asyncio.run(wakeup.idle_cost(10, 30.0))
        out["relays_10_idle_db_transactions_per_s"] = ten.transactions_per_s
        out["relays_10_idle_cpu_percent"] = ten.cpu_percent
        progress(f"phase: one relay, then ten, draining {args.rows} rows once connected "
                 f"({args.rounds} rounds, in turn)")
        rates: dict[int, list[float]] = {1: [], 10: []}
        for r in range(args.rounds):
            for n in (1, 10):
                rates[n].append(asyncio.run(wakeup.busy_rate(n, args.rows)))
                progress(f"  round {r + 1}: {n} relays {rates[n][-1]:.0f} msg/s")
        out["relays_1_msgs_per_s"] = median(rates[1])
        out["relays_10_msgs_per_s"] = median(rates[10])
        out["relays_10_vs_1"] = median(rates[10]) / median(rates[1])

    if "inbox" not in skip:
        progress("phase: inbox consumer (bench/inbox.py)")
        out["inbox_consume_msgs_per_s"] = asyncio.run(
            inbox.inbox_consume_rate(common.DATABASE_URL, AMQP_URL, args.rows))

    if args.long and "backlog" not in skip:
        # The broker's own rate falls as a run grows (the queue is not consumed): its ceiling
        # over the same numbers of messages tells that apart from what the outbox table does.
        progress(f"phase: backlog of 10k rows ({args.rounds} rounds), and the ceiling")
        small, _, _ = relay_rounds(args.rounds, 10_000, startup, startup_cpu)
        small_ceiling = [throughput.relay_like_ceiling(10_000)
                         for _ in range(args.rounds)]
        progress(f"phase: backlog of {args.big_backlog} rows, and the ceiling")
        big, _, big_rss = relay_rounds(1, args.big_backlog, startup, startup_cpu)
        big_ceiling = throughput.relay_like_ceiling(args.big_backlog)
        out["backlog_10k_msgs_per_s"] = median(small)
        out["backlog_1m_msgs_per_s"] = big[0]
        out["backlog_1m_vs_10k"] = big[0] / median(small)
        out["backlog_ceiling_10k_msgs_per_s"] = median(small_ceiling)
        out["backlog_ceiling_1m_msgs_per_s"] = big_ceiling
        out["backlog_ceiling_1m_vs_10k"] = big_ceiling / median(small_ceiling)
        out["backlog_1m_relay_vs_ceiling"] = big[0] / big_ceiling
        out["relay_peak_rss_mb"] = max(peak, big_rss)
        # The same messages 5k-55k of a drain, with 1M rows pending and with 60k: what the size
        # of the outbox table costs, the broker's decline over a long run left out.
        progress(f"phase: the relay's messages 5k-55k over {args.big_backlog} pending rows and "
                 f"over 60k, in turn ({args.rounds} rounds)")
        window_big, window_small = throughput.window_rates(args.big_backlog, 60_000, args.rounds)
        out["backlog_window_60k_msgs_per_s"] = median(window_small)
        out["backlog_window_1m_msgs_per_s"] = median(window_big)
        out["backlog_window_1m_vs_60k"] = median(window_big) / median(window_small)
        out["backlog_window_rounds"] = f"1m {spread(window_big)} 60k {spread(window_small)}"
    if args.long and "soak" not in skip:
        progress(f"phase: soak at {args.soak_rate:g} msg/s for {args.soak_seconds:g} s"
                 + (f", VACUUM every {args.soak_vacuum_every:g} s"
                    if args.soak_vacuum_every else ""))
        out["server_autovacuum_on"] = asyncio.run(load.autovacuum_enabled())
        sf = asyncio.run(load.soak(args.soak_rate, args.soak_seconds, args.soak_vacuum_every))
        out["outbox_table_mb_after_soak"] = sf.table_mb
        out["soak_n_live_tup"] = sf.n_live_tup
        out["soak_n_dead_tup"] = sf.n_dead_tup
        out["soak_autovacuum_count"] = sf.autovacuum_count
        out["soak_offered"] = sf.offered
        out["soak_relay_peak_rss_mb"] = sf.relay_peak_rss_mb

    out.print()


if __name__ == "__main__":
    sys.exit(main())
