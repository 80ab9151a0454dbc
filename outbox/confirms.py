"""Whether the broker answers the relay's publishes: the rule behind the ``confirms`` problem of
``/readyz``.

A broker can accept every publish and confirm none of them: a quorum queue whose cluster lost its
majority has no leader, so each batch runs into ``OUTBOX_PUBLISH_TIMEOUT`` while the connection
itself looks healthy (the relay reconnects and is let in again). Like a broker that blocks
publishers, that is a relay that cannot publish: not ready, and the reason says why. The lanes go
on publishing (their rows are retried as usual), so the first answer makes the relay ready again.
"""

from __future__ import annotations

from dataclasses import dataclass

# timed-out publishes in a row, with no answer since, before the relay says it is not ready: one
# alone is often a single lost connection, which the relay replaces at once
STALLED_AFTER = 2


@dataclass(slots=True)
class ConfirmWatch:
    """Counts publishes that timed out since the broker last answered one (pure: the caller passes
    the clock's readings)."""

    since: float | None = None  # when the first of those publishes began
    timeouts: int = 0

    def answered(self) -> None:
        """The broker confirmed (or nacked, or returned) a publish: it is answering."""
        self.since = None
        self.timeouts = 0

    def timed_out(self, started: float) -> None:
        """A publish begun at ``started`` got no answer within its deadline."""
        if self.since is None or started < self.since:
            self.since = started
        self.timeouts += 1

    @property
    def stalled(self) -> bool:
        return self.timeouts >= STALLED_AFTER

    def problem(self, now: float) -> str:
        """Why the relay is not ready, or "" while the broker answers."""
        if not self.stalled or self.since is None:
            return ""
        return (f"no publish confirmed for {max(0.0, now - self.since):.0f} s "
                f"({self.timeouts} timeouts): a quorum queue without a majority?")
