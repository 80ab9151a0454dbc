"""`python -m bench.claims [ROWS] [--jit]`: the relay's database work alone, no broker.

Fills a fresh schema with ROWS unkeyed rows (default 1,000,000), then claims batches of 500 with
the relay's own claim query and deletes them, one commit per batch, on one connection with the
relay's session settings, and prints rows/s per fifth of the drain. ``--jit`` turns the server's
JIT back on (the relay turns it off; bench/PROFILE.md says why). Uses OUTBOX_BENCH_DATABASE_URL or
the machine's server, like the other phases run piecemeal.
"""

from __future__ import annotations

import argparse
import time

import psycopg

from bench import common
from bench.common import Schema, progress
from outbox.sql import for_schema
from outbox.store import libpq_options, session_settings


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.claims", description=__doc__)
    p.add_argument("rows", nargs="?", type=int, default=1_000_000)
    p.add_argument("--jit", action="store_true", help="leave the server's JIT on")
    args = p.parse_args()
    with Schema() as schema:
        progress(f"filling {args.rows} rows")
        schema.fill(args.rows, "nowhere")
        options = session_settings(schema.settings)
        if args.jit:
            options.pop("jit")
        q = for_schema(schema.name)
        with psycopg.connect(common.DATABASE_URL, options=libpq_options(options)) as conn:
            done, began = 0, time.perf_counter()
            mark, marked = began, 0
            while True:
                ids = [r[0] for r in conn.execute(q["claim"], {"limit": 500},
                                                  prepare=True).fetchall()]
                if not ids:
                    conn.commit()
                    break
                conn.execute(q["delete_sent"], {"ids": ids}, prepare=True)
                conn.commit()
                done += len(ids)
                if done - marked >= args.rows // 5:
                    now = time.perf_counter()
                    progress(f"{done} rows: {(done - marked) / (now - mark):.0f} rows/s")
                    mark, marked = now, done
        print(f"claim_delete_rows_per_s: {done / (time.perf_counter() - began):.0f}")


if __name__ == "__main__":
    main()
