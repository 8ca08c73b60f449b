"""Kernel-path connections as operators see them: the same golden figures as proxied ones.

A service on the kernel path (Service `datapath`) is balanced by the cgroup connect hook, with
no proxy to count its connections; the BPF programs keep per-CPU counter rows per (source
cgroup, service id, endpoint) in mn_kflow and a ring of closed connections in mn_klog
(meshnode.bpf.kflow reads both). This module turns them into what the workers' figures become:

- `KernelTally`: rows -> monotonic `Totals.kernel` pairs (connections opened, active, closed,
  bytes, failures, connect errors, and the duration and RTT sums) and per-endpoint
  KERNEL_FIELDS rows, named with the agent's cgroup -> service map and the registry's service
  ids. It adds each row's growth since the last read under the names known *now*, so every
  series only grows even when a row is evicted (LRU), recreated, or its source renamed;
  labels stay bounded (unknown cgroups are src "unknown", unregistered endpoints "other").
- `KernelTelemetry`: the agent's handle: opens the pins once they exist, polls the rows into
  the tally (each sample), and turns new ring records into access log lines in the proxied
  format plus `"path": "kernel"` (sampled by the access log's share, and at most
  LOG_LINES_PER_SECOND) and close events for `meshnode tap`.

Agent side: imports bpf.kflow (raw syscalls), never the proxy package; blocking calls are
meant to run in a thread (asyncio.to_thread).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meshnode.bpf.kflow import Addr4, FlowKey, FlowStats, KernelFlows, KlogRecord, LogBatch
from meshnode.counters import KERNEL_PATH, NOT_ESTABLISHED
from meshnode.errors import BpfError
from meshnode.policy.records import ServiceRecord
from meshnode.telemetry.aggregate import PairTotals, Totals

__all__ = ["LOG_LINES_PER_SECOND", "FlowNames", "KernelTally", "KernelTelemetry",
           "log_record"]

log = logging.getLogger(__name__)

CGROUP_MASK = 0xFFFFFFFF  # the programs keep the low 32 bits of a cgroup id
UNKNOWN = "unknown"  # a source cgroup or a service id the agent cannot name
OTHER_ENDPOINT = "other"  # an endpoint address the destination no longer registers
LOG_LINES_PER_SECOND = 500  # kernel-path access log lines at most (the ring holds 1024)
REOPEN_INTERVAL = 5.0  # seconds between attempts to open pins that were not there

Pair = tuple[str, str]
EndpointKey = tuple[str, str, str]  # (src, dst, endpoint)


class FlowNames:
    """How rows are named: cgroup id (low 32 bits) -> source service, service id -> name, and
    the destination's registered endpoints ("ip:port"). Reads the registry's view lazily, and
    only what the rows need (a mesh may hold 10 000 services; most samples have no kernel-path
    row): use it on the agent's loop, within one step (the view changes between awaits)."""

    def __init__(self, sources: Mapping[str, str],
                 services: Mapping[str, ServiceRecord]) -> None:
        """`sources`: the agent's cgroup inode (as a string) -> service map
        (Telemetry.refresh_sources); `services`: the registry's records by name."""
        self._sources_raw, self._services = sources, services
        self._sources: dict[int, str] | None = None
        self._names: dict[int, str] | None = None
        self._endpoints: dict[str, frozenset[str]] = {}

    def src(self, cgroup: int) -> str:
        if self._sources is None:
            self._sources = {int(k) & CGROUP_MASK: v for k, v in self._sources_raw.items()}
        return self._sources.get(cgroup & CGROUP_MASK, UNKNOWN)

    def dst(self, service: int) -> str:
        if self._names is None:
            self._names = {rec.id: name for name, rec in self._services.items()}
        return self._names.get(service, UNKNOWN)

    def endpoint(self, dst: str, addr: Addr4) -> str:
        known = self._endpoints.get(dst)
        if known is None:
            rec = self._services.get(dst)
            known = self._endpoints[dst] = frozenset(
                str(e.addr) for e in rec.endpoints) if rec is not None else frozenset()
        text = _addr(addr)
        return text if text in known else OTHER_ENDPOINT


def _addr(addr: Addr4) -> str:
    return f"{addr[0]}:{addr[1]}"


def _growth(now: FlowStats, prev: FlowStats | None) -> FlowStats:
    """What a row added since `prev`; all of it when the row is new or went backwards (it was
    evicted and made again between two reads)."""
    if prev is None:
        return now
    names = [f.name for f in fields(now)]
    if any(getattr(now, n) < getattr(prev, n) for n in names):
        return now
    return FlowStats(*(getattr(now, n) - getattr(prev, n) for n in names))


class KernelTally:
    """mn_kflow rows -> monotonic kernel-path totals (see the module docstring)."""

    def __init__(self) -> None:
        self._last: dict[FlowKey, FlowStats] = {}  # each row as last read
        self.pairs: dict[Pair, FlowStats] = {}  # cumulative
        self.endpoints: dict[EndpointKey, FlowStats] = {}  # cumulative
        self.active: dict[Pair, int] = {}  # open now
        self.endpoint_active: dict[EndpointKey, int] = {}

    def update(self, rows: Mapping[FlowKey, FlowStats], names: FlowNames) -> None:
        active: dict[Pair, int] = {}
        endpoint_active: dict[EndpointKey, int] = {}
        for key, now in rows.items():
            src, dst = names.src(key.cgroup), names.dst(key.service)
            ep = (src, dst, names.endpoint(dst, key.endpoint))
            grown = _growth(now, self._last.get(key))
            self.pairs[(src, dst)] = self.pairs.get((src, dst), FlowStats()) + grown
            self.endpoints[ep] = self.endpoints.get(ep, FlowStats()) + grown
            active[(src, dst)] = active.get((src, dst), 0) + now.active
            endpoint_active[ep] = endpoint_active.get(ep, 0) + now.active
        # Rows gone from the map (evicted) keep what they added; one that comes back starts
        # from zero again.
        self._last = dict(rows)
        self.active, self.endpoint_active = active, endpoint_active

    def add_to(self, totals: Totals) -> None:
        """Add the kernel path's figures to a sample of the workers' sums."""
        for (src, dst), s in self.pairs.items():
            p = PairTotals(src, dst, {
                "connections": s.connects, "active": self.active.get((src, dst), 0),
                "closed": s.closed, "bytes_up": s.bytes_sent, "bytes_down": s.bytes_received,
                "connect_errors": s.failed, "kernel_closed": s.closed,
                "duration_us": s.duration_us, "rtt_us": s.srtt_us},
                {NOT_ESTABLISHED: s.failed} if s.failed else {})
            totals.kernel_pair(src, dst).add(p)
        rows: dict[str, dict[tuple[str, ...], int]] = {
            "kernel_endpoint_connections": {}, "kernel_endpoint_failures": {},
            "kernel_endpoint_active": {}}
        for ep, s in self.endpoints.items():
            rows["kernel_endpoint_connections"][ep] = s.connects
            if s.failed:
                rows["kernel_endpoint_failures"][ep] = s.failed
            rows["kernel_endpoint_active"][ep] = self.endpoint_active.get(ep, 0)
        for name, values in rows.items():
            into = totals.labelled.setdefault(name, {})
            for labels, n in values.items():
                into[labels] = into.get(labels, 0) + n


# -- the access log ---------------------------------------------------------------------------

def _iso(epoch: float) -> str:
    """ISO 8601 UTC with milliseconds, as the proxied lines write them."""
    stamp = datetime.fromtimestamp(epoch, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def log_record(r: KlogRecord, names: FlowNames, wall_of: Callable[[int], float]) -> dict[str, Any]:
    """One closed kernel-path connection as an access log record: the proxied record's fields
    in its order (what the kernel cannot know is null: worker, client, identities, connect
    latency) plus `path` and the smoothed RTT. `wall_of`: CLOCK_MONOTONIC ns -> epoch s."""
    dst = names.dst(r.key.service)
    duration_ms = max(0, r.end_ns - r.start_ns) / 1e6
    return {
        "start": _iso(wall_of(r.start_ns)), "end": _iso(wall_of(r.end_ns)),
        "duration_ms": round(duration_ms, 3), "worker": None,
        "src": names.src(r.key.cgroup), "pid": r.pid or None, "client": None,
        "orig_dst": _addr(r.vip), "dst": dst, "src_identity": None, "dst_identity": None,
        "endpoint": _addr(r.key.endpoint), "connect_ms": None, "attempts": 1,
        "bytes_up": r.bytes_sent, "bytes_down": r.bytes_received,
        "outcome": "ok" if r.established else NOT_ESTABLISHED,
        "path": KERNEL_PATH, "rtt_ms": round(r.srtt_us / 1000, 3) if r.established else None,
    }


class _LineBudget:
    """A token bucket: at most `rate` lines a second, bursts up to one second's worth."""

    def __init__(self, rate: float, monotonic: Callable[[], float]) -> None:
        self.rate = rate
        self._monotonic = monotonic
        self._tokens = rate
        self._at = monotonic()

    def take(self) -> bool:
        now = self._monotonic()
        self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def append_lines(path: str, lines: list[str]) -> None:
    """Append whole lines in one write (O_APPEND: the workers append to the same file), opening
    the path each time: once a second at most, and a rotated file is followed for free."""
    data = "".join(line + "\n" for line in lines).encode()
    if path == "-":
        os.write(1, data)
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


class KernelTelemetry:
    """The agent's reader of kernel-path telemetry. `log_path` "": no access log (else a path
    or "-"), `log_sample` the share of connections logged (the access log's settings).

    The `read_*` and `write_log` calls block (run them in a thread); `update` and `records`
    name what was read (FlowNames: on the agent's loop)."""

    def __init__(self, pin_dir: Path, log_path: str = "", log_sample: float = 1.0,
                 opener: Callable[[Path], KernelFlows] = KernelFlows.open,
                 rng: random.Random | None = None,
                 monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 monotonic_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.pin_dir = pin_dir
        self.log_path, self.log_sample = log_path, log_sample
        self._opener = opener
        self._rng = rng or random.Random()
        self._monotonic, self._wall, self._monotonic_ns = monotonic, wall, monotonic_ns
        self._budget = _LineBudget(LOG_LINES_PER_SECOND, monotonic)
        self._reader: KernelFlows | None = None
        self._retry_at = 0.0
        self.tally = KernelTally()
        # access log records not written: overwritten in the ring before they were read,
        # over the line budget, or lost to a write error (`meshnode status`)
        self.missed = self.limited = self.dropped = 0

    def _open(self) -> KernelFlows | None:
        if self._reader is not None:
            return self._reader
        now = self._monotonic()
        if now < self._retry_at:
            return None
        try:
            self._reader = self._opener(self.pin_dir)
        except BpfError as exc:
            self._retry_at = now + REOPEN_INTERVAL
            if exc.errno != errno.ENOENT:  # ENOENT: programs without a kernel path (yet)
                log.warning("kernel-path telemetry unavailable: %s", exc)
            return None
        return self._reader

    def _failed(self, exc: BpfError) -> None:
        log.warning("reading kernel-path telemetry failed: %s (reopening the maps)", exc)
        self.close()

    # -- counters ----------------------------------------------------------------------------
    def read_rows(self) -> dict[FlowKey, FlowStats] | None:
        """The counter rows now; None when the maps cannot be read (yet)."""
        reader = self._open()
        if reader is None:
            return None
        try:
            return reader.rows()
        except BpfError as exc:
            self._failed(exc)
            return None

    def update(self, rows: Mapping[FlowKey, FlowStats] | None, names: FlowNames) -> None:
        if rows is not None:  # unreadable: the figures stay as they were
            self.tally.update(rows, names)

    def add_to(self, totals: Totals) -> None:
        self.tally.add_to(totals)

    # -- the access log ----------------------------------------------------------------------
    def read_log(self) -> LogBatch | None:
        """The ring's records since the last call (KernelFlows.new_records)."""
        reader = self._open()
        if reader is None:
            return None
        try:
            batch = reader.new_records()
        except BpfError as exc:
            self._failed(exc)
            return None
        self.missed += batch.missed
        return batch

    def records(self, batch: LogBatch | None,
                names: FlowNames) -> tuple[list[dict[str, Any]], list[str]]:
        """(a tap close event per record, the access log lines to write: the sampled share,
        within LOG_LINES_PER_SECOND)."""
        if batch is None:
            return [], []
        offset = self._wall() - self._monotonic_ns() / 1e9  # CLOCK_MONOTONIC -> epoch

        def wall_of(ns: int) -> float:
            return offset + ns / 1e9

        events, lines = [], []
        for r in batch.records:
            rec = log_record(r, names, wall_of)
            events.append({"event": "close", **rec})
            if not self.log_path or not (self.log_sample >= 1.0
                                         or self._rng.random() < self.log_sample):
                continue
            if not self._budget.take():
                self.limited += 1
                continue
            lines.append(json.dumps(rec, separators=(",", ":")))
        return events, lines

    def write_log(self, lines: list[str]) -> None:
        if not lines or not self.log_path:
            return
        try:
            append_lines(self.log_path, lines)
        except OSError as exc:
            self.dropped += len(lines)
            log.warning("access log %s: %s (%d kernel-path lines dropped)", self.log_path,
                        exc.strerror, len(lines))

    def describe(self) -> dict[str, Any]:
        return {"open": self._reader is not None, "log_missed": self.missed,
                "log_limited": self.limited, "log_dropped": self.dropped}

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
