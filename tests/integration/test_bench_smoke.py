"""The benchmark harness runs end to end with tiny sizes so it cannot rot (no timing asserted)."""

from __future__ import annotations

import math

import psycopg
import pytest

from bench import cluster, common, latency, load, throughput, wakeup
from bench.postgres_node import PostgresNode

pytestmark = pytest.mark.timeout(60)


async def test_ceiling_and_naive_publish_every_message() -> None:
    assert await throughput.ceiling_rate(200) > 0
    assert await throughput.naive_rate(50) > 0
    p50, p99 = await throughput.confirm_latency(20)
    assert 0 < p50 <= p99


def test_relay_drains_a_backlog_and_reports_its_process() -> None:
    seconds, run = throughput.relay_drain(300, keys=10)  # raises if any row is left pending
    assert run.returncode == 0
    assert seconds > 0 and run.peak_rss_mb > 0


def test_traced_and_untraced_relays_drain_every_row() -> None:
    cost = throughput.traced_vs_untraced(300, rounds=1)
    assert cost.rates["off"][0] > 0 and cost.rates["on"][0] > 0


async def test_windows_are_taken_one_after_another_over_one_backlog() -> None:
    async with throughput.Backlog(20_000) as backlog:
        rates = [await backlog.window(200, 1_500) for _ in range(2)]
        assert backlog.schema.pending() < 20_000 - 2 * 1_300
    assert all(r > 0 for r in rates)


async def test_latency_phase_sees_every_offered_message() -> None:
    figures = await load.latency_and_idle(rate=200, seconds=0.5, idle_seconds=0.2)
    assert figures.offered > 0
    assert figures.received == figures.confirmed == figures.offered
    assert not math.isnan(figures.p99_ms) and figures.p50_ms <= figures.p99_ms
    assert not math.isnan(figures.receive_p99_ms)


async def test_outside_latency_counts_every_row_pgbench_committed() -> None:
    # The shared server keeps no commit timestamps: the figures then start at the insert.
    figures = await latency.outside_latency(rate=200, seconds=1, clients=2)
    assert figures.offered.transactions > 0 and figures.offered.rate > 0
    assert figures.received == figures.confirmed == figures.offered.transactions
    assert 0 < figures.confirm_p50_ms <= figures.confirm_p99_ms
    assert 0 < figures.receive_p50_ms <= figures.receive_p99_ms


async def test_outside_latency_starts_at_the_commit_when_the_server_keeps_its_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with PostgresNode(settings={"track_commit_timestamp": "on"}) as node:
        monkeypatch.setattr(common, "DATABASE_URL", node.url)
        figures = await latency.outside_latency(rate=200, seconds=1, clients=2)
    assert figures.commit_timestamps
    assert figures.confirmed == figures.offered.transactions > 0
    assert 0 < figures.confirm_p50_ms <= figures.confirm_p99_ms


def test_pgbench_summary_is_read_or_refused() -> None:
    summary = ("number of transactions actually processed: 9946\n"
               "latency average = 1.2 ms\n"
               "rate limit schedule lag: avg 0.069 (max 4.578) ms\n"
               "tps = 1001.260485 (without initial connection time)\n")
    offered = latency.parse_pgbench(summary)
    assert offered == latency.Offered(9946, 1001.260485, 0.069, 4.578, offered.transaction_ms)
    assert abs(offered.transaction_ms - (1.2 - 0.069)) < 1e-9
    with pytest.raises(RuntimeError, match="no"):
        latency.parse_pgbench("pgbench: error: connection refused")


async def test_producer_phase_measures_installed_no_wakeup_and_bare() -> None:
    figures = await wakeup.producer_commits(seconds=0.3, workers=2, rounds=1)
    assert figures.installed > 0 and figures.no_wakeup > 0 and figures.bare > 0


async def test_wakeup_phases_measure_idle_relays_and_busy_ones() -> None:
    idle = await wakeup.idle_cost(2, seconds=1.0, settle=0.2)
    assert idle.transactions_per_s >= 0 and idle.cpu_percent >= 0
    assert await wakeup.busy_rate(2, 500) > 0
    assert not math.isnan(await wakeup.first_after_idle(0.2, rounds=1))


def test_cluster_bench_prints_the_relay_curve(capsys: pytest.CaptureFixture[str]) -> None:
    # the single-broker part of `make bench-cluster`; the 3-node part needs minutes to start
    assert cluster.main(["--skip", "cluster", "--rounds", "1", "--rows", "300",
                         "--relays", "1,2", "--database-url", common.DATABASE_URL]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    for name in ("ceiling_msgs_per_s", "relays_1_msgs_per_s", "relays_2_msgs_per_s",
                 "relays_2_vs_ceiling", "relays_2_vs_1"):
        assert float(lines[name]) > 0


async def test_relays_drain_into_a_quorum_queue() -> None:
    # the cluster phase's path (a queue type and relay settings passed through), on one node
    assert await wakeup.busy_rate(1, 300, common.AMQP_URL, cluster.QUORUM,
                                  {"OUTBOX_BATCH_SIZE": "100", "OUTBOX_CONCURRENCY": "2"}) > 0
    assert await throughput.ceiling_rate(300, 100, 2, common.AMQP_URL, cluster.QUORUM) > 0


def test_private_postgres_runs_the_stock_configuration_and_is_removed() -> None:
    with PostgresNode() as node, psycopg.connect(node.url) as conn:
        rec = conn.execute("SELECT current_setting('autovacuum')").fetchone()
        assert rec == ("on",)
        assert node.proc is not None
    assert node.proc.poll() is not None
    assert not node.base.exists()
