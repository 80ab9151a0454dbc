"""Traces (outbox.tracing): the producer's headers and create span, the relay's send span, against
the SDK's in-memory exporter and the in-memory fakes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import baggage, context, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import outbox
from outbox import tracing
from outbox.relay import Relay
from outbox.rows import Outcome, Result, Row
from outbox.settings import Settings
from outbox.testing import InMemoryStore, StubPublisher

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
MESSAGE_ID = uuid.UUID("5f0c6a9e-5f5e-4a43-9a53-4bb0f3b1f0a1")


class Spans(InMemorySpanExporter):
    app: trace.Tracer  # the application's own tracer, on the same provider

    def ours(self) -> list[Any]:
        """The finished spans outbox made."""
        return [s for s in self.get_finished_spans()
                if s.instrumentation_scope is not None and s.instrumentation_scope.name == "outbox"]


@pytest.fixture
def spans() -> Iterator[Spans]:
    exporter = Spans()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    exporter.app = provider.get_tracer("app")
    tracing.use(provider)
    try:
        yield exporter
    finally:
        tracing.use(None)


class FakeConnection:
    """A SQLAlchemy-like target: records the parameters of the insert."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}

    def execute(self, statement: object, params: dict[str, Any]) -> FakeConnection:
        self.params = params
        return self

    def one(self) -> tuple[uuid.UUID]:
        return (MESSAGE_ID,)

    def headers(self) -> dict[str, Any]:
        decoded: dict[str, Any] = orjson.loads(self.params["headers"])
        return decoded


def test_no_active_span_no_headers_no_span(spans: Spans) -> None:
    conn = FakeConnection()
    outbox.enqueue(conn, "orders.created", {"id": 1}, headers={"x": 1})
    assert conn.headers() == {"x": 1}
    assert spans.get_finished_spans() == ()


def test_active_span_puts_the_create_span_context_in_the_headers(
        spans: Spans) -> None:
    conn = FakeConnection()
    tracer = spans.app
    token = context.attach(baggage.set_baggage("tenant", "t-1"))
    try:
        with tracer.start_as_current_span("place order") as parent:
            outbox.enqueue(conn, "orders.created", {"id": 1}, exchange="shop",
                           headers={"x": 1})
    finally:
        context.detach(token)
    (create,) = spans.ours()
    headers = conn.headers()
    assert headers["x"] == 1
    assert headers["traceparent"].startswith(
        f"00-{create.context.trace_id:032x}-{create.context.span_id:016x}-")
    assert headers["baggage"] == "tenant=t-1"
    assert create.name == "create shop"
    assert create.kind is trace.SpanKind.PRODUCER
    assert create.parent is not None and create.parent.span_id == parent.get_span_context().span_id
    assert dict(create.attributes or {}) == {
        "messaging.system": "rabbitmq", "messaging.operation.type": "create",
        "messaging.operation.name": "create", "messaging.destination.name": "shop",
        "messaging.rabbitmq.destination.routing_key": "orders.created",
        "messaging.message.id": str(MESSAGE_ID)}


def test_the_callers_traceparent_wins_and_no_create_span(spans: Spans) -> None:
    conn = FakeConnection()
    with spans.app.start_as_current_span("place order"):
        outbox.enqueue(conn, "orders.created", {"id": 1}, headers={"traceparent": TRACEPARENT})
    assert conn.headers() == {"traceparent": TRACEPARENT}
    assert spans.ours() == []


def test_the_callers_other_context_headers_win(spans: Spans) -> None:
    conn = FakeConnection()
    token = context.attach(baggage.set_baggage("tenant", "ours"))
    try:
        with spans.app.start_as_current_span("place order"):
            outbox.enqueue(conn, "orders.created", {"id": 1},
                           headers={"baggage": "tenant=theirs", "tracestate": "k=v"})
    finally:
        context.detach(token)
    headers = conn.headers()
    assert headers["baggage"] == "tenant=theirs" and headers["tracestate"] == "k=v"
    assert headers["traceparent"].startswith("00-")


async def test_enqueue_async_too(spans: Spans) -> None:
    class AsyncConn(FakeConnection):
        async def execute(self, statement: object,  # type: ignore[override]
                          params: dict[str, Any]) -> FakeConnection:
            self.params = params
            return self

    conn = AsyncConn()
    with spans.app.start_as_current_span("place order"):
        await outbox.enqueue_async(conn, "orders.created", {"id": 1})
    (create,) = spans.ours()
    assert conn.headers()["traceparent"].split("-")[2] == f"{create.context.span_id:016x}"


def test_a_failed_insert_ends_the_span_with_the_error(spans: Spans) -> None:
    class Broken(FakeConnection):
        def one(self) -> tuple[uuid.UUID]:
            raise RuntimeError("no such table")

    with (spans.app.start_as_current_span("place order"),
          pytest.raises(RuntimeError)):
        outbox.enqueue(Broken(), "orders.created", {"id": 1})
    (create,) = spans.ours()
    assert create.status.status_code is trace.StatusCode.ERROR
    assert (create.attributes or {})["error.type"] == "RuntimeError"


SETTINGS = Settings.load({"max_attempts": 2, "batch_size": 10, "poll_interval": 0.05},
                         environ={})


def test_relay_spans_are_a_no_op_while_tracing_is_off() -> None:
    assert tracing.relay_spans(StubPublisher()) is tracing.NO_SEND


async def test_one_send_span_per_batch_linked_to_each_creation_context(
        spans: Spans) -> None:
    store = InMemoryStore(on_sent="mark")
    store.insert("a", {"i": 1}, exchange="shop", headers={"traceparent": TRACEPARENT})
    bare = store.insert("b", {"i": 2}, exchange="shop")
    retried = store.insert("c", {"i": 3}, exchange="shop", attempts=1,
                           headers={"traceparent": TRACEPARENT.replace("b7ad", "c7ad")})

    def rule(row: Row) -> Result:
        if row.routing_key == "c":
            return Result(Outcome.FAILED, "returned by the broker: 312 NO_ROUTE", "returned")
        return Result.confirmed()

    publisher = StubPublisher(rule)
    publisher.current_url = "amqp://guest:guest@rabbit.internal:5673/"  # type: ignore[attr-defined]
    relay = Relay(SETTINGS, store, publisher, drain=True)
    await asyncio.wait_for(relay.run(), 5)

    (send,) = spans.get_finished_spans()
    assert send.name == "send shop" and send.kind is trace.SpanKind.CLIENT
    assert send.parent is None
    attrs = dict(send.attributes or {})
    assert attrs == {
        "messaging.system": "rabbitmq", "messaging.operation.type": "send",
        "messaging.operation.name": "send", "messaging.destination.name": "shop",
        "messaging.batch.message_count": 3, "server.address": "rabbit.internal",
        "server.port": 5673, "error.type": "returned", "outbox.failed_count": 1}
    links = {f"{link.context.span_id:016x}": dict(link.attributes or {}) for link in send.links}
    assert links == {"b7ad6b7169203331": {},  # a first try: no attributes
                     "c7ad6b7169203331": {"outbox.attempt": 2}}
    assert all(link.context.trace_id == 0x0af7651916cd43dd8448eb211c80319c
               for link in send.links)
    assert send.status.status_code is trace.StatusCode.ERROR
    (event,) = send.events
    assert dict(event.attributes or {}) == {
        "messaging.message.id": str(retried.message_id), "error.type": "returned",
        "outbox.reason": "returned by the broker: 312 NO_ROUTE", "outbox.attempt": 2,
        "outbox.then": "dead"}
    # a row without a creation context is published with the send span's
    published = {r.routing_key: orjson.loads(r.headers or "{}") for r in publisher.published}
    assert published["b"]["traceparent"].split("-")[1:3] == [
        f"{send.context.trace_id:032x}", f"{send.context.span_id:016x}"]
    assert published["a"] == {"traceparent": TRACEPARENT}
    assert not store.rows[bare.id].headers  # the stored row is left as it was


async def test_a_batch_of_several_exchanges_names_none(spans: Spans) -> None:
    store = InMemoryStore()
    store.insert("a", {"i": 1}, exchange="shop")
    store.insert("b", {"i": 2}, exchange="")
    await asyncio.wait_for(Relay(SETTINGS, store, StubPublisher(), drain=True).run(), 5)
    (send,) = spans.get_finished_spans()
    assert send.name == "send"
    assert "messaging.destination.name" not in (send.attributes or {})
    assert send.status.status_code is trace.StatusCode.UNSET


NOTHING_IMPORTED = textwrap.dedent("""
    import asyncio, os, sys
    os.environ["OTEL_TRACES_EXPORTER"] = sys.argv[1]
    import outbox
    from outbox import tracing
    from outbox.relay import Relay
    from outbox.settings import Settings
    from outbox.testing import InMemoryStore, StubPublisher

    class Conn:
        def execute(self, statement, params):
            return self
        def one(self):
            return ("5f0c6a9e-5f5e-4a43-9a53-4bb0f3b1f0a1",)

    outbox.enqueue(Conn(), "orders.created", {"id": 1})
    assert tracing.setup(10) is False
    store = InMemoryStore()
    for i in range(5):
        store.insert("rk", {"i": i}, headers={"traceparent": "TRACEPARENT"})
    counts = asyncio.run(Relay(Settings.load({}, environ={}), store, StubPublisher(),
                               drain=True).run())
    assert counts.published == 5, counts
    print(sorted(m for m, v in sys.modules.items()
                 if v is not None and m.split(".")[0] == "opentelemetry"))
""").replace("TRACEPARENT", TRACEPARENT)


@pytest.mark.parametrize("exporter", ["", "none"])
def test_nothing_of_opentelemetry_is_imported_with_tracing_off(exporter: str) -> None:
    """A fresh interpreter: the producer API and a relay drain, tracing off (the SDK is
    installed here, so this is also what a process without the extra does)."""
    out = subprocess.run([sys.executable, "-c", NOTHING_IMPORTED, exporter],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_without_the_sdk_tracing_stays_off() -> None:
    """OTEL_TRACES_EXPORTER set, but opentelemetry cannot be imported (the extra is absent)."""
    script = "import sys; sys.modules['opentelemetry'] = None\n" + NOTHING_IMPORTED
    out = subprocess.run([sys.executable, "-c", script, "console"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert "SDK is not installed" in out.stderr


async def test_a_creation_context_with_a_tracestate_keeps_it(spans: Spans) -> None:
    store = InMemoryStore()
    store.insert("a", {"i": 1}, headers={"traceparent": TRACEPARENT, "tracestate": "k=v"})
    store.insert("b", {"i": 2}, headers={"traceparent": "00-" + "0" * 32 + "-" + "1" * 16 + "-01"})
    store.insert("c", {"i": 3}, headers={"traceparent": "00-abc-def-01", "n": 3})
    publisher = StubPublisher()
    await asyncio.wait_for(Relay(SETTINGS, store, publisher, drain=True).run(), 5)
    (send,) = spans.get_finished_spans()
    (link,) = send.links  # an all-zero trace id, a malformed one: no context
    published = {r.routing_key: orjson.loads(r.headers or "{}") for r in publisher.published}
    assert published["c"] == {"traceparent": "00-abc-def-01", "n": 3}  # the producer's, kept
    assert link.context.span_id == 0xb7ad6b7169203331 and dict(link.context.trace_state) == {
        "k": "v"}
