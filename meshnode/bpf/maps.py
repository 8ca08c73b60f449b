"""Typed access to the pinned capture maps (layouts of bpf/include/mn_maps.h).

The agent opens the pins once (`CaptureMaps.open`) and diff-applies a CaptureState: the kernel
then redirects, refuses or passes each connect without the agent on the path. Packing helpers
are module functions so unit tests check the byte layout without a kernel.
Imports no bcc: raw bpf(2) through meshnode.bpf.syscall.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from meshnode import constants
from meshnode.bpf import syscall
from meshnode.errors import BpfError
from meshnode.model import CaptureState

# struct mn_addr4 { __u32 ip; __u16 port; __u16 pad; }: ip and port in network byte order.
_ADDR4 = struct.Struct("!4sHxx")
_U32 = struct.Struct("=I")  # service ids and flags: host byte order, as C reads a __u32
_U64 = struct.Struct("=Q")

ADDR4_SIZE = _ADDR4.size
# struct mn_orig { struct mn_addr4 dst; __u32 cgroup; __u32 pid; }: the value of mn_origdst.
ORIG_SIZE = ADDR4_SIZE + 8

DestKey = tuple[IPv4Address, int]  # (ip, port); port 0: every port of a VIP

STAT_NAMES: dict[str, int] = {
    "captured": constants.STAT_CAPTURED,
    "passthrough": constants.STAT_PASSTHROUGH,
    "refused": constants.STAT_REFUSED,
    "origdst_hit": constants.STAT_ORIGDST_HIT,
    "origdst_miss": constants.STAT_ORIGDST_MISS,
    "dns_redirected": constants.STAT_DNS_REDIRECTED,
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
    """struct mn_dns_cfg { __u32 flags; __u32 port; }: host byte order, as C reads them."""
    return _U32.pack(constants.DNS_ENABLED if enabled else 0) + _U32.pack(port)


def service_flags(state: CaptureState, service_id: int) -> int:
    flags = 0
    if service_id in state.ready:
        flags |= constants.SVC_READY
    if service_id in state.fail_closed:
        flags |= constants.SVC_FAIL_CLOSED
    return flags


@dataclass(frozen=True, slots=True)
class MapContents:
    """What the destination and service maps should hold for one CaptureState."""

    dests: dict[DestKey, int] = field(default_factory=dict)
    services: dict[int, int] = field(default_factory=dict)  # id -> flags (never 0)

    @classmethod
    def of(cls, state: CaptureState) -> MapContents:
        dests = {(r.ip, r.port): r.service_id for r in sorted(state.rules)}
        services = {sid: f for sid in sorted(set(dests.values()))
                    if (f := service_flags(state, sid))}
        return cls(dests, services)


def sum_percpu(raw: bytes, ncpus: int) -> int:
    """Sum one per-CPU u64 value (the kernel pads each CPU's value to 8 bytes)."""
    return sum(_U64.unpack_from(raw, 8 * i)[0] for i in range(ncpus))


class CaptureMaps:
    """Open fds of one agent's pinned maps. Close when done (or use as a context manager)."""

    def __init__(self, fds: dict[str, int]) -> None:
        self._fds = fds
        self._ncpus = syscall.possible_cpus()
        # What the last apply wrote: the agent is the maps' only writer, so diffing against
        # it saves reading 2 x up to 65k entries back from the kernel on every sync.
        self._applied: MapContents | None = None
        self._dns_port = 0  # the last port set_dns was given (kept when DNS goes off)

    @classmethod
    def open(cls, pin_dir: Path) -> CaptureMaps:
        fds: dict[str, int] = {}
        try:
            for name in ("mn_dest", "mn_svc", "mn_origdst", "mn_stats", "mn_dns_cfg"):
                fds[name] = syscall.obj_get(str(pin_dir / name))
        except BpfError:
            for fd in fds.values():
                os.close(fd)
            raise
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

    def apply(self, want: MapContents) -> None:
        """Make the maps hold `want`, touching only what differs. Destinations go in before
        the flags that enable them, and stale destinations go before their flags, so no
        connect ever sees a half-applied rule pointing at the wrong service."""
        have = self._applied if self._applied is not None else self.contents()
        self._applied = None  # unknown until this apply completes
        dest_fd, svc_fd = self._fds["mn_dest"], self._fds["mn_svc"]
        for (ip, port), sid in want.dests.items():
            if have.dests.get((ip, port)) != sid:
                syscall.map_update(dest_fd, pack_addr4(ip, port), pack_u32(sid))
        for sid, flags in want.services.items():
            if have.services.get(sid) != flags:
                syscall.map_update(svc_fd, pack_u32(sid), pack_u32(flags))
        for ip, port in have.dests.keys() - want.dests.keys():
            syscall.map_delete(dest_fd, pack_addr4(ip, port))
        for sid in have.services.keys() - want.services.keys():
            syscall.map_delete(svc_fd, pack_u32(sid))
        self._applied = want

    def clear_services(self) -> None:
        """Drop every service flag: every mesh connect passes untouched (fail open)."""
        self._applied = None
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
