"""Active health checks: each agent probes the endpoints of its own host (TCP connect, or
HTTP GET expecting 2xx) on the service's schedule, and tells the agent when an endpoint
crosses its healthy/unhealthy threshold; the agent writes the verdict into the endpoint's
registry record, and every other agent reads it from there (as Consul's agents do), so the
mesh costs one probe per endpoint, not one per host and endpoint, and no probe crosses hosts.
Unhealthy endpoints leave the workers' balancers and come back once healthy; `meshnode
status` shows each one's state and why (and which host checked a remote one).

New endpoints start healthy (optimistic): a fresh instance takes traffic at once, and the
unhealthy threshold bounds how long a broken one can. The threshold logic (`HealthState`) is
pure; probes are plain asyncio streams on the agent's loop. Must not import uvloop or bcc.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshnode.discovery.registry import ServiceRecord
from meshnode.model import HealthConfig, HostPort

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Probe = Callable[[HostPort, HealthConfig], Awaitable[tuple[bool, str]]]


@dataclass
class HealthState:
    """Consecutive results against thresholds; `record` says whether the verdict flipped."""

    healthy: bool = True
    reason: str = "not checked yet"
    successes: int = 0
    failures: int = 0
    checks: int = 0
    failed: int = 0  # of those, how many failed (a counter, for metrics)
    last_check: float | None = None
    changed_at: float = field(default_factory=time.monotonic)

    def record(self, ok: bool, detail: str, cfg: HealthConfig, now: float) -> bool:
        self.checks += 1
        self.last_check = now
        if ok:
            self.successes, self.failures = self.successes + 1, 0
        else:
            self.failures, self.successes = self.failures + 1, 0
            self.failed += 1
        flip = ((not self.healthy and ok and self.successes >= cfg.healthy_threshold)
                or (self.healthy and not ok and self.failures >= cfg.unhealthy_threshold))
        if flip:
            self.healthy = ok
            self.changed_at = now
        if ok:
            self.reason = detail if self.healthy else (
                f"{detail} ({self.successes}/{cfg.healthy_threshold} to healthy)")
        else:
            self.reason = (f"{detail} ({self.failures} in a row)" if not self.healthy
                           else f"{detail} ({self.failures}/{cfg.unhealthy_threshold} "
                                f"to unhealthy)")
        return flip

    def describe(self, now: float) -> dict[str, Any]:
        return {"healthy": self.healthy, "reason": self.reason, "checks": self.checks,
                "failed": self.failed,
                "last_check_ago_s": None if self.last_check is None
                else round(now - self.last_check, 2)}


async def probe_tcp(addr: HostPort, cfg: HealthConfig) -> tuple[bool, str]:
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(cfg.timeout):
            _, writer = await asyncio.open_connection(*addr.pair())
    except TimeoutError:
        return False, f"tcp connect timed out after {cfg.timeout:g}s"
    except OSError as exc:
        return False, f"tcp connect failed: {exc.strerror or exc}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True, f"tcp connect ok in {(time.monotonic() - t0) * 1000:.1f} ms"


async def probe_http(addr: HostPort, cfg: HealthConfig) -> tuple[bool, str]:
    t0 = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(cfg.timeout):
            reader, writer = await asyncio.open_connection(*addr.pair())
            writer.write(f"GET {cfg.path} HTTP/1.1\r\nHost: {addr}\r\n"
                         "User-Agent: meshnode-health\r\nConnection: close\r\n\r\n".encode())
            status_line = await reader.readline()
    except TimeoutError:
        return False, f"http GET {cfg.path} timed out after {cfg.timeout:g}s"
    except OSError as exc:
        return False, f"http GET {cfg.path} failed: {exc.strerror or exc}"
    finally:
        if writer is not None:
            writer.close()
    parts = status_line.decode("latin-1").split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return False, f"http GET {cfg.path}: not an HTTP response"
    code = int(parts[1])
    ms = (time.monotonic() - t0) * 1000
    return 200 <= code < 300, f"http GET {cfg.path} -> {code} in {ms:.1f} ms"


PROBES: dict[str, Probe] = {"tcp": probe_tcp, "http": probe_http}

Key = tuple[str, HostPort]


class HealthMonitor:
    """One check loop per (service, endpoint) with active checks; `sync` follows the registry."""

    def __init__(self, on_change: Callable[[], None], clock: Clock = time.monotonic,
                 probes: Mapping[str, Probe] = PROBES, node: str = "") -> None:
        self._on_change = on_change
        self.node = node  # endpoints of this node (or of none) are probed here
        self._clock = clock
        self._probes = probes
        self._states: dict[Key, HealthState] = {}
        self._tasks: dict[Key, tuple[HealthConfig, asyncio.Task[None]]] = {}
        self._by_service: dict[str, set[Key]] = {}  # the keys each service's checks use
        # other hosts' endpoints: the verdict their agent wrote in the registry, and who
        self._remote: dict[Key, tuple[bool, str]] = {}
        self._remote_by_service: dict[str, set[Key]] = {}
        self.dirty: set[str] = set()  # services with a verdict flipped, for the compiler

    def sync(self, services: Mapping[str, ServiceRecord]) -> None:
        """Follow a whole registry (what the agent starts from)."""
        self.update({**dict.fromkeys(self._by_service), **services})

    def update(self, changed: Mapping[str, ServiceRecord | None]) -> None:
        """Follow the services whose record changed (None: gone); the others keep their
        loops untouched, so a change costs its own endpoints, not the mesh's."""
        for name, rec in changed.items():
            for key in self._remote_by_service.pop(name, set()):
                self._remote.pop(key, None)
            if rec is not None:
                remote = {(name, e.addr): (e.healthy is not False, e.node)
                          for e in rec.endpoints if not self.owns(e.node)}
                self._remote.update(remote)
                if remote:
                    self._remote_by_service[name] = set(remote)
            want: dict[Key, HealthConfig] = {} if rec is None or rec.health.kind == "none" \
                else {(name, e.addr): rec.health for e in rec.endpoints if self.owns(e.node)}
            for key in self._by_service.pop(name, set()) - want.keys():
                _, task = self._tasks.pop(key)
                task.cancel()
                self._states.pop(key, None)
            for key, cfg in want.items():
                held = self._tasks.get(key)
                if held is not None and held[0] == cfg:
                    continue
                if held is not None:
                    held[1].cancel()
                self._states.setdefault(key, HealthState(changed_at=self._clock()))
                self._tasks[key] = (cfg, asyncio.ensure_future(self._loop(key, cfg)))
            if want:
                self._by_service[name] = set(want)

    def take_dirty(self) -> set[str]:
        """The services whose endpoints' verdicts flipped since the last call."""
        dirty, self.dirty = self.dirty, set()
        return dirty

    async def _loop(self, key: Key, cfg: HealthConfig) -> None:
        probe = self._probes[cfg.kind]
        while True:
            try:
                ok, detail = await probe(key[1], cfg)
            except Exception as exc:  # a probe bug must not stop the others
                ok, detail = False, f"check error: {exc}"
            state = self._states.get(key)
            if state is None:
                return
            if state.record(ok, detail, cfg, self._clock()):
                log.warning("endpoint %s of %s is now %s: %s", key[1], key[0],
                            "healthy" if state.healthy else "UNHEALTHY", detail)
                self.dirty.add(key[0])
                self._on_change()
            await asyncio.sleep(cfg.interval)

    def owns(self, node: str) -> bool:
        return node in ("", self.node)

    def healthy(self, service: str, addr: HostPort) -> bool:
        """This host's verdict for its endpoints, the registry's for other hosts'."""
        state = self._states.get((service, addr))
        if state is not None:
            return state.healthy
        remote = self._remote.get((service, addr))
        return remote is None or remote[0]

    def describe(self, service: str, addr: HostPort) -> dict[str, Any]:
        state = self._states.get((service, addr))
        remote = self._remote.get((service, addr))
        if state is None and remote is not None:
            return {"healthy": remote[0], "reason": f"checked by {remote[1]}", "checks": None,
                    "failed": None, "last_check_ago_s": None}
        if state is None:
            return {"healthy": True, "reason": "no active check", "checks": 0, "failed": 0,
                    "last_check_ago_s": None}
        return state.describe(self._clock())

    async def close(self) -> None:
        tasks = [t for _, t in self._tasks.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._by_service.clear()
        self._remote.clear()
        self._remote_by_service.clear()
