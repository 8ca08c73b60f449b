"""The multi-host scenarios, as in tests/e2e/test_multihost.py but across real VMs.

Each returns its Result (a and d, which share their calls, one each); an exception inside one
fails that scenario only. SSH round trips are few on purpose: a guest process starts ~35x
slower than on the host (TCG).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from tests.vagrant.testbed import GUEST_PY, GuestError, Testbed, read_json_line

PORT = 18080
T = TypeVar("T")
UNIT = "meshnode-agent.service"
DROPIN = "/run/systemd/system/meshnode-agent.service.d"


@dataclass
class Result:
    name: str
    ok: bool
    numbers: str
    seconds: float


def each(tb: Testbed, fn: Callable[[str], T]) -> dict[str, T]:
    """fn(vm) on every VM at once."""
    with ThreadPoolExecutor(len(tb.vms)) as pool:
        return dict(zip(tb.vms, pool.map(fn, tb.vms), strict=True))


def wait_count(tb: Testbed, n: int, timeout: float = 120) -> dict[str, Any]:
    return each(tb, lambda vm: tb.guest(vm, f"wait-count web {n} {timeout}",
                                        timeout=timeout + 30))


def secure_mesh(tb: Testbed) -> Result:
    """f. mTLS STRICT between the VMs, set up as the README says: vm1 holds the mesh CA, the
    others join it with a single-use token each (in their agent.yaml, applied with
    `systemctl reload`), and the Mesh resource makes STRICT the default. Every later scenario
    runs over mTLS."""
    t0 = time.monotonic()
    first, others = tb.vms[0], tb.vms[1:]
    tb.meshnode(first, "ca init --trust-domain vagrant.test")

    def join(vm: str) -> None:
        token = tb.meshnode(first, "ca token create --ttl 30m").strip()
        tb.sh(vm, f"echo 'join-token: {token}' | sudo tee /etc/meshnode/agent.yaml >/dev/null"
                  " && sudo systemctl reload meshnode-agent")

    for vm in others:  # each VM its own single-use token
        join(vm)
    tb.sh(first, "printf '%s\\n' 'kind: Mesh' 'name: mesh' 'spec:' '  mtls: {mode: STRICT}' "
                 "> /tmp/mesh.yaml && sudo meshnode apply -f /tmp/mesh.yaml")
    ready = each(tb, lambda vm: tb.guest(vm, "wait-identity 600", timeout=660))
    ok = all(r["identity"] for r in ready.values())
    numbers = "identities: " + ", ".join(f"{vm} {r['after_s']}s" for vm, r in ready.items())
    return Result("f. mTLS STRICT between the VMs", ok, numbers, time.monotonic() - t0)


def plaintext_refused(tb: Testbed) -> Result:
    """f'. Under STRICT, a process on vm2 that is not in the mesh reaching vm1's endpoint
    directly (plaintext) is refused at once by vm1's kernel."""
    t0 = time.monotonic()
    r = tb.guest(tb.vms[-1], f"get http://{tb.ip(tb.vms[0])}:{PORT}/")
    refused = not r["ok"] and "Connection refused" in r["text"]
    return Result("f'. STRICT: plaintext from another VM refused", refused,
                  f"{r['text'][:80]} after {r['after_s']}s", time.monotonic() - t0)


def start_web(tb: Testbed) -> str:
    """Service web (round robin, no locality: calls must reach every VM) with one instance
    per VM, answering with its VM's name; returns the VIP once every agent sees them all."""
    svc = tb.meshnode("vm1", "service add web --port 80 --lb round-robin --no-locality -o json")
    vip = str(json.loads(svc)["vip"])
    each(tb, lambda vm: tb.sh(vm, serve_cmd(vm)))
    seen = wait_count(tb, len(tb.vms))
    missing = {vm: r["count"] for vm, r in seen.items() if r["count"] != len(tb.vms)}
    if missing:
        raise GuestError(f"endpoints seen per VM {missing}, want {len(tb.vms)}")
    return vip


def reachable(tb: Testbed, vip: str) -> list[Result]:
    """a. From an enrolled client on every VM, by VIP and by name: every instance answers.
    d. The same calls are capture at work on the VMs' own kernel, in both backends: vm1 was
    set up with eBPF, the others with iptables (Vagrantfile), and each agent says so."""
    t0 = time.monotonic()
    n = 10 * len(tb.vms)
    by = {"vip": f"http://{vip}/", "name": "http://web.mesh/"}
    got = each(tb, lambda vm: tb.guest(vm, f"calls {by['vip']} {n} {by['name']}",
                                       enrolled="client"))
    want = set(tb.vms)
    answered = {vm: all(r[url]["failed"] == 0 and set(r[url]["replies"]) == want
                        for url in by.values())
                for vm, r in got.items()}
    numbers = "; ".join(f"{vm}: vip {_counts(r[by['vip']])} name {_counts(r[by['name']])}"
                        for vm, r in got.items())
    seconds = time.monotonic() - t0
    a = Result("a. web on every VM, by VIP and name", all(answered.values()), numbers, seconds)
    backends = {vm: ("ebpf" if vm == tb.vms[0] else "iptables") for vm in tb.vms}
    d_ok = all(answered[vm] and got[vm]["capture"]["backend"] == b for vm, b in backends.items())
    shown = list(dict.fromkeys([tb.vms[0], tb.vms[-1]]))  # one of each backend, with reasons
    lines = [f"{vm}: {got[vm]['capture']['reason']!r}" for vm in shown]
    lines += [f"{vm}: {got[vm]['capture']['backend']}" for vm in tb.vms if vm not in shown]
    lines.append(f"a's calls from each answered: {all(answered.values())}")
    d = Result("d. capture: eBPF and iptables", d_ok, "; ".join(lines), seconds)
    return [a, d]


def _counts(r: dict[str, Any]) -> str:
    c = " ".join(f"{vm}:{n}" for vm, n in sorted(r["replies"].items()))
    return "{" + c + "}" + (f" ({r['failed']} failed)" if r["failed"] else "")


def agent_killed(tb: Testbed, vip: str, ttl: int) -> Result:
    """b. SIGKILL the last VM's agent (unit kept from restarting): its endpoint leaves the
    other VMs within the lease TTL."""
    t0 = time.monotonic()
    victim, others = tb.vms[-1], tb.vms[:-1]
    gone = f"{tb.ip(victim)}:{PORT}"
    tb.sh(victim, f"sudo mkdir -p {DROPIN} && printf '[Service]\\nRestart=no\\n' "
                  f"| sudo tee {DROPIN}/no-restart.conf >/dev/null && sudo systemctl daemon-reload")
    watchers = {vm: tb.spawn(vm, f"sudo python3 {GUEST_PY} wait-gone web {gone} {ttl + 20}")
                for vm in others}
    for w in watchers.values():
        read_json_line(w.stdout)  # watching
    # The kill happens somewhere inside this SSH round trip (seconds under emulation): the
    # time to "gone" is bounded from both of its ends.
    before = time.monotonic()
    tb.sh(victim, f"sudo systemctl kill -s KILL {UNIT}")
    after_kill = time.monotonic()
    bounds: dict[str, tuple[float, float]] = {}
    for vm, w in watchers.items():
        r = read_json_line(w.stdout)
        w.wait(30)
        now = time.monotonic()
        bounds[vm] = (now - after_kill, now - before) if r["gone"] else (float("inf"),) * 2
    url = f"http://{vip}/"
    after = tb.guest(others[0], f"calls {url} 10", enrolled="client")[url]
    # Within the TTL, plus 2 s: etcd revokes expired leases on a 500 ms tick and commits the
    # revoke through raft, the watch carries it to the agent, and the watcher polls the agent's
    # status, each of which takes hundreds of ms on an emulated CPU (the namespace e2e test,
    # on real CPUs, holds it to the TTL).
    ok = (all(lo <= ttl + 2 for lo, _ in bounds.values()) and after["failed"] == 0
          and set(after["replies"]) == set(others))
    numbers = (", ".join(f"gone at {vm} {lo:.1f}-{hi:.1f}s after the kill"
                         for vm, (lo, hi) in bounds.items())
               + f" (TTL {ttl}s); then {after['replies']}")
    # back as it was: restartable, running, its instance registered again
    tb.sh(victim, f"sudo rm -rf {DROPIN} && sudo systemctl daemon-reload "
                  f"&& sudo systemctl start {UNIT}")
    adopted = readopt(tb, victim)
    numbers += f"; restarted agent registered its instance again: {adopted}"
    return Result("b. agent SIGKILLed -> endpoints gone", ok and adopted, numbers,
                  time.monotonic() - t0)


def readopt(tb: Testbed, vm: str) -> bool:
    """After `vm`'s agent restarted: True when every VM sees all web instances again, the
    restarted agent having re-adopted its instance (which kept running) and registered it
    under its new lease."""
    n = len(tb.vms)
    if not tb.guest(vm, "wait-ready 120", timeout=150)["ready"]:
        raise GuestError(f"{vm}: the restarted agent is not ready after 120 s")
    return all(r["count"] == n for r in wait_count(tb, n, 60).values())


def serve_cmd(vm: str) -> str:
    return (f"sudo setsid nohup meshnode run --service web -- python3 {GUEST_PY} serve {vm} "
            f"{PORT} >/tmp/web.log 2>&1 </dev/null &")


def etcd_restarts(tb: Testbed, vip: str, members: list[str]) -> Result:
    """c. Restart the etcd members one at a time while vm1 calls continuously: no call fails."""
    t0 = time.monotonic()
    client = tb.vms[0]
    # the first restart only once calls are flowing (the loop marks its first answer)
    _start_loop(tb, client, vip)
    restart_s = []
    for vm in members:
        r0 = time.monotonic()
        # Type=notify: returns once the member is back in the cluster
        tb.sh(vm, "sudo systemctl restart etcd.service", timeout=180)
        restart_s.append(time.monotonic() - r0)
    tb.sh(client, "sudo touch /tmp/stop")
    r = _wait_loop(tb, client)
    # every agent back on etcd (each reconnects with backoff: wait, within a bound)
    back = each(tb, lambda vm: tb.guest(vm, "wait-registry 60", timeout=90))
    reconnected = all(b["connected"] for b in back.values())
    ok = r["failed"] == 0 and r["ok"] > 20 and reconnected
    numbers = (f"{r['ok'] + r['failed']} calls, {r['failed']} failed, during "
               f"{len(members)} restarts ({', '.join(f'{s:.1f}s' for s in restart_s)}); "
               f"replies {r['replies']}; agents reconnected {reconnected} "
               f"(within {max(b['after_s'] for b in back.values()):.1f}s of the loop's end)")
    if r["errors"]:
        numbers += f"; errors {r['errors'][:2]}"
    return Result("c. etcd members restarted", ok, numbers, time.monotonic() - t0)


def agent_restarted(tb: Testbed, vip: str) -> Result:
    """e. The unit as installed (Type=notify, KillMode=mixed, ExecReload): `systemctl restart`
    then `systemctl reload` of the agent on vm1 (eBPF) and the last VM (iptables), each VM
    calling web continuously meanwhile: no call fails and the workers are the same processes
    before and after (the new agent adopted them)."""
    t0 = time.monotonic()

    def workers(vm: str) -> list[int]:
        status = json.loads(tb.meshnode(vm, "status -o json"))
        return sorted(int(w["pid"]) for w in status["workers"] if not w.get("retiring"))

    def one(vm: str) -> dict[str, Any]:
        _start_loop(tb, vm, vip)
        before = workers(vm)
        r0 = time.monotonic()
        tb.sh(vm, f"sudo systemctl restart {UNIT}", timeout=600)  # back once READY=1
        restart_s = time.monotonic() - r0
        tb.sh(vm, f"sudo systemctl reload {UNIT}", timeout=600)
        tb.guest(vm, "wait-ready 300", timeout=330)
        time.sleep(2)  # calls after the reload too
        tb.sh(vm, "sudo touch /tmp/stop")
        loop = _wait_loop(tb, vm)
        unit = tb.sh(vm, f"systemctl show -p Type -p KillMode -p NRestarts {UNIT}").split()
        return {"loop": loop, "same_workers": before == workers(vm), "restart_s": restart_s,
                "unit": " ".join(unit)}

    vms = list(dict.fromkeys([tb.vms[0], tb.vms[-1]]))  # one of each capture backend
    with ThreadPoolExecutor(len(vms)) as pool:
        got = dict(zip(vms, pool.map(one, vms), strict=True))
    ok = all(r["loop"]["failed"] == 0 and r["loop"]["ok"] > 10 and r["same_workers"]
             for r in got.values())
    numbers = "; ".join(
        f"{vm}: {r['loop']['ok'] + r['loop']['failed']} calls, {r['loop']['failed']} failed, "
        f"restart {r['restart_s']:.1f}s, same workers {r['same_workers']} ({r['unit']})"
        + (f", errors {r['loop']['errors'][:2]}" if r["loop"]["errors"] else "")
        for vm, r in got.items())
    return Result("e. agent restarted and reloaded by systemd", ok, numbers,
                  time.monotonic() - t0)


def _start_loop(tb: Testbed, vm: str, vip: str) -> None:
    """Calls to web from an enrolled client on `vm` until /tmp/stop exists; their tally lands
    in /tmp/loop.json. Returns once the first call was answered."""
    tb.sh(vm, "sudo rm -f /tmp/stop /tmp/stop.started /tmp/loop.json")
    tb.sh(vm, f"sudo setsid nohup meshnode run --service client -- python3 {GUEST_PY} "
              f"loop http://{vip}/ /tmp/stop >/tmp/loop.json 2>/tmp/loop.err </dev/null &")
    tb.sh(vm, "for _ in $(seq 150); do [ -e /tmp/stop.started ] && exit 0; sleep 0.2; "
              "done; echo 'the calling loop got no answer in 30 s' >&2; exit 1")


def _wait_loop(tb: Testbed, vm: str, timeout: float = 30) -> dict[str, Any]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        out = tb.sh(vm, "cat /tmp/loop.json", check=False).strip()
        if out:
            return dict(json.loads(out))
        time.sleep(1)
    raise GuestError("the calling loop did not finish")
