"""The Publisher contract (outbox.relay.Publisher), for AmqpPublisher and StubPublisher."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from outbox.ports import Publisher
from outbox.rows import Outcome, Row


def row(i: int, routing_key: str) -> Row:
    return Row(i, uuid.uuid4(), "", routing_key, b'{"i": %d}' % i, "application/json", None,
               None, None, None, datetime.now(UTC), 0)


async def test_one_result_per_row_in_order(publisher_case: tuple[Publisher, str]) -> None:
    publisher, queue = publisher_case
    assert publisher.ready
    rows = [row(i, queue) for i in range(50)]
    results = await publisher.publish(rows, 0)
    assert [r.outcome for r in results] == [Outcome.CONFIRMED] * 50


async def test_an_unroutable_row_fails_alone(publisher_case: tuple[Publisher, str]) -> None:
    publisher, queue = publisher_case
    rows = [row(1, queue), row(2, f"nowhere-{uuid.uuid4().hex}"), row(3, queue)]
    results = await publisher.publish(rows, 0)
    assert [r.outcome for r in results] == [Outcome.CONFIRMED, Outcome.FAILED,
                                            Outcome.CONFIRMED]
    assert results[1].kind == "returned" and "NO_ROUTE" in results[1].reason


async def test_an_empty_batch_publishes_nothing(publisher_case: tuple[Publisher, str]) -> None:
    publisher, _ = publisher_case
    assert await publisher.publish([], 0) == []
