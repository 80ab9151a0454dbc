"""The Publisher contract (outbox.relay.Publisher), for AmqpPublisher and StubPublisher."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson
import pytest

from outbox.ports import BrokerHealth, Publisher
from outbox.rows import Outcome, Row
from tests.contract.conftest import wait


def row(i: int, routing_key: str) -> Row:
    return Row(i, uuid.uuid4(), "", routing_key, b'{"i": %d}' % i, "application/json", None,
               None, None, None, datetime.now(UTC), 0)


async def test_one_result_per_row_in_order(publisher_case: tuple[Publisher, str]) -> None:
    publisher, queue = publisher_case
    assert publisher.ready
    rows = [row(i, queue) for i in range(50)]
    results = await publisher.publish(rows, 0)
    assert [r.outcome for r in results] == [Outcome.CONFIRMED] * 50


async def test_a_connected_publisher_reports_itself_healthy(
        publisher_case: tuple[Publisher, str]) -> None:
    publisher, _ = publisher_case
    assert publisher.health() == BrokerHealth(ready=True, blocked=False, problem="")


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


def poison(case: str, queue: str) -> tuple[Row, str]:
    """A row AMQP cannot carry as written, and the text its reason must hold."""
    r = row(2, queue)
    if case == "routing_key":
        r.routing_key = "k" * 300
        return r, "routing_key: 300 bytes, over AMQP's short-string limit of 255"
    if case == "message_type":
        r.message_type = "t" * 256
        return r, "message_type: 256 bytes"
    if case == "created_at_before_1970":
        r.created_at = datetime(1969, 7, 20, 20, 17, tzinfo=UTC)
        return r, "created_at 1969-07-20T20:17:00+00:00: before 1970"
    if case == "created_at_unreadable":
        r.created_at = None  # the claim's answer for infinity or year 10000
        return r, "created_at: infinite"
    if case == "headers_over_frame_max":
        r.headers = orjson.dumps({"blob": "x" * 200_000}).decode()
        return r, "over the connection's frame_max of 131,072"
    if case == "headers_deep":
        r.headers = '{"a":' * 600 + "1" + "}" * 600
        return r, "headers: nested 600 deep, over the limit of 100"
    if case == "headers_deep_with_a_long_integer":  # read by the standard library's parser
        r.headers = '{"n": 1234567890123456789, "a":' + '{"a":' * 600 + "1" + "}" * 601
        return r, "headers: nested over 100 deep, over the limit of 100"
    if case == "header_float":
        r.headers = '{"f": 1e39}'
        return r, "headers.f: number 1e+39 is beyond the 32-bit float"
    if case == "header_int":
        r.headers = '{"n": 36893488147419103232}'
        return r, "outside AMQP's signed 64-bit range"
    assert case == "header_name"
    r.headers = orjson.dumps({"n" * 200: 1}).decode()
    return r, "over AMQP's field-name limit of 128"


@pytest.mark.parametrize("case", [
    "routing_key", "message_type", "created_at_before_1970", "created_at_unreadable",
    "headers_over_frame_max", "headers_deep", "headers_deep_with_a_long_integer",
    "header_float", "header_int", "header_name"])
async def test_a_row_amqp_cannot_carry_is_poison_alone(
        publisher_case: tuple[Publisher, str], case: str) -> None:
    """Parked at once with a reason naming the column and the limit; its batch-mates are
    confirmed, and the publisher goes on (a header frame over frame_max would otherwise close
    the whole connection)."""
    publisher, queue = publisher_case
    bad, reason = poison(case, queue)
    results = await wait(publisher.publish([row(1, queue), bad, row(3, queue)], 0))
    assert [r.outcome for r in results] == [Outcome.CONFIRMED, Outcome.POISON,
                                            Outcome.CONFIRMED], results
    assert reason in results[1].reason and results[1].kind == "poison"
    assert publisher.ready
    assert [r.outcome for r in await wait(publisher.publish([row(4, queue)], 0))] == [
        Outcome.CONFIRMED]
