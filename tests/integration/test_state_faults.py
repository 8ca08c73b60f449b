"""A full or read-only state directory (issue 13): writes fail with a clear error, the data plane
goes on serving, and everything works again once there is room."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Host, free_port


@contextlib.contextmanager
def small_tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=700", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        for _ in range(2):  # a bind mount over it, then the tmpfs
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_state_dir_fault_fails_writes_clearly_and_keeps_serving(make_host, tmp_path: Path,
                                                                 fault: str) -> None:
    h: Host = make_host("ebpf")
    state = h.tmp / "state" / h.tag
    with small_tmpfs(state):
        h.start()
        h.call("service.add", name="web", patch={"port": 80})
        port = free_port()
        h.server("web-0", port, service="web")
        h.wait_endpoints("web", {f"127.0.0.1:{port}"})
        vip = h.service("web")["vip"]
        client = h.probe(service="client")
        assert client.connect(vip, 80)["reply"] == "web-0"

        if fault == "full":
            filler = state / "filler"
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"],
                           capture_output=True, check=False)  # until ENOSPC
        else:
            # a read-only bind mount over it: the agent's open lock file (a writer on the
            # tmpfs itself) would make a remount of the tmpfs busy
            subprocess.run(["mount", "--bind", str(state), str(state)], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(state)], check=True)
        # a change that must be written (large enough to need new pages): one line naming
        # the cause and the fix, nothing of it applied
        docs = tmp_path / "many.yaml"
        docs.write_text("".join(f"---\nkind: Service\nname: api-{i}\nspec:\n  port: {8000 + i}\n"
                                for i in range(40)))
        done = h.cli("apply", "-f", str(docs))
        assert done.returncode != 0
        err = done.stderr.strip().splitlines()
        assert len(err) == 1 and "error:" in err[0], done.stderr
        print(f"\n{fault}: {err[0]}")
        assert ("space" in err[0].lower() if fault == "full" else "read-only" in err[0].lower())
        assert not {s["name"] for s in h.status()["services"]} & {"api-0", "api-39"}
        # ... while the mesh serves on: calls, and the status
        assert all(client.connect(vip, 80)["reply"] == "web-0" for _ in range(10))
        assert h.status()["ready"]

        # room again: the same change goes through
        if fault == "full":
            filler.unlink()
        else:
            subprocess.run(["umount", str(state)], check=True)
        done = h.cli("apply", "-f", str(docs))
        assert done.returncode == 0, done.stderr
        assert {"api-0", "api-39"} <= {s["name"] for s in h.status()["services"]}
        h.uninstall()
