"""The data plane outlives the agent (issue 13): a restart, a crash and an upgrade leave the
workers and the capture serving, and the next agent adopts them; a single worker's death
refuses nothing; only `meshnode uninstall` takes it all down. (Under continuous load, with
figures per phase: tests/drill, `make drill`.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dnslib
import pytest

from meshnode.bpf import syscall
from tests.harness import Host, free_port, kernel_leftovers, wait_for
from tests.integration import progs


def _serve(h: Host) -> tuple[str, str]:
    """A `web` service (two name servers) and an `echo` service: their VIPs."""
    h.call("service.add", name="web", patch={"port": 80})
    h.call("service.add", name="echo", patch={"port": 7})
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        h.server(f"web-{i}", port, service="web")
    echo_port = free_port()
    p = h.popen([sys.executable, "-c", progs.ECHO_SERVER, str(echo_port)], "echo",
                stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "listening"
    h.wait_endpoints("web", {f"127.0.0.1:{p}" for p in ports})
    h.wait_endpoints("echo", {f"127.0.0.1:{echo_port}"})
    return h.service("web")["vip"], h.service("echo")["vip"]


def _attached_programs(h: Host) -> dict[str, int]:
    """function -> program id, as the ledger records the attachments."""
    ledger = json.loads((h.tmp / "state" / h.tag / "ledger.json").read_text())
    return {e["function"]: e["prog_id"] for e in ledger if e["kind"] == "bpf_attach"}


def _kernel_attached(h: Host) -> set[int]:
    """Program ids the kernel has attached to this host's apps cgroup."""
    fd = os.open(h.cgroup_root() / "apps", os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {pid for t in (10, 11, 3, 14, 19, 29) for pid in syscall.prog_query(fd, t)}
    finally:
        os.close(fd)


def _dns_queued(h: Host) -> bool:
    """Whether a datagram waits in the receive queue of the agent's DNS socket (ss Recv-Q)."""
    out = subprocess.run(["nsenter", f"--net=/run/netns/{h.netns}", "ss", "-Hunl",
                          "sport = :15053"], capture_output=True, text=True, check=True).stdout
    return any(int(line.split()[1]) > 0 for line in out.splitlines())


def _pids(h: Host) -> dict[int, Any]:
    return {w["id"]: w["pid"] for w in h.status()["workers"] if not w["retiring"]}


@pytest.mark.parametrize("how", ["sigterm", "sigkill", "upgrade"])
def test_agent_restart_keeps_calls_and_streams(make_host, backend: str, how: str) -> None:
    # a drain grace longer than the test: an upgrade's old workers keep their streams
    h = make_host(backend, agent_args=("--drain-grace", "60"))
    h.start()
    web, echo = _serve(h)
    client, dns_client = h.probe(service="client"), h.probe(service="client")
    streams = [client.ask(op="open", host=echo, port=7)["id"] for _ in range(3)]
    for s in streams:
        assert client.ask(op="ping", id=s, data=f"before-{s}")["ok"]
    workers, programs = _pids(h), _attached_programs(h)

    if how == "sigkill":
        h.kill()
    else:
        assert h.stop() == 0
    # no agent: the workers serve with their last routes, capture stays as it was
    assert {client.connect(web, 80)["reply"] for _ in range(20)} == {"web-0", "web-1"}
    for s in streams:
        assert client.ask(op="ping", id=s, data=f"between-{s}")["ok"]
    assert set(workers.values()) <= {int(p) for p in
                                     (h.cgroup_root() / "proxy" / "cgroup.procs").read_text()
                                     .split()}

    # a name asked while no agent runs waits in the DNS socket the workers hold, and is
    # answered by the next agent (the redirect stayed on)
    query = dnslib.DNSRecord.question("web.mesh", "A").pack().hex()
    with ThreadPoolExecutor(1) as pool:
        # waiting as long as glibc's resolver does per try (5 s): an upgrade recompiles the
        # programs before the new agent answers
        asked = pool.submit(dns_client.ask, op="dns", host="127.0.0.53", port=53, query=query,
                            timeout=5)
        # the query must be waiting in the held socket before an agent exists to answer it
        wait_for("the query queued in the DNS socket", lambda: _dns_queued(h), timeout=5)
        h.start(env={"MESHNODE_BUILD_ID": "test-upgrade"} if how == "upgrade" else None)
        answer = asked.result(timeout=10)
    assert answer["ok"], answer
    assert [str(rr.rdata) for rr in dnslib.DNSRecord.parse(bytes.fromhex(answer["reply"])).rr
            ] == [web]
    assert h.status()["ready"]
    for s in streams:  # established streams live on (an upgrade's old workers drain them)
        assert client.ask(op="ping", id=s, data=f"after-{s}")["ok"]
    assert {client.connect(web, 80)["reply"] for _ in range(20)} == {"web-0", "web-1"}
    if how == "upgrade":
        # workers replaced one at a time, programs swapped in place: new ids attached, the
        # old ones not any more
        wait_for("workers of the new build", lambda: all(
            w["build"] == "test-upgrade" and w["alive"] for w in h.status()["workers"]
            if not w["retiring"]), timeout=20)
        assert not set(_pids(h).values()) & set(workers.values())
        if backend == "ebpf":
            new = _attached_programs(h)
            assert set(new) == set(programs) and not set(new.values()) & set(programs.values())
            attached = _kernel_attached(h)
            assert attached >= {new[f] for f in new if f.startswith("mn_connect")}
            assert not attached & set(programs.values())
    else:
        assert _pids(h) == workers  # the same processes, adopted
        assert all(w["adopted"] for w in h.status()["workers"])
        if backend == "ebpf":
            assert _attached_programs(h) == programs  # kept as they were
    client.proc.kill()  # its streams would hold the removal's drain for the whole grace
    done = h.uninstall()
    assert done.returncode == 0, done.stderr
    assert kernel_leftovers(h) == []


def test_single_worker_replacement_refuses_nothing(make_host, backend: str) -> None:
    h = make_host(backend, workers=1)
    h.start()
    web, _ = _serve(h)
    client = h.probe(service="client")
    assert client.connect(web, 80)["ok"]
    (pid,) = _pids(h).values()
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    # calls right after the kill wait in the listening socket's queue (the agent's copy keeps
    # it open) until the replacement accepts them: none is refused
    replies = [client.connect(web, 80, timeout=5) for _ in range(20)]
    assert all(r["ok"] for r in replies), replies
    gap = max(r["seconds"] for r in replies)
    assert gap < 1.0, f"the replacement took {gap:.2f}s to serve"
    assert time.monotonic() - started < 5
    wait_for("a new worker", lambda: _pids(h) and pid not in _pids(h).values())


def test_reload_reexecs_in_place_with_the_new_config(make_host, tmp_path) -> None:
    """SIGHUP (systemctl reload): the same process re-executes, reads its config file again
    and adopts its own data plane."""
    config = tmp_path / "agent.yaml"
    config.write_text("dns_suffix: mesh\n")
    h = make_host("ebpf", agent_args=("--config", str(config)))
    h.start()
    web, _ = _serve(h)
    client = h.probe(service="client")
    agent_pid, workers = h.call("ping")["pid"], _pids(h)
    assert h.status()["dns"]["suffix"] == "mesh"
    config.write_text("dns_suffix: internal\n")
    assert h.agent is not None
    h.agent.send_signal(signal.SIGHUP)
    wait_for("re-executed with the new config", lambda: h.client.call("ping")["ready"]
             and h.status()["dns"]["suffix"] == "internal", timeout=60)
    assert h.call("ping")["pid"] == agent_pid  # systemd's MAINPID holds
    assert _pids(h) == workers and all(w["adopted"] for w in h.status()["workers"])
    assert {client.connect(web, 80)["reply"] for _ in range(20)} == {"web-0", "web-1"}


def test_systemd_notifications(make_host, tmp_path) -> None:
    """What systemd hears (Type=notify, WatchdogSec): READY=1 once serving, WATCHDOG=1 at
    half the interval, RELOADING=1 and READY=1 again around a reload, with the heartbeat
    (WATCHDOG=1, EXTEND_TIMEOUT_USEC) kept up in between, STOPPING=1."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)

    def heard(want: str) -> list[str]:
        seen: list[str] = []
        while not any(line.startswith(want) for line in seen):
            seen += sock.recv(4096).decode().splitlines()
        return seen

    h = make_host("ebpf")
    h.start(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})
    assert h.status()["ready"]
    assert "READY=1" in heard("READY=1")
    t0 = time.monotonic()
    heard("WATCHDOG=1")
    heard("WATCHDOG=1")
    assert time.monotonic() - t0 < 2.0  # every 0.5 s
    assert h.agent is not None
    h.agent.send_signal(signal.SIGHUP)
    heard("RELOADING=1")
    reloading = heard("READY=1")  # the re-executed agent, serving again
    assert any(line.startswith("EXTEND_TIMEOUT_USEC=") for line in reloading), reloading
    h.agent.send_signal(signal.SIGTERM)
    heard("STOPPING=1")
    sock.close()
