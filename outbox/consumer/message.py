"""What a handler sees and what a consumer counts, and how a delivery becomes a `Message`.

Also the consumer's own bookkeeping of a delivery (`_Delivery`) and of a subscription
(`_Subscription`), and the headers it reads and writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import aiormq
import orjson

ATTEMPT_HEADER = "x-outbox-attempt"
LAST_ERROR_HEADER = "x-outbox-last-error"
DEAD_REASON_HEADER = "x-outbox-dead-reason"
DEAD_QUEUE_HEADER = "x-outbox-queue"
DEAD_CONSUMER_HEADER = "x-outbox-consumer"
REASON_MAX = 500  # characters of an error kept in a header or a log line

Handler = Callable[[Any, "Message"], Awaitable[object]]
BatchHandler = Callable[[Any, Sequence["Message"]], Awaitable[object]]


@dataclass(slots=True)  # not frozen: a frozen dataclass costs more to build, once per message
class Message:
    """A delivered message, as the handler sees it (treat it as read-only)."""

    message_id: UUID
    body: bytes
    routing_key: str
    exchange: str
    content_type: str | None
    message_type: str | None
    correlation_id: str | None
    headers: Mapping[str, Any]
    timestamp: datetime | None
    redelivered: bool
    attempt: int
    """1 on the first delivery to a handler, then counted by ``x-outbox-attempt``."""

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)


@dataclass(slots=True)
class ConsumerCounts:
    """What one consumer did since it started."""

    received: int = 0        # deliveries taken from the broker
    applied: int = 0         # handler ran and its transaction committed
    duplicates: int = 0      # inbox row already there: acked without running the handler
    retried: int = 0         # handler failed: republished to a delay queue
    dead_lettered: int = 0   # sent to the dead-letter exchange (failed max_attempts, or invalid)
    invalid: int = 0         # no or malformed message_id (also counted in dead_lettered)
    acked: int = 0
    connections: int = 0     # broker connections made (more than 1: it reconnected)


@dataclass(slots=True)
class _Delivery:
    raw: aiormq.abc.DeliveredMessage
    tag: int
    message: Message | None = None
    invalid: str = ""
    ack: bool = True


@dataclass
class _Subscription:
    """One channel pair and its buffer; it ends when a channel closes or the broker cancels."""

    channel: aiormq.abc.AbstractChannel
    publish: aiormq.abc.AbstractChannel
    buffer: asyncio.Queue[aiormq.abc.DeliveredMessage] = field(default_factory=asyncio.Queue)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


def parse(raw: aiormq.abc.DeliveredMessage) -> _Delivery:
    """The delivery with its `Message`, or with the reason it cannot have one (``invalid``)."""
    delivery = raw.delivery
    tag = int(getattr(delivery, "delivery_tag", 0) or 0)
    props = raw.header.properties
    d = _Delivery(raw, tag)
    mid = props.message_id
    if not mid:
        d.invalid = "no message_id: cannot be deduplicated"
        return d
    try:
        message_id = UUID(mid)
    except (ValueError, TypeError, AttributeError):
        d.invalid = f"message_id is not a UUID: {str(mid)[:64]!r}"
        return d
    headers = props.headers or {}
    attempt = headers.get(ATTEMPT_HEADER, 1)
    d.message = Message(
        message_id=message_id, body=raw.body,
        routing_key=getattr(delivery, "routing_key", "") or "",
        exchange=getattr(delivery, "exchange", "") or "",
        content_type=props.content_type, message_type=props.message_type,
        correlation_id=props.correlation_id, headers=headers, timestamp=props.timestamp,
        redelivered=bool(getattr(delivery, "redelivered", False)),
        attempt=attempt if isinstance(attempt, int) and attempt >= 1 else 1,
    )
    return d


def describe(exc: BaseException) -> str:
    """An error on one line, with its type, short enough for a header."""
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text[:REASON_MAX]
