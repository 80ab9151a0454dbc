"""One trace from the producer's transaction through the relay to the consumer's handler, against
the real PostgreSQL and RabbitMQ, with the OpenTelemetry SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import outbox
from outbox import tracing
from outbox.consumer import Consumer, Message
from outbox.runner import run_relay
from outbox.settings import Settings
from tests import support

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    provider = TracerProvider()
    tracing.use(provider)
    try:
        yield provider
    finally:
        tracing.use(None)


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def test_one_trace_from_the_producer_through_the_relay_to_the_handler(
        schema: str, queue: str, provider: TracerProvider) -> None:
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = provider.get_tracer("app")
    settings: Settings = support.make_settings(schema, on_sent="mark")

    # the producer: an event written in the transaction of the application's own span
    with psycopg.connect(settings.database_url) as conn, \
            app.start_as_current_span("place order") as order:
        message_id = outbox.enqueue(conn, queue, {"n": 1}, schema=schema)

    async def handle(tx: Any, message: Message) -> None:
        with app.start_as_current_span("charge card"):
            pass

    consumer = Consumer(queue, handle, name="billing", settings=settings)
    await consumer.start()
    try:
        await asyncio.wait_for(consumer.subscribed.wait(), 30)
        assert (await asyncio.wait_for(run_relay(settings, drain=True), 30)).published == 1
        await consumer.wait_for(lambda c: c.applied == 1, timeout=20)
        # published once more, as after a lost confirm: the inbox finds a duplicate
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("UPDATE {}.outbox SET sent_at = NULL").format(
                sql.Identifier(schema)))
        assert (await asyncio.wait_for(run_relay(settings, drain=True), 30)).published == 1
        await consumer.wait_for(lambda c: c.duplicates == 1, timeout=20)
    finally:
        await consumer.close()

    spans = exporter.get_finished_spans()
    (create,) = named(spans, "create")  # the default exchange: no name to show
    sends = named(spans, "send")
    processes = named(spans, f"process {queue}")
    (handler,) = named(spans, "charge card")
    assert len(sends) == 2 and len(processes) == 2
    trace_id = order.get_span_context().trace_id

    assert create.kind is trace.SpanKind.PRODUCER
    assert create.context.trace_id == trace_id
    assert create.parent is not None and create.parent.span_id == order.get_span_context().span_id
    assert (create.attributes or {})["messaging.message.id"] == str(message_id)

    for send in sends:
        assert send.kind is trace.SpanKind.CLIENT and send.parent is None
        assert [(link.context.trace_id, link.context.span_id) for link in send.links] == [
            (trace_id, create.context.span_id)]
        assert dict(send.links[0].attributes or {}) == {}  # a first try each time
        assert dict(send.attributes or {}) == {
            "messaging.system": "rabbitmq", "messaging.operation.type": "send",
            "messaging.operation.name": "send", "messaging.destination.name": "",
            "messaging.batch.message_count": 1, "server.address": "127.0.0.1",
            "server.port": 5672}
        assert send.status.status_code is trace.StatusCode.UNSET

    first, second = sorted(processes, key=lambda s: s.start_time or 0)
    for process in (first, second):
        assert process.kind is trace.SpanKind.CONSUMER
        assert process.context.trace_id == trace_id
        assert process.parent is not None and process.parent.span_id == create.context.span_id
        attrs = dict(process.attributes or {})
        tag = attrs.pop("messaging.rabbitmq.message.delivery_tag")
        assert isinstance(tag, int) and tag >= 1
        assert attrs == {
            "messaging.system": "rabbitmq", "messaging.operation.type": "process",
            "messaging.operation.name": "process", "messaging.destination.name": queue,
            "messaging.consumer.group.name": "billing",
            "messaging.message.id": str(message_id),
            "messaging.rabbitmq.destination.routing_key": queue,
            "outbox.inbox.duplicate": process is second}
    # the handler ran once, under the first delivery's span
    assert handler.parent is not None and handler.parent.span_id == first.context.span_id
    assert handler.context.trace_id == trace_id
