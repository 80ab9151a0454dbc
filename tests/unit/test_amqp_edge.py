"""The one AMQP edge (outbox.amqp): URL defaults, the refusal classification, failover order.

aiormq.connect is replaced by a function that raises: what is tested is how its errors are
classified and reported, which needs no broker.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import pytest
from aiormq import exceptions as amqp_exc

from outbox import amqp
from outbox.consumer import Consumer
from outbox.exceptions import BrokerUnavailable, PermanentRefusal
from outbox.settings import Settings


def tls_failure() -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_message = "self-signed certificate"
    return exc


def refuse_with(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> list[str]:
    """Make every connection attempt raise ``exc``; returns the URLs tried."""
    tried: list[str] = []

    async def refuse(url: str, *args: Any, **kwargs: Any) -> Any:
        tried.append(url)
        raise exc

    monkeypatch.setattr("aiormq.connect", refuse)
    return tried


@pytest.mark.parametrize(("exc", "words"), [
    (tls_failure(), "TLS verification failed: self-signed certificate"),
    (amqp_exc.ConnectionNotAllowed("no vhost"), "access refused (unknown vhost"),
    (amqp_exc.ProbableAuthenticationError("bad"), "authentication failed"),
])
def test_a_permanent_refusal_is_described_as_one(exc: BaseException, words: str) -> None:
    assert isinstance(exc, amqp.PERMANENT)
    assert words in amqp.describe_connect_error(exc)


def test_any_other_connect_error_is_cannot_connect() -> None:
    assert amqp.describe_connect_error(ConnectionRefusedError(111, "refused")) == \
        "cannot connect ([Errno 111] refused)"
    assert amqp.describe_connect_error(StopAsyncIteration()) == \
        "cannot connect (StopAsyncIteration)"


def test_defaults_are_added_unless_the_url_sets_them() -> None:
    url = amqp.with_defaults("amqp://h/vh?heartbeat=5", heartbeat=30, timeout=2.4)
    assert "heartbeat=5" in url and "timeout=2" in url


async def test_connect_raises_permanent_refusal_for_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    refuse_with(monkeypatch, tls_failure())
    with pytest.raises(PermanentRefusal, match="TLS verification failed"):
        await amqp.connect("amqps://u:secret@broker/", 1.0)
    refuse_with(monkeypatch, OSError("network unreachable"))
    with pytest.raises(BrokerUnavailable, match="cannot connect") as info:
        await amqp.connect("amqps://u:secret@broker/", 1.0)
    assert "secret" not in str(info.value)


async def test_nodes_fail_over_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    tried = refuse_with(monkeypatch, ConnectionRefusedError(111, "refused"))
    nodes = amqp.Nodes(["amqp://a/", "amqp://b/"], heartbeat=30, timeout=1.0)
    for _ in range(3):
        with pytest.raises(BrokerUnavailable):
            await nodes.connect()
    assert [u.split("/")[2] for u in tried] == ["a", "b", "a"]
    nodes.lost()
    assert nodes.current.startswith("amqp://a/")  # after a loss: the next node first


class Reports(logging.Handler):
    """Collects the consumer's "broker unavailable" errors; `first` is set at the first one."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[str] = []
        self.first = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "broker unavailable":
            self.errors.append(getattr(record, "fields", {}).get("error", ""))
            self.first.set()


async def test_the_consumer_reports_a_tls_failure_as_a_refusal(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """It once had its own list of refusals, without the TLS error: "cannot connect"."""
    refuse_with(monkeypatch, tls_failure())
    settings = Settings.load({"amqp_url": "amqps://u:p@broker/"}, environ={})
    consumer = Consumer("orders", lambda tx, m: asyncio.sleep(0), settings=settings)
    reports = Reports()
    logger = logging.getLogger("outbox.consumer")
    logger.addHandler(reports)
    try:
        await consumer.start()
        try:
            async with asyncio.timeout(10):
                await reports.first.wait()
        finally:
            await consumer.close()
    finally:
        logger.removeHandler(reports)
    assert "TLS verification failed: self-signed certificate" in reports.errors[0]
    assert "cannot connect" not in reports.errors[0]
