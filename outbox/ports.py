"""The two narrow interfaces the relay core depends on — a store and a publisher — and the
backlog figures the store reports. `outbox.store` and `outbox.publisher` implement them on
PostgreSQL and RabbitMQ; `outbox.testing` in memory, held to the same contract tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from outbox.rows import Result, Row, Settlement


@dataclass(slots=True)
class Writer:
    """The oldest transaction still running in the cluster that has written something (or a
    prepared one nobody finished): every keyed row written after it began waits for it to end
    (docs/ordering.md, "The price of the horizon")."""

    pid: int | None = None  # None for a prepared transaction
    database: str | None = None
    role: str | None = None
    application_name: str | None = None
    state: str | None = None  # "prepared" for a prepared transaction
    prepared: str | None = None  # the prepared transaction's gid
    age_seconds: float | None = None  # None when PostgreSQL hides it from the relay's role
    xids_since: int = 0  # transaction ids assigned since it took its own


@dataclass(slots=True, frozen=True)
class BrokerHealth:
    """What readiness (``/readyz``) says of the broker side."""

    ready: bool
    blocked: bool = False  # the broker blocks publishers (memory or disk alarm)
    problem: str = ""  # why it is not ready, in one line ("" when nothing to say)


BLOCKED = "the broker is blocking publishers (memory or disk alarm)"


@dataclass(slots=True)
class Stats:
    """The backlog, as `outbox status` shows it."""

    pending: int = 0
    ready: int = 0
    retrying: int = 0
    dead: int = 0
    blocked_keys: int = 0
    sent: int = 0
    oldest_pending_age_seconds: float = 0.0
    held_back_rows: int = 0  # keyed rows written after `oldest_writer` began
    horizon_age_seconds: float = 0.0  # of `oldest_writer`; 0 when there is none
    oldest_writer: Writer | None = None


class StoreSession(Protocol):
    """One database connection of a lane. Contract: see tests/contract/test_store.py."""

    async def claim(self, limit: int) -> list[Row]:
        """Begin a transaction and lock up to ``limit`` ready rows, in id order."""

    async def settle(self, settlement: Settlement) -> int:
        """Apply the batch's writes and commit (which releases the rows' locks); returns the
        newest id as `newest_id` would right after (the relay claims again at once when rows
        came meanwhile), in the same round trip."""

    async def release(self) -> None:
        """Roll back: every claimed row goes back to pending untouched."""

    async def want_wakeups(self, wanted: bool) -> bool:
        """Raise or lower the flag that makes inserts send a NOTIFY (outbox.wakeup); True when
        it changed. Raises WakeupFlagUnavailable when it cannot be written."""

    async def newest_id(self) -> int:
        """The highest id of the outbox this session can see (0 when empty): the wake-up
        probe's question, so it must cost next to nothing."""

    async def close(self) -> None: ...


class Store(Protocol):
    """The database side of the relay."""

    async def session(self) -> StoreSession:
        """Open a connection for one lane (raises StoreUnavailable, PermanentRefusal)."""

    async def listen(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` once listening (rows may have come before), then on every NOTIFY of
        the outbox, until the connection fails (raises)."""

    async def stats(self) -> Stats: ...


class Publisher(Protocol):
    """The broker side of the relay. Contract: see tests/contract/test_publisher.py.

    `publish` must be safe to call from several lanes at once (each lane passes its number).
    """

    @property
    def ready(self) -> bool:
        """Connected and not blocked by the broker."""

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until `ready`, at most ``timeout`` seconds, awaiting (never spinning) while
        it is not."""

    def health(self) -> BrokerHealth:
        """`ready`, and why not, for readiness: each reason the publisher knows of (a lost or
        refused connection, a blocking broker) is one branch here."""

    async def publish(self, rows: Sequence[Row], lane: int) -> list[Result]:
        """Publish the rows in order, await their confirms; one `Result` per row.

        Never raises for a per-row problem or a lost connection: those are results (a lost
        connection makes the unconfirmed rows UNSETTLED).
        """
