"""Workload attestation at enrollment: a Service's identity selectors (uid, executable path,
executable digest, hosts) are checked against what the kernel says about the process; one that
does not match is refused with the reason and stays out of the mesh."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Host

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    h = Host(tmp_path_factory.mktemp("attest"), "ebpf")
    try:
        h.start()
        yield h
    finally:
        h.close()


def sleeper(h: Host) -> subprocess.Popen[bytes]:
    return h.popen([sys.executable, "-c", "import time; time.sleep(60)"])


def enroll(h: Host, pid: int, service: str) -> subprocess.CompletedProcess[str]:
    return h.cli("enroll", str(pid), "--service", service)


def selector(h: Host, service: str, identity: dict[str, object]) -> None:
    h.call("service.add", name=service, patch={"identity": identity})


def in_service_cgroup(h: Host, pid: int, service: str) -> bool:
    path = Path(f"/proc/{pid}/cgroup").read_text()
    return f"/apps/{service}" in path


def test_uid_selector_refuses_a_process_of_another_user(host: Host) -> None:
    selector(host, "uidsvc", {"uids": [4242]})
    p = sleeper(host)
    done = enroll(host, p.pid, "uidsvc")
    assert done.returncode == 77, done
    assert f"PID {p.pid} runs as uid 0; service uidsvc admits uid 4242" in done.stderr
    assert not in_service_cgroup(host, p.pid, "uidsvc")
    selector(host, "uidsvc", {"uids": [0, 4242]})
    assert enroll(host, p.pid, "uidsvc").returncode == 0
    assert in_service_cgroup(host, p.pid, "uidsvc")


def test_executable_path_and_digest(host: Host) -> None:
    exe = os.path.realpath(sys.executable)
    p = sleeper(host)
    selector(host, "exesvc", {"executables": ["/usr/bin/false"]})
    done = enroll(host, p.pid, "exesvc")
    assert done.returncode == 77 and f"runs {exe}; service exesvc admits /usr/bin/false" \
        in done.stderr, done
    digest = hashlib.sha256(Path(exe).read_bytes()).hexdigest()
    selector(host, "exesvc", {"executables": [exe], "sha256": ["0" * 64]})
    done = enroll(host, p.pid, "exesvc")
    assert done.returncode == 77 and f"sha256 {digest}, which service exesvc does not admit" \
        in done.stderr, done
    selector(host, "exesvc", {"executables": [exe], "sha256": [digest]})
    assert enroll(host, p.pid, "exesvc").returncode == 0


def test_host_selector(host: Host) -> None:
    selector(host, "elsewhere", {"nodes": ["db-*"]})
    p = sleeper(host)
    done = enroll(host, p.pid, "elsewhere")
    assert done.returncode == 77, done
    node = host.status()["node"]
    assert f"service elsewhere may not run on host {node}" in done.stderr


def test_bad_selectors_are_refused_at_apply(host: Host) -> None:
    for bad, why in (({"uids": [-1]}, "out of range"),
                     ({"executables": ["python3"]}, "must be an absolute path"),
                     ({"sha256": ["xyz"]}, "64 lowercase hex")):
        done = host.cli("service", "add", "bad")  # the service exists; then a bad patch
        assert done.returncode == 0, done
        with pytest.raises(Exception, match=why):
            selector(host, "bad", bad)
