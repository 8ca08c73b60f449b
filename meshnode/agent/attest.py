"""Workload attestation: does a process qualify for a service's identity?

At enrollment the agent reads what the kernel says about the process (its real uid, the path
of /proc/PID/exe, that executable's SHA-256) and checks it against the selectors of the
service's `identity` (Service resource). A process that does not match is refused with the
reason; one that matches becomes the service (its cgroup is what later connections are
attributed to, so the identity is bound to the cgroup, not to a claim the process makes).

Hashing reads the executable: bounded by MAX_HASH_BYTES, so a huge binary cannot stall the
agent (SPIRE's unix attestor has the same limit for the same reason).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from dataclasses import dataclass

from meshnode.errors import AccessError, NotFoundError
from meshnode.policy.resources import WorkloadSelector

__all__ = ["ProcessFacts", "attest", "facts", "node_allowed"]

MAX_HASH_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ProcessFacts:
    pid: int
    uid: int
    exe: str
    sha256: str | None  # None: not read (no selector asks for it)


def facts(pid: int, want_digest: bool) -> ProcessFacts:
    try:
        with open(f"/proc/{pid}/status") as f:
            uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        exe = os.readlink(f"/proc/{pid}/exe")
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        raise NotFoundError(f"no process with PID {pid}", "check the PID (ps -p PID)") from None
    digest = _digest(pid, exe) if want_digest else None
    return ProcessFacts(pid, uid, exe, digest)


def _digest(pid: int, exe: str) -> str:
    # through /proc/PID/exe: the file the process runs, even if its path was replaced since
    h = hashlib.sha256()
    read = 0
    with open(f"/proc/{pid}/exe", "rb") as f:
        while chunk := f.read(1 << 20):
            read += len(chunk)
            if read > MAX_HASH_BYTES:
                raise AccessError(f"{exe} is larger than {MAX_HASH_BYTES >> 20} MiB: not hashed",
                                  "select the service's processes by uid or executable path")
            h.update(chunk)
    return h.hexdigest()


def attest(pid: int, service: str, selector: WorkloadSelector) -> ProcessFacts | None:
    """Check a process against the service's selectors; AccessError saying which one it
    fails. None when the service has no process selectors."""
    if not (selector.uids or selector.executables or selector.sha256):
        return None
    got = facts(pid, bool(selector.sha256))
    hint = f"enroll a process that matches, or change Service {service}'s spec.identity"
    if selector.uids and got.uid not in selector.uids:
        raise AccessError(f"PID {pid} runs as uid {got.uid}; service {service} admits uid "
                          + ", ".join(map(str, selector.uids)), hint)
    exe = got.exe.removesuffix(" (deleted)")
    if selector.executables and exe not in selector.executables:
        raise AccessError(f"PID {pid} runs {exe}; service {service} admits "
                          + ", ".join(selector.executables), hint)
    if selector.sha256 and got.sha256 not in selector.sha256:
        raise AccessError(f"PID {pid} runs {exe} with sha256 {got.sha256}, which service "
                          f"{service} does not admit", hint)
    return got


def node_allowed(selector: WorkloadSelector, node: str) -> bool:
    """Whether `node` may run the service (its `identity.nodes` globs; none: any node)."""
    return not selector.nodes or any(fnmatch.fnmatchcase(node, p) for p in selector.nodes)
