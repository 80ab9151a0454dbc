"""`python -m bench.lanes [LANESxBATCH ...] [--rounds N] [--rows N]`: the relay's rate against the
broker's ceiling for several lane counts and batch sizes, interleaved round by round so that
every ratio is taken within the same minute. How the defaults (3 lanes of 1,000) were chosen.
Uses OUTBOX_BENCH_DATABASE_URL or the machine's server, like the other phases run piecemeal.
"""

from __future__ import annotations

import argparse

from bench import throughput
from bench.common import median, progress


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.lanes", description=__doc__)
    p.add_argument("configs", nargs="*", default=["2x500", "3x500", "2x1000", "3x1000"])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--keys", type=int, default=0, help="spread the rows over this many "
                   "ordering keys (0: unkeyed)")
    args = p.parse_args()
    startup = median([throughput.startup_seconds().wall for _ in range(3)])
    ratios: dict[str, list[float]] = {c: [] for c in args.configs}
    for r in range(args.rounds):
        ceiling = max(throughput.relay_like_ceiling(args.rows), throughput.ceiling(args.rows))
        for config in args.configs:
            lanes, batch = config.split("x")
            wall, _ = throughput.relay_drain(args.rows, args.keys, OUTBOX_CONCURRENCY=lanes,
                                             OUTBOX_BATCH_SIZE=batch)
            ratios[config].append(args.rows / (wall - startup) / ceiling)
        progress(f"round {r + 1}: ceiling {ceiling:.0f} msg/s; relay/ceiling "
                 + " ".join(f"{c} {v[-1]:.3f}" for c, v in ratios.items()))
    for config, values in ratios.items():
        print(f"relay_vs_ceiling_{config}: {median(values):.3f}")


if __name__ == "__main__":
    main()
