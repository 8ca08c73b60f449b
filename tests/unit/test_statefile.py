"""host/statefile.py: state files are replaced whole and durably, and a state directory that
cannot take the write gives a StateError with a hint while the old file stays as it was.

The failing directories are real, not mocked: a path through a regular file (any user), and
as root an immutable directory (chattr +i) and a full tmpfs, which refuse root too."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshnode.errors import EX_CANTCREAT, StateError, from_wire
from meshnode.host import statefile
from meshnode.host.ledger import Ledger
from meshnode.host.statefile import write_atomic, write_json

OLD = b'{"old": true}'


def leftovers(directory: Path) -> list[str]:
    """Temporary files a write left behind."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_a_write_replaces_the_file_whole_with_mode_600(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.json"  # parents are created
    write_atomic(path, OLD)
    write_json(path, [{"kind": "a", "n": 1}])
    assert path.read_text() == '[\n {\n  "kind": "a",\n  "n": 1\n }\n]'
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_atomic(path, b"x", mode=0o644)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert leftovers(path.parent) == []


def test_the_file_and_then_its_directory_are_fsynced(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "enrollments.json"
    path.write_bytes(OLD)
    synced: list[tuple[str, bytes]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        synced.append((kind, path.read_bytes()))  # what the target holds at that moment
        real_fsync(fd)

    monkeypatch.setattr(statefile.os, "fsync", fsync)
    write_atomic(path, b"new")
    # the temporary is synced before the rename (target still old), the directory after it
    assert synced == [("file", OLD), ("dir", b"new")]


def test_a_state_path_through_a_regular_file_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "state").write_bytes(b"not a directory")
    with pytest.raises(StateError) as info:
        write_json(tmp_path / "state" / "ledger.json", [])
    err = info.value
    assert err.errno == errno.ENOTDIR and err.exit_code == EX_CANTCREAT
    assert err.message == (f"cannot write {tmp_path}/state/ledger.json: "
                           f"{tmp_path}/state is not a directory")
    assert "a file is in the way" in err.hint and "MESHNODE_STATE_DIR" in err.hint
    # the agent sends it to the CLI as it is
    again = from_wire(err.to_wire())
    assert isinstance(again, StateError) and again.hint == err.hint


def test_the_ledger_reports_an_unwritable_state_directory(tmp_path: Path) -> None:
    (tmp_path / "state").write_bytes(b"")
    ledger = Ledger(tmp_path / "state" / "ledger.json")
    with pytest.raises(StateError, match="cannot write"):
        ledger.record("cgroup", path="/sys/fs/cgroup/x")


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chattr, mount)")


@pytest.fixture
def immutable_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / "ledger.json").write_bytes(OLD)
    if shutil.which("chattr") is None or subprocess.run(
            ["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        yield directory
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


@root_only
def test_an_immutable_directory_refuses_root_and_keeps_the_old_file(
        immutable_dir: Path) -> None:
    path = immutable_dir / "ledger.json"
    with pytest.raises(StateError) as info:
        write_json(path, [{"kind": "new"}])
    assert info.value.errno == errno.EPERM
    assert f"lsattr -d {immutable_dir}" in info.value.hint
    assert path.read_bytes() == OLD and leftovers(immutable_dir) == []


@pytest.fixture
def full_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "meshnode-test",
                    str(mnt)], check=True)
    try:
        (mnt / "ledger.json").write_bytes(OLD)
        # until the file system is full (unbuffered: closing has nothing left to flush)
        with open(mnt / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@root_only
def test_a_full_file_system_keeps_the_old_file_and_no_temporary(full_tmpfs: Path) -> None:
    path = full_tmpfs / "ledger.json"
    with pytest.raises(StateError) as info:
        write_atomic(path, b"[" + b"0," * 8192 + b"0]")
    assert info.value.errno == errno.ENOSPC
    assert info.value.hint == f"free space on the file system of {full_tmpfs} (df -h {full_tmpfs})"
    assert path.read_bytes() == OLD and leftovers(full_tmpfs) == []
