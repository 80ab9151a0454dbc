"""What AMQP 0-9-1 can carry: one row checked before it is published (pure; no I/O).

A row that passes is framed and sent as written; one that fails is parked dead at once with the
reason given here, which names the column and the limit (`outbox dead list` shows it). The
database refuses some of these rows at insert already (alembic/versions/0003); the others depend
on the connection (``frame_max`` is negotiated per connection) or predate the constraints.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from outbox.exceptions import Unframable
from outbox.rows import Row

SHORT_STRING = 255  # AMQP short strings: exchange, routing key, the string properties
FIELD_NAME = 128  # header names: pamqp cuts longer ones down, which would publish another name
MAX_DEPTH = 100  # header nesting: the encoders recurse per level; alembic/versions/0003 agrees
ORJSON_DEPTH = 1024  # orjson refuses deeper documents
FLOAT32_MAX = 3.4028234663852886e38  # pamqp sends a header's float as a 32-bit float
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FRAME_OVERHEAD = 8  # type, channel, size, frame-end: frame_max counts them
HEADER_HEAD = 14  # class, weight, body size, property flags
MESSAGE_ID = 1 + 36  # a uuid as a short string
# the exchange-name rule of AMQP 0-9-1, which pamqp enforces (RabbitMQ itself allows more)
_EXCHANGE_NAME = re.compile(r"[a-zA-Z0-9_.:-]{1,127}")


def problem(row: Row, headers: Mapping[str, Any] | None, frame_max: int,
            app_id: str = "") -> str | None:
    """Why ``row`` cannot be published on a connection of this ``frame_max`` (0: no limit),
    or None. ``headers`` is ``row.headers`` as `parse_headers` read it."""
    frame = FRAME_OVERHEAD + HEADER_HEAD + 1 + MESSAGE_ID + 8  # delivery mode, id, timestamp
    if app_id:
        frame += 1 + len(app_id.encode())
    if row.exchange and not _EXCHANGE_NAME.fullmatch(row.exchange):
        return (f"exchange {row.exchange[:40]!r}: not an AMQP 0-9-1 exchange name (at most "
                "127 of the characters a-z A-Z 0-9 - _ . :), which the encoder refuses")
    if len(row.routing_key) > 63:  # 4 bytes a character at most
        size = _short_string(row.routing_key)
        if size > SHORT_STRING:
            return f"routing_key: {size:,} bytes, over AMQP's short-string limit of 255"
    properties: tuple[tuple[str, str | None], ...] = (
        ("content_type", row.content_type), ("message_type", row.message_type),
        ("correlation_id", row.correlation_id))
    for column, prop in properties:
        if prop:  # properties: in the header frame unless empty
            size = _short_string(prop)
            if size > SHORT_STRING:
                return f"{column}: {size:,} bytes, over AMQP's short-string limit of 255"
            frame += 1 + size
    created_at = row.created_at
    if created_at is None:
        return ("created_at: infinite or outside the years 1 to 9999, which no client can "
                "read; AMQP timestamps count seconds from 1970")
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=UTC)  # as pamqp reads a naive datetime
    if created_at < EPOCH:
        return (f"created_at {created_at.isoformat()}: before 1970, AMQP timestamps are "
                "unsigned")
    if headers is not None:
        reason, table = _walk(headers)
        if reason:
            return reason
        frame += table
        if frame_max and frame > frame_max:
            return (f"headers: {table:,} bytes encoded (a header frame of {frame:,}), over the "
                    f"connection's frame_max of {frame_max:,}")
    return None


def row_problem(row: Row, frame_max: int, app_id: str = "") -> str | None:
    """`problem` for a row whose headers are still JSON text."""
    try:
        headers = parse_headers(row.headers) if row.headers is not None else None
    except Unframable as exc:
        return str(exc)
    return problem(row, headers, frame_max, app_id)


def _short_string(value: str) -> int:
    return len(value) if value.isascii() else len(value.encode())


def _walk(headers: Mapping[str, Any]) -> tuple[str, int]:
    """The first reason the headers cannot be sent (or ""), and their size as AMQP encodes
    them (pamqp's field table). Iterative, so no nesting can exhaust the stack."""
    size = 4
    depth = 0
    # (container, its level, where it is): a value inside sits one level deeper
    stack: list[tuple[Any, int, str]] = [(headers, 0, "headers")]
    while stack:
        container, level, where = stack.pop()
        level += 1
        if container:
            depth = max(depth, level)
        if isinstance(container, Mapping):
            items: Any = container.items()
        else:
            items = enumerate(container)
        for key, value in items:
            if isinstance(key, str):
                name = _short_string(key)
                if name > FIELD_NAME:
                    return (f"{where}: key {key[:40]!r}… of {name:,} bytes, over AMQP's "
                            f"field-name limit of {FIELD_NAME}"), 0
                size += 1 + name
            size += 1  # the value's type octet
            if value is None or value is True or value is False:
                size += 0 if value is None else 1
            elif isinstance(value, str):
                size += 4 + _short_string(value)
            elif isinstance(value, int):
                if not -(2**63) <= value < 2**63:
                    return (f"{_at(where, key)}: integer {value} is outside AMQP's signed "
                            "64-bit range"), 0
                size += _int_size(value)
            elif isinstance(value, float):
                if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
                    return (f"{_at(where, key)}: number {value:g} is beyond the 32-bit float "
                            "AMQP headers carry"), 0
                size += 4
            elif isinstance(value, Mapping | list):
                size += 4
                stack.append((value, level, _at(where, key)))
            else:
                return f"{_at(where, key)}: {type(value).__name__} has no AMQP type", 0
    if depth > MAX_DEPTH:
        return f"headers: nested {depth:,} deep, over the limit of {MAX_DEPTH}", 0
    return "", size


def _at(where: str, key: object) -> str:
    return f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}"


def _int_size(value: int) -> int:
    """The bytes of an integer in a field table, as pamqp's `table_integer` picks its type."""
    if -128 <= value <= 127:
        return 1
    if -32768 <= value <= 65535:
        return 2
    if -2147483648 <= value <= 4294967295:
        return 4
    return 8


_LONG_DIGITS = re.compile(r"\d{19}")


def parse_headers(text: str) -> dict[str, Any]:
    """The headers jsonb as a dict; raises `Unframable` for what AMQP cannot carry as written.

    orjson turns an integer beyond 64 bits into a float without a word, which would publish a
    different value than the producer wrote; so text with a 19-digit run is parsed again by the
    standard library, which keeps integers exact, and the range is checked. (PostgreSQL writes
    every jsonb number out in full, so a huge number always shows such a run.)
    """
    headers: Any = None
    try:
        headers = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc):
            raise Unframable(f"headers: nested over {ORJSON_DEPTH:,} deep, over the limit of "
                             f"{MAX_DEPTH}") from exc
        if not _LONG_DIGITS.search(text):  # else read again below, with a precise reason
            if "infinity" in str(exc):
                raise Unframable("headers: a number is beyond the 32-bit float AMQP headers "
                                 "carry") from exc
            raise Unframable(f"headers: not JSON that AMQP can carry: {exc}") from exc
    if _LONG_DIGITS.search(text):
        if headers is not None:
            _depth_within_limit(headers)  # the standard library's parser recurses
        try:
            headers = json.loads(text, parse_int=_amqp_int, parse_float=_amqp_float)
        except RecursionError as exc:
            raise Unframable(f"headers: nested too deep to read, over the limit of "
                             f"{MAX_DEPTH}") from exc
        except Unframable:
            raise
        except ValueError as exc:
            raise Unframable(f"headers: not JSON that AMQP can carry: {exc}") from exc
    if not isinstance(headers, dict):
        raise Unframable("headers: not a JSON object")
    return headers


def _depth_within_limit(value: Any) -> None:
    stack = [(value, 0)]
    while stack:
        container, level = stack.pop()
        if level >= MAX_DEPTH and container:
            raise Unframable(f"headers: nested over {MAX_DEPTH} deep, over the limit of "
                             f"{MAX_DEPTH}")
        children = container.values() if isinstance(container, dict) else container
        stack.extend((c, level + 1) for c in children if isinstance(c, dict | list))


def _amqp_int(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) <= 19:
        value = int(text)
        if -(2**63) <= value < 2**63:
            return value
    shown = text if len(text) <= 40 else f"{text[:20]}…({len(digits):,} digits)"
    raise Unframable(f"headers: integer {shown} is outside AMQP's signed 64-bit range")


def _amqp_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        shown = text if len(text) <= 40 else f"{text[:20]}…({len(text):,} characters)"
        raise Unframable(f"headers: number {shown} is beyond the 32-bit float AMQP headers "
                         "carry")
    return value
