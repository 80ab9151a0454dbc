"""In-memory fakes of the store and the publisher, for unit tests of the relay's decisions.

They obey the same contract tests as `PgStore` and `AmqpPublisher` (tests/contract/), so a
decision that works against them works against the real ones.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from outbox import limits
from outbox.exceptions import StoreUnavailable
from outbox.ports import BLOCKED, BrokerHealth, Stats
from outbox.rows import Outcome, Result, Row, Settlement


@dataclass
class StoredRow:
    id: int
    routing_key: str
    body: bytes
    exchange: str = ""
    ordering_key: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: str = "application/json"
    message_type: str | None = None
    correlation_id: str | None = None
    message_id: uuid.UUID = field(default_factory=uuid.uuid4)
    created_at: float = field(default_factory=time.time)
    available_at: float = 0.0
    attempts: int = 0
    last_error: str | None = None
    dead: bool = False
    sent: bool = False
    locked_by: object | None = None

    def as_row(self) -> Row:
        return Row(self.id, self.message_id, self.exchange, self.routing_key, self.body,
                   self.content_type, orjson.dumps(self.headers).decode() if self.headers else None,
                   self.ordering_key, self.message_type, self.correlation_id,
                   datetime.fromtimestamp(self.created_at, UTC), self.attempts)


BLOCK = 256  # ids per block of rows without a key, as in the claim of outbox/queries.sql


class InMemoryStore:
    """A `Store` on a dict, with the same claim rules as the SQL one (SKIP LOCKED, head of key,
    blocks of rows without a key)."""

    def __init__(self, on_sent: str = "delete", clock: Callable[[], float] = time.time) -> None:
        self.rows: dict[int, StoredRow] = {}
        self.on_sent = on_sent
        self.clock = clock
        self.down = False  # set to make every call fail as a lost database would
        self._next_id = 1
        self.block = BLOCK  # ids per block (a test may make blocks smaller)
        self.blocks: dict[int, object] = {}  # block of rows without a key -> the session holding it
        self._wakers: list[Callable[[], None]] = []
        self.wakeups_wanted = True  # the flag the NOTIFY trigger reads (alembic/versions/0002)
        self.wakeup_changes: list[bool] = []  # every change of it, in order
        self.claims = 0  # claims made, found rows or not: a test awaits the relay's next one

    def insert(self, routing_key: str, payload: Any = None, *, delay: float = 0.0,
               **fields: Any) -> StoredRow:
        body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        row = StoredRow(self._next_id, routing_key, body, available_at=self.clock() + delay,
                        **fields)
        self.rows[row.id] = row
        self._next_id += 1
        self.notify()
        return row

    def next_block(self) -> None:
        """Let the next row's id begin a new block."""
        self._next_id += -self._next_id % self.block

    def insert_many(self, routing_key: str, payloads: Sequence[Any]) -> list[StoredRow]:
        """One statement of many rows: like the statement-level trigger, one wake-up for all."""
        wakers, self._wakers = self._wakers, []
        try:
            inserted = [self.insert(routing_key, p) for p in payloads]
        finally:
            self._wakers = wakers
        self.notify()
        return inserted

    def notify(self) -> None:
        """What the trigger does after an insert: wake the listeners, if the flag asks for it."""
        if self.wakeups_wanted:
            for wake in self._wakers:
                wake()

    def check(self) -> None:
        if self.down:
            raise StoreUnavailable("in-memory store is down")

    async def session(self) -> InMemorySession:
        self.check()
        return InMemorySession(self)

    async def listen(self, wake: Callable[[], None]) -> None:
        self.check()
        self._wakers.append(wake)
        wake()  # as PgStore does once LISTEN is in place
        try:
            while not self.down:
                await asyncio.sleep(0.05)
            raise StoreUnavailable("in-memory store is down")
        finally:
            self._wakers.remove(wake)

    async def stats(self) -> Stats:
        self.check()
        now = self.clock()
        pending = [r for r in self.rows.values() if not r.sent and not r.dead]
        dead = [r for r in self.rows.values() if r.dead]
        return Stats(
            pending=len(pending),
            ready=sum(1 for r in pending if r.available_at <= now),
            retrying=sum(1 for r in pending if r.attempts > 0),
            dead=len(dead),
            blocked_keys=len({r.ordering_key for r in dead if r.ordering_key}),
            sent=sum(1 for r in self.rows.values() if r.sent),
            oldest_pending_age_seconds=max((now - r.created_at for r in pending), default=0.0),
        )

    def is_head(self, row: StoredRow) -> bool:
        """The claim's ordering rule (docs/ordering.md): a keyed row is claimable only if no
        earlier row of its key is unsent (pending, delayed, in flight or dead). The SQL claim
        also waits for older transactions to end, which has no counterpart here."""
        if row.ordering_key is None:
            return True
        return not any(o.ordering_key == row.ordering_key and o.id < row.id and not o.sent
                       for o in self.rows.values())


class InMemorySession:
    def __init__(self, store: InMemoryStore) -> None:
        self.store = store
        self.claimed: list[int] = []

    async def claim(self, limit: int) -> list[Row]:
        self.store.check()
        self.store.claims += 1
        now = self.store.clock()
        picked: list[StoredRow] = []
        for row in sorted(self.store.rows.values(), key=lambda r: r.id):
            if len(picked) >= limit:
                break
            if (row.sent or row.dead or row.available_at > now or row.locked_by is not None
                    or not self.store.is_head(row)):
                continue
            if row.ordering_key is None:  # the block's rows are this claim's, or none of them
                holder = self.store.blocks.setdefault(row.id // self.store.block, self)
                if holder is not self:
                    continue
            row.locked_by = self
            picked.append(row)
        self.claimed = [r.id for r in picked]
        return [r.as_row() for r in picked]

    async def settle(self, s: Settlement) -> int:
        self.store.check()
        now = self.store.clock()
        for row_id in s.sent:
            if self.store.on_sent == "delete":
                self.store.rows.pop(row_id, None)
            else:
                self.store.rows[row_id].sent = True
        for retry in s.retries:
            row = self.store.rows[retry.id]
            row.attempts += 1
            row.available_at = now + retry.delay
            row.last_error = retry.error
        for parked in s.parked:
            row = self.store.rows[parked.id]
            row.attempts += 1 if parked.counted else 0
            row.dead = True
            row.last_error = parked.error
        await self.release()
        return max(self.store.rows, default=0)

    async def release(self) -> None:
        for row_id in self.claimed:
            row = self.store.rows.get(row_id)
            if row is not None and row.locked_by is self:
                row.locked_by = None
        self.claimed = []
        self.store.blocks = {b: s for b, s in self.store.blocks.items() if s is not self}

    async def want_wakeups(self, wanted: bool) -> bool:
        self.store.check()
        if self.store.wakeups_wanted is wanted:
            return False
        self.store.wakeups_wanted = wanted
        self.store.wakeup_changes.append(wanted)
        return True

    async def newest_id(self) -> int:
        self.store.check()
        return max(self.store.rows, default=0)

    async def close(self) -> None:
        await self.release()


class StubPublisher:
    """A `Publisher` that records what it was given and answers with ``rule(row)``.

    Like `AmqpPublisher`, it parks a row AMQP cannot carry (`outbox.limits`) as POISON before
    anything else, whatever the rule says."""

    def __init__(self, rule: Callable[[Row], Result] | None = None,
                 routable: set[str] | None = None, *, frame_max: int = 131_072,
                 app_id: str = "outbox") -> None:
        """``routable``: routing keys the default exchange can route (others come back as
        returned, like RabbitMQ's NO_ROUTE); ``rule`` overrides it for any row. ``frame_max``:
        the connection's, as negotiated (RabbitMQ's default)."""
        self.routable = routable
        self.rule = rule or self._route
        self.frame_max = frame_max
        self.app_id = app_id
        self.published: list[Row] = []
        self.connected = True
        self.blocked = False
        self.waits = 0  # calls of wait_ready: a test awaits the relay's next look at the broker

    @property
    def ready(self) -> bool:
        return self.connected and not self.blocked

    def health(self) -> BrokerHealth:
        problem = (BLOCKED if self.blocked else
                   "" if self.connected else "not connected to the broker (stub)")
        return BrokerHealth(self.ready, self.blocked, problem)

    async def wait_ready(self, timeout: float) -> bool:
        self.waits += 1
        deadline = time.monotonic() + timeout
        while not self.ready and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.ready

    def _route(self, row: Row) -> Result:
        if self.routable is None or (row.exchange == "" and row.routing_key in self.routable):
            return Result.confirmed()
        return Result(Outcome.FAILED, "returned by the broker: 312 NO_ROUTE", "returned")

    async def publish(self, rows: Sequence[Row], lane: int) -> list[Result]:
        await asyncio.sleep(0)
        results: list[Result] = []
        for row in rows:
            reason = limits.row_problem(row, self.frame_max, self.app_id)
            if reason:
                results.append(Result(Outcome.POISON, reason, "poison"))
            else:
                self.published.append(row)
                results.append(self.rule(row))
        return results
