"""The agent's telemetry: it samples the workers' counters once a second into a monotonic,
host-wide history, answers `stat`, `top` and `tap`, tells workers which cgroup is which source
service, and feeds the admin port (/metrics, dashboard API). Kernel-path connections (no
proxy) join each sample from the BPF maps (telemetry/kernel_flows.py), and their access log
lines and tap events come from the agent once a second.

Takes the agent's config, then `Parts` (parts.py) once the agent runs: it reads the
registry, health, capture, names, enrollments and workers there, and changes none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshnode import __version__
from meshnode.agent.routes_api import service_marks
from meshnode.config import AgentConfig
from meshnode.counters import KERNEL_PATH, PROXY_PATH, request_succeeded
from meshnode.errors import MeshnodeError, UsageError
from meshnode.telemetry.admin import AdminServer, HostsSource
from meshnode.telemetry.aggregate import Accumulator, Totals
from meshnode.telemetry.history import History, WindowFigures, figures
from meshnode.telemetry.kernel_flows import FlowNames, KernelTelemetry
from meshnode.telemetry.metrics import Snapshot
from meshnode.telemetry.request_figures import RequestFigures, RequestTally, request_figures
from meshnode.wire import CgroupSources
from meshnode.wire import Tap as TapMessage

if TYPE_CHECKING:
    from meshnode.agent.parts import Parts
    from meshnode.discovery.catalog import Catalog

log = logging.getLogger(__name__)

SAMPLE_INTERVAL = 1.0
_TAP_QUEUE = 10_000  # events a slow tap client may fall behind by before it misses some


class Tap:
    """One `meshnode tap` client: its filter and its queue."""

    def __init__(self, services: frozenset[str], src: str | None, dst: str | None,
                 failed_only: bool) -> None:
        self.services = services
        self.src, self.dst = src, dst
        self.failed_only = failed_only
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(_TAP_QUEUE)
        self.missed = 0

    def matches(self, e: dict[str, Any]) -> bool:
        if "*" not in self.services and e.get("src") not in self.services \
                and e.get("dst") not in self.services:
            return False
        if self.src is not None and e.get("src") != self.src:
            return False
        if self.dst is not None and e.get("dst") != self.dst:
            return False
        return not self.failed_only or failed(e)


def failed(e: dict[str, Any]) -> bool:
    """Whether a tap event is a failure (`tap --failed`): a connection that closed other than
    ok or idle, or a request that failed (counters.request_succeeded on its status_class, or
    no answer from an endpoint)."""
    if e.get("event") == "request":
        return e.get("outcome") != "ok" or not request_succeeded(str(e.get("status_class")))
    return e.get("event") == "close" and e.get("outcome") not in ("ok", "idle_timeout")


def _busy(pair: dict[str, Any]) -> float:
    """How `top` ranks a pair: requests per second when it carries requests (keep-alive
    clients open few connections), else connections per second."""
    rate: float = (pair["requests"] or pair)["rate"]
    return rate


# The request figures of an HTTP service that has had no request yet.
_NO_REQUESTS = request_figures(RequestTally(), None, 1.0)


def _requests(l7: bool, f: WindowFigures) -> RequestFigures | None:
    """The request figures to show: an HTTP, HTTP/2, gRPC or auto service's (zero before its
    first request), none for a tcp one (unless it had requests: its protocol changed)."""
    if f.requests is not None:
        return f.requests
    return _NO_REQUESTS if l7 else None


class Telemetry:
    """The agent's traffic figures (sums over its workers, their history), the admin port,
    the taps and the cgroup sources. Built with the agent (the workers' first messages come
    from here); reads the running agent's collaborators once `attach` hands them over."""

    def __init__(self, cfg: AgentConfig, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 kernel: KernelTelemetry | None = None) -> None:
        """`clock`: the wall clock the history's samples are stamped with; `monotonic`: the
        one that spaces them; `kernel`: the kernel-path reader (default: the agent's pins)."""
        self.cfg = cfg
        self.parts: Parts | None = None
        self.acc = Accumulator()
        self._clock, self._monotonic = clock, monotonic
        self.history = History(clock(), keep=cfg.history_seconds)
        self._sampled_at = 0.0
        self._sample_lock = asyncio.Lock()
        self._sources: dict[str, str] = {}
        self._taps: set[Tap] = set()
        self.admin: AdminServer | None = None
        self.kernel = kernel or KernelTelemetry(cfg.pin_path, cfg.access_log_path,
                                                cfg.access_log_sample)

    def attach(self, parts: Parts) -> None:
        self.parts = parts

    def _p(self) -> Parts:
        assert self.parts is not None, "telemetry read before the agent runs"
        return self.parts

    # -- sampling ----------------------------------------------------------------------------
    async def sample(self) -> Totals:
        """The host's counters now. Operators' reads must see the connections that already
        happened, so every read asks the workers; a sample taken less than half an interval
        after the previous one replaces it, keeping the history about one sample a second
        however often it is read."""
        async with self._sample_lock:
            totals = self.acc.update(await self._p().workers.stats())
            if self._kernel_path():
                rows = await asyncio.to_thread(self.kernel.read_rows)
                self.kernel.update(rows, self._flow_names())
                self.kernel.add_to(totals)
            now = self._monotonic()
            soon_after = now - self._sampled_at < SAMPLE_INTERVAL / 2
            self.history.add(self._clock(), totals, replace_latest=soon_after)
            if not soon_after:
                self._sampled_at = now
            return totals

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            try:
                await self.sample()
                await self._kernel_log()
            except Exception:
                log.exception("telemetry sample failed")

    def _kernel_path(self) -> bool:
        """Whether kernel-path telemetry can exist: only the eBPF capture has the maps."""
        return self.parts is not None and self.parts.capture.name == "ebpf"

    def _flow_names(self) -> FlowNames:
        return FlowNames(self._sources, self._p().registry.services())

    async def _kernel_log(self) -> None:
        """Kernel-path connections closed since the last call: access log lines, tap
        events."""
        if not self._kernel_path():
            return
        async with self._sample_lock:  # the reader is not shared between threads
            batch = await asyncio.to_thread(self.kernel.read_log)
        events, lines = self.kernel.records(batch, self._flow_names())
        if lines:
            await asyncio.to_thread(self.kernel.write_log, lines)
        for event in events:
            self.on_event(event)

    def close(self) -> None:
        """Release the kernel-path maps (the agent stops)."""
        self.kernel.close()

    # -- admin port ------------------------------------------------------------------------
    async def start_admin(self, catalog: Catalog | None = None,
                          hosts: HostsSource | None = None) -> None:
        """`hosts`: the mesh's hosts and their reports (GET /api/hosts), run on this loop."""
        cfg = self.cfg
        if not cfg.admin_port:
            return
        self.admin = AdminServer("127.0.0.1", cfg.admin_port, self,
                                 asyncio.get_running_loop(), catalog=catalog, hosts=hosts)
        await asyncio.to_thread(self.admin.start)

    async def stop_admin(self) -> None:
        if self.admin is not None:
            await asyncio.to_thread(self.admin.stop)
            self.admin = None

    @property
    def ready(self) -> bool:
        return self.parts is not None and self.parts.ready()

    async def snapshot(self) -> Snapshot:
        a = self._p()
        totals = await self.sample()
        try:
            kernel = await asyncio.to_thread(a.capture.stats)
            inbound = await asyncio.to_thread(a.capture.inbound_counts)
        except MeshnodeError:
            kernel, inbound = {}, {}
        enrolled: dict[str, int] = {}
        for e in a.enrollments.describe():
            enrolled[e["service"]] = enrolled.get(e["service"], 0) + 1
        services = [{"name": name, "endpoints": [
            {"addr": str(e.addr), **_health(a.health.describe(name, e.addr))}
            for e in sorted(rec.endpoints, key=lambda e: e.addr)]}
            for name, rec in sorted(a.registry.services().items())]
        return Snapshot(
            info={"version": __version__, "node": a.node, "instance": a.cfg.instance,
                  "capture": a.capture.name},
            ready=a.ready(), totals=totals, kernel=kernel,
            dns=a.names.describe()["counters"],
            registry={**a.registry.describe(),
                      "applied_revision": a.report.applied_revision},
            services=services, enrolled=enrolled,
            workers=a.workers.describe(), inbound=inbound, certs=a.identity.expiries())

    # -- stat, top, overview ---------------------------------------------------------------
    async def stat(self, window: float, service: str | None) -> dict[str, Any]:
        a = self._p()
        await self.sample()
        known = a.registry.services()
        if service is not None and service not in known:
            raise UsageError(f"no service named {service!r}", "see them: meshnode status")
        per_service = self.history.by_service(window)
        per_route = self.history.by_route(window)
        paths = self.history.paths()
        rows = []
        for name in sorted(known) if service is None else [service]:
            rec = known[name]
            f = per_service.get(name) or figures((), (), 1.0)
            requests = _requests(rec.policy.l7, f)
            row: dict[str, Any] = {"service": name, "vip": str(rec.vip), "port": rec.port,
                                   "endpoints": len(rec.endpoints),
                                   "healthy": sum(1 for e in rec.endpoints
                                                  if a.health.healthy(name, e.addr)),
                                   "l7": requests is not None,
                                   "path": _path(paths.get(name), rec)}
            row.update(f.to_json())
            # connection figures stay for every service; requests for HTTP/gRPC ones
            row["requests"] = None if requests is None else requests.to_json()
            row["routes"] = [{"route": route, **rf.to_json()}
                             for route, rf in per_route.get(name, [])]
            rows.append(row)
        return {"window": window, "span": self._span(window), "services": rows}

    def _span(self, window: float) -> float:
        """The seconds the figures really cover (less than `window` right after start)."""
        return round(self.history.latest[0] - self.history.base(window)[0], 3)

    async def top(self, window: float, limit: int) -> dict[str, Any]:
        """The busiest pairs: by request rate for HTTP/gRPC pairs, connection rate else."""
        await self.sample()
        known = self._p().registry.services()
        pairs = []
        for src, dst, path, f in self.history.by_path_pair(window):
            rec = known.get(dst)
            requests = _requests(path == PROXY_PATH and rec is not None and rec.policy.l7, f)
            if f.connections or f.active or (requests is not None and requests.requests):
                pairs.append({"src": src, "dst": dst, "path": path, "l7": requests is not None,
                              **f.to_json(),
                              "requests": None if requests is None else requests.to_json()})
        pairs.sort(key=lambda p: (-_busy(p), -p["active"], p["src"], p["dst"], p["path"]))
        return {"window": window, "span": self._span(window), "pairs": pairs[:limit]}

    async def edges(self, window: float) -> tuple[float, list[tuple[str, str, WindowFigures]]]:
        """(the seconds the window really covers, every (source, destination service) pair
        with connections opened in it or open now): who called whom (`authz suggest`)."""
        await self.sample()
        return self._span(window), [(src, dst, f) for src, dst, f in
                                    self.history.by_pair(window) if f.connections or f.active]

    async def overview(self, window: float) -> dict[str, Any]:
        """The dashboard's one poll: services, edges, hosts and per-service series."""
        a = self._p()
        stat = await self.stat(window, None)
        known = a.registry.services()
        marks = service_marks(a.registry.resources())  # a Route's split, fault, ...
        services = []
        for row in stat["services"]:
            rec = known[row["service"]]
            services.append({
                "name": rec.name, "vip": str(rec.vip), "port": rec.port, "lb": rec.lb.algorithm,
                "route": marks.get(rec.name),
                "endpoints": [{"addr": str(e.addr), "node": e.node, "zone": e.zone,
                               "health": "healthy" if a.health.healthy(rec.name, e.addr)
                               else "unhealthy"}
                              for e in sorted(rec.endpoints, key=lambda e: e.addr)],
                **{k: row[k] for k in ("rate", "active", "error_rate", "bytes_up_rate",
                                       "bytes_down_rate", "p50_ms", "p95_ms", "p99_ms", "l7",
                                       "requests", "path", "rtt_ms")}})
        edges = [{"src": p["src"], "dst": p["dst"], "rate": p["rate"],
                  "error_rate": p["error_rate"], "active": p["active"],
                  "bytes_rate": round(p["bytes_up_rate"] + p["bytes_down_rate"], 3),
                  "l7": p["l7"], "requests": p["requests"], "path": p["path"],
                  "rtt_ms": p["rtt_ms"]}
                 for p in (await self.top(window, 1000))["pairs"]]
        return {
            "node": a.node, "instance": a.cfg.instance, "version": __version__,
            "capture": a.capture.name, "ready": a.ready(), "time": self._clock(), "window": window,
            "services": services, "edges": edges, "hosts": self._hosts(),
            "series": self.history.series_all(sorted(known)),
        }

    def _hosts(self) -> list[dict[str, Any]]:
        a = self._p()
        hosts: dict[str, dict[str, Any]] = {}
        local = a.node
        hosts[local] = {"node": local, "zone": a.cfg.zone, "local": True, "endpoints": [],
                        "enrolled": []}
        for name, rec in sorted(a.registry.services().items()):
            for e in sorted(rec.endpoints, key=lambda e: e.addr):
                h = hosts.setdefault(e.node or "?", {"node": e.node or "?", "zone": e.zone,
                                                     "local": e.node == local,
                                                     "endpoints": [], "enrolled": []})
                h["endpoints"].append({"service": name, "addr": str(e.addr)})
        for proc in a.enrollments.describe():
            hosts[local]["enrolled"].append({"pid": proc["pid"], "service": proc["service"],
                                             "cmd": _cmdline(proc["pid"]),
                                             "ports": proc["endpoints"]})
        return sorted(hosts.values(), key=lambda h: (not h["local"], h["node"]))

    # -- sources: which cgroup is which service --------------------------------------------
    def sources_message(self) -> CgroupSources:
        return CgroupSources(dict(self._sources))

    def refresh_sources(self, apps: Path) -> None:
        """Read the apps cgroup's service folders; tell the workers when they changed."""
        found: dict[str, str] = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(apps):
                if entry.is_dir(follow_symlinks=False):
                    # a cgroup2 folder's inode number is the cgroup id the kernel reports
                    found[str(entry.inode())] = entry.name
        if found != self._sources:
            self._sources = found
            if self.parts is not None:  # else the workers get them as a first message
                self.parts.workers.send_all(self.sources_message())

    # -- tap ---------------------------------------------------------------------------------
    def tap_message(self, extra: frozenset[str] = frozenset()) -> TapMessage:
        services: set[str] = set(extra)
        for t in self._taps:
            services |= t.services
        return TapMessage(tuple(sorted(services)))

    def describe(self) -> dict[str, Any]:
        """For `meshnode status`."""
        cfg = self.cfg
        return {"admin": f"127.0.0.1:{self.admin.port}" if self.admin else None,
                "access_log": cfg.access_log_path or None,
                "access_log_sample": cfg.access_log_sample, "taps": len(self._taps),
                "kernel": self.kernel.describe()}

    def on_event(self, event: dict[str, Any]) -> None:
        """A worker's tap event (wire.ConnEvent's record) to the taps that want it."""
        for tap in self._taps:
            if tap.matches(event):
                try:
                    tap.queue.put_nowait(event)
                except asyncio.QueueFull:
                    tap.missed += 1

    def open_tap(self, service: str, src: str | None, dst: str | None,
                 failed_only: bool) -> AsyncIterator[dict[str, Any]]:
        a = self._p()
        if service != "*" and service not in a.registry.services() \
                and service not in self._sources.values():
            raise UsageError(f"no service named {service!r}", "see them: meshnode status")
        tap = Tap(frozenset({service}), src, dst, failed_only)
        return self._stream(tap)

    async def _stream(self, tap: Tap) -> AsyncIterator[dict[str, Any]]:
        workers = self._p().workers
        try:
            # Workers first, then the tap counts as open: events from the first connection
            # after `status` shows the tap are not lost.
            workers.send_all(self.tap_message(tap.services))
            await workers.barrier()
            self._taps.add(tap)
            while True:
                event = await tap.queue.get()
                if tap.missed:
                    yield {"event": "missed", "count": tap.missed}
                    tap.missed = 0
                yield event
        finally:
            self._taps.discard(tap)
            workers.send_all(self.tap_message())

    def initial_messages(self) -> list[CgroupSources | TapMessage]:
        return [self.sources_message(), self.tap_message()]


def _path(seen: list[str] | None, rec: Any) -> str:
    """What carries a service's connections: the paths its traffic took ("proxy", "kernel",
    "proxy+kernel"), else what its Service asks for."""
    if seen:
        return "+".join(seen)
    datapath = str(getattr(rec.policy, "datapath", PROXY_PATH))
    return KERNEL_PATH if datapath == KERNEL_PATH else PROXY_PATH


def _health(d: dict[str, Any]) -> dict[str, Any]:
    # another host's verdict has no counts here (health.describe: None)
    return {"healthy": bool(d.get("healthy")), "checks": int(d.get("checks") or 0),
            "failed": int(d.get("failed") or 0)}


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")[:200]
