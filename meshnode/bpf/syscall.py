"""Raw bpf(2) through ctypes: the few commands the long-running agent needs to work with
pinned objects (open and pin, map access, cgroup attach/detach/query, bpf_link create, update
and detach, object info) and a tiny program load for the feature probe.

It exists so the agent never imports bcc (whose LLVM costs ~130 MB RSS). Every failure is a
BpfError that keeps the errno; callers test `err.errno` (ENOENT: "not found" is often fine).
Imports nothing of meshnode's but errors.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import platform
import struct
from dataclasses import dataclass

from meshnode.errors import BpfError

# enum bpf_cmd
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
PROG_LOAD = 5
OBJ_PIN = 6
OBJ_GET = 7
PROG_ATTACH = 8
PROG_DETACH = 9
PROG_GET_FD_BY_ID = 13
OBJ_GET_INFO_BY_FD = 15
PROG_QUERY = 16
LINK_CREATE = 28
LINK_UPDATE = 29
LINK_DETACH = 34

BPF_ANY = 0  # map update: create or replace
BPF_F_ALLOW_MULTI = 2  # attach flag: coexist with other programs on the cgroup and its parents
BPF_F_REPLACE = 4  # attach flag: atomically replace the program named by replace_bpf_fd

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
_ATTR_SIZE = 128  # larger than every command's attr here; the kernel wants the tail zeroed

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _sys_bpf_nr() -> int:
    machine = platform.machine()
    try:
        return _SYS_BPF[machine]
    except KeyError:
        raise BpfError(f"bpf(2) syscall number unknown for {machine}",
                       "use the iptables capture backend (--capture iptables)",
                       errno=errno_mod.ENOSYS) from None


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    ret = int(_libc.syscall(_sys_bpf_nr(), cmd, attr, _ATTR_SIZE))
    if ret < 0:
        err = ctypes.get_errno()
        hint = ("run as root (CAP_BPF and CAP_NET_ADMIN)" if err == errno_mod.EPERM
                else "see `bpftool prog` / `bpftool cgroup tree` for the kernel's view")
        raise BpfError(f"bpf {what}: {os.strerror(err)}", hint, errno=err)
    return ret


def _attr(fmt: str, *values: object) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into(fmt, buf, 0, *values)
    return buf


def _addr(buf: ctypes.Array[ctypes.c_char] | ctypes.c_char_p | None) -> int:
    if buf is None:
        return 0
    return ctypes.cast(buf, ctypes.c_void_p).value or 0


# --- pinned objects --------------------------------------------------------------------------

def obj_get(path: str) -> int:
    """Open a pinned map or program; returns a new fd (close it)."""
    p = ctypes.c_char_p(os.fsencode(path))
    return _bpf(OBJ_GET, _attr("=QII", _addr(p), 0, 0), f"open {path}")


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.c_char_p(os.fsencode(path))
    _bpf(OBJ_PIN, _attr("=QII", _addr(p), fd, 0), f"pin {path}")


# --- maps ------------------------------------------------------------------------------------

def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value for `key`, or None if there is none."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _bpf(MAP_LOOKUP_ELEM, _attr("=IIQQQ", fd, 0, _addr(k), _addr(v), 0), "map lookup")
    except BpfError as exc:
        if exc.errno == errno_mod.ENOENT:
            return None
        raise
    return v.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    _bpf(MAP_UPDATE_ELEM, _attr("=IIQQQ", fd, 0, _addr(k), _addr(v), flags), "map update")


def map_delete(fd: int, key: bytes) -> bool:
    """Delete `key`; returns False if it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _bpf(MAP_DELETE_ELEM, _attr("=IIQQQ", fd, 0, _addr(k), 0, 0), "map delete")
    except BpfError as exc:
        if exc.errno == errno_mod.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """Every key, walked with GET_NEXT_KEY (a snapshot; entries may change meanwhile)."""
    keys: list[bytes] = []
    nxt = ctypes.create_string_buffer(key_size)
    cur: ctypes.Array[ctypes.c_char] | None = None
    while True:
        try:
            _bpf(MAP_GET_NEXT_KEY, _attr("=IIQQQ", fd, 0, _addr(cur), _addr(nxt), 0),
                 "map next key")
        except BpfError as exc:
            if exc.errno == errno_mod.ENOENT:
                return keys
            raise
        keys.append(nxt.raw)
        cur = ctypes.create_string_buffer(nxt.raw, key_size)


# --- cgroup attachment -----------------------------------------------------------------------

def prog_attach(cgroup_fd: int, prog_fd: int, attach_type: int,
                flags: int = BPF_F_ALLOW_MULTI, replace_fd: int | None = None) -> None:
    """Attach; with `replace_fd`, swap that attached program for this one in one step (the
    cgroup's program list never lacks either: no connect runs without a capture hook)."""
    if replace_fd is not None:
        flags |= BPF_F_REPLACE
    _bpf(PROG_ATTACH, _attr("=IIIII", cgroup_fd, prog_fd, attach_type, flags,
                            replace_fd or 0), "attach")


def prog_detach(cgroup_fd: int, prog_fd: int, attach_type: int) -> bool:
    """Detach one program; returns False if it was not attached there."""
    try:
        _bpf(PROG_DETACH, _attr("=IIIII", cgroup_fd, prog_fd, attach_type, 0, 0), "detach")
    except BpfError as exc:
        if exc.errno == errno_mod.ENOENT:
            return False
        raise
    return True


def prog_query(cgroup_fd: int, attach_type: int, max_progs: int = 64) -> list[int]:
    """Ids of the programs attached directly to the cgroup for `attach_type`."""
    ids = (ctypes.c_uint32 * max_progs)()
    # target_fd, attach_type, query_flags, attach_flags, prog_ids (u64), prog_cnt
    buf = _attr("=IIIIQI", cgroup_fd, attach_type, 0, 0, _addr(ctypes.cast(ids, ctypes.c_char_p)),
                max_progs)
    _bpf(PROG_QUERY, buf, "query")
    (count,) = struct.unpack_from("=I", buf, 24)
    return [int(ids[i]) for i in range(min(count, max_progs))]


# --- links (a program attached to a network namespace: sk_lookup) ---------------------------

def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """Attach through a bpf_link; returns the link's fd. The attachment lives as long as the
    link does: pin it (obj_pin) to outlive this process, else it goes with the last fd."""
    return _bpf(LINK_CREATE, _attr("=IIII", prog_fd, target_fd, attach_type, 0), "link create")


def link_update(link_fd: int, new_prog_fd: int, old_prog_fd: int | None = None) -> None:
    """Swap the link's program in one step; with `old_prog_fd`, only if that one is still the
    link's program (BPF_F_REPLACE), so two agents cannot both think they replaced it."""
    flags = BPF_F_REPLACE if old_prog_fd is not None else 0
    _bpf(LINK_UPDATE, _attr("=IIII", link_fd, new_prog_fd, flags, old_prog_fd or 0),
         "link update")


def link_detach(link_fd: int) -> None:
    """Detach the link's program now, whoever else holds the link (its pin stays valid, as a
    defunct link, until unpinned)."""
    _bpf(LINK_DETACH, _attr("=I", link_fd), "link detach")


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """What meshnode reads of bpf_link_info: its id, the program it runs, and for a netns
    link the namespace's inode (0 once detached) and the attach type."""

    id: int
    type: int
    prog_id: int
    netns_ino: int
    attach_type: int


def link_info(fd: int) -> LinkInfo:
    info = ctypes.create_string_buffer(64)
    _bpf(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, len(info), _addr(info)), "link info")
    # struct bpf_link_info { __u32 type, id, prog_id; union { ... netns { __u32 netns_ino,
    # attach_type } } } (the union is 8-byte aligned: it starts at offset 16)
    ltype, lid, prog_id = struct.unpack_from("=III", info, 0)
    netns_ino, attach_type = struct.unpack_from("=II", info, 16)
    return LinkInfo(lid, ltype, prog_id, netns_ino, attach_type)


def prog_fd_by_id(prog_id: int) -> int:
    return _bpf(PROG_GET_FD_BY_ID, _attr("=III", prog_id, 0, 0), f"open program id {prog_id}")


@dataclass(frozen=True, slots=True)
class ObjInfo:
    """What meshnode reads of bpf_prog_info / bpf_map_info."""

    id: int
    type: int
    name: str


def prog_info(fd: int) -> ObjInfo:
    info = ctypes.create_string_buffer(256)
    _bpf(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, len(info), _addr(info)), "program info")
    ptype, pid = struct.unpack_from("=II", info, 0)
    name = info.raw[64:80].split(b"\0", 1)[0].decode()  # bpf_prog_info.name
    return ObjInfo(pid, ptype, name)


def map_info(fd: int) -> tuple[ObjInfo, int, int]:
    """(info, key_size, value_size) of a map."""
    info = ctypes.create_string_buffer(256)
    _bpf(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, len(info), _addr(info)), "map info")
    mtype, mid, key_size, value_size = struct.unpack_from("=IIII", info, 0)
    name = info.raw[24:40].split(b"\0", 1)[0].decode()  # bpf_map_info.name
    return ObjInfo(mid, mtype, name), key_size, value_size


# --- probe support ---------------------------------------------------------------------------

def prog_load(prog_type: int, insns: bytes, expected_attach_type: int, name: str) -> int:
    """Load raw instructions (the feature probe's two-instruction programs)."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.c_char_p(b"GPL")
    buf = _attr("=IIQQIIQII16sII", prog_type, len(insns) // 8, _addr(code), _addr(lic),
                0, 0, 0, 0, 0, name.encode()[:15], 0, expected_attach_type)
    return _bpf(PROG_LOAD, buf, f"load {name}")


def possible_cpus() -> int:
    """Number of possible CPUs: the stride count of per-CPU map values."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return n


def open_pins(pin_dir: str, layouts: dict[str, tuple[int, int]], fix: str,
              code: int = 0) -> dict[str, int]:
    """Open the maps pinned under `pin_dir` by name, refusing any whose (key, value) sizes are
    not `layouts`' (another meshnode version made it: `fix` says what to do; `code` is the
    error's errno). All or nothing: on an error none stays open."""
    fds: dict[str, int] = {}
    try:
        for name, layout in layouts.items():
            path = f"{pin_dir}/{name}"
            fds[name] = obj_get(path)
            _, key_size, value_size = map_info(fds[name])
            if (key_size, value_size) != layout:
                raise BpfError(f"pinned map {path} has key/value sizes {key_size}/{value_size}, "
                               f"this meshnode packs {layout[0]}/{layout[1]}", fix, errno=code)
    except BpfError:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds
