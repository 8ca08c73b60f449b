"""This agent's report to the mesh: which registry revision its workers and kernel run, so an
operator sees a rollout converge (`meshnode get KIND --hosts`, the dashboard's hosts).

The report is published through the registry (etcd: `hosts/<node>` under this agent's lease,
so a dead agent's report goes with it; embedded: kept in memory). Publishing is coalesced: a
burst of applies costs one write, the newest. Takes the registry and a state callback, not the
agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from meshnode.discovery.registry import Registry
from meshnode.errors import MeshnodeError

log = logging.getLogger(__name__)

RETRY_AFTER = 1.0  # seconds before a failed publish (etcd down) is tried again


class HostReport:
    def __init__(self, registry: Registry, state: Callable[[], dict[str, Any]]) -> None:
        self.registry = registry
        self.state = state
        self.applied_revision = 0
        self.applied_at = 0.0
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_error = ""

    def applied(self, revision: int) -> None:
        """The workers and the kernel now run the registry as of `revision`."""
        if revision != self.applied_revision:
            self.applied_revision, self.applied_at = revision, time.time()
            self._dirty.set()

    def changed(self) -> None:
        """Something the report says changed (an identity): publish it again."""
        self._dirty.set()

    def current(self) -> dict[str, Any]:
        return {**self.state(), "applied_revision": self.applied_revision,
                "applied_at": round(self.applied_at, 3)}

    def start(self) -> None:
        self._dirty.set()
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.registry.publish_host(self.current())
                self._last_error = ""
            except MeshnodeError as exc:
                if str(exc) != self._last_error:  # said once per outage, not per retry
                    log.warning("cannot publish this host's report: %s (retrying)", exc)
                    self._last_error = str(exc)
                await asyncio.sleep(RETRY_AFTER)
                self._dirty.set()
