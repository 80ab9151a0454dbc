"""Stack dumps of a running relay process on demand (outbox.stacks), and the claim-age gauge."""

from __future__ import annotations

import signal
import threading

import orjson

from outbox.settings import Settings
from tests import support
from tests.integration.test_http import metric


def test_sigusr1_logs_each_task_and_sigusr2_each_thread(settings: Settings) -> None:
    port = support.free_port()
    relay = support.start_relay(settings, OUTBOX_HTTP_PORT=str(port))
    lines: list[bytes] = []

    def read() -> None:
        assert relay.stderr is not None
        lines.extend(relay.stderr)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # ready and idle: the lanes claim at least every two poll intervals
        support.eventually(lambda: metric(port, "outbox_ready") == 1, 30)
        support.eventually(lambda: metric(port, "outbox_seconds_since_claim")
                           < 2 * settings.poll_interval + 1, 10)
        relay.send_signal(signal.SIGUSR1)
        def dumped() -> list[dict[str, str]] | None:
            """The task lines, once as many as the dump's first line announced are in."""
            got = [orjson.loads(line) for line in list(lines) if line.startswith(b"{")]
            head = [g for g in got if g.get("msg") == "task dump (SIGUSR1)"]
            tasks = [g for g in got if g.get("msg") == "task"]
            return tasks if head and len(tasks) == head[0]["tasks"] else None

        tasks = support.eventually(dumped, 10)
        assert {"outbox-safety-poll", "outbox-broker"} <= {t["task"] for t in tasks}
        assert any("in _lane" in t["stack"] for t in tasks)
        relay.send_signal(signal.SIGUSR2)
        support.eventually(lambda: any(b"most recent call first" in line for line in lines), 10)
        assert relay.poll() is None  # neither signal stops it
    finally:
        support.stop_process(relay)
        reader.join(5)
    assert relay.returncode == 0
