"""OpenTelemetry traces, following the messaging semantic conventions (RabbitMQ).

The only module that imports ``opentelemetry``, and only when tracing is on; everything else calls
the functions below, which cost next to nothing when it is off:

* `start_create` / `end_create` (the producer API): a ``create <exchange>`` span (PRODUCER) per
  event, and its context (``traceparent``, ``tracestate``, ``baggage``) in the row's headers — only
  when the application has a span active (then it has imported ``opentelemetry`` itself).
* `relay_spans` (the relay core): one ``send <exchange>`` span (CLIENT: each message has its own
  creation context, so the send span is not one) per published batch, linked to each row's creation
  context; with tracing off it is a shared no-op and no header is parsed.
* `start_processing` / `processing` / `end_processing` (the consumer): a ``process <queue>``
  span (CONSUMER) per message, a child of the message's creation context, current while its
  handler runs.

When tracing is on. The relay process (`outbox relay`, `make demo`) turns it on when
``OTEL_TRACES_EXPORTER`` names an exporter (anything but ``none``, and ``OTEL_SDK_DISABLED`` not
true) and the SDK is installed (``pip install 'outbox[otel]'``); the SDK reads the other
``OTEL_*`` variables itself (sampler, resource, service name, batch processor, OTLP endpoint).
A process that configured its own ``TracerProvider`` passes it to `use`. The producer and the
consumer, which run in the application's process, trace with `use`'s provider or else the global
one, as soon as the application has imported ``opentelemetry``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit
from uuid import UUID

if TYPE_CHECKING:  # for annotations only: nothing is imported at run time
    from outbox.rows import Result, Row, Settlement

log = logging.getLogger("outbox.tracing")

# a version-00 traceparent as PostgreSQL's jsonb text (or orjson) writes it
_TRACEPARENT = re.compile(r'"traceparent":\s?"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})"')
SCOPE = "outbox"
SYSTEM = "rabbitmq"
CONTEXT_HEADERS = ("traceparent", "tracestate", "baggage")

_provider: Any = None  # the TracerProvider of outbox's spans; None: the global one, if any
_tracer: tuple[Any, Any] | None = None  # (provider, tracer) cache


def use(provider: Any) -> None:
    """Trace with this ``TracerProvider`` (None: back to the global one; the relay off)."""
    global _provider, _tracer
    _provider, _tracer = provider, None


def enabled_by_env(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the OTEL_* environment asks a process started by outbox to trace."""
    env = os.environ if environ is None else environ
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    return bool(exporters) and exporters != "none" and not disabled


def setup(batch_size: int = 0) -> bool:
    """Configure the SDK from the OTEL_* environment for a process outbox runs (the relay, the
    demo), once; True when tracing is on. A provider given to `use` is kept as it is."""
    if _provider is not None:
        return True
    if not enabled_by_env():
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanLimits, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_TRACES_EXPORTER is set but the OpenTelemetry SDK is not installed "
                    "(pip install 'outbox[otel]'): no traces")
        return False
    limits = None
    if batch_size and "OTEL_SPAN_LINK_COUNT_LIMIT" not in os.environ:
        limits = SpanLimits(max_links=max(128, batch_size))  # one link per row of a batch
    named = ("OTEL_SERVICE_NAME" in os.environ
             or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", ""))
    resource = Resource.create({} if named else {"service.name": "outbox-relay"})
    provider = TracerProvider(resource=resource, span_limits=limits)
    for exporter in _exporters():
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # the application code of a demo's handler sees it too
    use(provider)
    return True


def flush() -> None:
    """Export the spans still queued (when a relay ends; the SDK also does at exit)."""
    force_flush = getattr(_provider, "force_flush", None)
    if force_flush is not None:
        force_flush(5000)


def _exporters() -> list[Any]:
    """The exporters OTEL_TRACES_EXPORTER names, found as the SDK finds them (entry points);
    ``otlp`` is OTLP over ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` (http/protobuf by default,
    the exporter the extra installs)."""
    from importlib.metadata import entry_points

    out = []
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    for name in os.environ.get("OTEL_TRACES_EXPORTER", "").split(","):
        name = name.strip().lower()
        if name == "otlp":
            name = "otlp_proto_grpc" if protocol == "grpc" else "otlp_proto_http"
        found = list(entry_points(group="opentelemetry_traces_exporter", name=name))
        if not found:
            log.warning("OTEL_TRACES_EXPORTER: no exporter named %r is installed", name)
            continue
        out.append(found[0].load()())
    return out


def application_span(name: str) -> AbstractContextManager[Any]:
    """A span of the application's own, current in the block (the demo's "place order"); a
    no-op while tracing is off."""
    if _provider is None:
        return _NOTHING
    span: AbstractContextManager[Any] = _get_tracer().start_as_current_span(name)
    return span


def _get_tracer() -> Any:
    global _tracer
    from opentelemetry import trace

    provider = _provider or trace.get_tracer_provider()
    if _tracer is None or _tracer[0] is not provider:
        from outbox import __version__

        _tracer = (provider, provider.get_tracer(SCOPE, __version__))
    return _tracer[1]


def _trace_module() -> Any:
    """``opentelemetry.trace`` if this process imported it (else no span can be active)."""
    return sys.modules.get("opentelemetry.trace")


# -- producer ----------------------------------------------------------------------------------


def start_create(routing_key: str, options: MutableMapping[str, Any]) -> Any:
    """With a span active: start the event's ``create`` span and put its context in
    ``options["headers"]`` (the caller's own headers win); returns the span, or None.

    A caller that gives its own ``traceparent`` gave the creation context: it is kept as it is
    and no span is made (the conventions say so)."""
    trace = _trace_module()
    if trace is None or not trace.get_current_span().get_span_context().is_valid:
        return None
    headers: Mapping[str, Any] = options.get("headers") or {}
    if "traceparent" in headers:
        return None
    from opentelemetry import propagate

    exchange = options.get("exchange", "")
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM, "messaging.operation.type": "create",
        "messaging.operation.name": "create", "messaging.destination.name": exchange}
    if routing_key:
        attributes["messaging.rabbitmq.destination.routing_key"] = routing_key
    if options.get("correlation_id"):
        attributes["messaging.message.conversation_id"] = options["correlation_id"]
    span = _get_tracer().start_span(_name("create", exchange), kind=trace.SpanKind.PRODUCER,
                                    attributes=attributes)
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    options["headers"] = {**carrier, **headers}
    return span


def end_create(span: Any, message_id: object = None, error: BaseException | None = None) -> None:
    if span is None:
        return
    if message_id is not None:
        span.set_attribute("messaging.message.id", str(message_id))
    if error is not None:
        _failed(span, type(error).__qualname__, str(error))
        span.record_exception(error)
    span.end()


def _name(operation: str, destination: str) -> str:
    # "{operation} {destination}"; the default exchange has no name to show
    return f"{operation} {destination}" if destination else operation


def _failed(span: Any, error_type: str, description: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, description))


# -- relay -------------------------------------------------------------------------------------


class _NoSend:
    """Tracing off: what the relay calls per batch, doing nothing."""

    __slots__ = ()

    def send(self, rows: Sequence[Row]) -> _NoSend:
        return self

    def end(self, rows: Sequence[Row], results: Sequence[Result], s: Settlement) -> None:
        pass


NO_SEND = _NoSend()


def relay_spans(publisher: object) -> Any:
    """The relay's span maker: `_NoSend` unless tracing is on (`setup` or `use`)."""
    if _provider is None:
        return NO_SEND
    return _SendSpans(publisher)


class _SendSpans:
    def __init__(self, publisher: object) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self._publisher = publisher
        self._server: tuple[str, tuple[str, int | None]] = ("", ("", None))

    def _server_of(self) -> tuple[str, int | None]:
        # the node the publisher is connected to now (several in a cluster)
        url = getattr(self._publisher, "current_url", "") or ""
        if url != self._server[0]:
            parts = urlsplit(url)
            port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
            self._server = (url, (parts.hostname or "", port if parts.hostname else None))
        return self._server[1]

    def send(self, rows: Sequence[Row]) -> _Send:
        """Start the batch's span, linked to each row's creation context. A row without one gets
        the send span's context in its headers, as the conventions say, so that its consumer
        still joins a trace."""
        exchanges = {r.exchange for r in rows}
        exchange = next(iter(exchanges)) if len(exchanges) == 1 else None
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM, "messaging.operation.type": "send",
            "messaging.operation.name": "send", "messaging.batch.message_count": len(rows)}
        if exchange is not None:  # the conventions: only a value true of every message
            attributes["messaging.destination.name"] = exchange
        address, port = self._server_of()
        if address:
            attributes["server.address"] = address
            attributes["server.port"] = port
        links = []
        bare = []
        for row in rows:
            if row.headers is None or "traceparent" not in row.headers:
                bare.append(row)
                continue
            context = self._creation_context(row)
            if context is None:  # the producer's own, unreadable: left as it is, unlinked
                continue
            # Every try of a row links to the same creation context, a retry with its attempt
            # number: a retried or revived row's tries are found from its create span. (No
            # attributes on a first try's link: they would cost more than the rest of the span.)
            links.append(self._trace.Link(context, {"outbox.attempt": row.attempts + 1})
                         if row.attempts else self._trace.Link(context))
        span = _get_tracer().start_span(
            _name("send", exchange or ""), context=self._trace.set_span_in_context(
                self._trace.INVALID_SPAN),  # a root: the lane has no parent to give
            kind=self._trace.SpanKind.CLIENT, attributes=attributes, links=links)
        if bare:
            carrier: dict[str, str] = {}
            self._propagator.inject(carrier, context=self._trace.set_span_in_context(span))
            for row in bare:
                try:
                    headers = _loads(row.headers) if row.headers else {}
                except ValueError:
                    continue  # not a JSON object: the publisher parks it, untouched
                row.headers = _dumps({**carrier, **headers})
        return _Send(span)

    def _creation_context(self, row: Row) -> Any:
        text = row.headers or ""
        match = _TRACEPARENT.search(text) if "tracestate" not in text else None
        if match is not None:  # the common case, without the propagator's cost
            trace_id, span_id = int(match[1], 16), int(match[2], 16)
            if not (trace_id and span_id):
                return None
            return self._trace.SpanContext(trace_id, span_id, is_remote=True,
                                           trace_flags=self._trace.TraceFlags(int(match[3], 16)))
        try:
            headers = _loads(text)
        except ValueError:
            return None
        carrier = {k: headers[k] for k in CONTEXT_HEADERS[:2] if isinstance(headers.get(k), str)}
        context = self._trace.get_current_span(
            self._propagator.extract(carrier)).get_span_context()
        return context if context.is_valid else None


class _Send:
    __slots__ = ("span",)

    def __init__(self, span: Any) -> None:
        self.span = span

    def end(self, rows: Sequence[Row], results: Sequence[Result], s: Settlement) -> None:
        """Record the rows that were not confirmed (an event each, and the span's status), then
        end the span."""
        from outbox.rows import Outcome

        failed = [(row, res) for row, res in zip(rows, results, strict=True)
                  if res.outcome is not Outcome.CONFIRMED]
        if failed:
            dead, retry = {p.id for p in s.parked}, {r.id for r in s.retries}
            for row, res in failed:
                then = ("dead" if row.id in dead else "retry" if row.id in retry
                        else "released")
                self.span.add_event("outbox.publish_failed", {
                    "messaging.message.id": str(row.message_id),
                    "error.type": res.kind or "_OTHER", "outbox.reason": res.reason,
                    "outbox.attempt": row.attempts + 1, "outbox.then": then})
            first = failed[0][1]
            self.span.set_attribute("outbox.failed_count", len(failed))
            _failed(self.span, first.kind or "_OTHER",
                    f"{len(failed)} of {len(rows)} messages not confirmed: {first.reason}")
        self.span.end()


def _loads(text: str) -> dict[str, Any]:
    import orjson

    value = orjson.loads(text)
    if not isinstance(value, dict):
        raise ValueError("headers are not a JSON object")
    return value


def _dumps(value: Mapping[str, Any]) -> str:
    import orjson

    return orjson.dumps(value).decode()


# -- consumer ----------------------------------------------------------------------------------

_NO_BATCH: dict[UUID, Any] = {}
_batch: ContextVar[dict[UUID, Any]] = ContextVar("outbox_process_spans", default=_NO_BATCH)


def _consumer_tracing() -> bool:
    # the application imported opentelemetry (its own provider, or `setup`'s), or `use` gave one
    return _provider is not None or _trace_module() is not None


class _Processing:
    __slots__ = ("duplicate", "failure", "span")

    def __init__(self, span: Any) -> None:
        self.span = span
        self.duplicate = False
        self.failure: str | None = None


def start_processing(queue: str, consumer: str, deliveries: Sequence[Any]) -> Any:
    """A ``process <queue>`` span (CONSUMER) for each message of a consumer's batch (deliveries
    with ``.message`` and ``.tag``), each a child of the creation context in the message's
    headers; None when tracing is off. `end_processing` ends them."""
    if not deliveries or not _consumer_tracing():
        return None
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace

    tracer = _get_tracer()
    spans: dict[UUID, _Processing] = {}
    for d in deliveries:
        m = d.message
        carrier = {k: v.decode() if isinstance(v, bytes) else v
                   for k, v in m.headers.items()
                   if k in CONTEXT_HEADERS and isinstance(v, str | bytes)}
        parent = propagate.extract(carrier) if carrier else otel_context.Context()
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM, "messaging.operation.type": "process",
            "messaging.operation.name": "process", "messaging.destination.name": queue,
            "messaging.consumer.group.name": consumer,
            "messaging.message.id": str(m.message_id),
            "messaging.rabbitmq.message.delivery_tag": d.tag}
        if m.routing_key:
            attributes["messaging.rabbitmq.destination.routing_key"] = m.routing_key
        if m.correlation_id:
            attributes["messaging.message.conversation_id"] = m.correlation_id
        span = tracer.start_span(_name("process", queue), context=parent,
                                 kind=trace.SpanKind.CONSUMER, attributes=attributes)
        spans[m.message_id] = _Processing(span)
    return spans, _batch.set(spans)


def processing(message: Any) -> AbstractContextManager[Any]:
    """Make the message's process span current while its handler runs (the handler's own
    spans nest under it); a shared no-op when tracing is off."""
    spans = _batch.get()
    p = spans.get(message.message_id) if spans else None
    if p is None:
        return _NOTHING
    from opentelemetry import trace

    return trace.use_span(p.span, end_on_exit=False, record_exception=False,
                          set_status_on_exception=False)


_NOTHING = nullcontext()


def duplicates(messages: Sequence[Any]) -> None:
    """The inbox already had these: their handler did not run."""
    spans = _batch.get()
    for m in messages if spans else ():
        p = spans.get(m.message_id)
        if p is not None:
            p.duplicate = True


def failed(message: Any, reason: str) -> None:
    """The handler (or its commit) failed for this message: it is retried or dead-lettered."""
    p = _batch.get().get(message.message_id) if _batch.get() else None
    if p is not None:
        p.failure = reason


def end_processing(started: Any) -> None:
    if started is None:
        return
    spans, token = started
    _batch.reset(token)
    for p in spans.values():
        p.span.set_attribute("outbox.inbox.duplicate", p.duplicate)
        if p.failure is not None:
            _failed(p.span, "handler", p.failure)
        p.span.end()
