"""The inbound enforcement program (bpf/mn_inbound.c, sk_lookup on the agent's network
namespace) as data, and typed access to its two pinned maps: local port -> mTLS mode, and
local port -> per-CPU counts of plaintext connections from other hosts.

Loading is compile.py's job (in the loader, after the cgroup programs), attaching the
capture backend's (meshnode.capture.inbound: a bpf_link pinned next to the maps). Imports no
bcc: raw bpf(2) through meshnode.bpf.syscall.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from meshnode import constants
from meshnode.bpf import syscall
from meshnode.bpf.program import AttachType, EntrySpec, ProgramSpec, ProgType
from meshnode.errors import BpfError

PROGRAM = ProgramSpec(
    source="mn_inbound.c",
    entries=(EntrySpec("mn_inbound", ProgType.SK_LOOKUP, AttachType.SK_LOOKUP, "netns",
                       detach_order=0),),
)
ENTRY = PROGRAM.entries[0]
MODE_MAP = "mn_inbound_mode"
STATS_MAP = "mn_inbound_stats"
MAP_PINS: tuple[str, ...] = (MODE_MAP, STATS_MAP)
LINK_PIN = "link_mn_inbound"  # the netns link, pinned so it outlives the agent

_U32 = struct.Struct("=I")  # ports and modes: host byte order, as C reads a __u32
_COUNT = struct.Struct("=QQ")  # struct mn_inbound_count { __u64 accepted; __u64 refused; }

# Key and value sizes as this module packs them (checked on open, and against clang's layout
# by the loader's "maps" output).
MAP_LAYOUTS: dict[str, tuple[int, int]] = {
    MODE_MAP: (_U32.size, _U32.size),
    STATS_MAP: (_U32.size, _COUNT.size),
}


def mode_value(strict: bool) -> int:
    return constants.INBOUND_STRICT if strict else constants.INBOUND_PERMISSIVE


@dataclass(frozen=True, slots=True)
class InboundCount:
    """Plaintext connections from other hosts to one port (SYNs looked up: a client's
    retransmitted SYN counts again)."""

    accepted: int = 0
    refused: int = 0


class InboundMaps:
    """Open fds of the two pinned inbound maps. Close when done."""

    def __init__(self, mode_fd: int, stats_fd: int) -> None:
        self._mode_fd = mode_fd
        self._stats_fd = stats_fd
        self._ncpus = syscall.possible_cpus()
        self._held: dict[int, int] | None = None  # port -> mode, as the kernel holds it

    @classmethod
    def open(cls, pin_dir: Path) -> InboundMaps:
        fds: list[int] = []
        try:
            for name in MAP_PINS:
                fd = syscall.obj_get(str(pin_dir / name))
                fds.append(fd)
                _, key_size, value_size = syscall.map_info(fd)
                if (key_size, value_size) != MAP_LAYOUTS[name]:
                    raise BpfError(f"pinned map {pin_dir / name} has key/value sizes "
                                   f"{key_size}/{value_size}, this meshnode packs "
                                   "{}/{}".format(*MAP_LAYOUTS[name]),
                                   f"another meshnode version made it: sweep {pin_dir}")
        except BpfError:
            for fd in fds:
                os.close(fd)
            raise
        return cls(fds[0], fds[1])

    def close(self) -> None:
        for fd in (self._mode_fd, self._stats_fd):
            if fd >= 0:
                os.close(fd)
        self._mode_fd = self._stats_fd = -1

    def modes(self) -> dict[int, int]:
        """Port -> mode, read from the kernel."""
        out: dict[int, int] = {}
        for key in syscall.map_keys(self._mode_fd, _U32.size):
            value = syscall.map_lookup(self._mode_fd, key, _U32.size)
            if value is not None:
                out[_U32.unpack(key)[0]] = _U32.unpack(value)[0]
        return out

    def sync(self, strict_by_port: dict[int, bool]) -> int:
        """Make the mode map hold exactly these ports; returns the writes made. A port that
        goes loses its counters too (a later rule on it starts from zero)."""
        held = self._held if self._held is not None else self.modes()
        self._held = None  # unknown until every write succeeded
        want = {port: mode_value(strict) for port, strict in strict_by_port.items()}
        writes = 0
        for port, mode in want.items():
            if held.get(port) != mode:
                syscall.map_update(self._mode_fd, _U32.pack(port), _U32.pack(mode))
                writes += 1
        for port in held.keys() - want.keys():
            syscall.map_delete(self._mode_fd, _U32.pack(port))
            syscall.map_delete(self._stats_fd, _U32.pack(port))
            writes += 1
        self._held = want
        return writes

    def counts(self) -> dict[int, InboundCount]:
        """Port -> counts, summed over the CPUs."""
        out: dict[int, InboundCount] = {}
        stride = _COUNT.size
        for key in syscall.map_keys(self._stats_fd, _U32.size):
            raw = syscall.map_lookup(self._stats_fd, key, stride * self._ncpus)
            if raw is None:
                continue
            accepted = refused = 0
            for cpu in range(self._ncpus):
                a, r = _COUNT.unpack_from(raw, stride * cpu)
                accepted += a
                refused += r
            out[_U32.unpack(key)[0]] = InboundCount(accepted, refused)
        return out
