"""Feature probe for capture auto-selection: can this host run the eBPF backend?

Checks, cheapest first: root, a cgroup2 mount, bpffs, bcc findable by the loader's interpreter
(without importing it: no LLVM in the agent), kernel headers for bcc, then the kernel itself:
it loads a two-instruction program of each type the backend uses (connect4, connect6,
sock_ops, getsockopt; sendmsg4, recvmsg4, getpeername4 for DNS) with raw bpf(2) and
attaches/detaches each on a throwaway empty cgroup.
Feature probes over version checks: kernels backport, and a version says nothing about config.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import platform
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from meshnode.bpf import syscall
from meshnode.bpf.program import all_entries
from meshnode.errors import MeshnodeError
from meshnode.host import cgroup

log = logging.getLogger(__name__)

# r0 = 1; exit: "proceed" for every hook the backend uses.
_PROCEED = struct.pack("<BBhi", 0xB7, 0, 0, 1) + struct.pack("<BBhi", 0x95, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    reason: str  # why not, or what works


def probe() -> ProbeResult:
    """Never raises: every failure becomes a reason."""
    if os.geteuid() != 0:
        return ProbeResult(False, "not running as root (CAP_BPF, CAP_NET_ADMIN needed)")
    try:
        mount = cgroup.cgroup2_mount()
    except MeshnodeError as exc:
        return ProbeResult(False, exc.message)
    if importlib.util.find_spec("bcc") is None:
        return ProbeResult(False, "bcc (python3-bpfcc) is not importable")
    headers = Path("/lib/modules") / platform.release() / "build"
    if not headers.exists():
        return ProbeResult(False, f"no kernel headers at {headers} (bcc needs them)")
    return _probe_kernel(mount)


def _probe_kernel(mount: Path) -> ProbeResult:
    group = mount / f"meshnode-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
    except OSError as exc:
        return ProbeResult(False, f"cannot create a cgroup under {mount}: {exc.strerror}")
    try:
        cg_fd = os.open(group, os.O_RDONLY | os.O_DIRECTORY)
        try:
            result = _load_and_attach_each(cg_fd)
        finally:
            os.close(cg_fd)
    finally:
        _remove_group(group)
    return result


def _load_and_attach_each(cg_fd: int) -> ProbeResult:
    for entry in all_entries():
        what = f"{entry.attach_type.name.lower()} program"
        try:
            fd = syscall.prog_load(entry.prog_type, _PROCEED, entry.attach_type, "mn_probe")
        except MeshnodeError as exc:
            return ProbeResult(False, f"kernel cannot load a {what}: {exc.message}")
        try:
            syscall.prog_attach(cg_fd, fd, entry.attach_type)
            syscall.prog_detach(cg_fd, fd, entry.attach_type)
        except MeshnodeError as exc:
            return ProbeResult(False, f"kernel cannot attach a {what}: {exc.message}")
        finally:
            os.close(fd)
    return ProbeResult(True, "cgroup connect4/connect6/sockops/getsockopt and "
                             "sendmsg4/recvmsg4/getpeername4 load and attach")


def _remove_group(group: Path) -> None:
    # An empty cgroup with nothing attached any more: rmdir cannot be busy for long, and a
    # leftover would only be an empty directory. A warning, not an error: probe() never raises.
    try:
        group.rmdir()
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("cannot remove probe cgroup %s: %s", group, exc.strerror)
