"""`python -m tests.vagrant [--vms N] [--keep-box]`, as root (`make vagrant-test`).

Builds the box if needed, starts libvirt, brings the VMs up (setup.sh provisions each), runs
the scenarios, collects every VM's agent journal, status and metrics into
artifacts/vagrant/<timestamp>/, prints a summary and the time of each phase (also written there
as summary.txt). Whatever happens (failure, Ctrl-C, SIGTERM), it destroys the VMs, checks with
virsh that nothing of ours is left and stops the libvirt daemons it started.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from tests.vagrant import scenarios, wheels
from tests.vagrant.libvirt import LibvirtHost, have_tools
from tests.vagrant.scenarios import Result
from tests.vagrant.testbed import Testbed, warn

REPO = Path(__file__).resolve().parents[2]
VAGRANT_DIR = REPO / "vagrant"
METRICS = ("import urllib.request as u; "
           "print(u.urlopen('http://127.0.0.1:15090/metrics', timeout=10).read().decode())")


class Phases:
    """Wall time per phase, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = time.monotonic() - t0

    def report(self) -> str:
        parts = [f"{k} {v:.0f}s" for k, v in self.seconds.items()]
        return " + ".join(parts) + f" = {sum(self.seconds.values()):.0f}s"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the finally blocks: the VMs are destroyed


def run_scenarios(tb: Testbed, ttl: int) -> list[Result]:
    members = tb.vms[:3] if len(tb.vms) >= 3 else tb.vms[:1]
    secured = scenarios.secure_mesh(tb)  # every scenario below runs over mTLS STRICT
    print(f"   {'PASS' if secured.ok else 'FAIL'} {secured.name} ({secured.seconds:.0f}s): "
          f"{secured.numbers}", flush=True)
    vip = scenarios.start_web(tb)
    steps: list[tuple[str, Callable[[], list[Result]]]] = [
        ("f'. STRICT: plaintext from another VM refused",
         lambda: [scenarios.plaintext_refused(tb)]),
        # d shares a's calls: the clients on vm1 (eBPF) and the others (iptables) are captured
        ("a. web on every VM, by VIP and name; d. capture: eBPF and iptables",
         lambda: scenarios.reachable(tb, vip)),
        ("c. etcd members restarted",
         lambda: [scenarios.etcd_restarts(tb, vip, members)]),
        ("e. agent restarted and reloaded by systemd",
         lambda: [scenarios.agent_restarted(tb, vip)]),
        # last: it kills an agent
        ("b. agent SIGKILLed -> endpoints gone",
         lambda: [scenarios.agent_killed(tb, vip, ttl)]),
    ]
    results = []
    for name, step in steps:
        t0 = time.monotonic()
        try:
            rs = step()
        except Exception as exc:  # one scenario's failure must not stop the others
            rs = [Result(name, False, f"error: {exc}"[:400], time.monotonic() - t0)]
        for r in rs:
            print(f"   {'PASS' if r.ok else 'FAIL'} {r.name} ({r.seconds:.0f}s): {r.numbers}",
                  flush=True)
        results += rs
    return sorted([secured, *results], key=lambda r: r.name)


COLLECT = (("agent.log", "sudo journalctl -b -u meshnode-agent --no-pager"),
           ("etcd.log", "sudo journalctl -b -u etcd --no-pager"),
           ("status.json", "sudo meshnode status -o json"),
           ("metrics.txt", f'python3 -c "{METRICS}"'))
_MARK = "=== meshnode-collect "


def collect(tb: Testbed, out: Path) -> None:
    """Every VM's agent journal, status and metrics, in one SSH session per VM (best effort:
    also after a failure)."""
    script = "; ".join(f"echo '{_MARK}{name}'; {cmd}" for name, cmd in COLLECT)

    def one(vm: str) -> None:
        try:
            text = tb.sh(vm, script, timeout=180, check=False)
        except subprocess.TimeoutExpired:
            text = ""
        parts = dict.fromkeys((name for name, _ in COLLECT), "(not collected)\n")
        chunks = re.split(f"^{re.escape(_MARK)}(\\S+)\n", text, flags=re.M)
        parts.update(zip(chunks[1::2], chunks[2::2], strict=True))
        for name, body in parts.items():
            (out / f"{vm}-{name}").write_text(body)

    scenarios.each(tb, one)


def summary(results: list[Result]) -> str:
    rows = [("SCENARIO", "RESULT", "SECONDS", "KEY NUMBERS")]
    rows += [(r.name, "PASS" if r.ok else "FAIL", f"{r.seconds:.0f}", r.numbers)
             for r in results]
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}  {d}" for a, b, c, d in rows)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.vagrant", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=int(os.environ.get("MESHNODE_VMS", "3")))
    ap.add_argument("--out", type=Path, default=None, help="artifacts folder")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (libvirt, the box build)", file=sys.stderr)
        return 77
    if missing := have_tools():
        print(f"missing {', '.join(missing)}: run ./setup.sh vagrant", file=sys.stderr)
        return 69
    ttl = int(os.environ.setdefault("MESHNODE_REGISTRY_TTL", "10"))  # as the Vagrantfile
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or REPO / "artifacts" / "vagrant" / stamp
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("MESHNODE_VAGRANT_CACHE", VAGRANT_DIR / ".cache"))
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)

    phase, results = Phases(), list[Result]()
    host = LibvirtHost()
    tb = Testbed(VAGRANT_DIR, args.vms, out, out / "vagrant.log")
    up_ok = False
    try:
        with phase("box build"):
            built = wheels.build(REPO / "pyproject.toml", cache / "wheels")
            print(f"   wheelhouse {'built' if built else 'up to date'}", flush=True)
            subprocess.run([str(VAGRANT_DIR / "build-box.sh")], check=True,
                           env={**os.environ, "MESHNODE_BOX_WHEELS": str(cache / "wheels")})
        with phase("libvirt"):
            host.start()
        with phase(f"VM start ({args.vms}, provisioned)"):
            tb.up()
            up_ok = True
        with phase("scenarios"):
            results = run_scenarios(tb, ttl)
    except (Exception, KeyboardInterrupt) as exc:
        warn(f"stopped: {exc!r}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # teardown is not to be interrupted
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        clean, cleanup = teardown(tb, host, phase, out, collected=up_ok)
    ok = up_ok and clean and bool(results) and all(r.ok for r in results)
    report = (f"{summary(results)}\n\nwall time: {phase.report()}\n{cleanup}\n\n"
              f"{sum(r.ok for r in results)} passed, {sum(not r.ok for r in results)} failed")
    (out / "summary.txt").write_text(report + "\n")
    print(f"\nartifacts: {out}\n\n{report}")
    return 0 if ok else 1


def teardown(tb: Testbed, host: LibvirtHost, phase: Phases, out: Path,
             collected: bool) -> tuple[bool, str]:
    """Destroy the VMs and check nothing of ours is left: (clean, what was found)."""
    if collected:
        with phase("collect"):
            try:
                collect(tb, out)
            except Exception as exc:
                warn(f"collecting artifacts failed: {exc!r}")
    with phase("teardown"):
        rc = tb.destroy() if _libvirt_up() else 0
        left = host.leftovers() if _libvirt_up() else None
        if left:
            host.remove(left)  # the box's base volume, or whatever a failure left
        after = host.leftovers() if _libvirt_up() else None
        stopped = list(host.started)
        host.stop()
    line = (f"teardown: vagrant destroy exit {rc}; removed after it: {left or 'nothing'}; "
            f"left now: {after if after is not None else 'libvirt not running'}; "
            f"stopped daemons: {', '.join(stopped) or 'none (were running already)'}")
    print(f"   {line}")
    return rc == 0 and not after, line


def _libvirt_up() -> bool:
    return subprocess.run(["virsh", "-q", "version"], capture_output=True).returncode == 0


if __name__ == "__main__":
    sys.exit(main())
