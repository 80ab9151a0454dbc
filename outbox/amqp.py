"""The AMQP edge shared by the publisher, the consumer and `outbox doctor`.

URL defaults, connecting to a node with a deadline, failing over along the configured nodes, and
the one classification of refusals that retrying soon will not fix (bad credentials, an unknown
vhost, a certificate that does not verify). The reads of aiormq's private parts stay in
`outbox.frames`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Sequence
from typing import Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiormq
from aiormq import exceptions as amqp_exc

from outbox.exceptions import BrokerUnavailable, PermanentRefusal
from outbox.settings import redact
from outbox.tls import ssl_text, verify_failure

PERMANENT: tuple[type[BaseException], ...] = (
    amqp_exc.AuthenticationError, amqp_exc.ProbableAuthenticationError,
    amqp_exc.ConnectionNotAllowed, ssl.SSLCertVerificationError,
)
"""Connection errors that mean "refused": the same URL fails the same way until someone fixes
the credentials, the vhost or the certificates. aiormq wraps the TLS ones in an
AMQPConnectionError: `refusal` looks through the wrapping."""

# TLS alerts by which the broker refuses our client certificate (OpenSSL's reason codes)
_CLIENT_CERT_REFUSED = frozenset({
    "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "TLSV1_ALERT_ACCESS_DENIED",
})


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, outermost first (aiormq's own errors may form a cycle)."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and not any(cur is s for s in seen):
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _is_refusal(exc: BaseException) -> bool:
    if isinstance(exc, PERMANENT):
        return True
    return isinstance(exc, ssl.SSLError) and exc.reason in _CLIENT_CERT_REFUSED


def _bad_pem(exc: BaseException) -> bool:
    """ssl's error for a CA, certificate or key file it cannot use."""
    return isinstance(exc, ssl.SSLError) and (
        exc.library in ("X509", "PEM") or "PEM lib" in str(exc))


def refusal(exc: BaseException) -> BaseException | None:
    """The permanent refusal behind ``exc`` (itself or a cause), or None if it is none."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)) or _bad_pem(exc):
        # not wrapped by aiormq, so raised before connecting: the cafile, certfile or keyfile
        # cannot be loaded (missing, unreadable, not PEM, a key that does not match)
        return exc
    return next((e for e in _chain(exc) if _is_refusal(e)), None)



def with_defaults(url: str, heartbeat: int, timeout: float) -> str:
    """Add the heartbeat and connect timeout to an AMQP URL unless it sets them itself."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("heartbeat", str(heartbeat))
    query.setdefault("timeout", str(max(1, round(timeout))))
    return urlunsplit(parts._replace(query=urlencode(query)))


def _unreadable_files(url: str) -> list[str]:
    """The URL's cafile, certfile and keyfile that cannot be read, as ``name=path``."""
    query = dict(parse_qsl(urlsplit(url).query))
    return [f"{name}={query[name]}" for name in ("cafile", "certfile", "keyfile")
            if name in query and not os.access(query[name], os.R_OK)]


def describe_refusal(exc: BaseException, url: str = "") -> str:
    """What a permanent refusal (see `refusal`) means, in words an operator can act on;
    ``url``, the one refused, names a missing TLS file."""
    exc = refusal(exc) or exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = verify_failure(
            exc, "the broker's certificate is not signed by a trusted CA: check cafile")
        return f"TLS: certificate verify failed: {why}"
    if isinstance(exc, amqp_exc.ConnectionNotAllowed):
        return f"access refused (unknown vhost or no permission): {exc}"
    if isinstance(exc, (amqp_exc.AuthenticationError, amqp_exc.ProbableAuthenticationError)):
        # aiormq's errors are OSErrors too: these before the file errors below
        return f"authentication failed (check the user and password): {exc}"
    if isinstance(exc, ssl.SSLError) and exc.reason in _CLIENT_CERT_REFUSED:
        return (f"TLS: the broker refused the client certificate ({ssl_text(exc)}); "
                "check certfile and keyfile")
    if isinstance(exc, ssl.SSLError):
        return f"TLS: cannot load the URL's cafile, certfile or keyfile ({ssl_text(exc)})"
    if isinstance(exc, OSError):
        files = ", ".join(_unreadable_files(url)) or "the URL's cafile, certfile or keyfile"
        return f"TLS: cannot load {files} ({exc.strerror or exc})"
    return f"refused: {exc}"


def describe_connect_error(exc: BaseException, url: str = "") -> str:
    """Why connecting to ``url`` failed: a refusal as `describe_refusal` says, anything else
    "cannot connect"."""
    if refusal(exc) is not None:
        return describe_refusal(exc, url)
    for cause in _chain(exc):
        if isinstance(cause, ssl.SSLError):  # e.g. amqps:// to a plain port
            return f"cannot connect (TLS: {ssl_text(cause)})"
    return f"cannot connect ({str(exc) or type(exc).__name__})"


async def connect(url: str, timeout: float) -> aiormq.abc.AbstractConnection:
    """Connect to one node within ``timeout`` seconds.

    Raises `PermanentRefusal` for a `refusal`, `BrokerUnavailable` for any other error:
    aiormq raises more than AMQPError when the peer closes during the handshake
    (StopAsyncIteration, RuntimeError…), and all of them mean "no connection".
    """
    try:
        async with asyncio.timeout(timeout):
            return await aiormq.connect(url)
    except Exception as exc:
        problem = f"broker {redact(url)}: {describe_connect_error(exc, url)}"
        if refusal(exc) is not None:
            raise PermanentRefusal(problem) from exc
        raise BrokerUnavailable(problem) from exc


class _Closable(Protocol):
    async def close(self, exc: BaseException | None = ...) -> object: ...


async def close_quietly(what: _Closable, timeout: float = 2.0,
                        reason: BaseException | None = None) -> None:
    """Close a connection or channel that may be broken already: aiormq's close waits for the
    peer, which a lost connection never answers, and any error means it is closed anyway.
    ``reason`` is what the requests still in flight on it fail with (aiormq's own default
    otherwise)."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            await (what.close() if reason is None else what.close(reason))


class Nodes:
    """The broker's nodes, tried in turn.

    A failed attempt or a lost connection moves on to the next node first: the one that failed
    may be down, and the others of a cluster serve the same queues.
    """

    def __init__(self, urls: Sequence[str], heartbeat: int, timeout: float) -> None:
        if not urls:
            raise ValueError("no broker URL")
        self.urls = [with_defaults(u, heartbeat, timeout) for u in urls]
        self.timeout = timeout + 1  # the URL's own connect timeout fires first
        self._index = 0

    @property
    def current(self) -> str:
        """The URL of the next attempt (with its defaults)."""
        return self.urls[self._index % len(self.urls)]

    async def connect(self) -> tuple[aiormq.abc.AbstractConnection, str]:
        """Connect to the current node; returns the connection and its URL. On failure the next
        attempt goes to the next node; raises as `connect`."""
        url = self.current
        try:
            return await connect(url, self.timeout), url
        except (BrokerUnavailable, PermanentRefusal):
            self.lost()
            raise

    def lost(self) -> None:
        """The connection to the current node was lost: try the next one first."""
        self._index += 1
