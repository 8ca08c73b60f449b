"""Enrollment: put running processes into the mesh without restarting them.

Enrolling moves a process (and its current descendants; later children follow by themselves)
into its service's cgroup, which is what capture keys on, and registers the TCP ports the tree
listens on as the service's endpoints, rescanning as ports open and close. A pidfd tells the
agent the moment the process exits; the start time guards against PID reuse across restarts.
Records persist, so a restarted agent re-enrolls the processes that are still the same ones.
An enrollment's labels (`--label version=v2`) go on every endpoint it registers: the subsets a
Route's backends name; enrolling the same process again with other labels relabels them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from meshnode.agent import attest
from meshnode.discovery.registry import EndpointRecord, Registry, patch_service
from meshnode.errors import AccessError, ConflictError, MeshnodeError, NotFoundError, UsageError
from meshnode.host import cgroup, process
from meshnode.host.statefile import write_json
from meshnode.model import HostPort, Labels, service_name
from meshnode.policy.labels import format_labels, labels_from, labels_json

log = logging.getLogger(__name__)


@dataclass
class Enrollment:
    pid: int
    start_time: float
    service: str
    origin_cgroup: str  # where it came from: unenroll and agent stop move it back there
    ports: set[HostPort] = field(default_factory=set)
    labels: Labels = ()
    # Whether this agent has registered `ports` itself. Not saved: after a restart the old
    # agent's registrations may be gone (lease revoked or expired), so the first scan of a
    # re-adopted process registers all its ports again, under the new agent's lease.
    registered: bool = field(default=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ports"] = sorted(str(p) for p in self.ports)
        d["labels"] = labels_json(self.labels)
        del d["registered"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Enrollment:
        # (records written before labels have none)
        return cls(int(d["pid"]), float(d["start_time"]), str(d["service"]),
                   str(d["origin_cgroup"]), {HostPort.parse(p) for p in d.get("ports", [])},
                   labels_from(d.get("labels") or {}))


class EnrollmentManager:
    def __init__(self, registry: Registry, apps_cgroup: Path, mount: Path,
                 state_file: Path, host_address: str, protected_pids: set[int],
                 node: str = "", zone: str = "") -> None:
        self.registry = registry
        self.node = node
        self.zone = zone
        self.apps_cgroup = apps_cgroup
        self.mount = mount
        self.state_file = state_file
        self.host_address = IPv4Address(host_address)
        self.protected = protected_pids  # the agent and its workers: never enrollable
        self.by_pid: dict[int, Enrollment] = {}
        self._pidfds: dict[int, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- persistence ----------------------------------------------------------------------
    def _save(self) -> None:
        # durable: a restarted agent re-enrolls from this file, and a torn one loses them all
        write_json(self.state_file, [e.to_json() for e in self.by_pid.values()])

    def _load(self) -> list[Enrollment]:
        try:
            return [Enrollment.from_json(d) for d in json.loads(self.state_file.read_text())]
        except FileNotFoundError:
            return []
        # garbage of any shape (a number, a wrong type, endless nesting, a bad address) must
        # not keep the agent from starting: the file is ignored, loudly
        except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError,
                RecursionError, MeshnodeError) as exc:
            log.warning("enrollment file %s unreadable (%s); ignoring it", self.state_file, exc)
            return []

    def services(self) -> set[str]:
        """The services with a process enrolled on this host now."""
        return {e.service for e in self.by_pid.values()}

    def service_cgroup(self, service: str) -> Path:
        return self.apps_cgroup / service

    # -- operations -----------------------------------------------------------------------
    async def restore(self) -> None:
        """After a (re)start: re-enroll recorded processes that still run; forget the rest and
        their endpoints (a reused PID is another process: its start time differs)."""
        for e in self._load():
            if process.ProcessId(e.pid, e.start_time).alive():
                try:
                    self._attach(e)
                    continue
                except Exception as exc:
                    log.warning("cannot re-enroll PID %d: %s", e.pid, exc)
            log.info("enrolled PID %d (%s) is gone; removing its endpoints", e.pid, e.service)
            await self._drop_endpoints(e, e.ports)
        self._save()

    async def enroll(self, pid: int, service: str, labels: Labels = ()) -> Enrollment:
        service_name(service)
        labels = labels_from(labels)
        if pid in self.protected:
            raise UsageError(f"PID {pid} is meshnode itself", "enroll an application process")
        pid_id = process.identify(pid)
        if not process.same_netns(pid):
            raise UsageError(f"PID {pid} is in another network namespace than this agent",
                             "start an agent in that namespace (meshnode agent --netns NAME)")
        current = self.by_pid.get(pid)
        if current is not None:
            if current.service == service and current.start_time == pid_id.start_time:
                if current.labels != labels:
                    # relabel: the next scan registers every port again, with these labels
                    current.labels, current.registered = labels, False
                    self._save()
                    await self.scan_one(current)
                    log.info("PID %d (%s) relabelled %s", pid, service,
                             format_labels(labels) or "(none)")
                return current
            if current.start_time == pid_id.start_time:
                raise ConflictError(f"PID {pid} is already enrolled in service {current.service!r}",
                                    f"unenroll it first: meshnode unenroll {pid}")
            await self._forget(current)  # the old process is gone and its PID was reused
        rec = self.registry.services().get(service)
        if rec is None:
            await patch_service(self.registry, service, {})
        else:
            selector = rec.spec.policy.identity
            if not attest.node_allowed(selector, self.node):
                raise AccessError(f"service {service} may not run on host {self.node}",
                                  f"its spec.identity.nodes admits only "
                                  f"{', '.join(selector.nodes)}")
            await asyncio.to_thread(attest.attest, pid, service, selector)
        origin = cgroup.process_cgroup(pid, self.mount)
        if origin.is_relative_to(self.apps_cgroup):
            origin = self.mount
        e = Enrollment(pid, pid_id.start_time, service, str(origin), labels=labels)
        self._attach(e)
        self._save()
        await self.scan_one(e)
        log.info("enrolled PID %d into %s", pid, service)
        return e

    def _attach(self, e: Enrollment) -> None:
        group = self.service_cgroup(e.service)
        cgroup.create(group)
        for p in process.tree(e.pid):
            with contextlib.suppress(NotFoundError):
                cgroup.move(p.pid, group)
        fd = process.pidfd(e.pid)
        self.by_pid[e.pid] = e
        self._pidfds[e.pid] = fd
        with contextlib.suppress(RuntimeError):  # no running loop (sync callers, tests)
            asyncio.get_running_loop().add_reader(fd, self._exited, e.pid)

    def _exited(self, pid: int) -> None:
        """pidfd readable: the process is gone. Its endpoints go at once, not at the next scan."""
        e = self.by_pid.get(pid)
        if e is not None:
            log.info("enrolled PID %d (%s) exited", pid, e.service)
            self._close_pidfd(pid)
            task = asyncio.ensure_future(self._forget_and_save(e))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _forget_and_save(self, e: Enrollment) -> None:
        await self._forget(e)
        self._save()

    def _close_pidfd(self, pid: int) -> None:
        fd = self._pidfds.pop(pid, None)
        if fd is not None:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    async def _forget(self, e: Enrollment) -> None:
        if self.by_pid.get(e.pid) is e:
            del self.by_pid[e.pid]
        self._close_pidfd(e.pid)
        await self._drop_endpoints(e, e.ports)

    async def _drop_endpoints(self, e: Enrollment, ports: set[HostPort]) -> None:
        if ports:
            await self.registry.remove_endpoints(e.service, ports)

    async def unenroll(self, pid: int) -> Enrollment:
        e = self.by_pid.get(pid)
        if e is None:
            raise NotFoundError(f"PID {pid} is not enrolled",
                                "see enrolled processes: meshnode status")
        self._release(e)
        await self._forget(e)
        self._save()
        log.info("unenrolled PID %d from %s", pid, e.service)
        return e

    def _release(self, e: Enrollment) -> None:
        """Move the process tree back to where it came from (or the root if that is gone)."""
        origin = Path(e.origin_cgroup)
        target = origin if origin.is_dir() else self.mount
        for p in process.tree(e.pid):
            with contextlib.suppress(NotFoundError):
                try:
                    cgroup.move(p.pid, target)
                except Exception:
                    cgroup.move(p.pid, self.mount)

    def release_all(self) -> None:
        """Agent stop: hand every process back to its old cgroup; the records stay so the next
        agent re-enrolls them."""
        for e in list(self.by_pid.values()):
            self._release(e)
            self._close_pidfd(e.pid)
        self._save()

    async def scan_one(self, e: Enrollment, listeners: process.Listeners | None = None) -> None:
        if listeners is None:
            listeners = await asyncio.to_thread(process.tcp_listeners)
        ports = await asyncio.to_thread(process.listening, e.pid, self.host_address, listeners)
        if (ports == e.ports and e.registered) or self.by_pid.get(e.pid) is not e:
            return
        added = ports - e.ports if e.registered else ports
        removed = e.ports - ports
        if removed:
            await self.registry.remove_endpoints(e.service, removed)
        if added:
            try:
                await self.registry.add_endpoints(
                    e.service, [EndpointRecord(a, "process", e.pid, self.node, self.zone,
                                               labels=e.labels)
                                for a in added])
            except ConflictError as exc:
                log.warning("PID %d: %s", e.pid, exc)
                added = set()
        e.ports = (e.ports - removed) | added
        e.registered = True
        self._save()

    async def scan(self) -> None:
        if not self.by_pid:
            return
        listeners = await asyncio.to_thread(process.tcp_listeners)  # once for every process
        for e in list(self.by_pid.values()):
            if not process.ProcessId(e.pid, e.start_time).alive():
                await self._forget_and_save(e)
            else:
                await self.scan_one(e, listeners)

    def describe(self) -> list[dict[str, Any]]:
        return [{"pid": e.pid, "service": e.service,
                 "cgroup": str(self.service_cgroup(e.service)),
                 "endpoints": sorted(str(p) for p in e.ports),
                 "labels": labels_json(e.labels)} for e in self.by_pid.values()]
