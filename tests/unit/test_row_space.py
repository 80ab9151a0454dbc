"""Property, against the fakes (no I/O): whatever a row holds, a drain ends with it sent or dead
with a reason, within bounded attempts, and its good batch-mates sent.

A row the fake publisher confirms is also framed by the real code (`outbox.batch.properties`
and `outbox.frames`), decoded again by pamqp and compared with what DESIGN.md documents: the fake
may only confirm what the broker could carry, exactly as written.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pamqp.frame
from hypothesis import event, given
from pamqp import commands as spec
from pamqp.header import ContentHeader

from outbox import frames
from outbox.batch import properties
from outbox.relay import Relay
from outbox.rows import Row
from outbox.settings import Settings
from outbox.testing import InMemoryStore, StoredRow, StubPublisher
from tests import rowspace
from tests.rowspace import FRAME_MAX, MAX_BODY, RowSpec

SETTINGS = Settings.load({"max_attempts": 3, "retry_base": 0, "retry_max": 0, "batch_size": 50,
                          "concurrency": 2, "poll_interval": 0.05,
                          "max_body_bytes": MAX_BODY}, environ={})
DRAIN_DEADLINE = 10.0


@dataclass
class WrittenRow(StoredRow):
    """A stored row that keeps its headers as the producer's JSON text (any integer, any
    depth) and its created_at as a datetime."""

    header_text: str = "{}"
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    spec: RowSpec | None = None

    def as_row(self) -> Row:
        return Row(self.id, self.message_id, self.exchange, self.routing_key, self.body,
                   self.content_type, None if self.header_text == "{}" else self.header_text,
                   self.ordering_key, self.message_type, self.correlation_id, self.created,
                   self.attempts)


def store_with(batch: list[RowSpec]) -> InMemoryStore:
    store = InMemoryStore(on_sent="mark", clock=lambda: 0.0)  # retries are due at once
    for i, s in enumerate(batch, start=1):
        is_json = s.payload is not None
        body = s.payload.encode() if s.payload is not None else s.payload_bytes or b""
        when = (datetime.now(UTC) if s.created_at is None
                else datetime.fromtimestamp(float(s.created_at), UTC))
        store.rows[i] = WrittenRow(
            i, s.routing_key, body, exchange=s.exchange, ordering_key=s.ordering_key,
            content_type=s.content_type or (rowspace.JSON if is_json else rowspace.OCTETS),
            message_type=s.message_type, correlation_id=s.correlation_id,
            header_text=s.headers, created=when, spec=s)
    store._next_id = len(batch) + 1
    return store


def framed(row: Row) -> tuple[spec.Basic.Publish, ContentHeader, int, bytes]:
    """The row as the real publisher frames it, decoded again: (method, header, header frame
    size, body)."""
    props = properties(row, SETTINGS.app_id)
    data = frames.marshal_message(1, row.body, row.exchange, row.routing_key, props,
                                  FRAME_MAX - 8)
    decoded: list[tuple[int, Any]] = []
    offset = 0
    while offset < len(data):
        consumed, _, frame = pamqp.frame.unmarshal(data[offset:])
        decoded.append((consumed, frame))
        offset += consumed
    body = b"".join(f.value for _, f in decoded[2:])
    return decoded[0][1], decoded[1][1], decoded[1][0], body


def check_sent(row: WrittenRow) -> None:
    """A confirmed row is one the broker could carry, with the documented properties."""
    assert row.spec is not None
    claimed = row.as_row()
    try:
        method, header, header_size, body = framed(claimed)
    except BaseException as exc:  # RecursionError, struct.error, OverflowError…
        raise AssertionError(f"row {row.id} was confirmed by the fake, but the publisher "
                             f"cannot frame it: {type(exc).__name__}: {exc}") from exc
    assert header_size <= FRAME_MAX, f"row {row.id}: header frame of {header_size} bytes"
    want = rowspace.expected(row.body, row.spec.content_type, row.spec.payload is not None,
                             row.header_text, row.message_type, row.correlation_id,
                             row.created.timestamp())
    assert (method.exchange, method.routing_key) == (row.exchange, row.routing_key)
    assert body == want.body and header.body_size == len(want.body)
    assert header.properties.message_id == str(row.message_id)
    rowspace.check_properties(header.properties, want, SETTINGS.app_id,
                              f"row {row.id} (created_at {row.created})")


async def drain(store: InMemoryStore, publisher: StubPublisher) -> None:
    relay = Relay(SETTINGS, store, publisher, drain=True, rng=random.Random(0))
    await rowspace.drain(relay, DRAIN_DEADLINE,
                         lambda: f"{Counter(r.id for r in publisher.published)} publishes")


def blocked(store: InMemoryStore, row: StoredRow) -> bool:
    return not (row.sent or row.dead) and row.ordering_key is not None and any(
        o.dead and o.ordering_key == row.ordering_key and o.id < row.id
        for o in store.rows.values())


@rowspace.UNIT
@rowspace.with_edges("", whole_range=False)
@given(batch=rowspace.batches(""))
def test_every_row_ends_sent_or_dead_and_good_rows_are_sent(batch: list[RowSpec]) -> None:
    store = store_with(batch)
    publisher = StubPublisher()
    asyncio.run(drain(store, publisher))
    published = Counter(r.id for r in publisher.published)
    for row in store.rows.values():
        assert isinstance(row, WrittenRow) and row.spec is not None
        if blocked(store, row):
            continue  # a dead row blocks its key until an operator acts (DESIGN.md, Ordering)
        assert row.sent or row.dead, f"row {row.id} still pending after the drain"
        assert published[row.id] <= SETTINGS.max_attempts, (
            f"row {row.id} published {published[row.id]} times")
        doubts = rowspace.problems(row.spec, "", row.header_text, row.created.timestamp(),
                                   row.body, FRAME_MAX)
        event("row: " + (doubts[0] if doubts else "within every limit")
              + (" -> sent" if row.sent else " -> dead"))
        if row.sent:
            check_sent(row)
        else:
            assert row.last_error, f"row {row.id} dead without a reason"
            assert doubts, f"row {row.id} is within every limit but dead: {row.last_error}"
