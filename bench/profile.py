"""`python -m bench.profile [ROWS]`: where the relay's CPU goes per message.

Drains a backlog of ROWS rows with `outbox relay --drain` under py-spy (``pip install py-spy``;
sampling at 200 Hz, idle time excluded) and prints the top functions by self time and the main
stages by inclusive time, in µs of sampled time per message. Figures are relative: sampling
and the other processes on the machine inflate them; compare runs made back to back.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import Queue, Schema, progress, relay_env

RATE = 200
STAGES = ("Relay._lane", "Relay._process", "Batch.publish_into", "publish_pipelined",
          "Channel.basic_publish", "marshal_message", "_header_frame", "ChannelFrame.marshall",
          "PgSession.claim", "PgSession.settle", "row_from_record", "properties",
          "Relay._account", "Connection.__writer", "Channel._reader", "Pipelined.wait")
_FRAME = re.compile(r"(.*) \((.*):\d+\)")


def record(rows: int, out: Path) -> None:
    import asyncio

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))

    async def run() -> None:
        async with Queue() as queue:
            with Schema() as schema:
                schema.fill(rows, queue.name)
                progress(f"profiling a drain of {rows} rows")
                command = [spy, "record", "-r", str(RATE), "-f", "raw", "-o", str(out),
                           "--nonblocking", "--", sys.executable, "-m", "outbox", "relay",
                           "--drain"]
                await asyncio.to_thread(subprocess.run, command, check=True,
                                        env=relay_env(schema.settings), capture_output=True)

    asyncio.run(run())


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    name, path = m.groups()
    path = path.split("site-packages/")[-1].split("lib/python3.11/")[-1]
    return f"{name} ({path.split('/work/main/')[-1]})"


def summarise(raw: Path, rows: int, top: int = 25) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n

    def us(n: int) -> str:
        return f"{n / RATE / rows * 1e6:7.1f}"

    lines = [f"sampled (non-idle) time: {us(total).strip()} µs/msg over {rows} rows", "",
             "self time, top entries:", ""]
    lines += [f"{us(n)} µs/msg {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive time of the stages:", ""]
    stages = [f for f in inclusive if f.split(" (")[0] in STAGES]
    lines += [f"{us(inclusive[f])} µs/msg {100 * inclusive[f] / total:5.1f}%  {f}"
              for f in sorted(stages, key=lambda f: -inclusive[f])]
    return "\n".join(lines)


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "relay.raw"
        record(rows, raw)
        print(summarise(raw, rows))


if __name__ == "__main__":
    main()
