"""The publisher's own frame marshalling produces exactly pamqp's bytes (it only skips its
per-property dispatch), for every property the relay sets and the edge cases of a body."""

from __future__ import annotations

from datetime import UTC, datetime

import pamqp.frame
import pytest
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from outbox.frames import marshal_message

FULL = spec.Basic.Properties(
    content_type="application/json", delivery_mode=2, message_id="6f1c0c5e-0000-4000-8000-1",
    timestamp=datetime(2026, 11, 22, 5, 30, tzinfo=UTC), message_type="order.created",
    correlation_id="c-1", app_id="outbox",
    headers={"traceparent": "00-abc-def-01", "n": 7, "nested": {"a": [1, "b"]}, "f": 1.5})


def pamqp_bytes(number: int, body: bytes, exchange: str, routing_key: str,
                props: spec.Basic.Properties, max_size: int) -> bytes:
    frames = [spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True),
              ContentHeader(properties=props, body_size=len(body))]
    frames += [ContentBody(body[i:i + max_size]) for i in range(0, len(body), max_size)]
    return b"".join(pamqp.frame.marshal(f, number) for f in frames)


@pytest.mark.parametrize(("body", "props", "max_size"), [
    (b'{"n": 1}', FULL, 131_064),
    (b"", spec.Basic.Properties(content_type="application/octet-stream", delivery_mode=2,
                                message_id="m", app_id="outbox"), 131_064),
    (bytes(range(256)) * 10, spec.Basic.Properties(delivery_mode=2, message_id="m"), 1000),
    # (the header frame, 28 bytes, must fit in frame_max = max_size + 8)
    (b"xyz", spec.Basic.Properties(message_id="m", correlation_id="", headers={}), 20),
])
def test_same_bytes_as_pamqp(body: bytes, props: spec.Basic.Properties, max_size: int) -> None:
    for number in (1, 7, 300):
        assert marshal_message(number, body, "ex", "orders.created", props, max_size) == \
            pamqp_bytes(number, body, "ex", "orders.created", props, max_size)
    assert marshal_message(1, body, "", "k" * 255, props, max_size) == \
        pamqp_bytes(1, body, "", "k" * 255, props, max_size)


@pytest.mark.parametrize("props", [
    spec.Basic.Properties(message_id="m" * 256),
    spec.Basic.Properties(message_id="m", headers={"big": 2**70}),
])
def test_unencodable_properties_raise_like_pamqp(props: spec.Basic.Properties) -> None:
    with pytest.raises(TypeError):
        pamqp_bytes(1, b"x", "", "k", props, 100)
    with pytest.raises(TypeError):
        marshal_message(1, b"x", "", "k", props, 100)
