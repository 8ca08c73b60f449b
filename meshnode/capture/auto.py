"""Choose the capture backend: eBPF where this host can run it, iptables otherwise.

The choice rests on a feature probe (meshnode.bpf.probe), not on kernel versions. An explicit
"ebpf" that the probe rejects is an error naming the fix; "auto" falls back and says why, also
when the probe passed but compiling or attaching the programs then failed (`install`).
"""

from __future__ import annotations

import logging
from typing import Literal

from meshnode.bpf.probe import ProbeResult, probe
from meshnode.capture import CaptureChoice, CaptureContext
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
