"""The wall clock every certificate expiry check reads, in the agent and in the workers.

Tests push it forward without touching the system clock: MESHNODE_CLOCK_OFFSET (seconds,
may be negative) is added to time.time(). Read on every call, so a test can change it.
"""

from __future__ import annotations

import os
import time

OFFSET_ENV = "MESHNODE_CLOCK_OFFSET"


def now() -> float:
    try:
        offset = float(os.environ.get(OFFSET_ENV) or 0)
    except ValueError:
        offset = 0.0
    return time.time() + offset
