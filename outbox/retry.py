"""Capped exponential backoff with jitter, for rows whose publish failed."""

from __future__ import annotations

import random


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay in seconds before retry number ``attempt`` (1 for the first retry).

    ``base * 2**(attempt-1)``, capped at ``cap``, then jittered to between half and all of it
    ("equal jitter"), so rows that failed together do not come back together.
    """
    exp = min(cap, base * float(2 ** min(attempt - 1, 62)))
    r = rng.random() if rng is not None else random.random()
    return exp * (0.5 + r / 2)
