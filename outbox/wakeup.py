"""How a sleeping lane learns of new rows without costing the application's commits.

Two ways, one at a time (alembic/versions/0002 has the flag the insert trigger reads):

* **Idle: NOTIFY.** With the flag raised, an insert's trigger sends a NOTIFY and the relay's
  listener wakes a lane at once. But a notifying commit takes a cluster-wide lock held until its
  WAL flush, so while rows keep coming the application's inserting transactions would commit one
  at a time.
* **Active: a probe.** As soon as a lane claims rows, the relay lowers the flag (inserts then skip
  the NOTIFY) and, while every lane sleeps, reads the newest id of the outbox on its own
  connection: every millisecond after a probe found rows, backing off to `PROBE_MAX` while it
  finds none. A newer id than it (or a claim) saw last wakes a lane; so the first probe after the
  last busy lane fell asleep also sees what came during its batch. Most of the time the lane
  has seen it first: a batch's settle reads the newest id in the same round trip as its
  COMMIT (`seen`), and its lane claims again at once when rows came meanwhile. After
  `IDLE_AFTER` without a claimed row the relay raises the flag again, probes a little longer
  (`GRACE`: an insert that read the flag lowered may still be committing), and goes back to
  waiting for a NOTIFY; raising it also wakes a lane to claim once more, for the rows committed
  in between.

What neither covers: a row committed with an id lower than one the probe already saw (two
producers committing out of order), and an insert that read the flag lowered but commits after
the grace. The next wake-up of any kind finds such a row; when nothing else comes, the relay's
safety poll (`Relay`) does.

The flag is shared by every relay on the table: a relay that lowered it and died leaves it
lowered, so each relay writes its own wish again every `RECHECK` polls even when it believes
nothing changed. The component writes on its own connection, never on a lane's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

from outbox.exceptions import DATABASE_AWAY, WakeupFlagUnavailable
from outbox.ports import Store, StoreSession
from outbox.retry import Failures

log = logging.getLogger("outbox.wakeup")

IDLE_AFTER = 1.0  # seconds without a claimed row before inserts are asked to NOTIFY again
GRACE = 0.2  # seconds the probe goes on after the flag was raised
PROBE_FIRST = 0.001  # seconds between probes right after one found rows
PROBE_MAX = 0.016  # ... doubling up to this while they find none
RECHECK = 10  # the flag is written again every this many poll intervals, changed or not


class Wakeups:
    """Keeps the flag lowered and probes while this relay is active; raised while it is idle."""

    def __init__(self, store: Store, wake: Callable[[], None], idle: Callable[[], bool],
                 poll_interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._wake = wake  # rouses one sleeping lane
        self._idle = idle  # is every lane asleep now?
        self._recheck_every = RECHECK * poll_interval
        self._clock = clock
        self._last_rows = -math.inf  # when a lane last claimed rows
        self._written: bool | None = None  # what this relay last wrote (None: nothing yet)
        self._written_at = -math.inf
        self._raised_at = -math.inf  # when this relay last raised it
        self._newest: int | None = None  # the newest id the probe saw
        self._probe_wait = PROBE_FIRST
        self._closing = False
        self._poked = asyncio.Event()
        self.probes = 0  # how many probes were made (for tests and the benchmark)

    @property
    def notifying(self) -> bool:
        """Inserts send a NOTIFY, as far as this relay knows: it has not lowered the flag (which
        unavailable counts as raised: the trigger of revision 0001 always notifies)."""
        return self._written is not False

    @property
    def probing(self) -> bool:
        """The probe watches for new rows while a lane sleeps: this relay lowered the flag, or
        raised it less than `GRACE` ago."""
        return not self._closing and (
            self._written is False or self._clock() - self._raised_at < GRACE)

    def asleep(self) -> None:
        """A lane went to sleep: the probe may have to start (when it was the last awake)."""
        self._poked.set()

    def busy(self, newest: int) -> None:
        """A lane claimed rows, the newest with id ``newest``: the relay is active."""
        self._last_rows = self._clock()
        if self._newest is None or newest > self._newest:
            self._newest = newest
        self._probe_wait = PROBE_FIRST
        self._poked.set()

    def seen(self, newest: int) -> bool:
        """A settled batch's look at the newest id (`StoreSession.settle`): True when rows came
        that neither a claim nor the probe has seen yet (the lane then claims at once: no probe
        round trip, no wake-up); the probe then need not report them again."""
        if self._newest is not None and newest <= self._newest:
            return False
        self._newest = newest
        return True

    def _wanted(self) -> tuple[bool, float | None]:
        """The flag as it should be now, and in how long that changes (None: when poked)."""
        if self._closing:
            return True, None
        idle_for = self._clock() - self._last_rows
        if idle_for >= IDLE_AFTER:
            return True, None
        return False, IDLE_AFTER - idle_for

    async def run(self) -> None:
        """Write the flag whenever it should change and probe while active, until `close`."""
        session: StoreSession | None = None
        # The lanes report the database's state; here it only delays the flag or a wake-up
        # (the safety poll still finds the rows).
        failures = Failures(log, "wakeup_flag", "unexpected error in the wake-up task; retrying",
                            base=0.2, cap=5.0, expected=DATABASE_AWAY)
        try:
            while True:
                wanted, changes_in = self._wanted()
                stale = self._clock() - self._written_at >= self._recheck_every
                try:
                    if wanted is not self._written or stale:
                        if session is None:
                            session = await self._store.session()
                        await self._write(session, wanted)
                        failures.succeeded()
                        continue
                    if self._closing:
                        return
                    if self.probing and self._idle():
                        if session is None:
                            session = await self._store.session()
                        await self._probe(session)
                        failures.succeeded()
                        await asyncio.sleep(self._probe_wait if changes_in is None
                                            else min(self._probe_wait, changes_in))
                        continue
                except WakeupFlagUnavailable as exc:
                    log.warning("%s; until then every insert sends a NOTIFY", exc)
                    return
                except Exception as exc:
                    delay = failures.failed(exc)
                    if session is not None:
                        with contextlib.suppress(Exception):
                            await session.close()
                    session = None
                    if self._closing:
                        return
                    await asyncio.sleep(delay)
                    continue
                self._poked.clear()
                look_again = self._written_at + self._recheck_every - self._clock()
                if changes_in is not None:
                    look_again = min(look_again, changes_in)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poked.wait(), max(0.0, look_again))
        finally:
            if session is not None:
                with contextlib.suppress(Exception):
                    await session.close()

    async def _write(self, session: StoreSession, wanted: bool) -> None:
        changed = await session.want_wakeups(wanted)
        self._written, self._written_at = wanted, self._clock()
        if changed and wanted:
            self._raised_at = self._written_at
            self._wake()  # rows committed while it was lowered sent no NOTIFY

    async def _probe(self, session: StoreSession) -> None:
        newest = await session.newest_id()
        self.probes += 1
        if self._newest is None or newest > self._newest:
            self._wake()
            self._probe_wait = PROBE_FIRST
        else:
            self._probe_wait = min(self._probe_wait * 2, PROBE_MAX)
        self._newest = newest

    def close(self) -> None:
        """Raise the flag a last time (for the relays that stay) and end `run`."""
        self._closing = True
        self._poked.set()
