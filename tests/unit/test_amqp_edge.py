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


def as_aiormq_raises(exc: OSError) -> amqp_exc.AMQPConnectionError:
    """aiormq's transport wraps every OSError of connecting, TLS errors included."""
    try:
        raise amqp_exc.AMQPConnectionError(*exc.args) from exc
    except amqp_exc.AMQPConnectionError as wrapped:
        return wrapped


def tls_failure(code: int = 18, message: str = "self-signed certificate"
                ) -> amqp_exc.AMQPConnectionError:
    exc = ssl.SSLCertVerificationError(1, f"certificate verify failed: {message}")
    exc.verify_code = code
    exc.verify_message = message
    return as_aiormq_raises(exc)


def client_cert_refused() -> amqp_exc.AMQPConnectionError:
    exc = ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:2580)")
    exc.reason = "TLSV1_ALERT_UNKNOWN_CA"
    try:
        raise amqp_exc.AMQPConnectionError(f"Server communication error: {exc!r}") from exc
    except amqp_exc.AMQPConnectionError as wrapped:
        return wrapped


def refuse_with(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> list[str]:
    """Make every connection attempt raise ``exc``; returns the URLs tried."""
    tried: list[str] = []

    async def refuse(url: str, *args: Any, **kwargs: Any) -> Any:
        tried.append(url)
        raise exc

    monkeypatch.setattr("aiormq.connect", refuse)
    return tried


@pytest.mark.parametrize(("exc", "words"), [
    (tls_failure(), "TLS: certificate verify failed: self-signed certificate (the broker's "
     "certificate is not signed by a trusted CA: check cafile)"),
    (tls_failure(10, "certificate has expired"),
     "TLS: certificate verify failed: certificate has expired"),
    (tls_failure(64, "IP address mismatch, certificate is not valid for '127.0.0.1'."),
     "TLS: certificate verify failed: IP address mismatch"),
    (client_cert_refused(), "TLS: the broker refused the client certificate (tlsv1 alert "
     "unknown ca)"),
    (FileNotFoundError(2, "No such file or directory"),
     "TLS: cannot load the URL's cafile, certfile or keyfile (No such file or directory)"),
    (amqp_exc.ConnectionNotAllowed("no vhost"), "access refused (unknown vhost"),
    (amqp_exc.ProbableAuthenticationError("bad"), "authentication failed"),
])
def test_a_permanent_refusal_is_described_as_one(exc: BaseException, words: str) -> None:
    assert amqp.refusal(exc) is not None
    assert amqp.describe_connect_error(exc).startswith(words)


def test_a_missing_tls_file_is_named() -> None:
    url = "amqps://u:p@broker/?cafile=/nonexistent/ca.pem&certfile=/dev/null&keyfile=/dev/null"
    exc = FileNotFoundError(2, "No such file or directory")
    assert amqp.describe_connect_error(exc, url) == \
        "TLS: cannot load cafile=/nonexistent/ca.pem (No such file or directory)"


def test_a_key_that_does_not_match_is_a_refusal(tmp_path: Any) -> None:
    """ssl's own error, as aiormq lets it through when it builds the context."""
    import trustme

    ca = trustme.CA()
    cert, key = tmp_path / "a.crt", tmp_path / "b.key"
    ca.issue_cert("a").cert_chain_pems[0].write_to_path(str(cert))
    ca.issue_cert("b").private_key_pem.write_to_path(str(key))
    with pytest.raises(ssl.SSLError) as info:
        ssl.create_default_context().load_cert_chain(str(cert), str(key))
    assert amqp.refusal(info.value) is info.value
    assert amqp.describe_connect_error(info.value) == \
        "TLS: cannot load the URL's cafile, certfile or keyfile (key values mismatch)"


def test_tls_that_is_not_a_refusal_still_names_tls() -> None:
    """amqps:// to a plain AMQP port: a wrong port, not a certificate; retried as an outage."""
    exc = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)")
    exc.reason = "WRONG_VERSION_NUMBER"
    wrapped = as_aiormq_raises(exc)
    assert amqp.refusal(wrapped) is None
    assert amqp.describe_connect_error(wrapped) == "cannot connect (TLS: wrong version number)"
    # nor is a connection the network refuses, although aiormq wraps its OSError the same way
    assert amqp.refusal(as_aiormq_raises(PermissionError(1, "Operation not permitted"))) is None


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
    with pytest.raises(PermanentRefusal, match="TLS: certificate verify failed"):
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
    assert "TLS: certificate verify failed: self-signed certificate" in reports.errors[0]
    assert "cannot connect" not in reports.errors[0]
