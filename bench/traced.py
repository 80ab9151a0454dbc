"""`python -m bench.traced relay --drain`: `outbox relay` with tracing on, as the cost figure
`relay_traced_vs_untraced` wants it: every span sampled, the SDK's batch span processor, and an
exporter that drops what it is given (so the figure is the relay's own cost, not a collector's)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from outbox import cli, tracing
from outbox.settings import Settings


class Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def main() -> int:
    links = max(128, Settings.load({}).batch_size)  # one link per row, as `tracing.setup` allows
    provider = TracerProvider(sampler=ALWAYS_ON, span_limits=SpanLimits(max_links=links))
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    tracing.use(provider)
    try:
        return cli.main(sys.argv[1:])
    finally:
        provider.shutdown()


if __name__ == "__main__":
    sys.exit(main())
