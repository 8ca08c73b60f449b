"""Backpressure between the two sides of a relay, as its own small class (after uvicorn's
`protocols/http/flow_control.py`).

A transport calls its protocol's `pause_writing()` when its write buffer passes the high-water
mark and `resume_writing()` when it drains below low water. A relay answers by pausing and
resuming *reading on the other side*: bytes then wait in the kernel's socket buffers, and TCP
flow control slows the sender, instead of the proxy buffering without bound.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import asyncio

__all__ = ["HIGH_WATER", "LOW_WATER", "FlowControl"]

# Write-buffer limits set on every relay transport. A relay read is up to 256 KiB and is written
# straight on; whatever the kernel does not take at once stays in the transport. With a high
# mark of 0 any leftover pauses the source until the leftover is written, so user-space holds at
# most one read per direction and the kernel's autotuned socket buffers do the queueing (the
# way HAProxy and nginx relay). It also means the read buffer is never lent to the transport
# while the next read would overwrite it.
HIGH_WATER = 0
LOW_WATER = 0


class FlowControl:
    """The read switch of one transport. Idempotent: pausing twice needs one resume."""

    __slots__ = ("_transport", "read_paused")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.read_paused = False

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self._transport.resume_reading()
