"""`python -m bench.cluster` (`make bench-cluster`): how many relays to run, and the relay on a
RabbitMQ cluster with quorum queues (issue 16).

* ``relays_N_msgs_per_s``: N = 1, 2, 4, 8 relay processes, already connected, on one table
  draining a backlog (`bench.wakeup.busy_drain`) on the single broker, against that broker's
  ceiling in the same rounds (`bench.throughput.relay_like_ceiling`: as many channels as a relay
  has lanes, one batch each in flight); the confirm timeouts and duplicates of each N (the
  queue counted after each drain); the most relays again with smaller batches (``--many-batch``).
* On a private 3-node cluster (`tests.rabbit_cluster`), a quorum queue declared through the
  first node, the node the relay connects to first: the broker's ceiling (the same publisher,
  connected the same way), one relay draining as many rows, and their quotient; the same on a
  classic queue; then the relay and the ceiling with wider windows (more rows per batch, more
  lanes), the settings a quorum queue may want; one confirm at a time per queue type; and the
  CPU per message of the nodes, the publisher or the relay, and PostgreSQL, over the same spans.

Progress goes to stderr; stdout ends with one ``name: value`` line per figure, medians of the
rounds, every ratio taken within this run. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from typing import Any

from bench import common, postgres_node, throughput, wakeup
from bench.common import Figures, median, progress, spread, tree_cpu
from outbox.amqp import with_defaults
from outbox.settings import Settings

QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}
CLASSIC: dict[str, Any] | None = None


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds per figure")
    p.add_argument("--rows", type=int, default=30_000,
                   help="backlog of each drain and ceiling on the single broker")
    p.add_argument("--relays", default="1,2,4,8", help="relay processes of the curve")
    p.add_argument("--many-batch", type=int, default=250,
                   help="OUTBOX_BATCH_SIZE of a second drain by the most relays (0: none)")
    p.add_argument("--cluster-rows", type=int, default=20_000,
                   help="backlog of each drain and ceiling on the cluster")
    p.add_argument("--confirms", type=int, default=500,
                   help="messages of the one-at-a-time confirm latency on the cluster")
    p.add_argument("--windows", default="2000x3,1000x6",
                   help="wider windows tried on the quorum queue, BATCHxLANES, comma-separated "
                   "(empty: none)")
    postgres_node.add_database_url(p)
    p.add_argument("--skip", default="", help="comma-separated phases to skip: "
                   "curve,cluster,classic,windows")
    return p.parse_args(argv)


def relay_curve(out: Figures, rounds: int, rows: int, counts: list[int],
                many_batch: int = 0) -> None:
    """``relays_N_*`` on the single broker: per round the ceiling, then each N in turn; with
    ``many_batch``, the most relays again with that OUTBOX_BATCH_SIZE (fewer rows in flight)."""
    defaults = Settings()
    ceiling: list[float] = []
    most = max(counts)
    runs: list[tuple[str, int, dict[str, str]]] = [(f"relays_{n}", n, {}) for n in counts]
    if many_batch:
        runs.append((f"relays_{most}_batch_{many_batch}", most,
                     {"OUTBOX_BATCH_SIZE": str(many_batch)}))
    rates: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    drains: dict[str, list[wakeup.BusyDrain]] = {name: [] for name, _, _ in runs}
    for r in range(rounds):
        progress(f"phase: relay curve, round {r + 1} of {rounds} ({rows} rows per drain)")
        ceiling.append(throughput.relay_like_ceiling(rows))
        progress(f"  ceiling, {defaults.concurrency} channels x {defaults.batch_size} in flight:"
                 f" {ceiling[-1]:.0f} msg/s")
        # the order turns each round, so that a drift of the machine's load favours none
        for name, n, env in runs if r % 2 == 0 else runs[::-1]:
            drains[name].append(asyncio.run(wakeup.busy_drain(n, rows, env=env)))
            rates[name].append(drains[name][-1].rate)
            progress(f"  {n} relays{f' of batch {many_batch}' if env else ''}: "
                     f"{rates[name][-1]:.0f} msg/s")
    out["ceiling_msgs_per_s"] = median(ceiling)
    out["ceiling_rounds"] = spread(ceiling)
    for name, _, _ in runs:
        out[f"{name}_msgs_per_s"] = median(rates[name])
        out[f"{name}_vs_ceiling"] = median(rates[name]) / median(ceiling)
        out[f"{name}_rounds"] = spread(rates[name])
        out[f"{name}_vs_ceiling_rounds"] = spread(
            [a / b for a, b in zip(rates[name], ceiling, strict=True)])
        # in all rounds: publishes whose confirms outlasted OUTBOX_PUBLISH_TIMEOUT, and the
        # extra copies they left in the queue
        out[f"{name}_confirm_timeouts"] = sum(d.timeouts for d in drains[name])
        out[f"{name}_duplicates"] = sum(d.delivered - rows for d in drains[name])
    if "relays_1" in rates:
        for name, n, _ in runs:
            if n != 1:
                out[f"{name}_vs_1"] = median(rates[name]) / median(rates["relays_1"])


def windows(text: str) -> list[tuple[int, int]]:
    """"2000x3,1000x6" -> [(2000, 3), (1000, 6)] (batch size, lanes)."""
    out = []
    for item in filter(None, text.split(",")):
        batch, _, lanes = item.partition("x")
        out.append((int(batch), int(lanes)))
    return out


def on_cluster(out: Figures, args: argparse.Namespace, skip: set[str],
               postgres: list[int]) -> None:
    """The cluster figures: per round and case (queue type, window), the ceiling and one relay
    next to each other, their order turned every round; and where the CPU went per message
    (the three nodes, the publisher or the relay, PostgreSQL's processes ``postgres``): on a
    machine that runs out of CPU, what decides the quotient of the two rates."""
    # imported here: the curve alone needs no RabbitMQ binaries or test harness
    from tests.rabbit_cluster import RabbitCluster

    defaults = Settings()
    n = args.cluster_rows
    # (figure prefix, queue arguments, batch size, lanes)
    cases: list[tuple[str, dict[str, Any] | None, int, int]] = [
        ("cluster", QUORUM, defaults.batch_size, defaults.concurrency)]
    if "classic" not in skip:
        cases.append(("cluster_classic", CLASSIC, defaults.batch_size, defaults.concurrency))
    if "windows" not in skip:
        cases += [(f"cluster_{lanes}x{batch}", QUORUM, batch, lanes)
                  for batch, lanes in windows(args.windows)]
    ceiling: dict[str, list[float]] = {tag: [] for tag, *_ in cases}
    relay: dict[str, list[float]] = {tag: [] for tag, *_ in cases}
    duplicates = {tag: 0 for tag, *_ in cases}
    confirm: dict[str, list[tuple[float, float]]] = {"quorum": [], "classic": []}
    # µs of CPU per message, per case and part: broker / publisher during the ceiling, broker /
    # relay / postgres during the relay's drain
    cpu: dict[str, dict[str, list[float]]] = {
        tag: {part: [] for part in ("ceiling_broker", "ceiling_publisher", "relay_broker",
                                    "relay_relay", "relay_postgres")} for tag, *_ in cases}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        progress("starting a private 3-node RabbitMQ cluster (tests/rabbit_cluster.py)")
        with RabbitCluster(tmp) as cluster:
            # the relay connects to the first node of its list; the ceiling's publisher connects
            # to that node with the same URL parameters (heartbeat, connect timeout)
            first = with_defaults(cluster.urls[0], defaults.heartbeat, defaults.db_timeout)
            progress(f"cluster up: {cluster.url}; {args.rounds} rounds of {n} messages")
            for r in range(args.rounds):
                progress(f"phase: cluster, round {r + 1} of {args.rounds}")
                for kind, arguments in (("quorum", QUORUM), ("classic", CLASSIC)):
                    if kind == "classic" and "classic" in skip:
                        continue
                    # one message at a time: the wait a batch's last confirm adds
                    confirm[kind].append(asyncio.run(throughput.confirm_latency(
                        args.confirms, first, arguments)))
                    progress(f"  {kind} queue: publish-to-confirm of one message p50 "
                             f"{confirm[kind][-1][0]:.2f} ms, p99 {confirm[kind][-1][1]:.2f} ms")
                for tag, arguments, batch, lanes in cases if r % 2 == 0 else cases[::-1]:
                    env = {"OUTBOX_BATCH_SIZE": str(batch), "OUTBOX_CONCURRENCY": str(lanes)}
                    nodes = [node.proc.pid for node in cluster.nodes if node.proc]
                    per_msg = 1e6 / n
                    for step in ("ceiling", "relay") if r % 2 == 0 else ("relay", "ceiling"):
                        broker = tree_cpu(nodes)
                        if step == "ceiling":
                            own = time.process_time()
                            ceiling[tag].append(throughput.ceiling(n, batch, lanes, first,
                                                                   arguments))
                            cpu[tag]["ceiling_publisher"].append(
                                (time.process_time() - own) * per_msg)
                            cpu[tag]["ceiling_broker"].append(
                                (tree_cpu(nodes) - broker) * per_msg)
                        else:
                            d = asyncio.run(wakeup.busy_drain(
                                1, n, cluster.url, arguments,
                                env=env, watch={"broker": nodes, "postgres": postgres}))
                            relay[tag].append(d.rate)
                            duplicates[tag] += d.delivered - n
                            cpu[tag]["relay_relay"].append(d.cpu * per_msg)
                            cpu[tag]["relay_broker"].append(d.watched["broker"] * per_msg)
                            cpu[tag]["relay_postgres"].append(d.watched["postgres"] * per_msg)
                    c, rr = ceiling[tag][-1], relay[tag][-1]
                    progress(f"  {'quorum' if arguments else 'classic'} queue, {lanes} lanes x "
                             f"{batch}: ceiling {c:.0f} msg/s, relay {rr:.0f} msg/s "
                             f"({rr / c:.3f})")
    for tag, *_ in cases:
        out[f"{tag}_ceiling_msgs_per_s"] = median(ceiling[tag])
        out[f"{tag}_relay_msgs_per_s"] = median(relay[tag])
        out[f"{tag}_relay_vs_ceiling"] = median(relay[tag]) / median(ceiling[tag])
        out[f"{tag}_relay_vs_ceiling_rounds"] = spread(
            [a / b for a, b in zip(relay[tag], ceiling[tag], strict=True)])
        out[f"{tag}_ceiling_rounds"] = spread(ceiling[tag])
        out[f"{tag}_relay_rounds"] = spread(relay[tag])
        out[f"{tag}_relay_duplicates"] = duplicates[tag]
        for part, values in cpu[tag].items():
            if part != "relay_postgres" or postgres:
                out[f"{tag}_{part}_cpu_us_per_msg"] = median(values)
        if tag not in ("cluster", "cluster_classic"):
            # a wider window against the default one's ceiling: what the setting buys
            out[f"{tag}_relay_vs_default_ceiling"] = median(relay[tag]) / median(
                ceiling["cluster"])
    for kind, name in (("quorum", "cluster"), ("classic", "cluster_classic")):
        if confirm[kind]:
            out[f"{name}_confirm_p50_ms"] = median([p50 for p50, _ in confirm[kind]])
            out[f"{name}_confirm_p99_ms"] = median([p99 for _, p99 in confirm[kind]])


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    skip = set(filter(None, args.skip.split(",")))
    out = Figures()
    if not args.database_url:
        progress("starting a private PostgreSQL with the stock configuration")
    with postgres_node.database(args.database_url) as node:
        common.DATABASE_URL = node.url if node else args.database_url
        postgres = [node.proc.pid] if node and node.proc else []
        if "curve" not in skip:
            relay_curve(out, args.rounds, args.rows,
                        [int(x) for x in args.relays.split(",") if x], args.many_batch)
        if "cluster" not in skip:
            on_cluster(out, args, skip, postgres)
    out.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
