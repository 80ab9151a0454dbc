"""/metrics, /healthz and /readyz of a running relay process."""

from __future__ import annotations

import asyncio
import re

import orjson

from outbox.settings import Settings
from tests import support
from tests.proxy import FaultProxy


def metric(port: int, name: str) -> float:
    _, body = support.http_get(port, "/metrics")
    m = re.search(rf"^{name} ([0-9.e+-]+)$", body.decode(), re.M)
    return float(m.group(1)) if m else float("nan")


def test_metrics_move_and_readiness_follows_the_broker(settings: Settings) -> None:
    queue = support.unique("q")
    asyncio.run(support.declare_queue(queue))
    port = support.free_port()
    with FaultProxy(5672) as broker:
        broker.refuse()  # the broker is "down" when the relay starts
        relay = support.start_relay(
            settings, OUTBOX_AMQP_URL=broker.url(support.AMQP_URL), OUTBOX_HTTP_PORT=str(port),
            OUTBOX_STATS_INTERVAL="0.5")
        try:
            support.eventually(lambda: support.http_get(port, "/healthz")[0] == 200, 30)
            status, body = support.http_get(port, "/readyz")
            assert status == 503 and orjson.loads(body)["broker"] is False
            support.insert_rows(settings, 500, queue)
            support.eventually(lambda: metric(port, "outbox_pending") == 500, 10)
            support.eventually(lambda: metric(port, "outbox_oldest_pending_age_seconds") > 0, 10)
            assert metric(port, "outbox_published_total") == 0

            broker.refuse(False)  # the broker comes back: the backlog drains by itself
            support.eventually(lambda: support.http_get(port, "/readyz")[0] == 200, 30)
            support.eventually(lambda: metric(port, "outbox_published_total") == 500, 30)
            support.eventually(lambda: metric(port, "outbox_pending") == 0, 10)
            assert metric(port, 'outbox_connected{target="broker"}') == 1
            assert metric(port, "outbox_batch_size_count") >= 1
            assert metric(port, "outbox_commit_to_confirm_seconds_count") == 500

            broker.refuse()  # cut: not ready, then ready again after
            support.eventually(lambda: support.http_get(port, "/readyz")[0] == 503, 30)
            support.eventually(lambda: metric(port, 'outbox_connected{target="broker"}') == 0, 10)
            broker.refuse(False)
            support.eventually(lambda: support.http_get(port, "/readyz")[0] == 200, 30)
            assert support.http_get(port, "/nope")[0] == 404
        finally:
            code = support.stop_process(relay)
            asyncio.run(support.delete_queues([queue]))
    assert code == 0
    stderr = relay.stderr.read().decode() if relay.stderr else ""
    for line in stderr.strip().splitlines():
        orjson.loads(line)  # every log line is one JSON object
    assert "guest:guest" not in stderr
