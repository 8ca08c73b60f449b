"""HostAgent: the one privileged process per host (or per test namespace).

Owns the kernel state (cgroups, capture, all recorded in a ledger), the registry, enrollment,
the proxy workers and the control socket. Start is all or nothing; stop removes capture first
(connections fall back to their original destinations), then drains the workers, hands enrolled
processes back to their old cgroups and removes everything the ledger lists. A new agent sweeps
what a crashed one left before it creates anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from meshnode import __version__
from meshnode.agent import cluster
from meshnode.agent.control import ControlServer, Handler
from meshnode.agent.enrollment import EnrollmentManager
from meshnode.agent.names import MeshNames
from meshnode.agent.observe import Telemetry
from meshnode.agent.report import HostReport
from meshnode.agent.requeue import reconcile_forever
from meshnode.agent.resources_api import ResourceApi
from meshnode.agent.workers import WorkerPool
from meshnode.capture import CaptureBackend, CaptureContext, undo_functions
from meshnode.config import AgentConfig
from meshnode.discovery import catalog
from meshnode.discovery.factory import open_registry
from meshnode.discovery.health import HealthMonitor
from meshnode.discovery.registry import EndpointRecord, Registry, ServiceRecord, patch_service
from meshnode.errors import AccessError, ConflictError, MeshnodeError, UsageError
from meshnode.host import cgroup, process
from meshnode.host.ledger import Ledger, UndoFn
from meshnode.model import CaptureState, HostPort
from meshnode.policy import compiler
from meshnode.policy.store import Delete

log = logging.getLogger(__name__)

_CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    """Join /run/netns/NAME (network namespace only: the mount namespace, and so the cgroup2
    mount, stays the host's). libc's setns(2) directly: pyroute2 would stay loaded in the
    agent for this one call (about 10 MB)."""
    path = Path(f"/run/netns/{name}")
    if not path.exists():
        raise UsageError(f"no network namespace named {name!r}", "create it: ip netns add NAME")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise AccessError(f"cannot enter network namespace {name!r}: "
                                   f"{os.strerror(err)}", "the agent must run as root")
    finally:
        os.close(fd)


class HostAgent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.node = cfg.node_name  # read once: it may ask the kernel for the host name
        self.state = cfg.state_path
        self.ledger = Ledger(self.state / "ledger.json")
        self.mount = Path()
        self.root_cgroup = Path()
        self.capture: CaptureBackend | None = None
        self.capture_reason = ""
        self.names: MeshNames | None = None
        self.registry: Registry | None = None
        self.enrollments: EnrollmentManager | None = None
        self.workers: WorkerPool | None = None
        self.control: ControlServer | None = None
        self.ready = False
        self.started_at = 0.0
        self.ready_after = 0.0
        self.compiler = compiler.Compiler()  # what the workers and the kernel were given
        self._feed = 0  # the registry change feed's position the compiler has read to
        self._synced: CaptureState | None = None  # the state the kernel last took
        self._reconcile_lock = asyncio.Lock()
        self._dirty = asyncio.Event()
        self.health = HealthMonitor(on_change=self._health_changed, node=cfg.node_name)
        self._background: set[asyncio.Task[None]] = set()
        # the read-only catalog on the admin port (/v1/catalog) follows registry and health
        self.catalog = catalog.Catalog(
            lambda: self.registry.services() if self.registry else {}, self.health.healthy)
        self.telemetry = Telemetry(self)
        self._stop = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._lock_fd: int | None = None
        self.report: HostReport | None = None

    # -- start ----------------------------------------------------------------------------
    def _take_lock(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.state / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConflictError(f"an agent for instance {self.cfg.instance!r} is already running",
                                "stop it first, or start this one with --instance OTHER") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _undo(self) -> dict[str, UndoFn]:
        return {**undo_functions(), **cgroup.UNDO}

    def sweep(self) -> None:
        """Remove whatever an earlier agent of this instance left in the kernel."""
        leftovers = self.ledger.entries()
        if not leftovers:
            return
        log.warning("sweeping %d kernel objects left by an earlier agent", len(leftovers))
        for failure in self.ledger.undo_all(self._undo()):
            log.error("sweep: %s", failure)

    async def start(self) -> None:
        self.started_at = time.monotonic()
        if not process.is_root():
            raise AccessError("meshnode agent must run as root (it loads kernel rules)")
        if self.cfg.netns:
            enter_netns(self.cfg.netns)
        self._take_lock()
        self.sweep()
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        self.ready_after = time.monotonic() - self.started_at

    async def _start(self) -> None:
        from meshnode.capture import auto  # imported late: it pulls the loader helpers

        self.mount = cgroup.cgroup2_mount()
        self.root_cgroup = self.mount / self.cfg.cgroup_name
        self.ledger.record("cgroup", path=str(self.root_cgroup))
        cgroup.create(self.root_cgroup)
        apps, proxy = self.root_cgroup / "apps", self.root_cgroup / "proxy"
        cgroup.create(apps)
        cgroup.create(proxy)

        self.registry = open_registry(self.cfg.registry, self.state, self.cfg.node_name,
                                      self.cfg.registry_ttl)
        await self.registry.start()
        self.report = HostReport(self.registry, self._report_state)
        ctx = CaptureContext(self.cfg.instance, self.mount, apps, proxy, self.cfg.pin_path,
                             self.cfg.outbound_port, self.cfg.proxy_mark, self.ledger)
        choice = await asyncio.to_thread(auto.install, ctx, self.cfg.capture)
        self.capture, self.capture_reason = choice.backend, choice.reason
        log.info("capture: %s", self.capture_reason)
        # names: the DNS server first, then the redirect of enrolled processes' port 53 to it
        self.names = MeshNames.for_agent(self.cfg, self.capture, self.registry,
                                         self.health.healthy)
        await self.names.start()

        log_file = self.cfg.access_log_path
        if log_file not in ("", "-"):
            Path(log_file).parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.workers = WorkerPool(
            self.cfg, proxy,
            lambda: [*compiler.resets(self.compiler.pushed),
                     *self.telemetry.initial_messages()],
            self._workers_changed, self.telemetry.on_event)
        self._feed, _ = self.registry.changes(0)
        self.compiler.run(self.registry.services(), self.health.healthy,
                          on_changed=self.health.update)
        await self.workers.start()
        self.enrollments = EnrollmentManager(
            self.registry, apps, self.mount, self.state / "enrollments.json",
            self.cfg.host_address, self._protected_pids(), self.cfg.node_name, self.cfg.zone)
        await self.enrollments.restore()
        self.registry.subscribe(self._dirty.set)
        self.registry.subscribe(self.catalog.changed)

        self.control = ControlServer(self.cfg.control_socket, self._handlers())
        await self.control.start()
        await self.telemetry.start_admin(hosts=self._hosts_view)
        await self._reconcile()
        self.report.start()
        self._tasks = [asyncio.ensure_future(self._reconcile_loop()),
                       asyncio.ensure_future(self._scan_loop()),
                       asyncio.ensure_future(self.telemetry.run())]

    def _protected_pids(self) -> set[int]:
        pids = {os.getpid()}
        if self.workers is not None:
            pids.update(w.pid for w in self.workers.workers if w.pid)
        return pids

    # -- keeping workers and kernel in step with the registry ------------------------------
    async def _workers_changed(self) -> None:
        if self.enrollments is not None:
            self.enrollments.protected |= self._protected_pids()
        await self._reconcile()

    async def _reconcile(self) -> None:
        """Push registry changes to the workers, wait until they applied them, then tell the
        kernel which services to redirect: a service is only captured once the proxy knows it."""
        assert self.registry and self.workers and self.capture
        async with self._reconcile_lock:
            if self._stopping:  # capture is being removed: never re-install rules
                return
            revision = self.registry.revision()  # what this pass applies, at least
            self.telemetry.refresh_sources(self.root_cgroup / "apps")
            # only what changed since the last pass: a change costs itself, not the mesh
            services = self.registry.services()
            dirty = self.health.take_dirty()
            self._feed, names = self.registry.changes(self._feed)
            compiled = self.compiler.run(services, self.health.healthy, dirty,
                                         on_changed=self.health.update, names=names)
            self._share_health(services, {*compiled.changed, *dirty})
            if compiled.updates:
                self.workers.broadcast(compiled.updates)
            ready = await self.workers.barrier()
            state = self.compiler.capture_state(ready)
            if state is not self._synced:  # the same object: nothing the kernel holds changed
                await asyncio.to_thread(self.capture.sync, state)
                self._synced = state
            self.ready = ready  # published only once the kernel rules match it
            if ready and self.report is not None:
                self.report.applied(revision)

    def _share_health(self, services: Mapping[str, ServiceRecord], names: Iterable[str]) -> None:
        """Write this host's verdicts into its endpoints' registry records where they differ
        from what the records say: every other agent reads them from there. In the
        background: a slow or unreachable registry must not hold up the data plane (a verdict
        that could not be written is written again when the registry resyncs)."""
        writes: dict[str, list[EndpointRecord]] = {}
        for name in names:
            rec = services.get(name)
            if rec is None or rec.health.kind == "none":
                continue
            for e in rec.endpoints:
                if self.health.owns(e.node):
                    verdict = self.health.healthy(name, e.addr)
                    if verdict != (e.healthy is not False):
                        writes.setdefault(name, []).append(replace(e, healthy=verdict))
        if writes:
            task = asyncio.ensure_future(self._write_health(writes))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _write_health(self, writes: dict[str, list[EndpointRecord]]) -> None:
        assert self.registry
        for name, recs in writes.items():
            try:
                await self.registry.add_endpoints(name, recs)
            except MeshnodeError as exc:
                log.warning("health of %s not shared: %s", name, exc)

    def _health_changed(self) -> None:
        """A health verdict flipped: the workers' balancers and the catalog follow it."""
        self._dirty.set()
        self.catalog.health_changed()

    async def _reconcile_loop(self) -> None:
        # a failed pass (say capture.sync) is retried with backoff, not only on the next change
        await reconcile_forever(self._dirty, self._reconcile)

    async def _scan_loop(self) -> None:
        assert self.enrollments
        last_error = ""
        while True:
            await asyncio.sleep(self.cfg.scan_interval)
            try:
                await self.enrollments.scan()
                last_error = ""
            except MeshnodeError as exc:
                # e.g. etcd unreachable: retried on the next scan; said once, not twice a second
                if str(exc) != last_error:
                    log.warning("enrollment scan: %s (retrying)", exc)
                    last_error = str(exc)
            except Exception:
                log.exception("enrollment scan failed")

    # -- stop -----------------------------------------------------------------------------
    async def stop(self) -> None:
        """Fail open first, then drain, then remove every recorded kernel object."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # 1. DNS redirect off, then capture off: new connections go to their original
        #    destinations and queries to the resolvers they asked
        if self.names is not None:
            await self.names.stop()
        if self.capture is not None:
            try:
                await asyncio.to_thread(self.capture.remove)
            except MeshnodeError as exc:
                log.error("removing capture: %s", exc)
        # 2. no new control requests, no more scrapes
        if self.control is not None:
            await self.control.stop()
        await self.telemetry.stop_admin()
        await self.health.close()
        # 3. drain the proxy: established connections finish within the grace period
        if self.workers is not None:
            await self.workers.stop()
        # 4. enrolled processes go back to the cgroups they came from (records are kept)
        if self.enrollments is not None:
            self.enrollments.release_all()
        # 5. this node's endpoints and report leave the shared registry (with etcd: the lease
        #    is revoked)
        if self.report is not None:
            await self.report.stop()
        if self.registry is not None:
            try:
                await self.registry.close()
            except MeshnodeError as exc:
                log.error("closing the registry: %s", exc)
        # 6. everything else the ledger lists (cgroups, pins, chains a failed remove left)
        for failure in self.ledger.undo_all(self._undo()):
            log.error("stop: %s", failure)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self.start()
        assert self.workers is not None
        log.info("meshnode agent ready in %.2fs (instance %s, capture %s, %d workers)",
                 self.ready_after, self.cfg.instance, self.capture.name if self.capture else "-",
                 len(self.workers.workers))
        try:
            await self._stop.wait()
        finally:
            log.info("stopping")
            await self.stop()

    # -- control operations ---------------------------------------------------------------
    def _handlers(self) -> dict[str, Handler]:
        assert self.registry
        return {
            "ping": self._op_ping,
            "status": self._op_status,
            "enroll": self._op_enroll,
            "unenroll": self._op_unenroll,
            "service.add": self._op_service_add,
            "service.remove": self._op_service_remove,
            "explain": self._op_explain,
            "stat": self._op_stat,
            "top": self._op_top,
            "tap": self._op_tap,
            **ResourceApi(self.registry, self._settled).handlers(),
            "hosts": self._op_hosts,
        }

    def _report_state(self) -> dict[str, Any]:
        """What this host reports; costs nothing per service (published on every apply)."""
        return {"node": self.node, "zone": self.cfg.zone, "version": __version__,
                "instance": self.cfg.instance, "ready": self.ready,
                "capture": self.capture.name if self.capture else None,
                "services": self.compiler.services,
                "local_endpoints": self.compiler.endpoints_by_node.get(self.node, 0),
                "workers": len(self.workers.workers) if self.workers else 0}

    async def _op_hosts(self, _: dict[str, Any]) -> Any:
        return self._hosts_view()

    def _hosts_view(self) -> dict[str, Any]:
        """Every agent's last report (etcd: the live ones), this one's fresh, each marked
        current or not (agent/cluster.py); the admin port serves it as /api/hosts."""
        assert self.registry and self.report
        return cluster.hosts_view(self.registry, self.report.current())

    async def _op_ping(self, _: dict[str, Any]) -> Any:
        return {"version": __version__, "pid": os.getpid(), "ready": self.ready}

    async def _settled(self) -> None:
        """Apply a change now, so the caller's next connection already sees it."""
        self._dirty.clear()
        await self._reconcile()

    @staticmethod
    def _int(args: dict[str, Any], key: str) -> int:
        try:
            return int(args[key])
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{key} must be a number", f"pass a valid {key}") from None

    async def _op_enroll(self, args: dict[str, Any]) -> Any:
        assert self.enrollments
        e = await self.enrollments.enroll(self._int(args, "pid"), str(args.get("service", "")))
        await self._settled()
        return {"pid": e.pid, "service": e.service,
                "cgroup": str(self.enrollments.service_cgroup(e.service)),
                "endpoints": sorted(str(p) for p in e.ports)}

    async def _op_unenroll(self, args: dict[str, Any]) -> Any:
        assert self.enrollments
        e = await self.enrollments.unenroll(self._int(args, "pid"))
        await self._settled()
        return {"pid": e.pid, "service": e.service}

    async def _op_service_add(self, args: dict[str, Any]) -> Any:
        """`service add`: the flags are a partial Service spec, merged in the registry over
        the stored version (compare-and-swap), then the static endpoints."""
        assert self.registry
        name = str(args.get("name", ""))
        eps = [HostPort.parse(str(e)) for e in args.get("endpoints", [])]
        patch = args.get("patch") or {}
        if not isinstance(patch, dict):
            raise UsageError("service.add: patch must be an object", "upgrade the CLI")
        rec = await patch_service(self.registry, name, patch)
        if eps:
            weight = self._int(args, "weight") if args.get("weight") is not None else 1
            await self.registry.add_endpoints(
                name, [EndpointRecord(a, "static", None, self.cfg.node_name, self.cfg.zone,
                                      weight) for a in eps])
        await self._settled()
        return self._describe_service(self.registry.services()[rec.name], {})

    async def _op_service_remove(self, args: dict[str, Any]) -> Any:
        assert self.registry
        name = str(args.get("name", ""))
        eps = [HostPort.parse(str(e)) for e in args.get("endpoints", [])]
        if eps:
            rec = self.registry.services().get(name)
            known = {e.addr for e in rec.endpoints} if rec else set()
            if missing := [str(a) for a in eps if a not in known]:
                raise UsageError(f"service {name!r} has no endpoint {', '.join(missing)}",
                                 "see its endpoints: meshnode status")
            await self.registry.remove_endpoints(name, eps)
        else:
            await self.registry.apply([], [Delete("Service", name)])
        await self._settled()
        return {"removed": name, "endpoints": [str(a) for a in eps]}

    def _describe_service(self, rec: ServiceRecord, counters: dict[str, Any]) -> dict[str, Any]:
        per_ep: dict[str, dict[str, Any]] = counters.get("endpoints", {})
        return {
            **rec.settings_json(),
            "counters": {k: v for k, v in counters.items() if k != "endpoints"},
            "endpoints": [
                {**e.to_json(), "health": self.health.describe(rec.name, e.addr),
                 "proxy": per_ep.get(str(e.addr), {})}
                for e in sorted(rec.endpoints, key=lambda e: e.addr)],
        }

    @staticmethod
    def _window(args: dict[str, Any]) -> float:
        try:
            window = float(args.get("window", 60))
        except (TypeError, ValueError):
            window = -1.0
        if not 0 < window <= 600:
            raise UsageError(f"invalid window {args.get('window')!r}",
                             "use --window SECONDS, up to 600 (10 minutes are kept)")
        return window

    async def _op_stat(self, args: dict[str, Any]) -> Any:
        service = args.get("service")
        return await self.telemetry.stat(self._window(args),
                                         None if service is None else str(service))

    async def _op_top(self, args: dict[str, Any]) -> Any:
        return await self.telemetry.top(self._window(args), self._int(args, "limit"))

    async def _op_tap(self, args: dict[str, Any]) -> Any:
        def opt(key: str) -> str | None:
            v = args.get(key)
            return None if v is None else str(v)

        return self.telemetry.open_tap(str(args.get("service") or "*"), opt("src"), opt("dst"),
                                       bool(args.get("failed_only")))

    async def _op_explain(self, args: dict[str, Any]) -> Any:
        from meshnode.agent.explain import ExplainInputs, ejections, explain

        assert self.registry and self.capture and self.enrollments
        services = self.registry.services()
        dns = self.names.server.port if self.names and self.names.redirecting else None
        # ejections: from the same monotonic sums as status, stat and /metrics
        totals = (await self.telemetry.sample()).by_service() if self.ready else {}
        inputs = ExplainInputs(
            services=services, pushed=self.compiler.pushed, ready=self.ready,
            capture=compiler.capture_state(services, self.ready), backend=self.capture.name,
            capture_reason=self.capture_reason, outbound_port=self.cfg.outbound_port,
            dns_port=dns, dns_suffix=self.cfg.dns_suffix, node=self.cfg.node_name,
            zone=self.cfg.zone, cgroup_mount=self.mount, root_cgroup=self.root_cgroup,
            enrollments=self.enrollments.describe(), health=self.health,
            ejected_for=ejections(totals))
        return explain(inputs, self._int(args, "pid"), str(args.get("dest", "")))

    async def _op_status(self, _: dict[str, Any]) -> Any:
        assert self.registry and self.workers and self.enrollments and self.capture
        # the telemetry's sums, as `stat` and /metrics read them: after a worker restart the
        # counters carry on from where they were instead of falling back
        totals = await self.telemetry.sample()
        per_service = totals.by_service()
        try:
            kernel = await asyncio.to_thread(self.capture.stats)
        except MeshnodeError as exc:
            kernel = {"error": str(exc)}  # type: ignore[dict-item]
        return {
            "instance": self.cfg.instance,
            "node": self.cfg.node_name,
            "zone": self.cfg.zone,
            "version": __version__,
            "pid": os.getpid(),
            "ready": self.ready,
            "ready_after_s": round(self.ready_after, 3),
            "capture": {"backend": self.capture.name, "reason": self.capture_reason,
                        "kernel": kernel},
            "registry": {**self.registry.describe(),
                         "applied_revision": self.report.applied_revision if self.report else 0},
            "dns": self.names.describe() if self.names else None,
            "telemetry": self.telemetry.describe(),
            "cgroup": str(self.root_cgroup),
            "workers": self.workers.describe(),
            "proxy": dict(totals.values),
            "services": [self._describe_service(rec, per_service.get(name, {}))
                         for name, rec in sorted(self.registry.services().items())],
            "enrolled": self.enrollments.describe(),
        }


async def _main(cfg: AgentConfig) -> None:
    await HostAgent(cfg).run()


def run_agent(cfg: AgentConfig) -> None:
    """Entry point for `meshnode agent`: stdlib asyncio (netlink work needs it, not uvloop)."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(cfg))
