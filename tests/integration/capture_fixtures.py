"""Fixtures for the capture backend tests: one network namespace, one cgroup subtree, one pin
dir and one ledger per test, all removed afterwards even when the test fails.

The test process itself enters the namespace (pyroute2 pushns/popns) for the test's duration:
iptables rules, the fake proxy, backends and clients then all live in it, and nothing the test
does can touch the host's traffic. eBPF programs attach to cgroups, not namespaces: only the
test's own client processes are ever in the apps cgroup. Entering with setns keeps /sys as it
is (unlike `ip netns exec`, which remounts it and hides the cgroup2 mount).

Import the fixtures from this module (the lead owns conftest.py):
    from tests.integration.capture_fixtures import capture_env_fixture, netns_fixture  # noqa: F401
(registered under the names `capture_env` and `netns`, so test parameters shadow nothing).
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from meshnode import constants
from meshnode.capture import CaptureBackend, CaptureContext, undo_functions
from meshnode.capture.ebpf import BpfCapture
from meshnode.capture.iptables import IptablesCapture
from meshnode.host import cgroup
from meshnode.host.ledger import Ledger

PY = sys.executable

# A server: joins a cgroup, listens on every ADDR, answers each connection with one line
# "<label> <SO_ORIGINAL_DST or ->" and closes it. Prints "ready" once listening.
SERVER = r"""
import json, os, selectors, socket, struct, sys
cg, label, addrs = sys.argv[1], sys.argv[2], sys.argv[3:]
if cg != "-":
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))  # before any socket exists: sockets keep their cgroup
sel = selectors.DefaultSelector()
for a in addrs:
    host, port = a.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
    s.listen(64)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        conn, _peer = key.fileobj.accept()
        try:
            raw = conn.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
            port, = struct.unpack_from("!H", raw, 2)
            orig = f"{socket.inet_ntoa(raw[4:8])}:{port}"
        except OSError:  # not redirected: the address that answered
            orig = "%s:%d" % conn.getsockname()
        conn.sendall(f"{label} {orig}\n".encode())
        conn.close()
"""

# A client: joins a cgroup, optionally marks its socket, connects, prints JSON with the reply
# line or the errno, and how long it took.
CLIENT = r"""
import json, os, socket, sys, time
cg, family, host = sys.argv[1:4]
port, mark = int(sys.argv[4]), int(sys.argv[5])
if cg != "-":
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
s = socket.socket(socket.AF_INET6 if family == "6" else socket.AF_INET, socket.SOCK_STREAM)
if mark:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
s.settimeout(5)
t = time.monotonic()
try:
    s.connect((host, port))
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(256)
        if not chunk:
            break
        data += chunk
    print(json.dumps({"reply": data.decode().strip(), "secs": time.monotonic() - t}))
except OSError as e:
    print(json.dumps({"errno": e.errno, "secs": time.monotonic() - t}))
"""


@dataclass
class CaptureEnv:
    """One test's world: where things are, and the processes it started."""

    kind: str  # "ebpf" | "iptables" (whichever is usable) | "iptables-legacy"
    netns: str
    root: Path  # the test's cgroup subtree (meshnode-t<id>.slice)
    apps: Path
    app_service: Path  # an enrolled service's cgroup below apps
    proxy: Path
    other: Path  # a cgroup outside apps: not enrolled
    ctx: CaptureContext
    ledger_path: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    backend: CaptureBackend | None = None

    def make_backend(self) -> CaptureBackend:
        backend: CaptureBackend
        if self.kind == "ebpf":
            backend = BpfCapture(self.ctx)
        elif self.kind == "iptables-legacy":
            backend = IptablesCapture(self.ctx, binary="iptables-legacy")
        else:
            backend = IptablesCapture(self.ctx)
        self.backend = backend
        return backend

    def serve(self, cg: Path | None, label: str, *addrs: str, timeout: float = 10.0) -> None:
        proc = subprocess.Popen([PY, "-c", SERVER, str(cg) if cg else "-", label, *addrs],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        line = _read_line(proc, timeout)
        if line != "ready":
            err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
            raise AssertionError(f"server {label} did not start: {line!r} {err}")

    def connect(self, cg: Path | None, host: str, port: int, family: str = "4",
                mark: int = 0) -> dict[str, Any]:
        proc = subprocess.run([PY, "-c", CLIENT, str(cg) if cg else "-", family, host,
                               str(port), str(mark)],
                              capture_output=True, text=True, timeout=20, check=False)
        assert proc.returncode == 0, proc.stderr
        result: dict[str, Any] = json.loads(proc.stdout)
        return result


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """One stdout line, or "" at the deadline (a readiness wait, not a sleep)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline().strip()


def free_port() -> int:
    return 20000 + secrets.randbelow(20000)


@pytest.fixture(name="netns")
def netns_fixture() -> Iterator[str]:
    """A fresh network namespace with lo up; the test process runs inside it."""
    from pyroute2 import NetNS
    from pyroute2 import netns as pnetns

    name = f"mn-t{secrets.token_hex(4)}"
    pnetns.create(name)
    try:
        with NetNS(name) as ns:
            (lo,) = ns.link_lookup(ifname="lo")
            ns.link("set", index=lo, state="up")
        pnetns.pushns(name)
        try:
            yield name
        finally:
            pnetns.popns()
    finally:
        pnetns.remove(name)


@pytest.fixture(name="capture_env")
def capture_env_fixture(request: pytest.FixtureRequest, netns: str,
                        tmp_path: Path) -> Iterator[CaptureEnv]:
    """Cgroups, pin dir and ledger for one backend (request.param: a CaptureEnv.kind)."""
    kind = str(request.param)
    mount = cgroup.cgroup2_mount()
    tag = f"t{secrets.token_hex(4)}"
    root = mount / f"meshnode-{tag}.slice"
    apps, proxy, other = root / "apps", root / "proxy", root / "other"
    for group in (apps / "web", proxy, other):
        cgroup.create(group)
    ledger_path = tmp_path / "ledger.json"
    ctx = CaptureContext(
        instance=tag, cgroup2_mount=mount, apps_cgroup=apps, proxy_cgroup=proxy,
        pin_dir=Path(constants.PIN_ROOT) / tag, outbound_port=free_port(),
        proxy_mark=constants.PROXY_MARK, ledger=Ledger(ledger_path))
    env = CaptureEnv(kind, netns, root, apps, apps / "web", proxy, other, ctx, ledger_path)
    try:
        yield env
    finally:
        for proc in env.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        try:
            if env.backend is not None:
                env.backend.remove()
        finally:
            # Whatever remove() missed (or a test that never removed): a sweep as a new agent.
            failures = Ledger(ledger_path).undo_all(undo_functions())
            cgroup.remove_tree(root, evacuate_to=mount)
            assert not failures, failures


def bpf_leftovers(env: CaptureEnv) -> list[str]:
    """Every trace of the eBPF backend still on the machine (empty when clean)."""
    found: list[str] = []
    for group in (env.apps, env.proxy):
        out = subprocess.run(["bpftool", "cgroup", "show", str(group)], capture_output=True,
                             text=True, check=True).stdout
        found += [f"{group}: {line}" for line in out.splitlines() if "mn_" in line]
    tree = subprocess.run(["bpftool", "cgroup", "tree"], capture_output=True, text=True,
                          check=True).stdout
    found += [f"tree: {line}" for line in tree.splitlines() if env.root.name in line]
    if env.ctx.pin_dir.exists():
        found.append(f"pin dir {env.ctx.pin_dir}: {sorted(os.listdir(env.ctx.pin_dir))}")
    return found


def iptables_leftovers(env: CaptureEnv) -> list[str]:
    """Our chains or jumps in either iptables flavour, in the test's namespace."""
    found: list[str] = []
    for save in ("iptables-save", "iptables-legacy-save"):
        out = subprocess.run([save], capture_output=True, text=True, check=False).stdout
        found += [f"{save}: {line}" for line in out.splitlines()
                  if env.ctx.instance in line]
    return found

