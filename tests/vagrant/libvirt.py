"""The host side of libvirt: its daemons (no systemd here), the `default` NAT network that must
never run, and the check that nothing of ours (named meshnode*) is left behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "meshnode"
POOL = "default"
AUTOSTART_DEFAULT = Path("/etc/libvirt/qemu/networks/autostart/default.xml")
KVM = Path("/dev/kvm")


def virsh(*args: str, check: bool = False) -> str:
    proc = subprocess.run(["virsh", "-q", *args], capture_output=True, text=True, timeout=60,
                          check=check)
    return proc.stdout


def _names(out: str, column: int = 0) -> list[str]:
    return [line.split()[column] for line in out.splitlines() if line.split()]


def _running(name: str) -> bool:
    return subprocess.run(["pgrep", "-x", "-r", "D,R,S", name], capture_output=True).returncode == 0


@dataclass
class Leftovers:
    domains: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.domains or self.networks or self.volumes)

    def __str__(self) -> str:
        return (f"domains {self.domains or 'none'}, networks {self.networks or 'none'}, "
                f"volumes {self.volumes or 'none'}")


class LibvirtHost:
    """Starts virtlogd and libvirtd when they are not running, and later stops exactly those."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.pool_existed = True
        self.kvm_mode: tuple[int, int] | None = None  # (mode, gid) to put back

    def _kvm_for_qemu_user(self) -> None:
        """/dev/kvm as udev leaves it on Debian (root:kvm 0660). Without udev it is root-only:
        libvirt's probe (as root) then sees KVM but its cache check (as libvirt-qemu) does not,
        so every define and start re-probes QEMU (about 30 s each: 7 minutes for 3 VMs)."""
        if not KVM.exists() or self.kvm_mode is not None:
            return
        st = KVM.stat()
        kvm_gid = int(subprocess.run(["getent", "group", "kvm"], capture_output=True,
                                     text=True).stdout.split(":")[2] or -1)
        if st.st_gid != kvm_gid or not st.st_mode & 0o060:
            self.kvm_mode = (st.st_mode & 0o7777, st.st_gid)
            os.chown(KVM, -1, kvm_gid)
            os.chmod(KVM, 0o660)

    def start(self) -> None:
        self._kvm_for_qemu_user()
        # a NAT network on 192.168.122.0/24 must never come up: drop its autostart first
        AUTOSTART_DEFAULT.unlink(missing_ok=True)
        for daemon in ("virtlogd", "libvirtd"):
            if not _running(daemon):
                subprocess.run([daemon, "-d"], check=True, timeout=30)
                self.started.append(daemon)
        self._wait_ready()
        if "default" in _names(virsh("net-list", "--all")):
            virsh("net-autostart", "--disable", "default")
            virsh("net-destroy", "default")
        self.pool_existed = POOL in _names(virsh("pool-list", "--all"))

    def _wait_ready(self, timeout: float = 30) -> None:
        t0 = time.monotonic()
        while subprocess.run(["virsh", "-q", "version"], capture_output=True).returncode != 0:
            if time.monotonic() - t0 > timeout:
                raise RuntimeError("libvirtd did not answer within 30 s")
            time.sleep(0.2)

    def leftovers(self) -> Leftovers:
        pools = _names(virsh("pool-list", "--all"))
        volumes = _names(virsh("vol-list", POOL)) if POOL in pools else []
        return Leftovers(
            domains=[d for d in _names(virsh("list", "--all", "--name")) if d.startswith(PREFIX)],
            networks=[n for n in _names(virsh("net-list", "--all")) if n.startswith(PREFIX)],
            volumes=[v for v in volumes if v.startswith(PREFIX)])

    def remove(self, left: Leftovers) -> None:
        """What `vagrant destroy` leaves on purpose (the box's base volume) or by failure."""
        for dom in left.domains:
            virsh("destroy", dom)
            virsh("undefine", dom, "--remove-all-storage")
        for net in left.networks:
            virsh("net-destroy", net)
            virsh("net-undefine", net)
        for vol in left.volumes:
            virsh("vol-delete", "--pool", POOL, vol)
        if not self.pool_existed and POOL in _names(virsh("pool-list", "--all")):
            virsh("pool-destroy", POOL)
            virsh("pool-undefine", POOL)

    def stop(self) -> None:
        if self.kvm_mode is not None:
            os.chmod(KVM, self.kvm_mode[0])
            os.chown(KVM, -1, self.kvm_mode[1])
            self.kvm_mode = None
        for daemon in reversed(self.started):
            pidfile = Path(f"/run/{daemon}.pid")
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)
            t0 = time.monotonic()
            while _running(daemon) and time.monotonic() - t0 < 10:
                time.sleep(0.1)
        self.started.clear()


def have_tools() -> list[str]:
    return [t for t in ("vagrant", "virsh", "libvirtd", "virtlogd", "qemu-system-x86_64",
                        "mmdebstrap", "qemu-img") if shutil.which(t) is None]
