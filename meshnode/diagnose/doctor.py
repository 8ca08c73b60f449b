"""`meshnode doctor`: can this host run the agent, and what exactly fixes what cannot.

Each check is a `Check` (what was found, the fix when not ok, whether the agent needs it).
The agent can run with root, a cgroup v2 mount and one usable capture backend: eBPF (kernel
headers, bcc, every hook type and helper the C programs use) or iptables (nat table,
cgroup match, REDIRECT). Everything is probed for real and nothing is left behind: BPF probes
use a throwaway cgroup (meshnode.bpf.probe), the iptables rule goes into a throwaway network
namespace, port probes close their sockets. Never prints; must not import uvloop or bcc.
Runs in the CLI process, never in the agent: it sits above host/, bpf/ and capture/ (which
it probes) so that host/ imports none of them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil

from meshnode import constants
from meshnode.agent.client import AgentClient
from meshnode.bpf import probe
from meshnode.capture import iptables
from meshnode.config import control_socket_path, instance_name
from meshnode.errors import MeshnodeError
from meshnode.host import cgroup

Status = Literal["ok", "warn", "fail"]

CAPS: dict[str, int] = {"CAP_BPF": 39, "CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21}
CAPTURE_BACKENDS = ("ebpf", "iptables")  # the order `--capture auto` prefers them in
ROOT_FIX = "run as root: sudo meshnode doctor"
SYSTEM_PYTHON = "/usr/bin/python3"
BTF_PATH = Path("/sys/kernel/btf/vmlinux")
TIMEOUT = 15.0  # seconds per external command
# Debian's kernel header package flavour by machine.
_DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "powerpc64le", "s390x": "s390x"}
# Kernel release that brought each hook (so the fix can name one).
_HOOK_SINCE = {"cgroup/connect4": "4.17", "cgroup/connect6": "4.17", "sockops": "4.13",
               "cgroup/getsockopt": "5.3", "cgroup/sendmsg4": "4.18",
               "cgroup/recvmsg4": "5.2", "cgroup/getpeername4": "5.8",
               "cgroup/getpeername6": "5.8"}
_IPTABLES_VERSION = re.compile(r"v(\d[\w.]*)(?:\s+\((\w+)\))?")


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str  # what was found
    fix: str = ""  # the exact command or action, when not ok
    required: bool = False  # the agent cannot run at all while this fails

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_checks(instance: str) -> list[Check]:
    """Every check, in the order a user fixes them."""
    instance = instance_name(instance)
    root = os.geteuid() == 0
    checks = [check_privileges(), check_cgroup2(), check_bpffs(), check_btf(),
              check_kernel_headers(), check_bcc()]
    checks += check_bpf_kernel(root)
    checks.append(ebpf_verdict(checks))
    checks.append(check_iptables(root))
    checks += check_ports(instance)
    checks += check_certificates(instance)
    checks += check_gateway(instance)
    return checks


def capture_backend(checks: Iterable[Check]) -> str | None:
    """The backend `--capture auto` would get, if any is usable."""
    usable = {c.name for c in checks if c.ok}
    return next((b for b in CAPTURE_BACKENDS if f"capture: {b}" in usable), None)


def can_run(checks: Iterable[Check]) -> bool:
    """Root, cgroup v2 (the required checks) and at least one capture backend."""
    checks = list(checks)
    return (all(c.status != "fail" for c in checks if c.required)
            and capture_backend(checks) is not None)


# --- privileges ------------------------------------------------------------------------------

def parse_cap_eff(proc_status: str) -> int:
    """The effective capability mask from /proc/<pid>/status."""
    for line in proc_status.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise ValueError("no CapEff line")


def missing_caps(mask: int, last_cap: int) -> list[str]:
    """Capabilities meshnode needs that `mask` lacks. Kernels before 5.8 (last_cap < 39) have
    no CAP_BPF: CAP_SYS_ADMIN covers BPF there."""
    return [name for name, bit in CAPS.items() if bit <= last_cap and not mask >> bit & 1]


def check_privileges() -> Check:
    euid = os.geteuid()
    try:
        mask = parse_cap_eff(Path("/proc/self/status").read_text())
        last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError) as exc:
        return Check("privileges", "fail", f"cannot read capabilities: {exc}", ROOT_FIX, True)
    missing = missing_caps(mask, last_cap)
    if euid != 0:
        return Check("privileges", "fail", f"running as uid {euid}, not root", ROOT_FIX, True)
    if missing:
        flags = " ".join(f"--cap-add {m.removeprefix('CAP_')}" for m in missing)
        return Check("privileges", "fail",
                     f"root, but the effective capabilities lack {', '.join(missing)}",
                     f"grant them (a container: {flags}) or run on the host", True)
    held = ", ".join(name for name, bit in CAPS.items() if bit <= last_cap)
    return Check("privileges", "ok", f"root with {held}", required=True)


# --- mounts ----------------------------------------------------------------------------------

def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def visible_mounts(mountinfo: str) -> dict[str, str]:
    """Mount point -> file system type of the mount seen there (one mounted over another on
    the same point hides it: its parent is the one it covers)."""
    entries: list[tuple[str, str, str, str]] = []  # id, parent id, mount point, fstype
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        entries.append((fields[0], fields[1], _unescape(fields[4]), right.split()[0]))
    covered = {(parent, point) for _, parent, point, _ in entries}
    return {point: fstype for mid, _, point, fstype in entries if (mid, point) not in covered}


def check_cgroup2() -> Check:
    try:
        mount = cgroup.cgroup2_mount()
    except MeshnodeError as exc:
        return Check("cgroup v2", "fail", exc.message, exc.hint, True)
    return Check("cgroup v2", "ok", f"mounted at {mount}", required=True)


def check_bpffs() -> Check:
    fix = f"mount -t bpf bpf {constants.BPF_FS}"
    try:
        fstype = visible_mounts(Path("/proc/self/mountinfo").read_text()).get(constants.BPF_FS)
    except OSError as exc:
        return Check("bpffs", "fail", f"cannot read /proc/self/mountinfo: {exc.strerror}", fix)
    if fstype == "bpf":
        return Check("bpffs", "ok", f"mounted at {constants.BPF_FS}")
    found = (f"{constants.BPF_FS} is {fstype}, not bpffs" if fstype
             else f"not mounted at {constants.BPF_FS}")
    # the agent mounts it itself when it starts (capture/ebpf.py), so this alone stops nothing
    return Check("bpffs", "warn", f"{found}; the agent mounts it when it starts", fix)


def check_btf() -> Check:
    if BTF_PATH.exists():
        return Check("BTF", "ok", f"{BTF_PATH} present")
    return Check("BTF", "warn", f"{BTF_PATH} absent (not needed: meshnode's programs use "
                                "uapi structs only)",
                 "none needed; a kernel built with CONFIG_DEBUG_INFO_BTF=y provides it")


# --- bcc and its headers ---------------------------------------------------------------------

def _version_key(path: Path) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", path.name)]


def headers_fix(release: str, usr_src: Path = Path("/usr/src")) -> str:
    """What setup.sh does: Debian's header package, and build/source links to its two halves
    (Debian splits the tree into -<arch> and -common)."""
    arch = _DEB_ARCH.get(platform.machine(), "amd64")
    mods = Path("/lib/modules") / release
    install = f"apt install linux-headers-{arch}"
    dirs = sorted(usr_src.glob(f"linux-headers-*-{arch}"), key=_version_key)
    if dirs:
        common = dirs[-1].with_name(dirs[-1].name.removesuffix(f"-{arch}") + "-common")
        if common.is_dir():
            return (f"{install} && mkdir -p {mods} && ln -sfn {dirs[-1]} {mods}/build"
                    f" && ln -sfn {common} {mods}/source")
    return (f"{install}, then link {mods}/build and {mods}/source to "
            f"/usr/src/linux-headers-<version>-{arch} and -common (./setup.sh does both)")


def check_kernel_headers() -> Check:
    build = probe.kernel_headers()
    fix = headers_fix(platform.release())
    if not build.exists():
        return Check("kernel headers", "fail", f"{build} missing (bcc compiles against it)", fix)
    if not (build / "include").is_dir():
        return Check("kernel headers", "fail", f"{build} has no include/", fix)
    source = build.parent / "source"
    if not (build / "include" / "linux").is_dir() and not (source / "include" / "linux").is_dir():
        return Check("kernel headers", "fail",
                     f"{build} is half of a split tree and {source} is missing", fix)
    where = f"{build} -> {build.resolve()}" if build.is_symlink() else str(build)
    return Check("kernel headers", "ok", where)


def _bcc_version(package: Path) -> str:
    # Read, not imported: importing bcc would load LLVM into this process.
    with contextlib.suppress(OSError):
        m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", (package / "version.py").read_text())
        if m:
            return m.group(1)
    return "?"


def _system_python_has_bcc() -> bool:
    if not Path(SYSTEM_PYTHON).exists():
        return False
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('bcc') is None)"
    try:
        return subprocess.run([SYSTEM_PYTHON, "-c", code], capture_output=True,
                              timeout=TIMEOUT, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def check_bcc() -> Check:
    package = probe.bcc_origin()
    if package is not None:
        return Check("bcc", "ok", f"bcc {_bcc_version(package)} at {package}")
    if sys.executable != SYSTEM_PYTHON and _system_python_has_bcc():
        return Check("bcc", "fail",
                     f"{SYSTEM_PYTHON} has python3-bpfcc but {sys.executable} cannot import it",
                     f"{SYSTEM_PYTHON} -m venv --system-site-packages {sys.prefix}")
    return Check("bcc", "fail", "python3-bpfcc is not installed", "apt install python3-bpfcc")


# --- the kernel's BPF ------------------------------------------------------------------------

def check_bpf_kernel(root: bool) -> list[Check]:
    """One check per hook type and per helper; a single warning when they cannot be probed."""
    if not root:
        return [Check("bpf programs", "warn", "not checked: loading BPF programs needs root",
                      ROOT_FIX)]
    try:
        mount = cgroup.cgroup2_mount()
    except MeshnodeError as exc:
        return [Check("bpf programs", "warn", "not checked: no cgroup v2 mount to attach to",
                      exc.hint)]
    checks = []
    for r in probe.probe_features(mount):
        if r.feature in _HOOK_SINCE:
            fix = (f"a kernel {_HOOK_SINCE[r.feature]}+ with CONFIG_CGROUP_BPF=y, "
                   "or run the agent with --capture iptables")
            checks.append(Check(r.feature, "ok" if r.ok else "fail", r.detail,
                                "" if r.ok else fix))
        else:
            fix = "a newer kernel, or run the agent with --capture iptables"
            checks.append(Check(f"helper {r.feature}", "ok" if r.ok else "fail", r.detail,
                                "" if r.ok else fix))
    return checks


def ebpf_verdict(checks: Iterable[Check]) -> Check:
    """eBPF capture needs everything above but privileges, cgroup v2 (both required anyway)
    and BTF (optional)."""
    ignore = {"privileges", "cgroup v2", "BTF", "bpffs"}  # bpffs: the agent mounts it
    needed = [c for c in checks if c.name not in ignore]
    missing = [c.name for c in needed if c.status == "fail"]
    if missing:
        return Check("capture: ebpf", "fail", "unusable: needs " + ", ".join(missing),
                     "the fixes above, or run the agent with --capture iptables")
    unchecked = [c.name for c in needed if c.status == "warn"]
    if unchecked:
        return Check("capture: ebpf", "warn", "not checked: " + ", ".join(unchecked), ROOT_FIX)
    return Check("capture: ebpf", "ok", "usable (bcc, headers, every hook and helper)")


# --- iptables --------------------------------------------------------------------------------

def parse_iptables_version(text: str) -> tuple[str, str] | None:
    """(version, flavour) from `iptables --version`: "iptables v1.8.9 (nf_tables)" or
    "(legacy)"; releases before 1.8 name no flavour and are all legacy."""
    m = _IPTABLES_VERSION.search(text)
    if m is None:
        return None
    return m.group(1), m.group(2) or "legacy"


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _last_line(proc: subprocess.CompletedProcess[str] | None) -> str:
    if proc is None:
        return "did not run"
    return (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]


def check_iptables(root: bool) -> Check:
    name = "capture: iptables"
    if not root:
        return Check(name, "warn", "not checked: the nat table needs root", ROOT_FIX)
    try:
        binary = iptables.detect_binary()  # the one the agent would use: lists the nat table
    except MeshnodeError as exc:
        return Check(name, "fail", exc.message, "apt install iptables")
    proc = _run([binary, "--version"])
    version, flavour = (parse_iptables_version(proc.stdout) if proc else None) or ("?", "?")
    what = f"{binary} v{version} ({flavour})"
    # The rule the agent installs, in a network namespace that dies with the command: proves
    # the cgroup match, the mark match and REDIRECT in the kernel, and leaves nothing behind.
    rule = [binary, "-w", iptables.WAIT_SECONDS, "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
            "-m", "cgroup", "--path", "/", "-m", "mark", "!", "--mark", hex(constants.PROXY_MARK),
            "-j", "REDIRECT", "--to-ports", str(constants.OUTBOUND_PORT)]
    unshare = shutil.which("unshare")
    if unshare is not None:
        proc = _run([unshare, "--net", *rule])
    else:  # util-linux missing: the userspace half at least
        proc = _run([binary, "-m", "cgroup", "--help"])
    if proc is None or proc.returncode != 0:
        return Check(name, "fail", f"{what}: the cgroup match or REDIRECT is unusable: "
                                   f"{_last_line(proc)}",
                     "modprobe xt_cgroup xt_REDIRECT xt_mark (kernel: "
                     "CONFIG_NETFILTER_XT_MATCH_CGROUP, CONFIG_NETFILTER_XT_TARGET_REDIRECT)")
    return Check(name, "ok", f"{what}: nat table, -m cgroup and REDIRECT work")


# --- ports -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PortNeed:
    port: int
    protocols: tuple[str, ...]
    role: str
    option: str  # the agent option that moves it, if any


PORTS = (
    PortNeed(constants.OUTBOUND_PORT, ("tcp",), "outbound proxy", "--outbound-port"),
    PortNeed(constants.DNS_PORT, ("udp", "tcp"), "DNS", "--dns-port"),
    PortNeed(constants.ADMIN_PORT, ("tcp",), "admin", ""),
)


def _in_use(port: int, protocol: str) -> bool:
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:  # no SO_REUSEADDR: any holder counts
        try:
            s.bind((constants.PROXY_ADDR, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def _holders(port: int, protocol: str) -> set[int]:
    """PIDs with a socket bound to `port` (only our own processes' unless root)."""
    try:
        conns = psutil.net_connections(kind=protocol)
    except psutil.Error:
        return set()
    return {c.pid for c in conns if c.laddr and c.laddr.port == port and c.pid is not None
            and (protocol == "udp" or c.status == psutil.CONN_LISTEN)}


def _process_name(pid: int) -> str:
    try:
        return str(psutil.Process(pid).name())
    except psutil.Error:
        return "?"


def running_agent(instance: str) -> tuple[int, set[int]] | None:
    """This instance's running agent: its PID, and the PIDs of it and its workers; None if
    none answers on the control socket."""
    try:
        pid = int(AgentClient(control_socket_path(instance), timeout=2.0).call("ping")["pid"])
    except (MeshnodeError, OSError, ValueError, KeyError, TypeError):
        return None
    try:
        return pid, {pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))}
    except psutil.Error:
        return pid, {pid}


def check_ports(instance: str) -> list[Check]:
    agent: tuple[int, set[int]] | None = None
    agent_looked = False
    checks = []
    for need in PORTS:
        name = f"port {need.port}"
        addr = f"{constants.PROXY_ADDR}:{need.port}"
        try:
            busy = [p for p in need.protocols if _in_use(need.port, p)]
        except OSError as exc:
            checks.append(Check(name, "warn", f"{addr}: cannot bind: {exc.strerror}"))
            continue
        if not busy:
            checks.append(Check(name, "ok", f"{addr} {'+'.join(need.protocols)} free "
                                            f"({need.role})"))
            continue
        where = f"{addr} {'+'.join(busy)}"
        if not agent_looked:
            agent, agent_looked = running_agent(instance), True
        holders = set().union(*(_holders(need.port, p) for p in busy))
        if agent is not None and holders <= agent[1]:
            # a holder we cannot see (another user's socket) is the agent's as far as we know
            checks.append(Check(name, "ok", f"{where} in use by the running agent "
                                            f"(pid {agent[0]})"))
            continue
        others = sorted(holders - (agent[1] if agent else set()))
        who = (", ".join(f"{_process_name(p)} (pid {p})" for p in others) if others
               else "a socket whose owner is not visible (another user's, or TIME_WAIT)")
        flags = "".join(sorted({"t" if p == "tcp" else "u" for p in busy}))
        fix = f"see it with: ss -l{flags}np 'sport = :{need.port}'; stop it"
        fix += f", or start the agent with {need.option} PORT" if need.option else ""
        checks.append(Check(name, "warn", f"{where} in use by {who} ({need.role})", fix))
    return checks


# --- certificates ----------------------------------------------------------------------------
# The classic mesh outage is an expired root or issuer (linkerd2#3452, #15109): warn a month
# ahead. A leaf past 3/4 of its life means renewal (due at half-life) has been failing.
CA_WARN_DAYS = 30


@dataclass(frozen=True, slots=True)
class HeldCert:
    label: str  # identity or CA name, and where it was found
    kind: str  # root, issuer, node, workload
    not_before: float
    not_after: float


def certificate_checks(held: Iterable[HeldCert], now: float) -> list[Check]:
    """Warnings about the certificates found (none found: no checks)."""
    held = list(held)
    out: list[Check] = []
    anchors = [c for c in held if c.kind in ("root", "issuer")]
    if anchors:
        expired = [c for c in anchors if c.not_after <= now]
        soon = [c for c in anchors if now < c.not_after < now + CA_WARN_DAYS * 86_400]
        first = min(anchors, key=lambda c: c.not_after)
        if expired:
            out.append(Check("certificates: CA", "fail",
                             "expired: " + "; ".join(f"{c.kind} {c.label}" for c in expired),
                             "rotate now: meshnode ca root add, ca root activate FP, then ca "
                             "root remove OLDFP (on the CA host)"))
        elif soon:
            out.append(Check("certificates: CA", "warn", "expiring within 30 days: " + "; ".join(
                f"{c.kind} {c.label} in {(c.not_after - now) / 86_400:.0f}d" for c in soon),
                "rotate before then: meshnode ca root add; ca root activate FP; ca root remove "
                "OLDFP (on the CA host)"))
        else:
            out.append(Check("certificates: CA", "ok",
                             f"{len(anchors)} root/issuer certificate(s), the first expiring in "
                             f"{(first.not_after - now) / 86_400:.0f}d ({first.label})"))
    leaves = [c for c in held if c.kind in ("node", "workload")]
    if leaves:
        expired = [c for c in leaves if c.not_after <= now]
        stale = [c for c in leaves if c.not_after > now and
                 now - c.not_before > 0.75 * (c.not_after - c.not_before)]
        if expired or stale:
            what = [f"{c.label} expired" for c in expired]
            what += [f"{c.label} past 3/4 of its life ({(c.not_after - now) / 3600:.1f}h left)"
                     for c in stale]
            out.append(Check("certificates: leaves", "warn", "; ".join(what),
                             "the agent renews at half-life: check that it runs and that the "
                             "CA host answers (meshnode ca status; the agent log)"))
        else:
            out.append(Check("certificates: leaves", "ok",
                             f"{len(leaves)} leaf certificate(s), none past 3/4 of its life"))
    return out


def check_gateway(instance: str) -> list[Check]:
    """The ingress gateway listeners the running agent could not open (or serves with old
    certificates), as it wrote them to its run directory (agent/gateway.py)."""
    import json

    from meshnode.config import run_dir

    try:
        problems = json.loads((run_dir(instance) / "gateway.json").read_text())["problems"]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # no gateway on this host (or no agent)
    return [Check(f"gateway {label}", "fail", str(why),
                  "fix the Gateway's certificate or key file (the agent reads it again "
                  "within seconds), or the Gateway: meshnode apply -f")
            for label, why in sorted(problems.items())]


def check_certificates(instance: str) -> list[Check]:
    """The CA's roots, issuers and issued leaves (on the CA host), and the bundle and
    certificates this host's agent holds; read from disk (doctor runs as root)."""
    from meshnode.config import AgentConfig

    cfg = AgentConfig(instance=instance)
    try:
        held = list(_held_certificates(cfg.state_path, cfg.run_dir))
    except (OSError, ValueError, MeshnodeError) as exc:
        return [Check("certificates", "warn", f"cannot read them: {exc}",
                      "run as root: sudo meshnode doctor")]
    from meshnode.security import clock

    return certificate_checks(held, clock.now())


def _held_certificates(state: Path, run: Path) -> Iterable[HeldCert]:
    import json

    from meshnode.security import certs
    from meshnode.security.ca import CertificateAuthority

    seen: set[str] = set()  # fingerprints (CA certificates) and serials (leaves) shown
    out: list[HeldCert] = []

    def add(pem: str, kind: str, where: str) -> HeldCert | None:
        c = certs.load_cert(pem)
        ids = {certs.fingerprint(c), format(c.serial_number, "x")}
        if ids & seen:
            return None
        seen.update(ids)
        held = HeldCert(f"{certs.subject_of(c)} ({where})", kind, certs.not_before(c),
                        certs.not_after(c))
        out.append(held)
        return held

    ca_dir = state / "ca"
    ca = CertificateAuthority.open(ca_dir) if CertificateAuthority.exists(ca_dir) else None
    if ca is not None:
        for a in ca.authorities.values():
            add(certs.cert_pem(a.root), "root", f"CA root {a.fp}")
            if a.issuer is not None:
                add(certs.cert_pem(a.issuer), "issuer", f"CA issuer {a.fp}")
    identity = state / "identity"
    bundle_file = identity / "bundle.json"
    if bundle_file.exists():
        b = json.loads(bundle_file.read_text())
        for pem in b.get("roots", []):
            add(pem, "root", "trust bundle")
        for pem in (b.get("issuerChain") or [])[:1]:
            add(pem, "issuer", "trust bundle")
    node = identity / "node.pem"
    if node.exists():
        add(certs.split_pem(node.read_text())[0], "node", str(node))
    # workload files: write-once names (<name>-<digest>.pem); the newest of each name counts
    newest: dict[str, str] = {}
    for path in sorted((run / "identity").glob("*.pem"), key=lambda p: p.stat().st_mtime):
        name = path.stem.rpartition("-")[0]
        if name and not name.startswith("bundle"):
            newest[name] = str(path)
    for path_name in newest.values():
        pems = certs.split_pem(Path(path_name).read_text())
        if pems:
            add(pems[0], "workload", path_name)
    if ca is not None:  # what the CA issued to every host (this host's own is shown above)
        for r in ca.issued():
            if r["node"] not in ca.revoked and r["serial"] not in seen:
                out.append(HeldCert(f"{r['identity']} (issued to {r['node']})", r["kind"],
                                    float(r["not_before"]), float(r["not_after"])))
    return out
