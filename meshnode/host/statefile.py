"""Atomic state files: the one way meshnode replaces a file under its state directory.

`write_atomic` writes a temporary file in the same directory, fsyncs it, renames it over the
target and fsyncs the directory: after a crash or a power cut the target holds either the old
bytes or the new ones, never a mix or an empty file (a rename alone is not durable until the
directory entry reaches the disk; ext4 and xfs may otherwise show a zero-length file). The
ledger, the enrollments and the registry's files all go through it.

A write that fails (read-only or full file system, a state path that is not a directory)
leaves the old file intact, removes its temporary file and raises StateError with a hint
naming the fix, instead of an OSError traceback.

Imports nothing of meshnode's but errors.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from meshnode.errors import StateError


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data`, all or nothing and durably; creates missing parents."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a unique name: two writers of one file never share (and truncate) a temporary
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        if tmp is not None:
            # the write already failed: that error is the one to report
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise _state_error(path, exc) from exc


def write_json(path: Path, value: Any, mode: int = 0o600) -> None:
    """`write_atomic` of `value` as JSON (indented by one: state files are read by people)."""
    write_atomic(path, json.dumps(value, indent=1).encode(), mode)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state_error(path: Path, exc: OSError) -> StateError:
    where = path.parent
    code, reason = exc.errno or 0, exc.strerror or str(exc)
    if code == errno.EEXIST:  # mkdir: a file sits where a directory of the path should be
        code, reason = errno.ENOTDIR, f"{where} is not a directory"
    if code in (errno.ENOSPC, errno.EDQUOT):
        hint = f"free space on the file system of {where} (df -h {where})"
    elif code == errno.EROFS:
        hint = (f"{where} is on a read-only file system: remount it read-write, or set "
                "MESHNODE_STATE_DIR to a writable directory")
    elif code in (errno.EACCES, errno.EPERM):
        hint = (f"make {where} writable by the agent: run it as root, and check that no "
                f"file or directory there is immutable (lsattr -d {where}; chattr -i)")
    elif code == errno.ENOTDIR:
        hint = (f"a file is in the way of the state directory {where}: move it, or set "
                "MESHNODE_STATE_DIR to another directory")
    else:
        hint = f"check {where} (mount, space, permissions), or set MESHNODE_STATE_DIR"
    return StateError(f"cannot write {path}: {reason}", hint, code)
