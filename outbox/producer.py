"""Write an event in the caller's own transaction (the producer API for Python applications).

    with Session(engine) as session, session.begin():
        session.add(order)
        outbox.enqueue(session, "orders.created", {"id": order.id},
                       ordering_key=f"order-{order.id}")

Works with a SQLAlchemy `Session`, `Connection`, `AsyncSession` or `AsyncConnection`, and with a raw
psycopg `Connection` or `AsyncConnection` (use `enqueue_async` for the async ones). Nothing is
committed here: the event exists if and only if the caller's transaction commits.

With an OpenTelemetry span active, each event gets a ``create`` span and its context
(``traceparent``, ``tracestate``, ``baggage``) in its headers, unless the caller's headers carry a
``traceparent`` of their own (outbox.tracing).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import timedelta
from typing import Any
from uuid import UUID

import orjson

from outbox import tracing
from outbox.sql import as_uuid, for_schema


def event_params(
    routing_key: str, payload: Any = None, *, exchange: str = "",
    ordering_key: str | None = None, headers: Mapping[str, Any] | None = None,
    message_type: str | None = None, correlation_id: str | None = None,
    content_type: str | None = None, delay: float | timedelta = 0.0,
) -> dict[str, Any]:
    """The parameters of the ``enqueue`` query; ``payload`` is JSON-able, or bytes for an
    opaque body."""
    if not routing_key:
        raise ValueError("routing_key must not be empty")
    is_bytes = isinstance(payload, bytes | bytearray | memoryview)
    return {
        "exchange": exchange,
        "routing_key": routing_key,
        "payload": None if is_bytes else orjson.dumps(payload).decode(),
        "payload_bytes": bytes(payload) if is_bytes else None,
        "content_type": content_type,
        "headers": orjson.dumps(dict(headers or {})).decode(),
        "ordering_key": ordering_key,
        "message_type": message_type,
        "correlation_id": correlation_id,
        "delay": delay.total_seconds() if isinstance(delay, timedelta) else float(delay),
    }


@functools.cache
def _sqlalchemy_statement(schema: str) -> Any:
    return for_schema(schema).sqlalchemy("enqueue")


def enqueue(target: Any, routing_key: str, payload: Any = None, *, schema: str = "public",
            **options: Any) -> UUID:
    """Insert one event through ``target`` (a SQLAlchemy Session/Connection or a psycopg
    Connection), inside its current transaction; returns the event's ``message_id``."""
    with _Creating(routing_key, options) as creating:
        params = event_params(routing_key, payload, **options)
        if _is_psycopg(target):
            row = target.execute(for_schema(schema)["enqueue"], params).fetchone()
        else:
            row = target.execute(_sqlalchemy_statement(schema), params).one()
        message_id = creating.message_id = as_uuid(row[0])
    return message_id


async def enqueue_async(target: Any, routing_key: str, payload: Any = None, *,
                        schema: str = "public", **options: Any) -> UUID:
    """`enqueue` for a SQLAlchemy AsyncSession/AsyncConnection or a psycopg AsyncConnection."""
    with _Creating(routing_key, options) as creating:
        params = event_params(routing_key, payload, **options)
        if _is_psycopg(target):
            cur = await target.execute(for_schema(schema)["enqueue"], params)
            row = await cur.fetchone()
        else:
            row = (await target.execute(_sqlalchemy_statement(schema), params)).one()
        message_id = creating.message_id = as_uuid(row[0])
    return message_id


class _Creating:
    """The ``create`` span of one event, around its insert (nothing unless a span is active):
    ended with the event's message id, or with the error that stopped it."""

    __slots__ = ("message_id", "span")

    def __init__(self, routing_key: str, options: dict[str, Any]) -> None:
        self.span = tracing.start_create(routing_key, options)  # may add to the headers
        self.message_id: UUID | None = None

    def __enter__(self) -> _Creating:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            tracing.end_create(self.span, error=exc)
        else:
            tracing.end_create(self.span, self.message_id)


def _is_psycopg(target: Any) -> bool:
    return type(target).__module__.startswith("psycopg")
