"""The README's first command, `setup.sh demo`, ends in `meshnode demo`: it must work against
the agent of the day (it starts one, makes a service, spreads calls, removes everything)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.harness import kernel_leftovers

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


@pytest.mark.parametrize("backend", ["ebpf"])
def test_the_demo_spreads_calls_over_three_instances(make_host, backend: str) -> None:
    h = make_host(backend)  # its namespace and instance; the demo starts the agent itself
    out = subprocess.run(["nsenter", f"--net=/run/netns/{h.netns}", sys.executable, "-m",
                          "meshnode.cli", "demo", "--calls", "30", "--instance", h.tag],
                         env=h.env, capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "30 calls spread over 3 instances" in out.stdout, out.stdout
    # round robin per worker (two workers): each instance gets about a third
    counts = {m[1]: int(m[2]) for m in re.finditer(r"(instance-\d)\s+(\d+)\s+#", out.stdout)}
    assert set(counts) == {"instance-1", "instance-2", "instance-3"}, out.stdout
    assert sum(counts.values()) == 30 and min(counts.values()) >= 5, counts
    assert "everything the demo's agent loaded into the kernel is removed" in out.stdout
    assert kernel_leftovers(h) == []
