"""Typed access to the pinned capture maps (layouts of bpf/include/mn_maps.h).

The agent opens the pins once (`CaptureMaps.open`) and syncs CaptureStates into them: the kernel
then redirects, balances (the kernel path: its tables in lb_maps.py), refuses or passes each
connect without the agent on the path. A sync writes
only the keys that changed since the last one (`MapMirror`, pure, so unit tests check the
writes without a kernel); the first sync after opening reads the maps back once, so an agent
that finds them already filled (pins adopted after a restart) converges instead of assuming
them empty. Packing helpers are module functions so unit tests check the byte layout too.
Imports no bcc: raw bpf(2) through meshnode.bpf.syscall.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import TypeVar

from meshnode import constants
from meshnode.bpf import inbound, kflow, lb_maps, syscall
from meshnode.errors import BpfError
from meshnode.model import CaptureState

# struct mn_addr4 { __u32 ip; __u16 port; __u16 pad; }: ip and port in network byte order.
_ADDR4 = struct.Struct("!4sHxx")
_U32 = struct.Struct("=I")  # service ids and flags: host byte order, as C reads a __u32
_U64 = struct.Struct("=Q")

ADDR4_SIZE = _ADDR4.size
# struct mn_orig { struct mn_addr4 dst; __u32 cgroup; __u32 pid; }: the value of mn_origdst.
ORIG_SIZE = ADDR4_SIZE + 8
# struct mn_dns_cfg { __u32 flags; __u32 port; }: host byte order, as C reads them.
_DNS_CFG = struct.Struct("=II")

# Key and value sizes of every pinned map, as this module packs them. The agent checks the
# pinned maps against them on open (maps made by another meshnode version are refused), and
# tests/integration/test_bpf_layout.py checks them against what clang compiled.
MAP_LAYOUTS: dict[str, tuple[int, int]] = {
    "mn_dest": (ADDR4_SIZE, _U32.size),
    "mn_svc": (_U32.size, _U32.size),
    "mn_cookie": (_U64.size, ORIG_SIZE),
    "mn_origdst": (ADDR4_SIZE, ORIG_SIZE),
    "mn_stats": (_U32.size, _U64.size),  # per CPU: the kernel pads each CPU's value to 8
    "mn_dns_cfg": (_U32.size, _DNS_CFG.size),
    "mn_dns_orig": (_U64.size, ADDR4_SIZE),
    **lb_maps.LAYOUTS,  # the kernel path's tables, packed by meshnode.bpf.lb_maps
    "mn_ksock": (_U64.size, 40),  # struct mn_ksock: the kernel path's open sockets
    **kflow.MAP_LAYOUTS,  # its telemetry: mn_kflow, mn_klog, mn_klog_head (bpf.kflow packs)
    **inbound.MAP_LAYOUTS,  # mn_inbound.c's, packed by meshnode.bpf.inbound
}

T = TypeVar("T")
DestKey = tuple[IPv4Address, int]  # (ip, port); port 0: every port of a VIP

STAT_NAMES: dict[str, int] = {
    "captured": constants.STAT_CAPTURED,
    "passthrough": constants.STAT_PASSTHROUGH,
    "refused": constants.STAT_REFUSED,
    "origdst_hit": constants.STAT_ORIGDST_HIT,
    "origdst_miss": constants.STAT_ORIGDST_MISS,
    "dns_redirected": constants.STAT_DNS_REDIRECTED,
    "kernel": constants.STAT_KERNEL,
    "kernel_no_endpoint": constants.STAT_KERNEL_NOEP,
}


def pack_addr4(ip: IPv4Address, port: int) -> bytes:
    return _ADDR4.pack(ip.packed, port)


def unpack_addr4(raw: bytes) -> DestKey:
    packed, port = _ADDR4.unpack(raw[:ADDR4_SIZE])
    return IPv4Address(packed), int(port)


def pack_u32(value: int) -> bytes:
    return _U32.pack(value)


def unpack_u32(raw: bytes) -> int:
    return int(_U32.unpack(raw[:4])[0])


def pack_dns_cfg(enabled: bool, port: int) -> bytes:
    """struct mn_dns_cfg: the DNS switch's flags and port."""
    return _DNS_CFG.pack(constants.DNS_ENABLED if enabled else 0, port)


def service_flags(state: CaptureState, service_id: int) -> int:
    flags = 0
    if service_id in state.ready:
        flags |= constants.SVC_READY
    if service_id in state.fail_closed:
        flags |= constants.SVC_FAIL_CLOSED
    if service_id in state.kernel:
        flags |= constants.SVC_KERNEL
    if service_id in state.fallback:
        flags |= constants.SVC_FALLBACK
    return flags


@dataclass(frozen=True, slots=True)
class MapContents:
    """What the destination and service maps should hold for one CaptureState."""

    dests: dict[DestKey, int] = field(default_factory=dict)
    services: dict[int, int] = field(default_factory=dict)  # id -> flags (never 0)

    @classmethod
    def of(cls, state: CaptureState) -> MapContents:
        dests: dict[DestKey, int] = {}
        for r in state.rules:
            key = (r.ip, r.port)
            # Two services claiming one address (the registries refuse it; a hand-made state
            # may not): the higher id wins, whatever the set's iteration order.
            if dests.get(key, -1) < r.service_id:
                dests[key] = r.service_id
        services = {sid: f for sid in set(dests.values()) if (f := service_flags(state, sid))}
        return cls(dests, services)


@dataclass(slots=True)
class MapDelta:
    """The map writes that take the kernel from one state to the next, in the order they must
    be made: destinations go in before the flags that enable them, and stale destinations go
    before their flags, so no connect sees a rule pointing at the wrong service."""

    dest_updates: list[tuple[DestKey, int]] = field(default_factory=list)
    svc_updates: list[tuple[int, int]] = field(default_factory=list)
    dest_deletes: list[DestKey] = field(default_factory=list)
    svc_deletes: list[int] = field(default_factory=list)

    @classmethod
    def between(cls, have: MapContents, want: MapContents) -> MapDelta:
        """Every write from `have` to `want` (a full comparison: the first sync only)."""
        return cls(
            [(k, sid) for k, sid in want.dests.items() if have.dests.get(k) != sid],
            [(sid, f) for sid, f in want.services.items() if have.services.get(sid) != f],
            list(have.dests.keys() - want.dests.keys()),
            list(have.services.keys() - want.services.keys()))

    def __len__(self) -> int:
        return (len(self.dest_updates) + len(self.svc_updates) + len(self.dest_deletes)
                + len(self.svc_deletes))


class MapMirror:
    """What the two maps hold, and the CaptureState they were made from: `step` turns the next
    state into the writes that differ. The rule sets are compared with C set operations, whose
    cost is proportional to the change only when the caller reuses the CaptureRule objects of
    rules that did not change (they compare by identity); freshly built equal rules each cost
    a Python __eq__, so the whole mesh is walked again (the bench-scale notes give figures)."""

    def __init__(self, state: CaptureState, held: MapContents) -> None:
        self.state = state
        self.dests = dict(held.dests)  # what mn_dest holds: the winning service per key
        self.services = dict(held.services)  # what mn_svc holds
        # Only keys claimed by more than one rule: every service id claiming them.
        self._claims: dict[DestKey, set[int]] = {}
        self._keys_of: dict[int, int] = {}  # service id -> number of keys it wins
        for sid in self.dests.values():
            self._keys_of[sid] = self._keys_of.get(sid, 0) + 1

    @classmethod
    def converge(cls, have: MapContents, state: CaptureState) -> tuple[MapMirror, MapDelta]:
        """The mirror of `state`, and the writes that turn the maps' actual content `have`
        (read from the kernel) into it."""
        want = MapContents.of(state)
        mirror = cls(state, want)
        for r in state.rules:
            key = (r.ip, r.port)
            if want.dests[key] != r.service_id:
                mirror._claims.setdefault(key, {want.dests[key]}).add(r.service_id)
        return mirror, MapDelta.between(have, want)

    def step(self, state: CaptureState) -> MapDelta:
        """Advance to `state`; returns the writes. If they then fail, drop this mirror: it
        already believes they were made."""
        old, self.state = self.state, state
        before: dict[DestKey, int | None] = {}  # each touched key's value before this step
        if state.rules is not old.rules:
            hint = state.changes_since(old)
            removed, added = hint if hint is not None else _set_changes(old.rules, state.rules)
            for r in removed:
                self._unclaim((r.ip, r.port), r.service_id, before)
            for r in added:
                self._claim((r.ip, r.port), r.service_id, before)
        delta = MapDelta()
        touched: set[int] = set()  # service ids whose flags may change
        for key, was in before.items():
            now = self.dests.get(key)
            if now == was:
                continue
            if now is None:
                delta.dest_deletes.append(key)
            else:
                delta.dest_updates.append((key, now))
                self._keys_of[now] = self._keys_of.get(now, 0) + 1
                touched.add(now)
            if was is not None:
                self._keys_of[was] -= 1
                if not self._keys_of[was]:
                    del self._keys_of[was]
                touched.add(was)
        for was_set, now_set in ((old.ready, state.ready), (old.fail_closed, state.fail_closed),
                                 (old.kernel, state.kernel), (old.fallback, state.fallback)):
            if now_set is not was_set:
                for changed in _set_changes(was_set, now_set):
                    touched |= changed
        for sid in touched:
            want = service_flags(state, sid) if sid in self._keys_of else 0
            if want == self.services.get(sid, 0):
                continue
            if want:
                self.services[sid] = want
                delta.svc_updates.append((sid, want))
            else:
                del self.services[sid]
                delta.svc_deletes.append(sid)
        return delta

    def _claim(self, key: DestKey, sid: int, before: dict[DestKey, int | None]) -> None:
        cur = self.dests.get(key)
        before.setdefault(key, cur)
        if cur is None:
            self.dests[key] = sid
            return
        claims = self._claims.setdefault(key, {cur})
        claims.add(sid)
        self.dests[key] = max(claims)

    def _unclaim(self, key: DestKey, sid: int, before: dict[DestKey, int | None]) -> None:
        cur = self.dests.get(key)
        before.setdefault(key, cur)
        claims = self._claims.get(key)
        if claims is None:
            if cur == sid:
                del self.dests[key]
            return
        claims.discard(sid)
        self.dests[key] = max(claims)
        if len(claims) == 1:
            del self._claims[key]


def sum_percpu(raw: bytes, ncpus: int) -> int:
    """Sum one per-CPU u64 value (the kernel pads each CPU's value to 8 bytes)."""
    return sum(_U64.unpack_from(raw, 8 * i)[0] for i in range(ncpus))


def _set_changes(old: frozenset[T], new: frozenset[T]) -> tuple[frozenset[T], frozenset[T]]:
    """(removed, added). Each difference walks a whole set; the sizes tell when one of them
    must be empty (a pure add or removal, the usual change), which halves the walk."""
    if len(new) >= len(old):
        added = new - old
        return (old - new if len(old) - len(new) + len(added) else frozenset()), added
    removed = old - new
    return removed, (new - old if len(new) - len(old) + len(removed) else frozenset())


class CaptureMaps:
    """Open fds of one agent's pinned maps. Close when done (or use as a context manager)."""

    def __init__(self, fds: dict[str, int]) -> None:
        self._fds = fds
        self._ncpus = syscall.possible_cpus()
        # What the maps hold since the last sync: the agent is their only writer, so diffing
        # against it saves reading up to 2 x 262 144 entries back on every sync. None: not
        # known (just opened, cleared, or a write failed): the next sync reads the kernel.
        self._mirror: MapMirror | None = None
        self.last_writes = 0  # map writes the last sync made (for tests and timing logs)
        self._dns_port = 0  # the last port set_dns was given (kept when DNS goes off)
        self.lb = lb_maps.LbMaps(fds["mn_lb_table"], fds["mn_lb_slot"])  # kernel-path tables

    @classmethod
    def open(cls, pin_dir: Path) -> CaptureMaps:
        """Open the pinned maps, refusing any whose layout is not the one this code packs."""
        names = ("mn_dest", "mn_svc", "mn_origdst", "mn_stats", "mn_dns_cfg", "mn_lb_table",
                 "mn_lb_slot", "mn_ksock")
        fds = syscall.open_pins(str(pin_dir), {n: MAP_LAYOUTS[n] for n in names},
                                "another meshnode version made it: stop that agent, or sweep "
                                f"and remove {pin_dir}")
        return cls(fds)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __enter__(self) -> CaptureMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------

    def contents(self) -> MapContents:
        dest_fd, svc_fd = self._fds["mn_dest"], self._fds["mn_svc"]
        dests: dict[DestKey, int] = {}
        for key in syscall.map_keys(dest_fd, ADDR4_SIZE):
            value = syscall.map_lookup(dest_fd, key, 4)
            if value is not None:
                dests[unpack_addr4(key)] = unpack_u32(value)
        services: dict[int, int] = {}
        for key in syscall.map_keys(svc_fd, 4):
            value = syscall.map_lookup(svc_fd, key, 4)
            if value is not None:
                services[unpack_u32(key)] = unpack_u32(value)
        return MapContents(dests, services)

    def stats(self) -> dict[str, int]:
        fd = self._fds["mn_stats"]
        out: dict[str, int] = {}
        for name, slot in STAT_NAMES.items():
            raw = syscall.map_lookup(fd, pack_u32(slot), 8 * self._ncpus)
            out[name] = sum_percpu(raw, self._ncpus) if raw else 0
        return out

    def origdst(self, client_ip: IPv4Address, client_port: int) -> DestKey | None:
        """The original destination of a captured connection by its client address."""
        raw = syscall.map_lookup(self._fds["mn_origdst"], pack_addr4(client_ip, client_port),
                                 ORIG_SIZE)
        return unpack_addr4(raw) if raw else None

    # -- writing ---------------------------------------------------------------------------

    def sync(self, state: CaptureState) -> None:
        """Make the maps match `state`, writing only what differs from the last sync."""
        mirror, self._mirror = self._mirror, None  # unknown until this sync completes
        if mirror is None:
            mirror, delta = MapMirror.converge(self.contents(), state)
        else:
            delta = mirror.step(state)
        dest_fd, svc_fd = self._fds["mn_dest"], self._fds["mn_svc"]
        for (ip, port), sid in delta.dest_updates:
            syscall.map_update(dest_fd, pack_addr4(ip, port), pack_u32(sid))
        # tables before the flags that send connects to them; stale ones after the flags
        # that stop doing so
        retire = self.lb.sync(state)
        for sid, flags in delta.svc_updates:
            syscall.map_update(svc_fd, pack_u32(sid), pack_u32(flags))
        for ip, port in delta.dest_deletes:
            syscall.map_delete(dest_fd, pack_addr4(ip, port))
        for sid in delta.svc_deletes:
            syscall.map_delete(svc_fd, pack_u32(sid))
        lb_writes = retire()
        self.last_writes = len(delta) + lb_writes
        self._mirror = mirror

    def ksock_service(self, cookie: int) -> int | None:
        """The service id of an open kernel-path socket, by its cookie (None: not one)."""
        raw = syscall.map_lookup(self._fds["mn_ksock"], _U64.pack(cookie), 40)
        return unpack_u32(raw[4:8]) if raw else None  # struct mn_ksock: key.service

    def clear_services(self) -> None:
        """Drop every service flag: every mesh connect passes untouched (fail open)."""
        self._mirror = None
        self.lb.forget()
        fd = self._fds["mn_svc"]
        for key in syscall.map_keys(fd, 4):
            syscall.map_delete(fd, key)

    def set_dns(self, port: int | None) -> None:
        """Redirect DNS queries to 127.0.0.1:`port`, or stop (None). Turning it off keeps the
        port in the map: replies to queries already redirected still get their resolver's
        address back (mn_dns_restore)."""
        if port is not None:
            if not 0 < port < 65536:
                raise BpfError(f"invalid DNS port {port}", "use 1..65535")
            self._dns_port = port
        syscall.map_update(self._fds["mn_dns_cfg"], pack_u32(constants.DNS_CFG_SLOT),
                           pack_dns_cfg(port is not None, self._dns_port))
