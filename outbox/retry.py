"""Capped exponential backoff, the reconnect delays of every edge (relay, publisher, consumer),
and the failures in a row of a background task (`Failures`).

One formula for all: a row whose publish failed, a lost database or broker, a consumer's retry
delay queue. Each caller passes its own base and cap.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from outbox import metrics

RECONNECT_BASE = 0.2
RECONNECT_CAP = 15.0
REFUSED_RETRY = 30.0  # a permanent refusal (bad password…) is retried slowly, never hammered


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None, *,
            jitter: bool = True) -> float:
    """Delay in seconds before retry number ``attempt`` (1 for the first retry).

    ``base * 2**(attempt-1)``, capped at ``cap``, then jittered to between half and all of it
    ("equal jitter"), so rows that failed together do not come back together. ``jitter=False``
    gives the capped delay itself, for a caller that needs the same delay every time (the
    consumer's delay queues: one queue per distinct delay).
    """
    exp = min(cap, base * float(2 ** min(attempt - 1, 62)))
    if not jitter:
        return exp
    r = rng.random() if rng is not None else random.random()
    return exp * (0.5 + r / 2)


@dataclass
class Failures:
    """The failures in a row of a task that retries for as long as the relay runs (the
    listener, the backlog gauges, the wake-up flag, the broker's supervisor).

    An error of ``expected`` (the database or the broker being away: the lanes or the
    supervisor report those) only lengthens the backoff. Any other is a bug or a case nobody
    foresaw: it must not end the task silently, nor fill the log while it repeats, so it is
    counted in ``outbox_task_errors_total{task}`` and logged with its traceback once, until the
    task works again.
    """

    log: logging.Logger
    task: str  # its label in outbox_task_errors_total
    message: str  # the line that says an unexpected error
    base: float
    cap: float
    expected: tuple[type[BaseException], ...] = ()
    rng: random.Random | None = None
    count: int = field(default=0, init=False)  # failures since the task last worked
    _reported: str = field(default="", init=False)

    def failed(self, exc: BaseException) -> float:
        """Note one failure; returns the delay before the next try."""
        self.count += 1
        if not isinstance(exc, self.expected):
            metrics.TASK_ERRORS.labels(self.task).inc()
            problem = f"{type(exc).__name__}: {exc}"
            if problem != self._reported:
                self.log.error(self.message, exc_info=exc)
            self._reported = problem
        return backoff(self.count, self.base, self.cap, self.rng)

    def succeeded(self) -> None:
        """The task worked: the next failure is retried quickly, and said again."""
        self.count = 0
        self._reported = ""
