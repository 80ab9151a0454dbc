"""The relay loop and its decisions.

It imports neither psycopg nor aiormq: it talks to a `Store` (claims rows, settles batches) and a
`Publisher` (publishes a batch, reports one `Result` per row) through the protocols below, so every
decision is unit-tested with the in-memory fakes of `outbox.testing`.

A *lane* is one loop: claim a batch in a database transaction (rows locked ``FOR UPDATE SKIP
LOCKED``), publish it with confirms, settle it (delete or mark the confirmed rows, reschedule or
park the failed ones) and commit. ``concurrency`` lanes run at once, so one batch's database work
overlaps another batch's wait for confirms. A lane never claims while the broker is unreachable or
blocking, so no transaction stays open across a wait without a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from outbox import metrics, tracing
from outbox.confirms import ConfirmWatch
from outbox.exceptions import (
    DATABASE_AWAY,
    OutboxError,
    PermanentRefusal,
    SchemaMissing,
    StoreUnavailable,
)
from outbox.ports import Publisher, Store, StoreSession
from outbox.retry import RECONNECT_BASE, RECONNECT_CAP, REFUSED_RETRY, Failures, backoff
from outbox.rows import Outcome, Result, Row, Settlement
from outbox.settings import Settings
from outbox.wakeup import Wakeups

log = logging.getLogger("outbox.relay")

FAILED_IDS_LOGGED = 5  # row ids named in the one "publish failed" line of a batch
SAFETY_POLLS = 2  # poll intervals between safety polls while wake-ups cover the sleeping lanes


@dataclass(slots=True)
class Counts:
    published: int = 0
    failed: int = 0
    dead: int = 0
    released: int = 0
    batches: int = 0


def decide(
    rows: Sequence[Row], results: Sequence[Result], settings: Settings,
    rng: random.Random | None = None,
) -> Settlement:
    """Turn one batch's results into the writes that settle it (pure; no I/O)."""
    s = Settlement()
    for row, res in zip(rows, results, strict=True):
        if res.outcome is Outcome.CONFIRMED:
            s.sent.append(row.id)
        elif res.outcome is Outcome.UNSETTLED:
            s.unsettled += 1
        elif res.outcome is Outcome.POISON:
            s.park(row.id, res.reason, counted=False)
        elif row.attempts + 1 >= settings.max_attempts:
            s.park(row.id, f"{res.reason} (attempt {row.attempts + 1} of "
                           f"{settings.max_attempts})", counted=True)
        else:
            delay = backoff(row.attempts + 1, settings.retry_base, settings.retry_max, rng)
            s.retry(row.id, delay, res.reason)
    return s


def oversized(rows: Sequence[Row], limit: int) -> dict[int, Result]:
    """Rows whose body exceeds the limit, by position: parked before publishing."""
    return {
        i: Result(Outcome.POISON, f"body of {len(r.body)} bytes exceeds the limit of {limit} "
                                  "(OUTBOX_MAX_BODY_BYTES)", "poison")
        for i, r in enumerate(rows) if len(r.body) > limit
    }


@dataclass
class Health:
    database: bool = False
    broker: bool = False
    problems: dict[str, str] = field(default_factory=dict)


class Relay:
    """Runs the lanes until `stop` (or, with ``drain``, until nothing is ready)."""

    def __init__(
        self, settings: Settings, store: Store, publisher: Publisher, *, drain: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self._traces = tracing.relay_spans(publisher)  # a no-op unless tracing is on
        self.drain = drain
        self.counts = Counts()
        self.health = Health()
        self._rng = rng or random.Random()
        self._stopping = asyncio.Event()
        self._wakeups: list[asyncio.Event] = []
        self._sleeping: list[asyncio.Event] = []  # the lanes asleep now, the longest first
        self._timerless = 0  # how many of them sleep with no timer (covered by wake-ups)
        self._in_flight = 0  # lanes publishing or settling a batch
        self._claiming = 0  # lanes whose claim is running
        self._open: set[int] = set()  # lanes whose transaction (claim to settle or release) is open
        self._overlapped: set[int] = set()  # ... of which those another lane's overlapped
        self._passed_over: set[int] = set()  # ... of which those another lane's short claim did
        # a wake-up came while no lane slept, and no claim has begun since
        self._unclaimed = False
        self._listening = False  # LISTEN is in place: inserts wake a lane
        self._lanes_connected: set[int] = set()
        self.failure = ""  # why a background task ended: the relay stops and exits non-zero
        self._released_reason = ""  # why the last batch went back whole (logged once)
        self.confirms = ConfirmWatch()  # publishes timing out with no answer: not ready
        self._claimed_at = time.monotonic()  # when a lane last began a claim
        self._stall_said = False  # "no lane has claimed" was logged since that claim
        metrics.SECONDS_SINCE_CLAIM.set_function(self.seconds_since_claim)
        self._ending = False  # run() is cancelling its helpers itself
        self._flag = Wakeups(store, self._wake,
                             lambda: len(self._sleeping) == settings.concurrency,
                             settings.poll_interval)

    def seconds_since_claim(self) -> float:
        return time.monotonic() - self._claimed_at

    def _stalled_after(self) -> float:
        """Longer than any lane of a working relay goes between two claims: a whole batch at
        its deadlines (claim, publish, settle), then asleep until the safety poll; twice that."""
        s = self.settings
        return 2 * (s.publish_timeout + 2 * s.db_timeout + SAFETY_POLLS * s.poll_interval)

    def _check_claiming(self, ready_rows: int) -> None:
        """Say it, once, when rows are ready and this relay is ready too but no lane has begun
        a claim for longer than a working relay ever waits: a stall must never be silent."""
        idle = self.seconds_since_claim()
        if self._stall_said or not ready_rows or not self.ready or idle < self._stalled_after():
            return
        self._stall_said = True
        log.warning("rows are ready but no lane has claimed for %.0fs; SIGUSR1 logs where "
                    "each task waits", idle, extra={"fields": {
                        "ready_rows": ready_rows, "lanes": self.settings.concurrency,
                        "asleep": len(self._sleeping), "asleep_without_timer": self._timerless,
                        "in_flight": self._in_flight}})

    @property
    def ready(self) -> bool:
        return (self.health.database and self.publisher.ready and not self._stopping.is_set()
                and not self.failure and not self.confirms.stalled)

    @property
    def unconfirmed(self) -> str:
        """Why the broker seems to confirm nothing (`outbox.confirms`), or ""."""
        return self.confirms.problem(time.monotonic())

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """What ``/readyz`` answers: ready, and the state and problems of each side."""
        broker = self.publisher.health()
        problems: dict[str, object] = dict(self.health.problems)
        if broker.problem:
            problems["broker"] = broker.problem
        if unconfirmed := self.unconfirmed:
            problems["confirms"] = unconfirmed
        return self.ready, {
            "database": self.health.database, "broker": broker.ready,
            "blocked": broker.blocked, "problems": problems,
        }

    def stop(self) -> None:
        """Stop claiming; the lanes settle what they hold and return."""
        if not self._stopping.is_set():
            log.info("stopping: no new claims; settling the batches in flight")
        self._stopping.set()
        self._wake_all()

    async def run(self) -> Counts:
        """Run until stopped (or drained); returns what this relay did. Raises OutboxError
        when a background task ended (see `fail`), after the lanes settled their batches."""
        lanes = [asyncio.Event() for _ in range(self.settings.concurrency)]
        self._wakeups = lanes
        helpers = {"listen": asyncio.create_task(self._listen(), name="outbox-listen"),
                   "safety_poll": asyncio.create_task(self._safety_poll(),
                                                      name="outbox-safety-poll")}
        if not self.drain:
            helpers["stats"] = asyncio.create_task(self._refresh_stats(), name="outbox-stats")
        flag = asyncio.create_task(self._flag.run(), name="outbox-wakeup-flag")
        for name, task in [*helpers.items(), ("wakeup_flag", flag)]:
            task.add_done_callback(functools.partial(self._helper_ended, name))
        try:
            await asyncio.gather(*(
                self._lane(i, ev) for i, ev in enumerate(lanes)))
        finally:
            self._ending = True
            self._flag.close()  # its last write leaves the flag raised for the relays that stay
            with contextlib.suppress(Exception):
                await asyncio.wait_for(flag, self.settings.db_timeout)
            for t in helpers.values():
                t.cancel()
            await asyncio.gather(*helpers.values(), return_exceptions=True)
        if self.failure:
            raise OutboxError(self.failure)
        return self.counts

    def fail(self, task: str, error: BaseException | str) -> None:
        """A background task ended: without it the relay would go on degraded in silence, so
        it turns not-ready, counts it, says so in one line and stops (`run` then raises)."""
        if self.failure:
            return
        self.failure = f"the {task} task ended: {error!r}" if isinstance(
            error, BaseException) else f"the {task} task ended: {error}"
        metrics.TASK_ERRORS.labels(task).inc()
        self.health.problems["relay"] = self.failure
        log.critical("background task ended; stopping the relay", extra={"fields": {
            "task": task, "error": self.failure}},
            exc_info=error if isinstance(error, BaseException) else None)
        self.stop()
        self._refresh_ready()

    def _helper_ended(self, name: str, task: asyncio.Task[None]) -> None:
        if self._ending:
            return
        if task.cancelled():
            self.fail(name, "cancelled")
        elif (error := task.exception()) is not None:
            self.fail(name, error)
        elif name != "wakeup_flag":  # the flag task ends by itself when the flag is missing
            self.fail(name, "returned")

    # -- lanes -----------------------------------------------------------------------------------

    async def _lane(self, lane: int, wake: asyncio.Event) -> None:
        session: StoreSession | None = None
        failures = 0
        try:
            while not self._stopping.is_set():
                if not await self._broker_ready():
                    continue
                try:
                    if session is None:
                        session = await self.store.session()
                        self._database_up(lane, True)
                    wake.clear()
                    self._unclaimed = False  # this claim sees every row committed until now
                    self._claimed_at = time.monotonic()
                    self._stall_said = False
                    self._transaction_begins(lane)
                    skipped = fresh = False
                    try:
                        rows = await self._claim(session, lane)
                        full = len(rows) == self.settings.batch_size
                        if rows:
                            self._flag.busy(rows[-1].id)
                            if full:
                                self._wake()  # more may be waiting: a sleeping lane joins in
                            self._in_flight += 1
                            try:
                                fresh = self._flag.seen(await self._process(session, rows, lane))
                            finally:
                                self._in_flight -= 1
                            # Another lane's claim came back short while this one held its
                            # rows, or is running now: it may have passed over ready rows in
                            # the blocks this batch held (outbox/queries.sql). Look again.
                            skipped = lane in self._passed_over or self._claiming > 0
                        else:
                            await session.release()
                    finally:
                        alone = self._transaction_ends(lane)
                    if not rows:
                        if self.drain and not self._in_flight:
                            if alone:
                                self._wake_all()  # lanes asleep below see the same and end
                                return
                            # Another lane's transaction overlapped this claim: it may have
                            # held ready rows, committed some after this claim's snapshot, or
                            # (its claim rechecking a row this lane had just rescheduled against
                            # its older now()) locked one without claiming it. Look again once
                            # none is open.
                            if not self._open:
                                continue
                        # (a drain waits too while a batch is in flight: it may free the next
                        # rows of its keys)
                        if not self._unclaimed:
                            await self._sleep(wake)
                        continue
                    keyed = any(r.ordering_key is not None for r in rows)
                    if keyed:
                        self._wake()  # the next rows of these keys are claimable now
                    failures = 0
                    if not (full or keyed or skipped or fresh) and self._may_rest():
                        await self._sleep(wake)
                except StoreUnavailable as exc:
                    failures += 1
                    await self._drop(session)
                    session = None
                    self._database_up(lane, False, str(exc))
                    await self._pause(backoff(failures, RECONNECT_BASE, RECONNECT_CAP, self._rng))
                except (PermanentRefusal, SchemaMissing) as exc:
                    await self._drop(session)
                    session = None
                    self._database_up(lane, False, str(exc))
                    await self._pause(REFUSED_RETRY)
                except Exception:
                    # A bug or an error nobody foresaw must not end the relay (the sidecar would
                    # crash-loop): drop the connection, which rolls the batch back, and go on.
                    failures += 1
                    log.exception("unexpected error in lane %d; the batch was rolled back", lane)
                    await self._drop(session)
                    session = None
                    await self._pause(backoff(failures, RECONNECT_BASE, RECONNECT_CAP, self._rng))
        finally:
            await self._drop(session)

    async def _claim(self, session: StoreSession, lane: int) -> list[Row]:
        self._claiming += 1
        try:
            rows = await session.claim(self.settings.batch_size)
        finally:
            self._claiming -= 1
        if len(rows) < self.settings.batch_size:  # it may have passed over their blocks
            self._passed_over.update(self._open - {lane})
        return rows

    def _transaction_begins(self, lane: int) -> None:
        if self._open:
            self._overlapped.update(self._open)
            self._overlapped.add(lane)
        else:
            self._overlapped.discard(lane)
        self._open.add(lane)

    def _transaction_ends(self, lane: int) -> bool:
        """Close a lane's transaction; True when no other lane's was open at any time during
        it, so that an empty claim in it proves that no row was ready for this relay."""
        self._open.discard(lane)
        alone = lane not in self._overlapped
        self._overlapped.discard(lane)
        self._passed_over.discard(lane)
        return alone

    async def _process(self, session: StoreSession, rows: list[Row], lane: int) -> int:
        """Publish and settle one batch; the newest id right after (`StoreSession.settle`)."""
        metrics.BATCH_SIZE.observe(len(rows))
        self.counts.batches += 1
        send = self._traces.send(rows)
        poison = oversized(rows, self.settings.max_body_bytes)
        started = time.monotonic()
        if poison:
            sendable = [r for i, r in enumerate(rows) if i not in poison]
            published = iter(await self.publisher.publish(sendable, lane))
            results = [poison.get(i) or next(published) for i in range(len(rows))]
        else:
            results = await self.publisher.publish(rows, lane)
        confirmed_at = time.time()
        self._watch_confirms(results, started)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("batch published", extra={"fields": {
                "lane": lane, "rows": len(rows), "at": confirmed_at, "confirmed_ids": [
                    r.id for r, res in zip(rows, results, strict=True)
                    if res.outcome is Outcome.CONFIRMED]}})
        settlement = decide(rows, results, self.settings, self._rng)
        send.end(rows, results, settlement)
        newest = await session.settle(settlement)
        if settlement.retries:  # wake a lane when the first of them is due
            asyncio.get_running_loop().call_later(
                min(r.delay for r in settlement.retries), self._wake)
        self._account(rows, results, settlement, confirmed_at)
        return newest

    def _account(self, rows: list[Row], results: list[Result], s: Settlement,
                 confirmed_at: float) -> None:
        failed: dict[str, list[tuple[Row, Result]]] = {}
        for row, res in zip(rows, results, strict=True):
            if res.outcome is Outcome.CONFIRMED:
                if row.created_at is not None:
                    metrics.COMMIT_TO_CONFIRM.observe(
                        max(0.0, confirmed_at - row.created_at.timestamp()))
            elif res.outcome is not Outcome.UNSETTLED:
                metrics.FAILURES.labels(res.kind or "other").inc()
                failed.setdefault(res.kind or "other", []).append((row, res))
        # one line per batch and kind of failure: a broker that nacks everything would
        # otherwise write a line per row
        for kind, items in failed.items():
            attempts = [row.attempts + 1 for row, _ in items]
            log.warning("publish failed", extra={"fields": {
                "kind": kind, "rows": len(items),
                "row_ids": [row.id for row, _ in items[:FAILED_IDS_LOGGED]],
                "message_ids": [str(row.message_id) for row, _ in items[:FAILED_IDS_LOGGED]],
                "attempts": [min(attempts), max(attempts)],
                "reasons": sorted({res.reason for _, res in items})[:FAILED_IDS_LOGGED]}})
        metrics.PUBLISHED.inc(len(s.sent))
        metrics.DEAD.inc(len(s.parked))
        metrics.RELEASED.inc(s.unsettled)
        self.counts.published += len(s.sent)
        self.counts.failed += len(s.retries)
        self.counts.dead += len(s.parked)
        self.counts.released += s.unsettled
        if s.parked:
            log.error("rows parked as dead", extra={"fields": {
                "row_ids": [p.id for p in s.parked],
                "reasons": sorted({p.error for p in s.parked})}})
        # A batch that went back whole (nothing confirmed, nothing failed) says nothing anywhere
        # else: say it, once per reason until a batch gets through, so a relay that keeps
        # releasing is never silent.
        if s.sent or s.unsettled < len(rows):
            self._released_reason = ""
        elif rows:
            unsettled = next(res for res in results if res.outcome is Outcome.UNSETTLED)
            reason = f"{unsettled.kind}: {unsettled.reason}"
            if reason != self._released_reason:
                log.warning("batch released: nothing was confirmed; the rows stay pending",
                            extra={"fields": {"rows": len(rows), "reason": reason}})
            self._released_reason = reason

    def _watch_confirms(self, results: list[Result], started: float) -> None:
        was = self.confirms.stalled
        if any(r.outcome is Outcome.CONFIRMED or r.kind in ("nack", "returned") for r in results):
            self.confirms.answered()
        elif any(r.kind == "timeout" for r in results):
            self.confirms.timed_out(started)
        if self.confirms.stalled != was:
            if was:
                log.info("publishes confirmed again")
            else:
                log.warning("not ready: the broker confirms nothing", extra={"fields": {
                    "problem": self.unconfirmed}})
            self._refresh_ready()

    async def _drop(self, session: StoreSession | None) -> None:
        if session is not None:
            with contextlib.suppress(Exception):
                await session.close()

    # -- readiness and waiting ---------------------------------------------------------------------

    async def _broker_ready(self) -> bool:
        if self.publisher.ready:
            return True
        self._refresh_ready()
        loop = asyncio.get_running_loop()
        timeout = min(1.0, self.settings.poll_interval)
        until = loop.time() + timeout
        if not await self.publisher.wait_ready(timeout) and loop.time() < until:
            # a publisher that gave up before its deadline must not make this lane spin: wait
            # out the rest (a stop ends the wait)
            await self._pause(until - loop.time())
        self._refresh_ready()
        return self.publisher.ready and not self._stopping.is_set()

    def _database_up(self, lane: int, up: bool, problem: str = "") -> None:
        """Record one lane's connection state; the database is up while any lane is."""
        was = self.health.database
        before = self.health.problems.get("database")
        if up:
            self._lanes_connected.add(lane)
            self.health.problems.pop("database", None)
        else:
            self._lanes_connected.discard(lane)
            self.health.problems["database"] = problem
        self.health.database = bool(self._lanes_connected)
        if self.health.database != was:
            if self.health.database:
                log.info("database connected")
            else:
                log.error("database unavailable", extra={"fields": {"error": problem}})
        elif not self.health.database and problem != before:
            # down from the start (no transition to log), or down for another reason now: a
            # refusal such as a missing database must still be reported, once
            log.error("database unavailable", extra={"fields": {"error": problem}})
        metrics.CONNECTED.labels("database").set(1 if self.health.database else 0)
        self._refresh_ready()

    def _refresh_ready(self) -> None:
        metrics.READY.set(1 if self.ready else 0)

    async def _sleep(self, wake: asyncio.Event) -> None:
        """Sleep until woken; at most `poll_interval` unless a wake-up will come when rows do
        (then the safety poll is the only timer)."""
        timeout = None if self._covered() else self.settings.poll_interval
        self._sleeping.append(wake)
        self._timerless += timeout is None
        self._flag.asleep()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout)
        finally:
            self._sleeping.remove(wake)
            self._timerless -= timeout is None

    def _covered(self) -> bool:
        """New rows wake a sleeping lane: by a NOTIFY (LISTEN in place and the flag raised, as far
        as this relay knows) or by the probe of an active relay (outbox.wakeup)."""
        return (self._listening and self._flag.notifying) or self._flag.probing

    def _may_rest(self) -> bool:
        """After a batch that was neither full nor keyed (either says that rows wait), sleep
        rather than claim again when nothing says that rows came: no wake-up since the last claim
        began, and one will come when they do. A drain always claims again: an empty claim is how
        it ends."""
        return not self.drain and not self._unclaimed and self._covered()

    async def _safety_poll(self) -> None:
        """While a lane sleeps without a timer, wake one every two poll intervals anyway: for
        delayed rows whose time came, and the few commits no wake-up reports (outbox.wakeup).
        Whether a lane has a timer was decided when it fell asleep: the wake-ups that covered it
        then may have stopped since (the probe ends after the flag's GRACE, LISTEN may not be
        back yet), so what counts here is how it sleeps, not what covers it now."""
        while True:
            await asyncio.sleep(SAFETY_POLLS * self.settings.poll_interval)
            if self._timerless:
                self._wake()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # -- helpers -----------------------------------------------------------------------------------

    async def _listen(self) -> None:
        """Wake a lane on NOTIFY; polling covers the gaps while this reconnects. Any error is
        retried with backoff; one the lanes do not report already (the database's state) is
        logged once, and counted."""
        failures = Failures(
            log, "listen", "listening for notifications failed; lanes poll every "
            f"{self.settings.poll_interval:g}s until it is back", base=1.0, cap=RECONNECT_CAP,
            expected=DATABASE_AWAY, rng=self._rng)
        while True:
            try:
                await self.store.listen(self._heard)
                raise OutboxError("the listener returned")  # it only ever ends by raising
            except Exception as exc:
                error = exc
            finally:
                listened, self._listening = self._listening, False
                self._wake_all()  # lanes asleep without a timer poll again until it is back
            if listened:  # it ran: a new outage, retried quickly again and reported again
                failures.succeeded()
            await asyncio.sleep(failures.failed(error))

    def _heard(self) -> None:
        """A NOTIFY, or the listener's first call once LISTEN is in place."""
        self._listening = True
        self._wake()

    def _wake(self) -> None:
        """New rows: wake one sleeping lane (waking them all made every lane but one claim
        nothing). With none asleep, note it: a claim that began before the rows committed and
        comes back empty is then made again, unless another claim has begun since (it sees
        them). Waking every lane instead made each one whose claim was under way claim again."""
        for ev in self._sleeping:
            if not ev.is_set():
                ev.set()
                return
        self._unclaimed = True

    def _wake_all(self) -> None:
        for ev in self._wakeups:
            ev.set()

    async def _refresh_stats(self) -> None:
        """Refresh the backlog gauges every ``stats_interval``, retrying any error with backoff
        (an unmigrated schema too): one the lanes do not report is logged once, and counted."""
        interval = self.settings.stats_interval
        failures = Failures(log, "stats", "cannot refresh the backlog gauges; retrying",
                            base=interval, cap=max(interval, RECONNECT_CAP),
                            expected=DATABASE_AWAY, rng=self._rng)
        while True:
            interval = self.settings.stats_interval
            try:
                st = await self.store.stats()
            except Exception as exc:
                interval = failures.failed(exc)
            else:
                failures.succeeded()
                metrics.PENDING.set(st.pending)
                metrics.DEAD_ROWS.set(st.dead)
                metrics.BLOCKED_KEYS.set(st.blocked_keys)
                metrics.OLDEST_PENDING_AGE.set(st.oldest_pending_age_seconds)
                metrics.HORIZON_AGE.set(st.horizon_age_seconds)
                metrics.HELD_BACK_ROWS.set(st.held_back_rows)
                self._check_claiming(st.ready)
            self._refresh_ready()
            await asyncio.sleep(interval)

