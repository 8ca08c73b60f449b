"""HostAgent: the one privileged process per host (or per test namespace).

Owns the lifecycle and the reconcile: the kernel state (cgroups, capture, all recorded in a
ledger), the registry, enrollment, the proxy workers, health sharing and the control socket,
whose operations (api.py, resources_api.py, status.py) get the running collaborators, not
this object.

Two ways to stop, on purpose (DESIGN.md, restart model):
- a restart (SIGTERM, SIGINT, a crash, `systemctl restart`, SIGHUP's re-exec) leaves the data
  plane serving: workers, capture, enrollments, this node's registry entries. The next agent
  adopts them (the ledger, the workers in the proxy cgroup, the pinned maps, the etcd lease),
  checks them against the registry and carries on; code of another build is replaced without
  a gap (workers one at a time, BPF programs atomically);
- a removal (`meshnode uninstall`) fails open first (capture off: connections go to their
  original destinations), then drains the workers, hands enrolled processes back to their old
  cgroups and removes everything the ledger lists.
A first start that fails is unwound whole; a failed restart leaves what serves in place.

Every stop is bounded, whatever the registry or a collaborator does: each step runs within its
own deadline (a step that does not finish is named in one warning and left behind: the data
plane is not this process's to lose, and the next agent adopts whatever was left); systemd
hears a heartbeat throughout; a reload whose leftovers will not end re-executes regardless.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import time
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from meshnode import __version__
from meshnode.agent import systemd
from meshnode.agent.api import ControlApi
from meshnode.agent.control import ControlServer
from meshnode.agent.enrollment import EnrollmentManager
from meshnode.agent.gateway import GatewayListeners
from meshnode.agent.identity import IdentityClient
from meshnode.agent.kernel_path import KernelPath
from meshnode.agent.mesh_security import HELD_INBOUND, MeshSecurity, bind_inbound
from meshnode.agent.names import MeshNames
from meshnode.agent.observe import Telemetry
from meshnode.agent.parts import Parts
from meshnode.agent.report import HostReport
from meshnode.agent.requeue import reconcile_forever
from meshnode.agent.workers import WorkerPool
from meshnode.capture import CaptureBackend, CaptureContext, undo_functions
from meshnode.config import AgentConfig
from meshnode.discovery import catalog
from meshnode.discovery.factory import open_registry
from meshnode.discovery.health import HealthMonitor
from meshnode.discovery.registry import EndpointRecord, Registry, ServiceRecord
from meshnode.errors import AccessError, ConflictError, MeshnodeError
from meshnode.host import cgroup, process
from meshnode.host.ledger import Ledger, UndoFn
from meshnode.host.netns import enter_netns
from meshnode.host.statefile import write_json
from meshnode.model import CaptureState
from meshnode.policy import compiler
from meshnode.wire import GATEWAY_FDS_SOCKET, Retain

log = logging.getLogger(__name__)

# A stop's bounds, in seconds: each step (the identity client, the host report, ...) gets
# STEP_DEADLINE; leaving the registry REGISTRY_DEADLINE (etcd: a few calls in a row, each
# within the session's request timeout); in a removal, taking capture off KERNEL_DEADLINE (the
# ledger's undo must not race a removal still running) and draining the workers their grace
# on top. What still runs on the loop afterwards gets STRAGGLERS_DEADLINE to end once
# cancelled. systemd hears a heartbeat for as long as all that can take (STOP_BOUND, + grace).
STEP_DEADLINE = 5.0
REGISTRY_DEADLINE = 10.0
KERNEL_DEADLINE = 30.0
STRAGGLERS_DEADLINE = 3.0
STOP_BOUND = 9 * STEP_DEADLINE + REGISTRY_DEADLINE + KERNEL_DEADLINE + STRAGGLERS_DEADLINE


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
        self.kernel_path = KernelPath()  # which services the kernel balances, and over what
        self._feed = 0  # the registry change feed's position the compiler has read to
        self._synced: CaptureState | None = None  # the state the kernel last took
        self._reconcile_lock = asyncio.Lock()
        self._reconcile_started_at = 0.0
        self._dirty = asyncio.Event()
        self.health = HealthMonitor(on_change=self._health_changed, node=cfg.node_name)
        self._background: set[asyncio.Task[None]] = set()
        # the read-only catalog on the admin port (/v1/catalog) follows registry and health
        self.catalog = catalog.Catalog(
            lambda: self.registry.services() if self.registry else {}, self.health.healthy)
        self.telemetry = Telemetry(cfg)
        self._stop = asyncio.Event()
        self._stopping = False
        self.remove_on_stop = False  # set by `meshnode uninstall`: a removal, not a restart
        self.reload = False  # SIGHUP: re-exec in place once detached
        self.adopting = False  # an earlier agent's state was found at start
        self._tasks: list[asyncio.Task[None]] = []
        self._lock_fd: int | None = None
        self.report: HostReport | None = None
        self.identity: IdentityClient | None = None
        self.security: MeshSecurity | None = None
        self.ca: Any = None  # the CA service, on the host that holds the mesh CA
        self.gateway: GatewayListeners | None = None  # this host's ingress listeners

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

    async def start(self) -> None:
        self.started_at = time.monotonic()
        if not process.is_root():
            raise AccessError("meshnode agent must run as root (it loads kernel rules)")
        if self.cfg.netns:
            enter_netns(self.cfg.netns)
        self._take_lock()
        # what `meshnode uninstall` starts with when no agent runs (same registry, netns...)
        write_json(self.state / "agent-config.json", self.cfg.to_argv())
        self.adopting = bool(self.ledger.entries())
        if self.adopting:
            log.info("found an earlier agent's state (%d kernel objects): adopting it",
                     len(self.ledger.entries()))
        try:
            await self._start()
        except BaseException:
            # a first start is unwound whole; a restart leaves what serves in place
            await self.stop(remove=not self.adopting)
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
        await self._start_identity()
        ctx = CaptureContext(self.cfg.instance, self.mount, apps, proxy, self.cfg.pin_path,
                             self.cfg.outbound_port, self.cfg.proxy_mark, self.ledger)
        choice = await asyncio.to_thread(auto.adopt_or_install, ctx, self.cfg.capture)
        self.capture, self.capture_reason = choice.backend, choice.reason
        log.info("capture: %s", self.capture_reason)
        log_file = self.cfg.access_log_path
        if log_file not in ("", "-"):
            Path(log_file).parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.workers = WorkerPool(
            self.cfg, proxy,
            # an adopted worker also drops the services deleted while no agent ran (Retain)
            lambda: [*compiler.resets(self.compiler.pushed),
                     Retain(tuple(self.compiler.pushed)), *self.telemetry.initial_messages(),
                     *(self.security.all() if self.security else ()),
                     *(self.gateway.initial() if self.gateway else ())],
            self._workers_changed, self.telemetry.on_event)
        workers = self.workers
        self.gateway = GatewayListeners(self.registry, self.node, lambda: workers.held,
                                        self.cfg.run_dir / GATEWAY_FDS_SOCKET, self._dirty.set)
        self._feed, _ = self.registry.changes(0)
        self.compiler.run(self.registry.services(), self.health.healthy,
                          on_changed=self.health.update)
        await self.workers.adopt()  # the workers an earlier agent left serving, if any
        # names: the DNS server first (on the sockets the adopted workers kept, or new ones),
        # then the redirect of enrolled processes' port 53 to it; every worker holds the
        # sockets too, so queries wait in them through the next restart
        self.names = MeshNames.for_agent(self.cfg, self.capture, self.registry,
                                         self.health.healthy)
        await self.names.start(self.workers.held)
        if not self.workers.held:
            self.workers.held = self.names.server.held()
        if self.cfg.inbound_port and HELD_INBOUND not in self.workers.held:
            self.workers.held[HELD_INBOUND] = bind_inbound(self.cfg.host_address,
                                                           self.cfg.inbound_port)
        await self.gateway.start()  # before the workers: they may ask it for listeners
        await self.workers.start()
        self.enrollments = EnrollmentManager(
            self.registry, apps, self.mount, self.state / "enrollments.json",
            self.cfg.host_address, self._protected_pids(), self.cfg.node_name, self.cfg.zone)
        await self.enrollments.restore()
        self.registry.subscribe(self._dirty.set)
        self.registry.subscribe(self.catalog.changed)
        assert self.identity is not None
        self.registry.subscribe(self.identity.changed)
        self.identity.start()

        parts = self._parts()
        self.telemetry.attach(parts)
        api = ControlApi(parts)
        self.control = ControlServer(self.cfg.control_socket, api.handlers())
        await self.control.start()
        await self.telemetry.start_admin(catalog=self.catalog, hosts=api.hosts_view)
        await self._reconcile()
        self.report.start()
        self._tasks = [asyncio.ensure_future(self._reconcile_loop()),
                       asyncio.ensure_future(self._scan_loop()),
                       asyncio.ensure_future(self.telemetry.run()),
                       asyncio.ensure_future(self._upgrade_workers())]

    async def _start_identity(self) -> None:
        """The CA service (on the host holding the CA) and this host's identity client; the
        workers' security messages follow both."""
        assert self.registry is not None
        from meshnode.agent.ca_service import CaService  # the CA code loads only here

        ca_dir = self.state / "ca"
        if (ca_dir / "ca.json").exists():
            self.ca = CaService(self.registry, ca_dir, self.node)
            await self.ca.start()
        self.identity = IdentityClient(
            self.cfg, self.node, self.registry,
            self._identities,
            self._identity_changed, self.ca)
        self.identity.load()
        self.security = MeshSecurity(self.registry, self.identity.message, self.node,
                                     self.cfg.workers)

    def _identities(self) -> set[str]:
        """The services this host takes workload identities for: those enrolled here, and
        those its gateways call into the mesh as."""
        return {*(self.enrollments.services() if self.enrollments else ()),
                *(self.gateway.services() if self.gateway else ())}

    async def ca_started(self, ca: Any) -> None:
        """`meshnode ca init` made this host the CA's: its identity comes from it now."""
        self.ca = ca
        if self.identity is not None:
            self.identity.local_ca = ca
            self.identity.changed()

    def _identity_changed(self) -> None:
        """New certificates, a new bundle or none left: workers and the host report follow."""
        self._dirty.set()
        if self.report is not None:
            self.report.changed()

    async def _upgrade_workers(self) -> None:
        """Workers adopted from another build are replaced one at a time, once this agent
        serves (the new ones take the same listening socket; the old ones drain)."""
        assert self.workers
        replaced = await self.workers.upgrade()
        if replaced:
            await self._workers_changed()

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
            self._reconcile_started_at = time.monotonic()
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
            pushed = self.identity.generation if self.identity else 0
            if self.security is not None:
                for msg in self.security.changes():
                    self.workers.send_all(msg)
            if self.gateway is not None:
                before = self.gateway.services()
                gateway = self.gateway.reconcile()
                if gateway is not None:
                    self.workers.send_all(gateway)
                if self.gateway.services() != before and self.identity is not None:
                    self.identity.changed()  # a gateway's identity to ask for (or drop)
            ready = await self.workers.barrier()
            if ready and self.identity is not None:
                self.identity.workers_have = pushed  # status says when workers present it
            resources = self.registry.resources()
            kernel = self.kernel_path
            plan = kernel.plan(services, self.compiler.pushed, {*compiled.changed, *dirty},
                               resources, self.node, self.cfg.zone, self.capture.name == "ebpf")
            state = kernel.while_down(self.compiler.capture_state(ready, self.compiler.inbound(
                self.node, compiler.mesh_spec(resources)), plan), ready, bool(self.workers.alive))
            if state is not self._synced:  # the same object: nothing the kernel holds changed
                await asyncio.to_thread(self.capture.sync, state)
                self._synced = state
            kernel.take_queued(state, self.capture, self.workers.listener,
                               bool(self.workers.alive))
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
    async def stop(self, remove: bool) -> None:
        """A removal (`remove`): fail open, drain, remove every recorded kernel object. A
        restart: leave the data plane serving for the next agent. Each step is bounded
        (`_step`): a stop never waits on a dead registry or a stuck collaborator."""
        if not remove:
            await self._detach()
            return
        self._stopping = True
        await self._step("the agent's background tasks", self._end_tasks())
        # 1. DNS redirect off, then capture off: new connections go to their original
        #    destinations and queries to the resolvers they asked
        if self.names is not None:
            await self._step("the DNS server", self.names.stop())
        if self.capture is not None:
            await self._step("removing capture", asyncio.to_thread(self.capture.remove),
                             KERNEL_DEADLINE)
        # 2. no new control requests, no more scrapes, no more certificates
        if self.control is not None:
            await self._step("the control socket", self.control.stop())
        await self._stop_identity()
        if self.gateway is not None:
            await self._step("the gateway descriptors socket", self.gateway.stop())
        await self._step("the admin port", self.telemetry.stop_admin())
        self.telemetry.close()  # no more samples: the kernel-path maps' fds go
        await self._step("the health checks", self.health.close())
        await self._step("connections taken from the proxy's queue", self.kernel_path.close())
        # 3. drain the proxy: established connections finish within the grace period
        if self.workers is not None:
            await self._step("draining the workers", self.workers.stop(),
                             STEP_DEADLINE + self.cfg.drain_grace)
        # 4. enrolled processes go back to the cgroups they came from (records are kept)
        if self.enrollments is not None:
            self.enrollments.release_all()
        # 5. this node's endpoints and report leave the shared registry (with etcd: the lease
        #    is revoked)
        if self.report is not None:
            await self._step("the host report", self.report.stop())
        if self.registry is not None:
            await self._step("closing the registry", self.registry.close(),
                             REGISTRY_DEADLINE)
        # 6. everything else the ledger lists (cgroups, pins, chains a failed remove left)
        for failure in self.ledger.undo_all(self._undo()):
            log.error("stop: %s", failure)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _detach(self) -> None:
        """Stop this process, not the mesh: workers keep serving (and reconnect to the next
        agent), capture and enrollments stay, this node's registry entries stay (etcd: the
        lease is left to the next agent), the ledger keeps listing every kernel object."""
        self._stopping = True
        await self._step("the agent's background tasks", self._end_tasks())
        # DNS: the redirect stays; the workers hold the sockets, queries wait in them
        if self.names is not None:
            await self._step("the DNS server", self.names.detach())
        if self.control is not None:
            await self._step("the control socket", self.control.stop())
        await self._stop_identity()
        if self.gateway is not None:
            await self._step("the gateway descriptors socket", self.gateway.stop())
        await self._step("the admin port", self.telemetry.stop_admin())
        self.telemetry.close()  # no more samples: the kernel-path maps' fds go
        await self._step("the health checks", self.health.close())
        await self._step("connections taken from the proxy's queue", self.kernel_path.close())
        if self.workers is not None:
            self.workers.detach()
        if self.report is not None:
            await self._step("the host report", self.report.stop())
        if self.registry is not None:
            await self._step("detaching from the registry", self.registry.detach(),
                             REGISTRY_DEADLINE)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _stop_identity(self) -> None:
        if self.identity is not None:
            await self._step("the identity client", self.identity.stop())
        if self.ca is not None:
            await self._step("the CA service", self.ca.stop())

    async def _end_tasks(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _step(self, name: str, work: Awaitable[Any],
                    deadline: float | None = None) -> None:
        """Run one step of a stop, for at most `deadline` seconds; log what it raised and go on.

        The step runs as a task of its own and is waited for with asyncio.wait, not
        asyncio.timeout: a timeout acts by cancelling the waiting task, which a step that
        swallows cancellations defeats (one that cancels a task and awaits it, when that task
        ignored the cancel: asyncio.wait_for on Python 3.11 does, when its wait completes as
        the cancellation lands). A step that does not finish is named and left: it is
        cancelled once more, and `end_stragglers` deals with it."""
        deadline = STEP_DEADLINE if deadline is None else deadline
        task = asyncio.ensure_future(work)
        try:
            done, _ = await asyncio.wait({task}, timeout=deadline)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            log.warning("stopping: %s did not finish within %g s (waiting in %s); going on "
                        "without it", name, deadline, waiting_in(task))
            task.cancel()
            return
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, MeshnodeError):
            log.error("stopping: %s: %s", name, exc)
        elif exc is not None:
            log.error("stopping: %s failed", name, exc_info=exc)

    async def end_stragglers(self, keep: Iterable[asyncio.Task[Any]] = ()) -> list[str]:
        """Once stopped: cancel whatever else still runs on the loop (a step left behind,
        background work) and give it STRAGGLERS_DEADLINE to end, cancelling again what ignored
        the first cancellation. Returns what still runs then (asyncio.run would wait for it
        without a bound)."""
        me, kept = asyncio.current_task(), set(keep)
        deadline = time.monotonic() + STRAGGLERS_DEADLINE

        def running() -> list[asyncio.Task[Any]]:
            return [t for t in asyncio.all_tasks() if t is not me and t not in kept
                    and not t.done()]

        left, wait = running(), 1.0  # the first cancellation gets time to unwind
        while left and (rest := deadline - time.monotonic()) > 0:
            for t in left:
                t.cancel()
            await asyncio.wait(left, timeout=min(wait, rest))
            left, wait = running(), 0.2
        return [f"{t.get_name()} (waiting in {waiting_in(t)})" for t in left]

    def remove_leftovers(self) -> None:
        """The last resort of a removal: stop whatever serves in the proxy cgroup, undo every
        ledger entry (newest first: capture before the cgroups)."""
        proxy = cgroup.cgroup2_mount() / self.cfg.cgroup_name / "proxy"
        with contextlib.suppress(OSError):
            for pid in (proxy / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        for failure in self.ledger.undo_all(self._undo()):
            log.error("removal: %s", failure)

    def uninstall(self) -> None:
        """`meshnode uninstall`: stop with a removal."""
        self.remove_on_stop = True
        self._stop.set()

    def _reload(self) -> None:
        """SIGHUP: detach, then re-execute in place. Once a stop began it is not turned into
        a reload."""
        if self._stop.is_set():
            return
        self.reload = True
        self._stop.set()

    def _terminate(self) -> None:
        """SIGTERM, SIGINT: stop; during a reload's detach too (it then exits instead of
        re-executing: `systemctl stop` must not be lost to a reload in progress)."""
        self.reload = False
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._terminate)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        await self.start()
        assert self.workers is not None
        log.info("meshnode agent ready in %.2fs (instance %s, capture %s, %d workers%s)",
                 self.ready_after, self.cfg.instance, self.capture.name if self.capture else "-",
                 len(self.workers.workers),
                 f", {self.workers.adopted} adopted" if self.workers.adopted else "")
        systemd.notify("READY=1", f"STATUS=serving ({self.capture_reason})")
        watchdog = asyncio.ensure_future(systemd.watchdog(self._healthy))
        try:
            await self._stop.wait()
        finally:
            watchdog.cancel()
            remove = self.remove_on_stop
            systemd.notify("RELOADING=1" if self.reload else "STOPPING=1",
                           "STATUS=" + ("removing meshnode from this host" if remove else
                                        "restarting: the data plane keeps serving"))
            # systemd hears a heartbeat until the process exits or re-executes
            heartbeat = asyncio.ensure_future(systemd.while_stopping(
                STOP_BOUND + (self.cfg.drain_grace if remove else 0.0)))
            log.info("%s", "removing: failing open, draining, removing kernel state" if remove
                     else "stopping; workers and capture keep serving for the next agent")
            await self.stop(remove=remove)
            stuck = await self.end_stragglers(keep={heartbeat})
            if stuck:
                log.warning("stopping: still running after %g s: %s", STRAGGLERS_DEADLINE,
                            "; ".join(stuck))
                if self.reload:  # asyncio.run would wait for them: re-execute regardless
                    systemd.reexec()
            heartbeat.cancel()

    def _healthy(self) -> bool:
        """The watchdog's heartbeat: the loop runs (this is called on it) and a reconcile
        is not wedged (one that holds the lock for a whole watchdog period is)."""
        return not self._reconcile_lock.locked() or self._reconcile_started_at > (
            time.monotonic() - systemd.WEDGED_AFTER)

    # -- what the control socket and the report read ------------------------------------
    def _report_state(self) -> dict[str, Any]:
        """What this host reports; costs nothing per service (published on every apply)."""
        return {"node": self.node, "zone": self.cfg.zone, "version": __version__,
                "instance": self.cfg.instance, "ready": self.ready,
                "capture": self.capture.name if self.capture else None,
                "services": self.compiler.services,
                "local_endpoints": self.compiler.endpoints_by_node.get(self.node, 0),
                "workers": len(self.workers.workers) if self.workers else 0,
                # the CA issues workload identities only for services enrolled here (a
                # gateway's service counts: the gateway calls into the mesh as it)
                "enrolled": sorted(self._identities()),
                # peers dial this host's mTLS listener only while it has an identity
                "inbound": (f"{self.cfg.host_address}:{self.cfg.inbound_port}"
                            if self.identity and self.identity.ready and self.cfg.inbound_port
                            else ""),
                "identity": self.identity.node_identity() if self.identity else ""}

    def _parts(self) -> Parts:
        """The collaborators the control operations may use, once all of them run."""
        assert self.registry and self.enrollments and self.workers and self.capture
        assert self.names and self.report and self.identity
        return Parts(cfg=self.cfg, node=self.node, registry=self.registry,
                     enrollments=self.enrollments, workers=self.workers, capture=self.capture,
                     capture_reason=self.capture_reason, names=self.names,
                     telemetry=self.telemetry, health=self.health, compiler=self.compiler,
                     report=self.report, mount=self.mount, root_cgroup=self.root_cgroup,
                     ready=lambda: self.ready, ready_after=lambda: self.ready_after,
                     settle=self._settled, uninstall=self.uninstall, identity=self.identity,
                     planner=self.kernel_path.planner, synced=lambda: self._synced,
                     ca=lambda: self.ca, ca_started=self.ca_started, gateway=self.gateway)

    async def _settled(self) -> None:
        """Apply a change now, so the caller's next connection already sees it."""
        self._dirty.clear()
        await self._reconcile()


def waiting_in(task: asyncio.Task[Any]) -> str:
    """Where a task waits, for a log: the innermost of its coroutines outside asyncio itself
    (file, line, function)."""
    where, obj = "?", cast(Any, task.get_coro())
    while obj is not None:
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "ag_frame", None)
        if frame is None:
            break
        path = Path(frame.f_code.co_filename)
        if path.parent.name != "asyncio":
            where = f"{path.name}:{frame.f_lineno} {frame.f_code.co_name}"
        obj = getattr(obj, "cr_await", None) or getattr(obj, "ag_await", None)
    return where
