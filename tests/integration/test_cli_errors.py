"""Bad input against a running agent: one line naming the fix, a sysexits code, and the agent's
state unchanged afterwards."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.harness import free_port, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid  # reaped: nothing runs under it now


@pytest.mark.parametrize("backend", ["iptables"])
def test_bad_input_is_one_line_and_changes_nothing(make_host, backend: str) -> None:
    h = make_host(backend)
    h.start()
    h.call("service.add", name="web", patch={"port": 80})
    h.server("a", port := free_port(), service="web")
    h.wait_endpoints("web", {f"127.0.0.1:{port}"})
    before = h.status()
    outsider = h.popen(["sleep", "60"])  # in the namespace, not enrolled
    cases = [
        (["enroll", str(dead_pid()), "--service", "web"], 66, "no process with PID"),
        (["enroll", "1", "--service", "web"], 64, "PID 1 cannot be enrolled"),
        (["enroll", "2", "--service", "web"], 64, "kernel thread"),  # kthreadd
        (["enroll", str(os.getpid()), "--service", "web"], 64, "another network namespace"),
        (["enroll", str(outsider.pid), "--service", "Bad_Name"], 64, "invalid service name"),
        (["unenroll", str(outsider.pid)], 66, "is not enrolled"),
        (["service", "remove", "nope"], 66, "no Service named 'nope'"),
        (["service", "add", "web", "--endpoint", "example:80"], 64, "invalid address"),
        (["service", "add", "web", "--endpoint", "127.0.0.1:99999"], 64, "out of range"),
        (["service", "add", "web", "--port", "0"], 64, "port 0 is out of range"),
        (["service", "remove", "web", "--endpoint", "127.0.0.1:1"], 64, "has no endpoint"),
        (["enroll", "12x", "--service", "web"], 64, "valid integer"),
    ]
    for args, code, text in cases:
        r = h.cli(*args)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert text in r.stderr, (args, r.stderr)
        if "integer" not in text:  # click renders its own usage errors, in a box
            assert len(lines) == 1 and "hint:" in lines[0], (args, r.stderr)
    after = h.status()

    def settings(status: dict) -> list:  # what a failed command could have changed
        return [({k: v for k, v in s.items() if k not in ("counters", "endpoints")},
                 sorted(e["addr"] for e in s["endpoints"])) for s in status["services"]]

    assert settings(after) == settings(before)
    for key in ("enrolled", "ready"):
        assert after[key] == before[key], key
    assert after["capture"]["backend"] == before["capture"]["backend"]


@pytest.mark.parametrize("backend", ["ebpf"])
def test_static_endpoints_and_fail_closed(make_host, backend: str) -> None:
    h = make_host(backend, restart_backoff=8.0)
    h.start()
    port = free_port()
    h.server("static", port)  # not enrolled: a service on "another machine"
    r = h.cli("service", "add", "db", "--port", "5432", "--endpoint", f"127.0.0.1:{port}",
            "--fail-closed")
    assert r.returncode == 0, r.stderr
    vip = h.service("db")["vip"]
    client = h.probe(service="client")
    assert client.connect(vip, 5432)["reply"] == "static"
    assert h.service("db")["counters"]["connections"] == 1
    for w in h.status()["workers"]:
        subprocess.run(["kill", "-KILL", str(w["pid"])], check=True)

    wait_for("fail-closed", lambda: not h.status()["ready"], timeout=2)
    # fail-closed: even the endpoint's own address is refused while the proxy is down
    r = client.connect("127.0.0.1", port)
    assert not r["ok"] and r["seconds"] < 1.0, r
    r = h.cli("service", "remove", "db", "--endpoint", f"127.0.0.1:{port}")
    assert r.returncode == 0 and h.service("db")["endpoints"] == []


def test_agent_refuses_to_run_without_root(tmp_path) -> None:
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if subprocess.run([*nobody, sys.executable, "-c", "import meshnode"],
                      capture_output=True, timeout=30).returncode != 0:
        pytest.skip("uid 65534 cannot read this checkout or its venv (a clone under /root, "
                    "mode 700): clone somewhere world-readable to run this test")
    r = subprocess.run([*nobody,
                        sys.executable, "-m", "meshnode.cli", "agent", "--instance", "nonroot"],
                       capture_output=True, text=True, timeout=30,
                       env={**os.environ, "MESHNODE_STATE_DIR": str(tmp_path),
                            "MESHNODE_RUN_DIR": str(tmp_path)})
    assert r.returncode == 77
    assert r.stderr.strip().splitlines()[-1].startswith("meshnode: error: meshnode agent must run"
                                                        " as root")


@pytest.mark.parametrize("backend", ["iptables"])
def test_second_agent_for_the_same_instance_is_refused(make_host, backend: str) -> None:
    h = make_host(backend)
    h.start()
    r = h.cli("agent", "--netns", h.netns, "--capture", "iptables")
    assert r.returncode == 65 and "already running" in r.stderr
    assert h.status()["ready"]  # the first one is unharmed
