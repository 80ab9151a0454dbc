"""Runs the relay process: publisher, store, HTTP endpoints, signals and the shutdown deadline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

from outbox import stacks, tracing
from outbox.exceptions import OutboxError
from outbox.http import HealthServer
from outbox.publisher import AmqpPublisher
from outbox.relay import Counts, Relay
from outbox.settings import Settings
from outbox.store import PgStore

log = logging.getLogger("outbox")


async def run_relay(settings: Settings, *, drain: bool = False) -> Counts:
    """Run until SIGTERM/SIGINT (or, with ``drain``, until nothing is ready)."""
    store = PgStore(settings)
    publisher = AmqpPublisher(settings)
    tracing.setup(settings.batch_size)  # on when OTEL_TRACES_EXPORTER names an exporter
    relay = Relay(settings, store, publisher, drain=drain)
    http: HealthServer | None = None
    if settings.http_port and not drain:
        http = HealthServer(settings.http_port, relay.readiness)
        try:
            await http.start()
        except OSError as exc:
            raise OutboxError(f"cannot listen on port {settings.http_port}: {exc.strerror}") \
                from None
    log.info("relay starting", extra={"fields": {"settings": settings.redacted(),
                                                 "drain": drain}})
    await publisher.start()
    task = asyncio.create_task(relay.run(), name="outbox-relay")
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: exiting now (claimed rows go back to pending)")
            sys.stderr.flush()
            os._exit(1)
        log.info("signal received", extra={"fields": {
            "signal": signal.Signals(signum).name,
            "shutdown_timeout": settings.shutdown_timeout}})
        relay.stop()
        loop.call_later(settings.shutdown_timeout, _deadline, task)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    stacks.install(loop)
    try:
        # the broker's supervisor reconnects for as long as the relay runs: if it ends (an
        # unsupported aiormq, a bug), so does the process, loudly
        counts = await publisher.guard(task)
    except asyncio.CancelledError:
        if not signals:  # not our deadline: never report an escaped cancellation as a clean stop
            raise OutboxError("the relay loop was cancelled unexpectedly") from None
        counts = relay.counts
        log.warning("shutdown deadline reached: batches in flight were released")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        stacks.uninstall(loop)
        await publisher.close()
        if http is not None:
            await http.close()
        tracing.flush()
    log.info("relay stopped", extra={"fields": {
        "published": counts.published, "failed": counts.failed, "dead": counts.dead}})
    return counts


def _deadline(task: asyncio.Task[Counts]) -> None:
    if not task.done():
        task.cancel()


def install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
