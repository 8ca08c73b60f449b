"""The VMs: `vagrant up` / `destroy`, and commands in them over SSH.

Commands go through plain ssh with the config `vagrant ssh-config` prints, multiplexed over one
master connection per VM: `vagrant ssh` starts Ruby each time (seconds), and a fresh SSH
handshake with an emulated guest costs about a second.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

GUEST_PY = "/opt/meshnode/tests/vagrant/guest.py"


class GuestError(RuntimeError):
    pass


class Testbed:
    def __init__(self, vagrant_dir: Path, count: int, work: Path, log: Path) -> None:
        self.dir = vagrant_dir
        self.count = count
        self.work = work
        self.log = log
        self.ssh_config = work / "ssh-config"
        self.env = {**os.environ, "MESHNODE_VMS": str(count), "VAGRANT_CWD": str(vagrant_dir),
                    "VAGRANT_DEFAULT_PROVIDER": "libvirt", "VAGRANT_NO_COLOR": "1"}

    @property
    def vms(self) -> list[str]:
        return [f"vm{i}" for i in range(1, self.count + 1)]

    @staticmethod
    def ip(vm: str) -> str:
        return f"198.18.1.{10 + int(vm.removeprefix('vm'))}"

    def _vagrant(self, *args: str, echo: bool = True) -> int:
        """Run vagrant, its output to the log, and to stdout with seconds since the start.
        Interrupted (Ctrl-C, SIGTERM, a failure around us), it is stopped with its children
        before we go on: a `vagrant up` left running holds the machines' locks, so neither
        the teardown's `vagrant destroy` nor the next run can act on them."""
        t0 = time.monotonic()
        with self.log.open("a") as log:
            proc = subprocess.Popen(["vagrant", *args], cwd=self.dir, env=self.env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    stamped = f"[{time.monotonic() - t0:6.1f}s] {line.rstrip()}"
                    log.write(stamped + "\n")
                    if echo:
                        print("  " + stamped, flush=True)
                return proc.wait()
            except BaseException:
                _stop_group(proc)
                raise

    def up(self) -> None:
        if self._vagrant("up", "--no-tty") != 0:
            raise GuestError(f"vagrant up failed (see {self.log})")
        config = subprocess.run(["vagrant", "ssh-config"], cwd=self.dir, env=self.env,
                                capture_output=True, text=True, check=True, timeout=120)
        mux = (f"  ControlMaster auto\n  ControlPath {self.work}/ssh-%h\n"
               "  ControlPersist 600\n  ServerAliveInterval 5\n")
        self.ssh_config.write_text(config.stdout.replace("  LogLevel FATAL\n",
                                                         "  LogLevel FATAL\n" + mux))

    def destroy(self) -> int:
        self.close_ssh()
        return self._vagrant("destroy", "-f", echo=False)

    def close_ssh(self) -> None:
        if not self.ssh_config.exists():
            return
        for vm in self.vms:
            subprocess.run(["ssh", "-F", str(self.ssh_config), "-O", "exit", vm],
                           capture_output=True, timeout=10)

    def _argv(self, vm: str, cmd: str) -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), vm, cmd]

    def sh(self, vm: str, cmd: str, timeout: float = 120, check: bool = True) -> str:
        proc = subprocess.run(self._argv(vm, cmd), capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise GuestError(f"{vm}: `{cmd}` exited {proc.returncode}: "
                             f"{(proc.stderr or proc.stdout).strip()[-500:]}")
        return proc.stdout

    def spawn(self, vm: str, cmd: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self._argv(vm, cmd), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)

    def guest(self, vm: str, args: str, enrolled: str | None = None,
              timeout: float = 120) -> Any:
        """guest.py in the VM, as root (enrolled in service `enrolled`); its JSON answer."""
        run = f"meshnode run --service {enrolled} -- " if enrolled else ""
        out = self.sh(vm, f"sudo {run}python3 {GUEST_PY} {args}", timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])

    def meshnode(self, vm: str, args: str, timeout: float = 120) -> str:
        return self.sh(vm, f"sudo meshnode {args}", timeout=timeout)


def _stop_group(proc: subprocess.Popen[str]) -> None:
    """SIGINT (vagrant cleans up as after Ctrl-C), then SIGKILL to whatever of its group
    (ssh, rsync) is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def read_json_line(stream: IO[str] | None) -> Any:
    if stream is None:
        raise GuestError("no output stream")
    line = stream.readline()
    if not line:
        raise GuestError("the guest command ended without output")
    return json.loads(line)


def warn(msg: str) -> None:
    print(f"  ! {msg}", file=sys.stderr, flush=True)
