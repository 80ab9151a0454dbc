"""Poison rows (one of each kind) in a batch of 1,000, and the `outbox dead` commands."""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from outbox import migrate
from outbox.settings import Settings
from tests import support
from tests.faults.harness import (
    Ledger,
    RelayProcess,
    collecting,
    execute,
    fault_settings,
    until,
)

pytestmark = pytest.mark.faults


def insert_row(settings: Settings, **columns: Any) -> str:
    """Insert one row with the given columns (plain SQL, as any producer would)."""
    columns.setdefault("payload", '{"poison": true}')
    names = ", ".join(columns)
    marks = ", ".join(["%s"] * len(columns))
    rows = execute(settings, f"INSERT INTO {{}}.outbox ({names}) VALUES ({marks}) "
                             "RETURNING message_id::text", list(columns.values()))
    return str(rows[0][0])


def outbox(settings: Settings, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(support.outbox_cmd(*args), env=support.relay_env(settings),
                         capture_output=True, text=True, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


@pytest.fixture
async def full_queue() -> AsyncIterator[str]:
    """A queue that refuses every publish: x-max-length=0 with x-overflow=reject-publish."""
    name = support.unique("full")
    arguments: dict[str, Any] = {"x-max-length": 0, "x-overflow": "reject-publish"}
    await support.declare_queue(name, support.AMQP_URL, **arguments)
    yield name
    await support.delete_queues([name])


async def test_batch_of_1000_with_one_poison_row_of_each_kind(
    schema: str, queue: str, full_queue: str, ledger: Ledger,
    relays: Callable[..., RelayProcess],
) -> None:
    settings = fault_settings(schema, batch_size=1000, max_attempts=3, max_body_bytes=10_000)
    big = orjson.dumps({"blob": "x" * 20_000}).decode()
    ledger.insert(settings, 500, queue)
    poison = {
        "unroutable": insert_row(settings, routing_key=support.unique("nowhere")),
        "missing_exchange": insert_row(settings, exchange=support.unique("no_such_exchange"),
                                       routing_key=queue),
        "nack": insert_row(settings, routing_key=full_queue),
        "oversized": insert_row(settings, routing_key=queue, payload=big),
        "header_int": insert_row(settings, routing_key=queue,
                                 headers='{"n": 36893488147419103232}'),  # 2**65
    }
    ledger.add(list(poison.values()))
    ledger.insert(settings, 494, queue, start=500)
    normal = ledger.committed - set(poison.values())
    async with collecting(ledger, [queue]) as consumer:
        t0 = time.monotonic()
        relay = relays(settings)
        try:
            await until(lambda: normal <= consumer.distinct, 20, "every healthy row delivered")
        except AssertionError:
            print(relay.log_tail(40))
            raise
        healthy_after = time.monotonic() - t0
        await ledger.wait_settled(30)
        tally = await ledger.account()
        assert relay.alive, relay.log_tail()
    print(f"\nhealthy rows delivered {healthy_after:.2f}s after the relay started")
    dead = {r[0]: r[1:] for r in execute(
        settings, "SELECT message_id::text, attempts, last_error FROM {}.outbox "
                  "WHERE dead_at IS NOT NULL")}
    assert set(dead) == set(poison.values()), dead
    expect = {
        "unroutable": (3, "returned by the broker: 312 NO_ROUTE"),
        "missing_exchange": (3, "NOT_FOUND - no exchange"),
        "nack": (3, "nacked by the broker"),
        "oversized": (0, "exceeds the limit of 10000"),
        "header_int": (0, "outside AMQP's signed 64-bit range"),
    }
    for kind, (attempts, reason) in expect.items():
        got_attempts, got_reason = dead[poison[kind]]
        assert got_attempts == attempts, (kind, got_attempts, got_reason)
        assert reason in got_reason, (kind, got_reason)
    assert tally.dead == len(poison)
    assert not consumer.distinct & set(poison.values())
    listing = outbox(settings, "dead", "list").stdout
    for kind, mid in poison.items():
        line = next(x for x in listing.splitlines() if mid in x)
        assert dead[mid][1] in line, (kind, line)


# One row of each kind AMQP cannot carry as written: (columns, what its reason must say).
UNFRAMABLE: dict[str, tuple[dict[str, Any], str]] = {
    "headers_over_frame_max": ({"headers": orjson.dumps({"blob": "x" * 200_000}).decode()},
                               "over the connection's frame_max of 131,072"),
    "headers_deep": ({"headers": '{"a":' * 600 + "1" + "}" * 600},
                     "headers: nested 600 deep, over the limit of 100"),
    "headers_deeper_than_json_parsers_go": ({"headers": '{"a":' * 3000 + "1" + "}" * 3000},
                                            "headers: nested over 1,024 deep"),
    "header_int": ({"headers": '{"n": 36893488147419103232}'},
                   "headers: integer 36893488147419103232 is outside AMQP's signed 64-bit"),
    "header_huge_number": ({"headers": '{"n": 1e400}'}, "headers: integer 1000"),
    "header_float": ({"headers": '{"f": 1e39, "g": 0.5}'},  # jsonb writes 1e39 in full
                     "headers: integer 1000000000000000000000000000000000000000 is outside"),
    "header_fraction": ({"headers": '{"f": 1000000000000000000000000000000000000000.5}'},
                        "is beyond the 32-bit float AMQP headers carry"),
    "header_name": ({"headers": orjson.dumps({"n" * 200: 1}).decode()},
                    "headers: key 'nnnn"),
    "created_at_1969": ({"created_at": "1969-07-20 20:17:40+00"},
                        "created_at 1969-07-20T20:17:40+00:00: before 1970"),
    "created_at_infinity": ({"created_at": "infinity"}, "created_at: infinite"),
    "created_at_minus_infinity": ({"created_at": "-infinity"}, "created_at: infinite"),
    "created_at_year_10000": ({"created_at": "10000-06-01 00:00:00+00"},
                              "created_at: infinite"),
    "exchange": ({"exchange": "x" * 300}, "not an AMQP 0-9-1 exchange name"),
    "routing_key": ({"routing_key": "k" * 300}, "routing_key: 300 bytes, over AMQP's short"),
    "content_type": ({"content_type": "c" * 300}, "content_type: 300 bytes"),
    "message_type": ({"message_type": "t" * 300}, "message_type: 300 bytes"),
    "correlation_id": ({"correlation_id": "i" * 256}, "correlation_id: 256 bytes"),
}


async def test_a_drain_ends_with_every_row_sent_or_dead_whatever_it_holds(
    schema: str, queue: str, ledger: Ledger, relays: Callable[..., RelayProcess],
) -> None:
    """Rows valid in SQL that no frame can carry, among 3,000 good ones: `--drain` ends, every
    good row is delivered, each bad row is dead with a reason naming its column and limit, and
    nothing was left to "unexpected" errors. (Before, the drain never ended: one row closed the
    whole connection at every claim, or raised an error nobody turned into a result.)

    Most of these rows are refused at insert now (revision 0003); they are written with the
    schema at 0002, as rows from before it, which the relay must still park."""
    settings = fault_settings(schema, batch_size=500, max_attempts=3)
    migrate.downgrade(settings, "0002")
    ledger.insert(settings, 1_500, queue)
    poison = {kind: insert_row(settings, **{"routing_key": queue, **columns})
              for kind, (columns, _) in UNFRAMABLE.items()}
    ledger.add(list(poison.values()))
    ledger.insert(settings, 1_500, queue, start=1_500)
    migrate.upgrade(settings)
    async with collecting(ledger, [queue]):
        relay = relays(settings, "--drain")
        try:
            code = await relay.wait(60)  # the drain must end: before, it never did
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"--drain did not end:\n{relay.log_tail(20)}") from exc
        tally = await ledger.account()
    assert code == 0, relay.log_tail()
    assert tally.dead == len(poison) and tally.delivered == 3_000
    dead = {r[0]: (r[1], r[2]) for r in execute(
        settings, "SELECT message_id::text, attempts, last_error FROM {}.outbox "
                  "WHERE dead_at IS NOT NULL")}
    assert set(dead) == set(poison.values())
    for kind, (_, reason) in UNFRAMABLE.items():
        attempts, error = dead[poison[kind]]
        assert reason in error and attempts == 0, (kind, attempts, error)
    assert not relay.logged("unexpected"), relay.logged("unexpected")[:3]
    listing = outbox(settings, "dead", "list").stdout
    for kind, (_, reason) in UNFRAMABLE.items():
        line = next(x for x in listing.splitlines() if poison[kind] in x)
        assert reason in line, (kind, line)


async def test_dead_list_retry_discard(
    schema: str, queue: str, ledger: Ledger, relays: Callable[..., RelayProcess],
) -> None:
    settings = fault_settings(schema)
    other = support.unique("other")
    await support.declare_queue(other)
    try:
        a = ledger.insert(settings, 4, queue)
        b = ledger.insert(settings, 3, other)
        execute(settings, "UPDATE {}.outbox SET dead_at = now(), attempts = 5, "
                          "last_error = 'nacked by the broker (attempt 5 of 5)'")
        ids = {str(r[0]): int(r[1]) for r in execute(
            settings, "SELECT message_id::text, id FROM {}.outbox")}

        listing = outbox(settings, "dead", "list").stdout.splitlines()
        assert len(listing) == 7 and all("nacked by the broker" in x for x in listing)
        assert "attempts=5" in listing[0]
        only = outbox(settings, "dead", "list", "--routing-key", other, "--json").stdout
        assert sorted(r["message_id"] for r in orjson.loads(only)) == sorted(b)

        refused = outbox(settings, "dead", "retry", check=False)
        assert refused.returncode == 2 and "--id" in refused.stderr

        out = outbox(settings, "dead", "retry", "--id", str(ids[a[0]]), "--id", str(ids[a[1]]))
        assert out.stdout.strip() == "2 dead rows back to pending"
        out = outbox(settings, "dead", "retry", "--routing-key", other)
        assert out.stdout.strip() == "3 dead rows back to pending"
        out = outbox(settings, "dead", "discard", "--id", str(ids[a[2]]))
        assert out.stdout.strip() == "1 dead rows discarded"
        out = outbox(settings, "dead", "retry", "--all")
        assert out.stdout.strip() == "1 dead rows back to pending"
        assert outbox(settings, "dead", "list").stdout.strip() == "no dead rows"
        out = outbox(settings, "dead", "discard", "--all")
        assert out.stdout.strip() == "0 dead rows discarded"
        ledger.committed.discard(a[2])  # discarded on purpose: neither delivered nor dead

        async with collecting(ledger, [queue, other]):
            relay = relays(settings, "--drain")
            assert await relay.wait(30) == 0, relay.log_tail()
            tally = await ledger.account()
        assert tally.delivered == 6 and tally.dead == 0
    finally:
        await support.delete_queues([other])
