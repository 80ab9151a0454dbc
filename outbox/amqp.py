"""The AMQP edge shared by the publisher, the consumer and `outbox doctor`.

URL defaults, connecting to a node with a deadline, failing over along the configured nodes, and
the one classification of refusals that retrying soon will not fix (bad credentials, an unknown
vhost, a certificate that does not verify). The reads of aiormq's private parts stay in
`outbox.frames`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Sequence
from typing import Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiormq
from aiormq import exceptions as amqp_exc

from outbox.exceptions import BrokerUnavailable, PermanentRefusal
from outbox.settings import redact

PERMANENT: tuple[type[BaseException], ...] = (
    amqp_exc.AuthenticationError, amqp_exc.ProbableAuthenticationError,
    amqp_exc.ConnectionNotAllowed, ssl.SSLCertVerificationError,
)
"""Connection errors that mean "refused": the same URL fails the same way until someone fixes
the credentials, the vhost or the certificates."""


def with_defaults(url: str, heartbeat: int, timeout: float) -> str:
    """Add the heartbeat and connect timeout to an AMQP URL unless it sets them itself."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("heartbeat", str(heartbeat))
    query.setdefault("timeout", str(max(1, round(timeout))))
    return urlunsplit(parts._replace(query=urlencode(query)))


def describe_refusal(exc: BaseException) -> str:
    """What a refusal of `PERMANENT` means, in words an operator can act on."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS verification failed: {exc.verify_message or exc}"
    if isinstance(exc, amqp_exc.ConnectionNotAllowed):
        return f"access refused (unknown vhost or no permission): {exc}"
    return f"authentication failed (check the user and password): {exc}"


def describe_connect_error(exc: BaseException) -> str:
    """Why connecting failed: a refusal as `describe_refusal` says, anything else "cannot
    connect"."""
    if isinstance(exc, PERMANENT):
        return describe_refusal(exc)
    return f"cannot connect ({str(exc) or type(exc).__name__})"


async def connect(url: str, timeout: float) -> aiormq.abc.AbstractConnection:
    """Connect to one node within ``timeout`` seconds.

    Raises `PermanentRefusal` for an error of `PERMANENT`, `BrokerUnavailable` for any other:
    aiormq raises more than AMQPError when the peer closes during the handshake
    (StopAsyncIteration, RuntimeError…), and all of them mean "no connection".
    """
    try:
        async with asyncio.timeout(timeout):
            return await aiormq.connect(url)
    except Exception as exc:
        problem = f"broker {redact(url)}: {describe_connect_error(exc)}"
        if isinstance(exc, PERMANENT):
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
