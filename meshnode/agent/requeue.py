"""The agent's reconcile loop: run on every change, and after a failure again with backoff.

A reconcile that fails (a capture.sync the kernel refused, a worker barrier that timed out)
is requeued as a controller would: 0.1 s, doubling to at most 5 s, until one succeeds, which
resets the delay. Retrying only on the next change would leave the kernel stale until
something unrelated happened to change. A change that arrives during the backoff runs the
next attempt at once: it may be the fix.

Owns only the loop's timing and its logging (one traceback per failure streak, not one per
retry). Imports nothing of meshnode's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

RETRY_FIRST = 0.1  # s: a transient failure (a busy worker, a netlink hiccup) is often gone
RETRY_MOST = 5.0  # s: a lasting one costs a cheap retry every 5 s, not a busy loop


async def reconcile_forever(dirty: asyncio.Event, reconcile: Callable[[], Awaitable[None]], *,
                            what: str = "reconcile", first: float = RETRY_FIRST,
                            most: float = RETRY_MOST) -> None:
    """Wait for `dirty`, clear it and run `reconcile`; after a failure run it again after the
    backoff delay (or at once if `dirty` is set meanwhile). Runs until cancelled."""
    delay: float | None = None  # None: the last attempt succeeded, wait for a change
    failures = 0
    while True:
        if delay is None:
            await dirty.wait()
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await dirty.wait()
        dirty.clear()
        try:
            await reconcile()
        # Anything: this loop is what keeps the kernel in step, so it must outlive any bug
        # in one pass. Cancellation is a BaseException and still ends it.
        except Exception:
            failures += 1
            delay = first if delay is None else min(delay * 2, most)
            if failures == 1:
                log.exception("%s failed; retrying in %g s, backing off to %g s", what,
                              delay, most)
            else:
                log.debug("%s failed again (%d in a row); retrying in %g s", what, failures,
                          delay, exc_info=True)
        else:
            if failures:
                log.info("%s succeeded after %d failed attempts", what, failures)
            delay, failures = None, 0
