"""What the relay moves: claimed rows, per-row publish outcomes, and the settlement of a batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from uuid import UUID


@dataclass(slots=True)
class Row:
    """One claimed outbox row, ready to publish."""

    id: int
    message_id: UUID
    exchange: str
    routing_key: str
    body: bytes
    content_type: str
    headers: str | None  # the jsonb object as JSON text; None when empty
    ordering_key: str | None
    message_type: str | None
    correlation_id: str | None
    created_at: datetime | None  # None: infinite or beyond what a client can read (claim)
    attempts: int


class Outcome(Enum):
    """What became of one row of a batch at the broker."""

    CONFIRMED = "confirmed"  # acked and not returned: mark sent
    FAILED = "failed"  # nack, return, channel error, timeout: retry with backoff, then dead
    POISON = "poison"  # can never be published as it is (too large, bad headers): dead now
    UNSETTLED = "unsettled"  # unknown (connection lost before the confirm): leave it pending


@dataclass(slots=True)
class Result:
    """The outcome of one row, with the reason when it is not CONFIRMED."""

    outcome: Outcome
    reason: str = ""
    kind: str = ""  # short failure label for metrics: nack, returned, channel, timeout, …

    @classmethod
    def confirmed(cls) -> Result:
        return _CONFIRMED


_CONFIRMED = Result(Outcome.CONFIRMED)


@dataclass(slots=True)
class Retry:
    """A row that failed, published again after ``delay`` seconds."""

    id: int
    delay: float
    error: str


@dataclass(slots=True)
class Parked:
    """A row parked as dead with its reason; ``counted`` when the failure was a publish attempt
    (a poison row is parked before any)."""

    id: int
    error: str
    counted: bool


@dataclass(slots=True)
class Settlement:
    """The writes that end a batch, decided by the relay core and applied by the store."""

    sent: list[int] = field(default_factory=list)  # row ids: delete or mark sent
    retries: list[Retry] = field(default_factory=list)
    parked: list[Parked] = field(default_factory=list)
    unsettled: int = 0  # rows left pending untouched

    def retry(self, row_id: int, delay: float, error: str) -> None:
        self.retries.append(Retry(row_id, delay, error))

    def park(self, row_id: int, error: str, counted: bool) -> None:
        self.parked.append(Parked(row_id, error, counted))
