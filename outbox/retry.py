"""Capped exponential backoff, and the reconnect delays of every edge (relay, publisher, consumer).

One formula for all: a row whose publish failed, a lost database or broker, a consumer's retry
delay queue. Each caller passes its own base and cap.
"""

from __future__ import annotations

import random

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
