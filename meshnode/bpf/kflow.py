"""Kernel-path telemetry as the BPF programs leave it (bpf/include/mn_maps.h): the per-CPU
(source cgroup, service, endpoint) counter rows of mn_kflow, and the mn_klog ring of closed
connections with its head, mn_klog_head.

Packing and unpacking are module functions on plain bytes, so unit tests check the byte layout
without a kernel; `KernelFlows` opens the agent's pins and reads them with raw bpf(2) calls
(meshnode.bpf.syscall). What the rows mean to operators (service names, monotonic totals, the
access log) is meshnode.telemetry.kernel_flows'. Imports no bcc, and nothing of meshnode's but
constants, errors and bpf.syscall (maps.py imports MAP_LAYOUTS from here).
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, fields
from ipaddress import IPv4Address
from pathlib import Path

from meshnode import constants
from meshnode.bpf import syscall

__all__ = ["FLOW_KEY_SIZE", "FLOW_STATS_SIZE", "KLOG_SIZE", "MAP_LAYOUTS", "FlowKey",
           "FlowStats", "KernelFlows", "KlogRecord", "LogBatch", "pack_flow_key",
           "pack_flow_stats", "pack_klog", "sum_flow_stats", "unpack_flow_key",
           "unpack_flow_stats", "unpack_klog"]

KFLOW_MAP = "mn_kflow"
KLOG_MAP = "mn_klog"
KLOG_HEAD_MAP = "mn_klog_head"

Addr4 = tuple[IPv4Address, int]  # (ip, port), as mn_addr4 holds them

# struct mn_flow_key { __u32 cgroup; __u32 service; struct mn_addr4 endpoint; }: the ids in
# host byte order (as C reads a __u32), the endpoint's ip and port in network order.
_FLOW_KEY = struct.Struct("=II4s2sxx")
# struct mn_flow_stats: eight __u64 (the last one padding).
_FLOW_STATS = struct.Struct("=7Qxxxxxxxx")
# struct mn_klog: seq, start_ns, end_ns; the flow key; the VIP (mn_addr4); bytes_sent,
# bytes_received; srtt_us, pid, established, pad (__u32 each). No implicit padding: every
# field sits at a multiple of its size.
_KLOG = struct.Struct("=QQQ16s4s2sxxQQIIIxxxx")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")

FLOW_KEY_SIZE = _FLOW_KEY.size  # 16
FLOW_STATS_SIZE = _FLOW_STATS.size  # 64
KLOG_SIZE = _KLOG.size  # 80

# Key and value sizes as this module packs them; meshnode.bpf.maps merges them into its own
# (checked on open, and against clang's layout by tests/integration/test_bpf_layout.py).
MAP_LAYOUTS: dict[str, tuple[int, int]] = {
    KFLOW_MAP: (FLOW_KEY_SIZE, FLOW_STATS_SIZE),  # per CPU: each CPU's value padded to 8
    KLOG_MAP: (_U32.size, KLOG_SIZE),
    KLOG_HEAD_MAP: (_U32.size, _U64.size),
}


@dataclass(frozen=True, slots=True)
class FlowKey:
    """One mn_kflow row: who connected (cgroup id, low 32 bits), to which service (its id),
    and the endpoint the kernel picked."""

    cgroup: int
    service: int
    endpoint: Addr4


@dataclass(frozen=True, slots=True)
class FlowStats:
    """One row's counters (summed over CPUs): connects balanced, closed without being
    established (`failed`) or after (`closed`); bytes, lifetime and smoothed RTT summed over
    the closed ones."""

    connects: int = 0
    failed: int = 0
    closed: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    duration_us: int = 0
    srtt_us: int = 0

    def __add__(self, o: FlowStats) -> FlowStats:
        return FlowStats(*(getattr(self, f.name) + getattr(o, f.name) for f in fields(self)))

    @property
    def active(self) -> int:
        """Connections balanced and not closed yet (0 when the per-CPU counters, read one
        after the other, briefly disagree)."""
        return max(0, self.connects - self.failed - self.closed)


@dataclass(frozen=True, slots=True)
class KlogRecord:
    """One closed kernel-path connection. Times are bpf_ktime_get_ns(), CLOCK_MONOTONIC."""

    seq: int
    start_ns: int
    end_ns: int
    key: FlowKey
    vip: Addr4  # what the app dialled
    bytes_sent: int
    bytes_received: int
    srtt_us: int
    pid: int
    established: bool


@dataclass(frozen=True, slots=True)
class LogBatch:
    """What one read of the ring found: the records after the last one read, in order, and
    how many in between were overwritten before they could be read (the ring's sampling)."""

    records: list[KlogRecord]
    missed: int = 0


def _pack_addr(addr: Addr4) -> tuple[bytes, bytes]:
    return addr[0].packed, addr[1].to_bytes(2, "big")


def _addr(ip: bytes, port: bytes) -> Addr4:
    return IPv4Address(ip), int.from_bytes(port, "big")


def pack_flow_key(key: FlowKey) -> bytes:
    return _FLOW_KEY.pack(key.cgroup, key.service, *_pack_addr(key.endpoint))


def unpack_flow_key(raw: bytes) -> FlowKey:
    cgroup, service, ip, port = _FLOW_KEY.unpack(raw[:FLOW_KEY_SIZE])
    return FlowKey(int(cgroup), int(service), _addr(ip, port))


def pack_flow_stats(s: FlowStats) -> bytes:
    """One CPU's value."""
    return _FLOW_STATS.pack(*(getattr(s, f.name) for f in fields(s)))


def unpack_flow_stats(raw: bytes, offset: int = 0) -> FlowStats:
    return FlowStats(*(int(v) for v in _FLOW_STATS.unpack_from(raw, offset)))


def sum_flow_stats(raw: bytes, ncpus: int) -> FlowStats:
    """A per-CPU lookup's value: `ncpus` values, each padded to a multiple of 8 bytes (64 is
    one already), summed."""
    stride = (FLOW_STATS_SIZE + 7) & ~7
    total = FlowStats()
    for cpu in range(ncpus):
        total = total + unpack_flow_stats(raw, cpu * stride)
    return total


def pack_klog(r: KlogRecord) -> bytes:
    return _KLOG.pack(r.seq, r.start_ns, r.end_ns, pack_flow_key(r.key), *_pack_addr(r.vip),
                      r.bytes_sent, r.bytes_received, r.srtt_us, r.pid, int(r.established))


def unpack_klog(raw: bytes) -> KlogRecord:
    (seq, start, end, key, vip_ip, vip_port, sent, received, srtt, pid,
     established) = _KLOG.unpack(raw[:KLOG_SIZE])
    return KlogRecord(int(seq), int(start), int(end), unpack_flow_key(key),
                      _addr(vip_ip, vip_port), int(sent), int(received), int(srtt), int(pid),
                      bool(established))


def ring_span(last: int, head: int, slots: int = constants.KLOG_SLOTS) -> tuple[range, int]:
    """The sequence numbers to read after `last` up to `head`, and how many before them the
    ring has already overwritten (it holds the newest `slots`)."""
    first = max(last + 1, head - slots + 1)
    return range(first, head + 1), max(0, first - last - 1)


class KernelFlows:
    """Open fds of mn_kflow, mn_klog and mn_klog_head. Close when done (or use `with`).

    `rows()` reads every counter row. `new_records()` reads the ring after the last record it
    returned, up to the head it saw on its *previous* call: the program bumps the head before
    it fills the slot, so a record is read only once a whole read interval has passed since it
    was announced (a BPF program finishes in microseconds) and is never read half-written.
    The first call only notes the head: what an earlier agent read is not logged twice."""

    def __init__(self, fds: dict[str, int]) -> None:
        self._fds = fds
        self._ncpus = syscall.possible_cpus()
        self._last: int | None = None  # the last sequence number read (None: not yet)
        self._settled = 0  # the head as the previous call saw it

    @classmethod
    def open(cls, pin_dir: Path) -> KernelFlows:
        """Open the three pins under `pin_dir` (the agent's, as CaptureMaps.open gets it).
        A BpfError with errno ENOENT: the running programs have no kernel path (yet)."""
        fds = syscall.open_pins(str(pin_dir), MAP_LAYOUTS, "another meshnode version made "
                                "it: restart the agent to reload the programs", errno.EPROTO)
        return cls(fds)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __enter__(self) -> KernelFlows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rows(self) -> dict[FlowKey, FlowStats]:
        """Every counter row, summed over CPUs (a snapshot: rows change while it is read)."""
        fd = self._fds[KFLOW_MAP]
        size = ((FLOW_STATS_SIZE + 7) & ~7) * self._ncpus
        out: dict[FlowKey, FlowStats] = {}
        for raw_key in syscall.map_keys(fd, FLOW_KEY_SIZE):
            raw = syscall.map_lookup(fd, raw_key, size)
            if raw is not None:  # else evicted since the walk saw it
                out[unpack_flow_key(raw_key)] = sum_flow_stats(raw, self._ncpus)
        return out

    def head(self) -> int:
        raw = syscall.map_lookup(self._fds[KLOG_HEAD_MAP], _U32.pack(0), _U64.size)
        return int(_U64.unpack(raw)[0]) if raw else 0

    def new_records(self) -> LogBatch:
        """The ring's records after the last one returned (see the class docstring)."""
        head = self.head()
        settled, self._settled = self._settled, head
        if self._last is None or head < self._last:  # first call, or the ring was remade
            self._last = head
            return LogBatch([])
        span, missed = ring_span(self._last, min(settled, head))
        fd = self._fds[KLOG_MAP]
        records: list[KlogRecord] = []
        for seq in span:
            raw = syscall.map_lookup(fd, _U32.pack((seq - 1) % constants.KLOG_SLOTS), KLOG_SIZE)
            rec = unpack_klog(raw) if raw else None
            if rec is None or rec.seq != seq:
                missed += 1  # overwritten by a newer one meanwhile (read with its own seq)
                continue
            records.append(rec)
        if span:
            self._last = span[-1]
        return LogBatch(records, missed)
