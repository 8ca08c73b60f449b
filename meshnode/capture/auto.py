"""Choose the capture backend: eBPF where this host can run it, iptables otherwise.

The choice rests on a feature probe (meshnode.bpf.probe), not on kernel versions. An explicit
"ebpf" that the probe rejects is an error naming the fix; "auto" falls back and says why, also
when the probe passed but compiling or attaching the programs then failed (`install`).
"""

from __future__ import annotations

import logging
from typing import Literal

from meshnode.bpf.probe import ProbeResult, probe
from meshnode.capture import CaptureBackend, CaptureChoice, CaptureContext
from meshnode.capture.ebpf import BpfCapture
from meshnode.capture.iptables import IptablesCapture
from meshnode.errors import KernelError, UnavailableError, UsageError

CaptureMode = Literal["ebpf", "iptables", "auto"]
MODES: tuple[str, ...] = ("ebpf", "iptables", "auto")

log = logging.getLogger(__name__)


def choose(ctx: CaptureContext, mode: str, iptables_binary: str | None = None,
           probe_result: ProbeResult | None = None) -> CaptureChoice:
    """The backend for `mode`; `probe_result` lets tests and callers that probed already skip
    the probe."""
    if mode not in MODES:
        raise UsageError(f"unknown capture mode {mode!r}", "use one of: " + ", ".join(MODES))
    if mode == "iptables":
        return CaptureChoice(IptablesCapture(ctx, iptables_binary), "iptables: configured")
    result = probe_result if probe_result is not None else probe()
    if result.ok:
        return CaptureChoice(BpfCapture(ctx), f"ebpf: {result.reason}")
    if mode == "ebpf":
        raise UnavailableError(f"eBPF capture unavailable: {result.reason}",
                               "fix that, or run with --capture iptables (or auto)")
    return CaptureChoice(IptablesCapture(ctx, iptables_binary),
                         f"iptables: eBPF unavailable ({result.reason})")


def install(ctx: CaptureContext, mode: str, iptables_binary: str | None = None,
            probe_result: ProbeResult | None = None) -> CaptureChoice:
    """Choose (as `choose`) and install the backend. Under "auto", an eBPF install that fails
    (the loader cannot compile, an attach is refused) falls back to iptables; the eBPF
    install has unwound whatever it made by then."""
    choice = choose(ctx, mode, iptables_binary, probe_result)
    try:
        choice.backend.install()
    except KernelError as exc:
        if mode != "auto" or not isinstance(choice.backend, BpfCapture):
            raise
        log.warning("eBPF capture failed to install (%s); falling back to iptables", exc)
        choice = CaptureChoice(IptablesCapture(ctx, iptables_binary),
                               f"iptables: eBPF install failed ({exc.message})")
        choice.backend.install()
    return choice


def found(ctx: CaptureContext) -> str | None:
    """The backend an earlier agent of this instance left installed, per its ledger."""
    from meshnode.capture import ebpf, iptables

    kinds = {e["kind"] for e in ctx.ledger.entries()}
    if ebpf.KIND_ATTACH in kinds:
        return "ebpf"
    if kinds & {iptables.KIND_CHAIN, iptables.KIND_JUMP}:
        return "iptables"
    return None


def adopt_or_install(ctx: CaptureContext, mode: str, iptables_binary: str | None = None,
                     probe_result: ProbeResult | None = None) -> CaptureChoice:
    """A restarted agent keeps the capture it finds (`CaptureBackend.adopt`): no moment of
    capture off. It installs anew when there is none, when the mode asks for the other
    backend (the old one is removed first: connections pass uncaptured meanwhile), or when
    what it found is not whole."""
    there = found(ctx)
    if there is not None:
        old: CaptureBackend = (BpfCapture(ctx) if there == "ebpf"
                               else IptablesCapture(ctx, iptables_binary))
        if mode in (there, "auto"):
            try:
                old.adopt()
                return CaptureChoice(old, f"{there}: kept from the previous agent")
            except KernelError as exc:
                log.warning("cannot adopt the %s capture (%s): installing it anew", there, exc)
        else:
            log.warning("capture mode changed from %s to %s: replacing the capture "
                        "(connections pass uncaptured meanwhile)", there, mode)
        old.remove()
    return install(ctx, mode, iptables_binary, probe_result)
