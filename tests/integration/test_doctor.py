"""`meshnode doctor` on this (working) host, then with a feature hidden for real: kernel headers
or bpffs covered in a private mount namespace, no root, ports taken. Each run happens in a test
"host" (its own network namespace, so the ports it checks are its own)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from meshnode.diagnose.doctor import run_checks
from meshnode.host import cgroup
from tests.harness import Host

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

RELEASE = platform.release()
HOOKS = ["cgroup/connect4", "cgroup/connect6", "cgroup/getpeername4", "cgroup/getpeername6",
         "sockops", "cgroup/getsockopt", "cgroup/sendmsg4", "cgroup/recvmsg4"]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
LISTENER = """
import os, socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print(os.getpid(), flush=True)
time.sleep(60)
"""


def doctor(h: Host, *args: str, prefix: tuple[str, ...] = (), shell: str = "",
           output: str = "json") -> subprocess.CompletedProcess[str]:
    """`meshnode doctor` in host `h`; `shell` runs first in a private mount namespace."""
    cmd = [sys.executable, "-m", "meshnode.cli", "doctor", "-o", output, "--instance", h.tag,
           *args]
    if shell:
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
               f'{shell}; exec "$@"', "sh", *cmd]
    return subprocess.run(["nsenter", f"--net=/run/netns/{h.netns}", *prefix, *cmd],
                          env=h.env, capture_output=True, text=True, timeout=60)


def report(r: subprocess.CompletedProcess[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    data = json.loads(r.stdout)
    return data, {c["name"]: c for c in data["checks"]}


def test_this_host_can_run_everything(make_host) -> None:
    h = make_host("iptables")  # no agent started: its namespace only
    r = doctor(h)
    assert r.returncode == 0, r.stderr
    data, checks = report(r)
    assert data["can_run"] is True and data["capture"] == "ebpf"
    expected = ["privileges", "cgroup v2", "bpffs", "BTF", "kernel headers", "bcc", *HOOKS]
    assert [c["name"] for c in data["checks"]][:len(expected)] == expected
    helpers = [n for n in checks if n.startswith("helper ")]
    assert {"helper bpf_get_socket_cookie", "helper bpf_map_lookup_elem",
            "helper bpf_map_update_elem", "helper bpf_map_delete_elem"} <= set(helpers)
    for name in [*expected, *helpers, "capture: ebpf", "capture: iptables",
                 "port 15001", "port 15053", "port 15090"]:
        assert checks[name]["status"] == "ok", checks[name]
        assert checks[name]["fix"] == "", checks[name]
    assert checks["privileges"]["required"] and checks["cgroup v2"]["required"]
    assert checks["cgroup v2"]["detail"] == f"mounted at {cgroup.cgroup2_mount()}"
    assert checks["bpffs"]["detail"] == "mounted at /sys/fs/bpf"
    assert checks["port 15053"]["detail"] == "127.0.0.1:15053 udp+tcp free (DNS)"
    assert checks["capture: iptables"]["detail"].endswith(
        "nat table, -m cgroup and REDIRECT work")
    assert checks["helper bpf_map_delete_elem"]["detail"] == "available to sockops"

    table = doctor(h, output="table")
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[-1] == "the agent can run (capture: ebpf)"
    assert any(line.startswith("  ok    cgroup v2 ") and line.endswith(
        f"mounted at {cgroup.cgroup2_mount()}") for line in lines)


def test_missing_kernel_headers_leave_iptables(make_host) -> None:
    h = make_host("iptables")
    hide = f"mount -t tmpfs tmpfs /lib/modules/{RELEASE}"
    r = doctor(h, shell=hide)
    assert r.returncode == 0, r.stderr  # iptables keeps the agent runnable
    data, checks = report(r)
    assert data["can_run"] is True and data["capture"] == "iptables"
    headers = checks["kernel headers"]
    assert headers["status"] == "fail" and not headers["required"]
    assert headers["detail"] == (f"/lib/modules/{RELEASE}/build missing "
                                 "(bcc compiles against it)")
    assert headers["fix"].startswith(f"apt install linux-headers-amd64 && mkdir -p "
                                     f"/lib/modules/{RELEASE} && ln -sfn /usr/src/linux-headers-")
    assert f"/lib/modules/{RELEASE}/source" in headers["fix"]
    ebpf = checks["capture: ebpf"]
    assert (ebpf["status"], ebpf["detail"]) == ("fail", "unusable: needs kernel headers")
    assert checks["capture: iptables"]["status"] == "ok"

    table = doctor(h, shell=hide, output="table")
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    line = next(x for x in lines if "kernel headers" in x)
    assert line.startswith("  FAIL  kernel headers ")
    assert f"/lib/modules/{RELEASE}/build missing" in line
    assert "  -> fix: apt install linux-headers-amd64 && " in line
    assert lines[-1] == "the agent can run (capture: iptables); 2 optional checks failed"


@pytest.mark.parametrize(("hide", "detail"), [
    ("mount -t tmpfs tmpfs /sys/fs/bpf", "/sys/fs/bpf is tmpfs, not bpffs"),
    ("umount /sys/fs/bpf", "not mounted at /sys/fs/bpf"),
])
def test_missing_bpffs(make_host, hide: str, detail: str) -> None:
    h = make_host("iptables")
    r = doctor(h, shell=hide)
    assert r.returncode == 0, r.stderr
    data, checks = report(r)
    bpffs = checks["bpffs"]
    # a warning, not a failure: the agent mounts bpffs itself when it starts
    assert bpffs["status"] == "warn"
    assert bpffs["detail"] == f"{detail}; the agent mounts it when it starts"
    assert bpffs["fix"] == "mount -t bpf bpf /sys/fs/bpf"
    assert checks["capture: ebpf"]["status"] == "ok"
    assert data["capture"] == "ebpf"


def test_not_root_cannot_run(make_host) -> None:
    if subprocess.run([*NOBODY, sys.executable, "-c", "import meshnode.diagnose.doctor"],
                      capture_output=True, timeout=30).returncode != 0:
        pytest.skip("uid 65534 cannot read this checkout or its venv (a clone under /root, "
                    "mode 700): clone somewhere world-readable to run this test")
    h = make_host("iptables")
    r = doctor(h, prefix=tuple(NOBODY))
    assert r.returncode == 69, r.stderr
    data, checks = report(r)
    assert data["can_run"] is False and data["capture"] is None
    priv = checks["privileges"]
    assert (priv["status"], priv["detail"], priv["fix"]) == (
        "fail", "running as uid 65534, not root", "run as root: sudo meshnode doctor")
    # what needs root is reported as not checked, not as missing
    assert checks["bpf programs"]["status"] == "warn"
    assert checks["capture: iptables"]["status"] == "warn"
    table = doctor(h, prefix=tuple(NOBODY), output="table")
    assert table.returncode == 69
    assert table.stdout.splitlines()[-1] == "the agent cannot run: 1 problem"
    assert ("  FAIL  privileges         running as uid 65534, not root"
            "  -> fix: run as root: sudo meshnode doctor") in table.stdout.splitlines()


def test_port_taken_by_another_process_is_named(make_host) -> None:
    h = make_host("iptables")
    holder = h.popen([sys.executable, "-c", LISTENER, "15001"], stdout=subprocess.PIPE,
                     text=True)
    assert holder.stdout is not None
    pid = int(holder.stdout.readline())
    r = doctor(h)
    assert r.returncode == 0, r.stderr  # a warning: --outbound-port moves it
    _, checks = report(r)
    port = checks["port 15001"]
    assert port["status"] == "warn"
    name = psutil.Process(pid).name()  # python3, as ps shows it
    assert port["detail"].startswith("127.0.0.1:15001 tcp in use by "), port
    assert f"{name} (pid {pid})" in port["detail"], port
    assert port["fix"] == ("see it with: ss -ltnp 'sport = :15001'; stop it, "
                           "or start the agent with --outbound-port PORT")


def test_ports_of_the_running_agent_are_fine(make_host) -> None:
    h = make_host("iptables")
    h.start()
    agent_pid = h.call("ping")["pid"]
    r = doctor(h)
    assert r.returncode == 0, r.stderr
    _, checks = report(r)
    for port, protos in ((15001, "tcp"), (15053, "udp+tcp")):
        c = checks[f"port {port}"]
        assert (c["status"], c["detail"]) == (
            "ok", f"127.0.0.1:{port} {protos} in use by the running agent (pid {agent_pid})")


def test_checks_leave_nothing_behind() -> None:
    mount = cgroup.cgroup2_mount()
    fds = sorted(os.listdir("/proc/self/fd"))
    checks = run_checks("default")
    assert {c.name: c.status for c in checks}["capture: ebpf"] == "ok"
    assert sorted(os.listdir("/proc/self/fd")) == fds
    assert list(Path(mount).glob(f"meshnode-probe-{os.getpid()}-*")) == []
