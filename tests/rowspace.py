"""The space of outbox rows, for the property-based tests (tests/*/test_row_space.py).

Hypothesis strategies for every producer-facing column, with values at and over each limit of
AMQP 0-9-1 (short strings of 255 bytes, field-table keys, 64-bit integers, the unsigned
timestamp, the negotiated ``frame_max``, nesting depth), and the oracle that says, from a row
alone, what a consumer must receive for it: the documented properties (DESIGN.md, "What is
published"), whether the row is surely sendable, and what the encoder makes of it.

The oracle is written from the protocol, not from the relay's own limits check, so that the two
are checked against each other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import pamqp.frame
from hypothesis import HealthCheck, Phase, example, settings
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp.header import ContentHeader

JSON = "application/json"
OCTETS = "application/octet-stream"
FRAME_MAX = 131_072  # RabbitMQ's default; the integration tier reads the negotiated one
MAX_BODY = 65_536  # the tests' OUTBOX_MAX_BODY_BYTES: small, so bodies over it stay cheap
SHORTSTR = 255
EXCHANGE_NAME = re.compile(r"^[a-zA-Z0-9-_.:]*$")  # AMQP 0-9-1's exchange-name grammar
TABLE_KEY = 128  # pamqp truncates longer field-table keys (with a warning) instead of failing
SAFE_DEPTH = 64  # nesting every encoder here handles; deeper is at the edge
EPOCH_MAX = 2**64 - 1  # the AMQP timestamp is an unsigned 64-bit count of seconds
PY_MIN = datetime(1, 1, 1, tzinfo=UTC).timestamp()
PY_MAX = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()
# the last created_at surely sent: a later one is a year 10000 in some time zone, which the
# claim reads as unreadable (outbox/queries.sql)
SEND_MAX = datetime(9999, 12, 29, tzinfo=UTC).timestamp()
PG_MIN = -210_866_803_200.0  # 4714-11-24 BC, PostgreSQL's first timestamptz
PG_MAX = 9_224_318_015_999.0  # 294276-12-31 23:59:59, its last

# Examples per tier; OUTBOX_HYPOTHESIS_SCALE=10 for a long local run. Derandomized (and no
# example database) so that CI runs the same examples every time.
_SCALE = float(os.environ.get("OUTBOX_HYPOTHESIS_SCALE", "1"))
_COMMON: dict[str, Any] = dict(
    # no "explain" phase: its line tracing is very slow before Python 3.12
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example, HealthCheck.function_scoped_fixture])
UNIT = settings(max_examples=max(1, int(200 * _SCALE)), **_COMMON)
INTEGRATION = settings(max_examples=max(1, int(30 * _SCALE)), **_COMMON)


@dataclass
class RowSpec:
    """One row as a producer writes it (None: the column's default)."""

    routing_key: str
    exchange: str = ""
    payload: str | None = "{}"  # JSON text
    payload_bytes: bytes | None = None
    content_type: str | None = None
    headers: str = "{}"  # JSON text (an object, unless a test wants the refusal)
    ordering_key: str | None = None
    message_type: str | None = None
    correlation_id: str | None = None
    created_at: float | str | None = None  # epoch seconds, 'infinity', '-infinity' or now()


# -- strategies ------------------------------------------------------------------------------

_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
_WIDE = ["a", "\u00e9", "\u20ac", "\U0001f600"]  # 1, 2, 3 and 4 bytes in UTF-8


def sized(n_bytes: int, char: str) -> str:
    """A string of exactly ``n_bytes`` bytes in UTF-8, made of ``char`` (padded with 'a')."""
    width = len(char.encode())
    return char * (n_bytes // width) + "a" * (n_bytes % width)


@cache
def text(max_size: int = 12) -> st.SearchStrategy[str]:
    return st.text(_CHARS, max_size=max_size)


@cache
def at_limit(*sizes: int) -> st.SearchStrategy[str]:
    """Strings of exactly these UTF-8 lengths, in one- to four-byte characters."""
    return st.builds(sized, st.sampled_from(sizes), st.sampled_from(_WIDE))


@cache
def short_string(min_size: int = 0) -> st.SearchStrategy[str]:
    """An AMQP short string's worth of text: ordinary, or at and just over 255 bytes."""
    return st.one_of(st.text(_CHARS, min_size=min_size, max_size=12),
                     at_limit(SHORTSTR - 1, SHORTSTR, SHORTSTR + 1, 4 * SHORTSTR))


@cache
def _int64_edges() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(), st.sampled_from([
        2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**30, -(10**40), 2**15, 2**16,
        2**31, 2**32]))


@cache
def json_leaf() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.booleans(), _int64_edges(),
                     st.floats(allow_nan=False, allow_infinity=False), text(),
                     at_limit(1_000))


@cache
def header_key() -> st.SearchStrategy[str]:
    return st.one_of(text(), at_limit(TABLE_KEY - 1, TABLE_KEY, TABLE_KEY + 1, SHORTSTR,
                                      SHORTSTR + 1))


@cache
def json_value(keys: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[Any]:
    keys = text() if keys is None else keys
    return st.recursive(json_leaf(), lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)), max_leaves=10)


def nested(depth: int, in_list: bool) -> str:
    """JSON text nested ``depth`` times, built as text: the json module's encoder and decoder
    recurse, and would fail here at a depth that depends on the caller's stack."""
    return ("[" * depth + "1" + "]" * depth) if in_list else (
        '{"k": ' * depth + "1" + "}" * depth)


def json_depth(text: str) -> int:
    """The nesting depth of JSON text, without recursing."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


@cache
def deep() -> st.SearchStrategy[str]:
    """JSON text nested ``depth`` times: ordinary, or around every recursion limit in the path
    (orjson refuses 1,024 levels; pamqp recurses twice per level)."""
    depths = st.one_of(st.integers(1, 40), st.sampled_from(
        [SAFE_DEPTH, 300, 600, 1_000, 1_023, 1_024, 1_025, 3_000]))
    return st.builds(nested, depths, st.booleans())


@cache
def headers(frame_max: int) -> st.SearchStrategy[str]:
    """Header objects as JSON text: ordinary, deep, many keys, long keys, or one value around
    frame_max."""
    return st.one_of(
        st.just("{}"),
        st.dictionaries(header_key(), json_value(header_key()), max_size=6).map(dumps),
        deep().map(lambda v: '{"deep": ' + v + "}"),
        st.builds(lambda n: dumps({f"k{i}": i for i in range(n)}), st.sampled_from(
            [200, 3_000])),
        st.builds(lambda n: dumps({"big": "x" * n}), st.sampled_from(
            [frame_max - 300, frame_max - 100, frame_max, 2 * frame_max])),
    )


@cache
def bodies() -> st.SearchStrategy[tuple[str | None, bytes | None]]:
    """(payload, payload_bytes): JSON of any shape, or bytes; bodies at and over the limit."""
    return st.one_of(
        st.builds(lambda v: (v, None), st.one_of(json_value().map(dumps), deep())),
        st.builds(lambda b: (None, b), st.binary(max_size=64)),
        st.builds(lambda n: (None, b"\x00" * n), st.sampled_from([MAX_BODY, MAX_BODY + 1])),
        st.builds(lambda n: (dumps("x" * (n - 2)), None), st.sampled_from(
            [MAX_BODY, MAX_BODY + 1])),
    )


@cache
def created_at(whole_range: bool) -> st.SearchStrategy[float | str | None]:
    """Epoch seconds: around 1970, 2038, 2106 and year 9999; with ``whole_range`` all of
    PostgreSQL's range and its infinities too."""
    edges = [-1.0, -0.5, 0.0, 0.5, 2**31 - 1.0, 2**31, 2**32 - 1.0, 2**32, PY_MIN, PY_MAX]
    low, high = (PG_MIN, PG_MAX) if whole_range else (PY_MIN, PY_MAX)
    choices: list[st.SearchStrategy[Any]] = [
        st.none(), st.sampled_from(edges),
        st.floats(low, high).map(lambda s: float(math.floor(s)))]
    if whole_range:
        choices.append(st.sampled_from(["infinity", "-infinity", PY_MAX + 1, PG_MIN, PG_MAX]))
    return st.one_of(*choices)


COLUMNS = ("exchange", "routing_key", "body", "content_type", "headers", "ordering_key",
           "message_type", "correlation_id", "created_at")


@st.composite
def row_spec(draw: st.DrawFn, *, exchange: str, frame_max: int = FRAME_MAX,
             whole_range: bool = False, refusable: bool = False) -> RowSpec:
    """A good row with one or two columns drawn from their whole range (at and over each
    limit). ``exchange`` is the one that routes to the test's queue; ``refusable`` also draws
    values that the schema refuses at insert."""
    row = dataclasses.replace(draw(good_row(exchange)))  # a new object, printed as it ends
    # headers and created_at have the most classes: drawn twice as often
    columns = (*COLUMNS, "headers", "created_at", "body")
    for column in draw(st.lists(st.sampled_from(columns), min_size=1, max_size=2,
                                unique=True)):
        if column == "exchange":
            row.exchange = draw(st.one_of(text(), at_limit(127, 128, SHORTSTR, SHORTSTR + 1)))
        elif column == "routing_key":
            row.routing_key = draw(short_string(min_size=0 if refusable else 1))
        elif column == "body":
            row.payload, row.payload_bytes = draw(bodies())
            if refusable and draw(st.integers(0, 9)) == 0:
                row.payload, row.payload_bytes = draw(st.sampled_from([(None, None),
                                                                       ("{}", b"")]))
        elif column == "headers":
            row.headers = draw(headers(frame_max))
            if refusable and draw(st.integers(0, 9)) == 0:
                row.headers = draw(st.sampled_from(["[]", "1", '"x"', "null"]))
        elif column == "ordering_key":
            row.ordering_key = draw(st.one_of(
                st.text(_CHARS, min_size=1, max_size=300), *([st.just("")] if refusable else [])))
        elif column == "content_type":
            row.content_type = draw(st.one_of(st.just(""), short_string()))
        elif column == "created_at":
            row.created_at = draw(created_at(whole_range))
        else:
            setattr(row, column, draw(short_string()))
    return row


@cache
def good_row(exchange: str) -> st.SearchStrategy[RowSpec]:
    """A row well within every limit: it must be delivered, whatever its batch-mates hold."""
    return st.builds(
        RowSpec, routing_key=text().map(lambda s: "rk." + s), exchange=st.just(exchange),
        payload=json_value().map(dumps),
        headers=st.dictionaries(text(), st.one_of(
            st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), text(),
            st.floats(-1e15, 1e15)), max_size=3).map(dumps),
        ordering_key=st.one_of(st.none(), st.sampled_from(["a", "b"])),
        message_type=st.one_of(st.none(), text()), correlation_id=st.one_of(st.none(), text()),
        created_at=st.one_of(st.none(), st.floats(0, 4e9).map(math.floor)))


@cache
def batches(exchange: str, **kw: Any) -> st.SearchStrategy[list[RowSpec]]:
    """A small batch: a few rows of any kind shuffled among good ones."""
    return st.lists(st.one_of(row_spec(exchange=exchange, **kw), good_row(exchange)),
                    min_size=2, max_size=8)


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# -- the oracle ------------------------------------------------------------------------------

@dataclass
class Expected:
    """What a consumer must receive for a row that is sent."""

    body: bytes
    content_type: str
    timestamp: datetime | None  # None: the relay cannot even read the row's created_at
    message_type: str | None
    correlation_id: str | None
    headers: dict[str, Any]


def expected(row_body: bytes, content_type: str | None, is_json: bool, header_text: str,
             message_type: str | None, correlation_id: str | None,
             epoch_seconds: float | None) -> Expected:
    """The documented properties of a row as the database holds it (``header_text`` is the
    jsonb's own text, ``epoch_seconds`` its created_at, None for an infinity)."""
    stamp = None
    if epoch_seconds is not None and 0 <= epoch_seconds <= PY_MAX:
        seconds = math.floor(epoch_seconds)
        # pamqp, and so aiormq, decodes a value past 2106 (over 32 bits) as milliseconds: a
        # consumer's quirk, not the relay's; this is what such a consumer reads
        stamp = (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
                 if seconds <= 0xFFFFFFFF else datetime.fromtimestamp(seconds / 1000, UTC))
    return Expected(
        body=row_body, content_type=content_type or (JSON if is_json else OCTETS),
        timestamp=stamp, message_type=message_type or None,
        correlation_id=correlation_id or None, headers=as_float32(json.loads(header_text)))


def as_float32(value: Any) -> Any:
    """A header value as a consumer decodes it: pamqp writes every float of a field table as a
    32-bit float ('f'), so a float arrives rounded to single precision."""
    if isinstance(value, float):
        return struct.unpack(">f", struct.pack(">f", value))[0]
    if isinstance(value, dict):
        return {k: as_float32(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_float32(v) for v in value]
    return value


def problems(spec_row: RowSpec, exchange: str, header_text: str, epoch: float | None,
             body: bytes, frame_max: int) -> list[str]:
    """Why a row may not be deliverable as written (empty: it must be delivered). Conservative:
    a row listed here may still be delivered, if delivered exactly as documented."""
    found = []
    for name in ("exchange", "routing_key", "content_type", "message_type", "correlation_id"):
        value = getattr(spec_row, name)
        if value is not None and len(value.encode()) > SHORTSTR - 1:
            found.append(f"{name} at or over {SHORTSTR} bytes")
    if spec_row.exchange != exchange:
        found.append("exchange does not route to the queue")
    if not EXCHANGE_NAME.match(spec_row.exchange) or len(spec_row.exchange) > 127:
        found.append("exchange name outside AMQP's grammar (pamqp: 127 characters)")
    if epoch is None or not 0 <= epoch <= SEND_MAX:
        found.append("created_at outside the AMQP timestamp (or Python's) range")
    if len(body) > MAX_BODY:
        found.append("body over OUTBOX_MAX_BODY_BYTES")
    if json_depth(header_text) > SAFE_DEPTH:
        return [*found, "headers nested too deep"]
    hdrs = json.loads(header_text)
    found += header_problems(hdrs)
    if not found and header_frame_size(hdrs) > frame_max - 400:
        found.append("header frame near or over frame_max")
    return found


def header_problems(value: Any) -> list[str]:
    if isinstance(value, dict):
        found = [f"header key over {TABLE_KEY} bytes" for k in value
                 if len(k.encode()) > TABLE_KEY][:1]
        for v in value.values():
            found += header_problems(v)
        return found
    if isinstance(value, list):
        return [p for v in value for p in header_problems(v)]
    if isinstance(value, int) and not isinstance(value, bool) and not (
            -(2**63) <= value < 2**63):
        return ["header integer outside 64 bits"]
    if isinstance(value, float) and abs(value) >= 3.4e38:
        return ["header float outside 32 bits"]
    return []


def header_frame_size(hdrs: dict[str, Any]) -> int:
    """Bytes of the content header frame carrying these headers with short properties."""
    props = spec.Basic.Properties(
        content_type=JSON, delivery_mode=2, message_id="0" * 36, timestamp=datetime.now(UTC),
        message_type="t" * SHORTSTR, correlation_id="c" * SHORTSTR, app_id="outbox",
        headers=hdrs or None)
    return len(pamqp.frame.marshal(ContentHeader(0, 0, props), 1))


def edge_rows(exchange: str, whole_range: bool) -> list[RowSpec]:
    """One row per class of trouble, run as explicit examples on every run (each beside a good
    row), whatever the derandomized draw happens to cover."""
    def row(**changes: Any) -> RowSpec:
        return RowSpec(**{"routing_key": "rk.edge", "exchange": exchange, **changes})

    rows = [
        row(headers=dumps({"big": "x" * FRAME_MAX})),  # header frame over frame_max
        row(headers=dumps({"big": "x" * (FRAME_MAX - 400)})),  # just under it
        row(headers='{"n": 1e300}'),  # jsonb prints it as a 301-digit integer
        row(headers=dumps({"n": 2**63})),
        row(headers=dumps({"n": 0.1})),  # arrives as a 32-bit float
        row(headers=dumps({"f": 3.5e38})),
        row(headers=dumps({sized(TABLE_KEY + 1, "a"): 1})),
        row(headers=dumps({sized(TABLE_KEY, "\u00e9"): 1})),
        row(headers='{"d": ' + nested(99, False) + "}"),  # 100 deep: the schema's limit
        row(headers='{"d": ' + nested(100, True) + "}"),
        row(headers='{"d": ' + nested(600, False) + "}"),
        row(headers='{"d": ' + nested(1_100, True) + "}"),
        row(exchange=sized(128, "a")),
        row(exchange="\u00e9"),
        row(routing_key=sized(SHORTSTR, "\u20ac")),
        row(correlation_id=sized(SHORTSTR + 1, "a")),
        row(created_at=-1.0),
        row(created_at=-0.5),
        row(created_at=2.0**32),
        row(created_at=PY_MAX),
        row(payload=None, payload_bytes=b"\x00" * (MAX_BODY + 1)),
    ]
    if whole_range:
        rows += [row(created_at=c) for c in ("infinity", "-infinity", PY_MAX + 1, PG_MIN)]
    return rows


def with_edges(exchange: str, whole_range: bool) -> Callable[[Any], Any]:
    """A decorator adding each of `edge_rows`, beside a good row, as an explicit example of a
    property test over ``batch``."""

    def add(test: Any) -> Any:
        for edge in edge_rows(exchange, whole_range):
            test = example(batch=[RowSpec("rk.good", exchange), edge])(test)
        return test

    return add


def check_properties(p: Any, want: Expected, app_id: str, row: str) -> None:
    """The AMQP properties ``p`` a row went out with are what DESIGN.md documents for it
    (``row`` names it in a failure)."""
    assert p.content_type == want.content_type
    assert p.delivery_mode == 2
    assert p.app_id == app_id
    assert want.timestamp is not None, f"{row}: published with an unreadable created_at"
    assert p.timestamp == want.timestamp
    assert p.message_type == want.message_type
    assert p.correlation_id == want.correlation_id
    assert (p.headers or {}) == want.headers, f"{row}: headers changed"


async def drain(relay: Any, deadline: float, progress: Callable[[], object]) -> None:
    """Run a relay made with ``drain=True`` to its end; fail, saying ``progress()``, if it is
    still running after ``deadline`` seconds."""
    try:
        async with asyncio.timeout(deadline):
            await relay.run()
    except TimeoutError:
        raise AssertionError(f"the drain did not end within {deadline:g}s: "
                             f"{progress()}") from None
