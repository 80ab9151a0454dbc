"""The wake-up flag: whether inserts into the outbox send a NOTIFY (alembic/versions/0002).

A notifying commit costs the application more than it seems: PostgreSQL holds one cluster-wide
lock from a notifying commit until its WAL flush, so the inserting transactions commit one at a
time. A relay whose lanes are all busy needs no NOTIFY (each lane claims again as soon as its
batch is settled), so one task of the relay lowers the flag once no lane has slept for
`LOWER_AFTER`, and raises it as soon as a lane goes to sleep. When raising it changed it, rows
committed meanwhile sent no NOTIFY, so the task wakes a lane to claim once more.

What is left uncovered: a producer whose insert read the flag lowered and which commits after
that last claim. The next claim of any lane of any relay finds the row (the next insert's NOTIFY
brings one); when nothing else comes, the poll (``poll_interval``) does.

The task writes on its own connection, never on a lane's path. It imports no driver: it talks to
the `Store` of `outbox.relay`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from outbox import metrics
from outbox.exceptions import (
    PermanentRefusal,
    SchemaMissing,
    StoreUnavailable,
    WakeupFlagUnavailable,
)
from outbox.retry import backoff

if TYPE_CHECKING:
    from outbox.relay import Store, StoreSession

log = logging.getLogger("outbox.wakeup")

LOWER_AFTER = 0.1  # seconds during which every lane stayed busy before the flag is lowered


class WakeupFlag:
    """Keeps the flag raised while a lane of this relay sleeps, lowered while all are busy."""

    def __init__(self, store: Store, wake: Callable[[], None], sleeping: Callable[[], bool],
                 poll_interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._wake = wake  # rouses one sleeping lane
        self._sleeping = sleeping  # is a lane asleep now?
        self._poll_interval = poll_interval
        self._clock = clock
        self._last_asleep = clock()  # when a lane's sleep last ended (as if at the start)
        self._written: bool | None = None  # what this relay last wrote (None: nothing yet)
        self._written_at = -math.inf
        self._recheck = False
        self._closing = False
        self._poked = asyncio.Event()

    @property
    def notifying(self) -> bool:
        """Inserts send a NOTIFY, as far as this relay knows: it has not lowered the flag (which
        unavailable counts as raised: the trigger of revision 0001 always notifies)."""
        return self._written is not False

    def asleep(self) -> None:
        """A lane went to sleep."""
        self._poked.set()

    def awake(self, *, polled: bool) -> None:
        """A lane's sleep ended. ``polled``: at the poll interval, not by a wake-up; then the
        flag is written even if this relay believes it raised (another relay may have lowered
        it and died since)."""
        self._last_asleep = self._clock()
        self._recheck = self._recheck or polled
        self._poked.set()

    def busy(self) -> None:
        """A lane claimed rows: every lane may be busy now."""
        self._poked.set()

    def _wanted(self) -> tuple[bool, float | None]:
        """The flag as it should be now, and in how long to look again (None: when poked)."""
        if self._closing or self._sleeping():
            return True, None
        busy_for = self._clock() - self._last_asleep
        if busy_for >= LOWER_AFTER:
            return False, None
        return self._written is not False, LOWER_AFTER - busy_for

    async def run(self) -> None:
        """Write the flag whenever it should change, until `close`."""
        session: StoreSession | None = None
        failures = 0
        reported = ""
        self._last_asleep = self._clock()
        try:
            while True:
                wanted, look_again = self._wanted()
                recheck = self._recheck and (
                    self._clock() - self._written_at >= self._poll_interval)
                self._recheck = False
                if wanted is self._written and not recheck:
                    if self._closing:
                        return
                    self._poked.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._poked.wait(), look_again)
                    continue
                try:
                    if session is None:
                        session = await self._store.session()
                    changed = await session.want_wakeups(wanted)
                except WakeupFlagUnavailable as exc:
                    log.warning("%s; until then every insert sends a NOTIFY", exc)
                    return
                except Exception as exc:
                    # The lanes report the database's state; here it only delays the flag. An
                    # error nobody foresaw must not end the task silently either: it is logged
                    # once (until the flag is written again), counted, and retried.
                    if not isinstance(exc, (StoreUnavailable, PermanentRefusal, SchemaMissing)):
                        metrics.TASK_ERRORS.labels("wakeup_flag").inc()
                        problem = f"{type(exc).__name__}: {exc}"
                        if problem != reported:
                            log.exception("unexpected error while setting the wake-up flag")
                        reported = problem
                    if session is not None:
                        with contextlib.suppress(Exception):
                            await session.close()
                    session = None
                    failures += 1
                    if self._closing:
                        return
                    await asyncio.sleep(backoff(failures, 0.2, self._poll_interval))
                    continue
                failures = 0
                reported = ""
                self._written, self._written_at = wanted, self._clock()
                if changed and wanted:
                    self._wake()  # rows committed while it was lowered sent no NOTIFY
        finally:
            if session is not None:
                with contextlib.suppress(Exception):
                    await session.close()

    def close(self) -> None:
        """Raise the flag a last time (for the relays that stay) and end `run`."""
        self._closing = True
        self._poked.set()
