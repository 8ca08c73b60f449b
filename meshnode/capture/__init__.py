"""Capture: the kernel rules that send enrolled processes' connections to the proxy.

One interface (`CaptureBackend`), two mechanisms (`ebpf.BpfCapture`, `iptables.IptablesCapture`)
and a chooser (`auto.choose`). Backends never import bcc: compiling runs in a short-lived
loader process; the long-running agent only touches pinned objects with raw syscalls.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from meshnode.host.ledger import Ledger, UndoFn
from meshnode.model import CaptureState, HostPort


@dataclass(frozen=True)
class CaptureContext:
    """Where one agent's capture applies; several agents side by side each have their own."""

    instance: str
    cgroup2_mount: Path  # e.g. /sys/fs/cgroup or /sys/fs/cgroup/unified
    apps_cgroup: Path  # absolute; every enrolled process lives below it
    proxy_cgroup: Path  # absolute; the proxy workers (never captured)
    pin_dir: Path  # this agent's folder on bpffs
    outbound_port: int
    proxy_mark: int
    ledger: Ledger

    @property
    def apps_cgroup_rel(self) -> str:
        """The apps cgroup as the cgroup2 hierarchy names it (for `-m cgroup --path`)."""
        return "/" + str(self.apps_cgroup.relative_to(self.cgroup2_mount)).lstrip("/")


# What a backend can do beyond redirecting, so callers ask instead of inferring it from empty
# results (an empty stats() could mean "no traffic" as well as "no counters").
CAP_STATS = "stats"  # stats() returns kernel counters (captured, passthrough, refused, ...)
# The proxy learns the dialing process (cgroup id, pid) with the original destination, so it
# needs no sock_diag request per connection to attribute it to a source service.
CAP_CGROUP_SOURCE = "cgroup_source"
# Original destinations live in a BPF map the agent can read (CaptureMaps.origdst), not only
# in conntrack behind SO_ORIGINAL_DST.
CAP_ORIGDST_MAP = "origdst_map"


class CaptureBackend(Protocol):
    name: str  # "ebpf" or "iptables"
    capabilities: frozenset[str]  # CAP_* above

    def install(self) -> None:
        """Create the capture machinery, redirecting nothing yet. All or nothing: on failure,
        whatever was created is removed before the error propagates."""

    def adopt(self) -> None:
        """Take over what an earlier agent of this instance installed (as its ledger lists),
        without a moment of capture off: kernel state stays, code of another build is swapped
        in place. Raises a KernelError when there is nothing whole to adopt."""

    def sync(self, state: CaptureState) -> None:
        """Make the kernel redirect exactly `state.redirected()` and refuse `state.refused()`.
        Applies only the difference against the last sync (nothing when nothing the kernel
        shows changed); the first one after `install` starts from what the kernel holds.
        Reusing the unchanged CaptureRule objects between states keeps the diff cheap."""

    def set_dns(self, port: int | None) -> None:
        """Send the apps cgroup's DNS queries (UDP and TCP to port 53 of any resolver) to
        127.0.0.1:`port`, with replies appearing to come from the resolver asked; None stops
        it. Off after `install`; call it only while a DNS server listens there (fail open)."""

    def stats(self) -> dict[str, int]:
        """Kernel-side counters (captured, passthrough, ...); empty without CAP_STATS."""

    def origdst(self, client: HostPort) -> HostPort | None:
        """Where a connection redirected to the proxy was going, by its client address (None:
        not known; the iptables backend has no kernel path, so nothing asks it)."""

    # Inbound enforcement (sync's `state.inbound`; meshnode.capture.inbound): which mechanism
    # enforces the mTLS modes of this host's endpoint ports, and why (`meshnode status`).
    inbound_reason: str

    def inbound_counts(self) -> dict[str, dict[str, int]]:
        """Service name -> {"accepted": n, "refused": n}: plaintext connections from other
        hosts to its local endpoints, PERMISSIVE ports let through, STRICT ones refused."""

    def remove(self) -> None:
        """Remove everything `install` created; fail-open: redirect and inbound refusal stop
        first."""


@dataclass(frozen=True)
class CaptureChoice:
    backend: CaptureBackend
    reason: str  # why this backend (shown by `meshnode status`)


def undo_functions() -> dict[str, UndoFn]:
    """Ledger kinds the capture backends create, and how to remove each."""
    # imported here: both backends import this module for CaptureContext
    import meshnode.capture.ebpf as ebpf_backend
    import meshnode.capture.inbound as inbound_enforcement
    import meshnode.capture.iptables as iptables_backend

    return {**ebpf_backend.UNDO, **iptables_backend.UNDO, **inbound_enforcement.UNDO}
