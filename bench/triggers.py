"""`python -m bench.triggers [INSERTS] [--rounds N]`: what the outbox's triggers cost an insert.

In a fresh schema, times INSERTS one-row inserts (default 20,000) in one server-side loop (a
`DO` block: no round trips, no commits, so neither the network nor the WAL flush hides the
triggers' own cost), with the table as installed and the wake-up flag lowered (how the relay
keeps it while rows keep coming), without the wake-up trigger, and without any trigger (the
insert's checks of revision 0003 off too: the baseline of `producer_commits_vs_no_wakeup`), in
turn, and prints the median microseconds per insert of each. Uses OUTBOX_BENCH_DATABASE_URL or
the machine's server, like the other phases run piecemeal.
"""

from __future__ import annotations

import argparse
import time

from psycopg import sql

from bench.common import PAD, Schema, connect, median, progress, spread

SETUPS = {  # what each round turns off, the table's triggers all on before
    "as installed, flag lowered": None,
    "without the wake-up trigger": "DISABLE TRIGGER outbox_notify",
    "without any trigger": "DISABLE TRIGGER ALL",
}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.triggers", description=__doc__)
    p.add_argument("inserts", nargs="?", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    with Schema() as schema, connect() as conn:
        table = schema.table()
        conn.execute(sql.SQL("UPDATE {}.outbox_wakeup SET wanted = false").format(
            sql.Identifier(schema.name)))
        loop = sql.SQL(
            "DO $$ BEGIN FOR i IN 1..{n} LOOP INSERT INTO {table} (routing_key, payload) "
            "VALUES ('k', jsonb_build_object('n', i, 'pad', repeat('x', {pad}))); END LOOP; "
            "END $$").format(n=sql.Literal(args.inserts), table=table, pad=sql.Literal(PAD))
        times: dict[str, list[float]] = {name: [] for name in SETUPS}
        for r in range(args.rounds):
            for name, action in SETUPS.items():
                conn.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER ALL").format(table))
                if action:
                    conn.execute(sql.SQL("ALTER TABLE {} {}").format(table, sql.SQL(action)))
                conn.execute(sql.SQL("TRUNCATE {}").format(table))
                began = time.perf_counter()
                conn.execute(loop)
                times[name].append((time.perf_counter() - began) / args.inserts * 1e6)
            progress(f"  round {r + 1}: " + ", ".join(
                f"{name} {t[-1]:.1f} µs" for name, t in times.items()))
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER ALL").format(table))
    for name, t in times.items():
        print(f"{name}: {median(t):.1f} µs per insert (rounds {spread(t)})")


if __name__ == "__main__":
    main()
