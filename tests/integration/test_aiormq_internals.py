"""The private parts of aiormq that outbox reads, on a real RabbitMQ connection; and the relay
process ending with one line when one of them is gone (see tests/unit/test_aiormq_frames.py for
the frame-level tests without a network)."""

from __future__ import annotations

import subprocess
import sys

import aiormq
import orjson
from pamqp import commands as spec

from outbox import frames
from outbox.settings import Settings
from tests import support


async def test_a_real_connection_and_confirm_channel_pass_the_check(queue: str) -> None:
    conn = await aiormq.connect(support.AMQP_URL)
    try:
        channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
        frames.check_internals(conn, channel)
        assert not frames.reader_died(conn) and not frames.blocked(conn)
        # a routed message is confirmed, an unroutable one returned, on the real broker
        pipelined = await frames.publish_pipelined(channel, [
            (b"1", "", queue, spec.Basic.Properties(message_id="routed")),
            (b"2", "", support.unique("nowhere"), spec.Basic.Properties(message_id="lost")),
        ])
        assert await pipelined.wait(10.0) == set()
        routed, lost = pipelined.futures
        assert routed.exception() is None
        assert isinstance(lost.exception(), aiormq.exceptions.PublishError)
    finally:
        await conn.close()
    assert frames.reader_died(conn)


# The relay as a process, on an aiormq whose Connection keeps its reader task under another
# name (as a release that renamed it would).
MOVED = """
import sys, aiormq
real = aiormq.Connection.connect
async def connect(self, *args, **kwargs):
    ok = await real(self, *args, **kwargs)
    self.__dict__["_reader_task_v8"] = self.__dict__.pop("_reader_task")
    return ok
aiormq.Connection.connect = connect
from outbox.cli import main
sys.exit(main(["relay"]))
"""


def test_the_relay_exits_with_one_line_when_aiormq_lacks_a_part(settings: Settings) -> None:
    proc = subprocess.run([sys.executable, "-c", MOVED], env=support.relay_env(settings),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    *logs, last = proc.stderr.strip().splitlines()
    assert last.startswith("outbox: aiormq 7.2.4 with pamqp 4.0.1 is not supported: "
                           "Connection._reader_task is missing"), last
    assert "pip install 'aiormq==7.2.4' 'pamqp==4.0.1'" in last
    for line in logs:
        orjson.loads(line)  # the rest are the JSON log lines
    assert "broker connected" not in proc.stderr  # it stopped before using the connection
