"""agent/requeue.py: a failed reconcile is retried with backoff until it succeeds, without
waiting for another change; a change during the backoff retries at once.

Real asyncio timers with short delays (tens of ms); the assertions on gaps are lower bounds,
plus generous upper bounds only where they tell a reset delay from a grown one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from meshnode.agent.requeue import reconcile_forever


class FlakySync:
    """A reconcile that fails while `failing` is positive (counting down), and records when
    each attempt ran."""

    def __init__(self, failing: int = 0) -> None:
        self.failing = failing
        self.attempts: list[float] = []
        self.succeeded = asyncio.Event()

    async def __call__(self) -> None:
        self.attempts.append(time.monotonic())
        if self.failing > 0:
            self.failing -= 1
            raise OSError("capture.sync: the kernel said EBUSY")
        self.succeeded.set()

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.attempts, self.attempts[1:], strict=False)]


@asynccontextmanager
async def loop(dirty: asyncio.Event, sync: FlakySync, **backoff: float) -> AsyncIterator[None]:
    task = asyncio.create_task(reconcile_forever(dirty, sync, **backoff))
    try:
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def run(fn: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(fn(), 10))


def test_a_transient_failure_converges_without_a_new_change() -> None:
    async def scenario() -> None:
        dirty, sync = asyncio.Event(), FlakySync(failing=3)
        async with loop(dirty, sync, first=0.02, most=0.05):
            dirty.set()  # the one change
            await asyncio.wait_for(sync.succeeded.wait(), 5)
            assert len(sync.attempts) == 4 and not dirty.is_set()
            # 0.02, doubling, capped at 0.05
            assert [g >= want for g, want in zip(sync.gaps(), [0.02, 0.04, 0.05],
                                                 strict=True)] == [True] * 3
            # converged: nothing more runs until the next change
            await asyncio.sleep(0.15)
            assert len(sync.attempts) == 4

    run(scenario)


def test_success_resets_the_delay() -> None:
    async def scenario() -> None:
        dirty, sync = asyncio.Event(), FlakySync(failing=4)
        async with loop(dirty, sync, first=0.05, most=0.8):
            dirty.set()
            await asyncio.wait_for(sync.succeeded.wait(), 5)
            assert sync.gaps()[-1] >= 0.4  # the delay had grown: 0.05, 0.1, 0.2, 0.4
            sync.succeeded.clear()
            sync.failing = 1
            dirty.set()  # a new change that fails once
            await asyncio.wait_for(sync.succeeded.wait(), 5)
            # back to the first delay (0.05), not the grown one (0.8)
            assert 0.05 <= sync.gaps()[-1] < 0.6

    run(scenario)


def test_a_change_during_the_backoff_retries_at_once() -> None:
    async def scenario() -> None:
        dirty, sync = asyncio.Event(), FlakySync(failing=1)
        async with loop(dirty, sync, first=30, most=30):
            dirty.set()
            while not sync.attempts:
                await asyncio.sleep(0)
            dirty.set()  # e.g. the operator fixed what failed; no 30 s wait
            await asyncio.wait_for(sync.succeeded.wait(), 5)
            assert len(sync.attempts) == 2

    run(scenario)


def test_one_traceback_per_failure_streak(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        dirty, sync = asyncio.Event(), FlakySync(failing=3)
        async with loop(dirty, sync, first=0.01, most=0.02):
            dirty.set()
            await asyncio.wait_for(sync.succeeded.wait(), 5)

    with caplog.at_level(logging.INFO, logger="meshnode.agent.requeue"):
        run(scenario)
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in errors] == [
        "reconcile failed; retrying in 0.01 s, backing off to 0.02 s"]
    assert errors[0].exc_info is not None
    assert "reconcile succeeded after 3 failed attempts" in caplog.messages
