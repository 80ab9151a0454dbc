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
class Settlement:
    """The writes that end a batch, decided by the relay core and applied by the store."""

    sent: list[int] = field(default_factory=list)
    retry_ids: list[int] = field(default_factory=list)
    retry_delays: list[float] = field(default_factory=list)
    retry_errors: list[str] = field(default_factory=list)
    dead_ids: list[int] = field(default_factory=list)
    dead_errors: list[str] = field(default_factory=list)
    dead_counted: list[int] = field(default_factory=list)
    unsettled: int = 0

    def retry(self, row_id: int, delay: float, error: str) -> None:
        self.retry_ids.append(row_id)
        self.retry_delays.append(delay)
        self.retry_errors.append(error)

    def dead(self, row_id: int, error: str, counted: bool) -> None:
        self.dead_ids.append(row_id)
        self.dead_errors.append(error)
        self.dead_counted.append(1 if counted else 0)
