"""outbox.limits: what AMQP 0-9-1 can carry, checked for one row before it is published.

Each limit is checked at, and just over, its bound; the reason names the column and the limit.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from pamqp import commands as spec

from outbox import limits
from outbox.exceptions import Unframable
from outbox.frames import marshal_message
from outbox.limits import MAX_DEPTH, parse_headers, problem, row_problem
from outbox.rows import Row

NOW = datetime(2026, 12, 3, tzinfo=UTC)


def row(**changes: Any) -> Row:
    base = Row(1, uuid.UUID(int=7), "", "orders.created", b'{"n": 1}', "application/json", None,
               None, None, None, NOW, 0)
    for name, value in changes.items():
        setattr(base, name, value)
    return base


def nested(depth: int, leaf: Any = 1) -> dict[str, Any]:
    """Headers whose deepest value sits ``depth`` levels down ({"a": 1} is 1 deep)."""
    value: Any = leaf
    for level in range(depth - 1):
        value = {"a": value} if level % 2 else [value]
    return {"a": value}


def check(r: Row, frame_max: int = 131_072) -> str | None:
    return row_problem(r, frame_max, "outbox")


@pytest.mark.parametrize("column", ["routing_key", "content_type", "message_type",
                                    "correlation_id"])
def test_short_strings_at_most_255_bytes(column: str) -> None:
    assert check(row(**{column: "é" * 127 + "x"})) is None  # 255 bytes
    reason = check(row(**{column: "é" * 128}))  # 128 characters, 256 bytes
    assert reason == f"{column}: 256 bytes, over AMQP's short-string limit of 255"


def test_exchange_names_as_amqp_0_9_1_has_them() -> None:
    """pamqp refuses what the spec refuses (RabbitMQ itself would take up to 255 bytes of
    anything): over 127 characters, or a character outside a-z A-Z 0-9 - _ . :"""
    assert check(row(exchange="")) is None  # the default exchange
    assert check(row(exchange="orders.v1:EU-west_2" + "x" * 108)) is None  # 127 characters
    for bad in ("x" * 128, "é", "orders created", "a/b"):
        reason = check(row(exchange=bad))
        assert reason is not None and reason.startswith(f"exchange {bad[:40]!r}: not an AMQP")


def test_created_at_before_1970_or_unreadable() -> None:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert check(row(created_at=epoch)) is None
    assert check(row(created_at=datetime(9999, 12, 29, tzinfo=UTC))) is None
    reason = check(row(created_at=epoch - timedelta(seconds=1)))
    assert reason == ("created_at 1969-12-31T23:59:59+00:00: before 1970, AMQP timestamps are "
                      "unsigned")
    reason = check(row(created_at=None))  # what the claim returns for infinity, BC, year 10000
    assert reason is not None and reason.startswith("created_at: infinite")


def test_headers_nested_at_most_max_depth() -> None:
    assert check(row(headers=orjson.dumps(nested(MAX_DEPTH)).decode())) is None
    reason = check(row(headers=orjson.dumps(nested(MAX_DEPTH + 1)).decode()))
    assert reason == f"headers: nested {MAX_DEPTH + 1} deep, over the limit of {MAX_DEPTH}"
    # an empty container at the bound holds no value deeper than it (as the SQL check says)
    assert check(row(headers=orjson.dumps(nested(MAX_DEPTH, leaf={})).decode())) is None


@pytest.mark.parametrize("text", [
    '{"a":' * 2000 + "1" + "}" * 2000,  # deeper than orjson reads
    '{"a":' * 600 + "1" + "}" * 600,  # deeper than the encoder's recursion goes
    '{"n": 1234567890123456789, "a":' + '{"a":' * 600 + "1" + "}" * 601,  # stdlib parser
    '{"n": 1234567890123456789, "a":' + '{"a":' * 2000 + "1" + "}" * 2001,
])
def test_deep_headers_are_refused_without_recursion_error(text: str) -> None:
    reason = check(row(headers=text))
    assert reason is not None and reason.startswith("headers: nested"), reason
    assert f"limit of {MAX_DEPTH}" in reason


def test_header_names_at_most_128_bytes() -> None:
    """pamqp cuts a longer name to 128 bytes: the consumer would see another header."""
    assert check(row(headers=orjson.dumps({"k" * 128: 1}).decode())) is None
    reason = check(row(headers=orjson.dumps({"k" * 129: 1}).decode()))
    assert reason is not None and "of 129 bytes, over AMQP's field-name limit of 128" in reason
    reason = check(row(headers=orjson.dumps({"ok": [{"é" * 65: 1}]}).decode()))
    assert reason is not None and reason.startswith("headers.ok[0]: key")


@pytest.mark.parametrize("number", [2**63, -(2**63) - 1, 2**65, 10**400])
def test_integers_outside_int64(number: int) -> None:
    text = f'{{"n": {number}}}'
    reason = check(row(headers=text))
    assert reason is not None and "outside AMQP's signed 64-bit range" in reason
    assert reason.startswith("headers: integer")
    with pytest.raises(Unframable):
        parse_headers(text)


@pytest.mark.parametrize("number", [2**63 - 1, -(2**63), 65535, 4294967295, -129])
def test_integers_inside_int64_keep_their_value(number: int) -> None:
    text = f'{{"n": {number}}}'
    assert check(row(headers=text)) is None
    assert parse_headers(text) == {"n": number}


@pytest.mark.parametrize("text", ['{"f": 1e39}', '{"f": -1e39}', '{"f": 1e400}',
                                  '{"f": ' + "9" * 400 + '.5}'])
def test_floats_beyond_what_a_32_bit_float_carries(text: str) -> None:
    reason = check(row(headers=text))
    assert reason is not None and "beyond the 32-bit float AMQP headers carry" in reason, reason
    assert reason.startswith("headers")


def test_header_frame_at_most_frame_max() -> None:
    r = row(headers=orjson.dumps({"blob": "x" * 140_000}).decode())
    reason = check(r)
    assert reason is not None
    assert reason.startswith("headers: 140,014 bytes encoded (a header frame of 140,")
    assert reason.endswith("over the connection's frame_max of 131,072")
    assert check(r, frame_max=0) is None  # 0: the peers agreed on no limit


EVERY_TYPE: dict[str, Any] = {
    "s": "text", "u": "é€😀", "t": True, "f": False, "null": None, "i8": -5, "i16": -300,
    "u16": 40_000, "i32": -70_000, "u32": 3_000_000_000, "i64": -(2**40), "float": 1.25,
    "list": [1, "a", None, [True, {"x": 2.5}]], "table": {"k": {"k": []}, "e": {}},
    "": "empty name",
}


@pytest.mark.parametrize("headers", [EVERY_TYPE, {}, {"k" * 128: "v" * 1000}, nested(MAX_DEPTH)])
def test_frame_size_is_exactly_what_is_sent(headers: dict[str, Any]) -> None:
    """The size `problem` computes is the header frame's: a frame_max of exactly that size
    passes, one byte less does not (and the marshalling refuses it too)."""
    r = row(headers=orjson.dumps(headers).decode(), message_type="order.created",
            correlation_id="c-1")
    props = spec.Basic.Properties(
        content_type=r.content_type, delivery_mode=2, message_id=str(r.message_id),
        timestamp=r.created_at, message_type=r.message_type, correlation_id=r.correlation_id,
        app_id="outbox", headers=parse_headers(orjson.dumps(headers).decode()))
    data = marshal_message(1, r.body, r.exchange, r.routing_key, props, 1 << 20)
    publish = len(marshal_message(1, b"", r.exchange, r.routing_key,
                                  spec.Basic.Properties(), 1 << 20)) - 22
    size = len(data) - publish - (8 + len(r.body))  # the header frame alone
    assert check(r, frame_max=size) is None
    assert check(r, frame_max=size - 1) is not None
    assert marshal_message(1, r.body, r.exchange, r.routing_key, props, size - 8)
    with pytest.raises(Unframable, match="over the connection's frame_max"):
        marshal_message(1, r.body, r.exchange, r.routing_key, props, size - 9)


def test_every_json_type_in_headers_is_accepted() -> None:
    assert check(row(headers=orjson.dumps(EVERY_TYPE).decode())) is None
    assert problem(row(), EVERY_TYPE, 4096) is None


def test_headers_that_are_not_an_object_are_refused() -> None:
    with pytest.raises(Unframable, match="not a JSON object"):
        parse_headers("[1, 2]")
    assert limits.row_problem(row(headers="[1]"), 0) == "headers: not a JSON object"
