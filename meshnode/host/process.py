"""Processes (psutil): validate a PID for enrollment, guard against PID reuse, read the TCP
ports a process tree listens on, and watch for exit without polling (pidfd)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

import psutil

from meshnode.errors import AccessError, NotFoundError, UnavailableError, UsageError
from meshnode.model import HostPort
from meshnode.sockdiag import Address, SockDiag

_PF_KTHREAD = 0x00200000  # include/linux/sched.h


@dataclass(frozen=True, slots=True)
class ProcessId:
    """A PID plus its start time: together they name one process, even after PID reuse."""

    pid: int
    start_time: float

    def alive(self) -> bool:
        try:
            return bool(psutil.Process(self.pid).create_time() == self.start_time)
        except psutil.Error:
            return False


def _no_such(pid: int) -> NotFoundError:
    return NotFoundError(f"no process with PID {pid}", "check the PID with: ps -p PID")


def identify(pid: int) -> ProcessId:
    """Check that `pid` can be enrolled and return its identity."""
    if pid <= 0:
        raise UsageError(f"invalid PID {pid}", "give the PID of a running process")
    if pid == 1:
        raise UsageError("PID 1 cannot be enrolled", "enroll the service's own process instead")
    try:
        p = psutil.Process(pid)
        with open(f"/proc/{pid}/stat") as f:
            # the comm field may hold spaces and parentheses: split after the last ')'
            flags = int(f.read().rpartition(")")[2].split()[6])
        start = p.create_time()
    except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
        raise _no_such(pid) from None
    if flags & _PF_KTHREAD:
        raise UsageError(f"PID {pid} is a kernel thread", "enroll a user-space process")
    return ProcessId(pid, start)


def same_netns(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except FileNotFoundError:
        raise _no_such(pid) from None
    except PermissionError:  # ptrace access refused, even to root: another user namespace
        raise AccessError(f"cannot read the network namespace of PID {pid}",
                          "give the PID of a process in the agent's own namespace") from None


def tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _endpoint_ip(addr: Address, host_address: IPv4Address) -> IPv4Address | None:
    if addr.is_unspecified:
        return host_address
    if isinstance(addr, IPv6Address):
        return addr.ipv4_mapped  # a v6-only listener on a v6 address is not reachable by IPv4
    return addr


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets the process tree of `pid` holds open."""
    inodes: set[int] = set()
    for p in tree(pid):
        fds = f"/proc/{p.pid}/fd"
        try:
            names = os.listdir(fds)
        except OSError:
            continue  # gone, or a zombie
        for name in names:
            try:
                link = os.readlink(f"{fds}/{name}")
            except OSError:
                continue  # closed meanwhile
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    return inodes


Listeners = dict[int, tuple[Address, int]]


def tcp_listeners() -> Listeners:
    """This network namespace's listening TCP sockets, by inode (one sock_diag dump)."""
    diag = SockDiag()
    try:
        return diag.tcp_listeners()
    except OSError as exc:
        raise UnavailableError(f"cannot list listening sockets through sock_diag: {exc}",
                               "load the kernel's socket diagnostics: modprobe tcp_diag") from exc
    finally:
        diag.close()


def listening(pid: int, host_address: IPv4Address, listeners: Listeners) -> set[HostPort]:
    """The TCP addresses the process and its descendants listen on, as IPv4 endpoints
    (wildcard listeners are reachable at the host's address). `listeners` is the namespace's
    listening sockets by inode (`SockDiag.tcp_listeners`), read once per scan."""
    found: set[HostPort] = set()
    for inode in socket_inodes(pid) & listeners.keys():
        addr, port = listeners[inode]
        ip = _endpoint_ip(addr, host_address)
        if ip is not None:
            found.add(HostPort(ip, port))
    return found


def pidfd(pid: int) -> int:
    """A descriptor that becomes readable when the process exits."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise _no_such(pid) from None


_SYS_PIDFD_GETFD = 438  # the same on every architecture (syscalls numbered after 5.1 are)


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A copy of descriptor `target_fd` of the process behind `pidfd` (close-on-exec), the way
    a restarted agent takes the proxy's listening socket back from a worker it adopts."""
    import ctypes  # only here: the rest of the module has no use for it

    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0))
    if fd < 0:
        err = ctypes.get_errno()
        raise UnavailableError(f"cannot copy descriptor {target_fd} of a worker: "
                               f"{os.strerror(err)}", "pidfd_getfd(2) needs Linux 5.6 and root")
    return fd


def is_root() -> bool:
    return os.geteuid() == 0


__all__ = ["IPv4Address", "ProcessId", "identify", "is_root", "listening", "pidfd", "pidfd_getfd",
           "same_netns", "tree"]
