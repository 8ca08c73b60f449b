"""What crosses the fabric's bridge: every frame seen on any interface of the switch namespace
(the bridge's ports carry every frame between hosts; br0 itself only sees what is addressed
to the switch), kept in memory while a `Sniffer` runs, so a test can say whether a payload
crossed in the clear. An AF_PACKET socket: no tcpdump needed."""

from __future__ import annotations

import contextlib
import select
import socket
import threading

from tests.e2e.fabric import inside

ETH_P_ALL = 0x0003


class Sniffer:
    def __init__(self, switch_ns: str) -> None:
        with inside(switch_ns):  # unbound: every interface of the namespace it was made in
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                      socket.htons(ETH_P_ALL))
        self.sock.setblocking(False)
        self.frames: list[bytes] = []
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sniffer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        # every frame that crossed before now is in the socket's queue (a reply came back
        # over the bridge after the request it answers): take the rest, no waiting
        self._drain()
        self.sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if ready:
                self._drain()

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                frame = self.sock.recv(65536)
                self.frames.append(frame)
                self.bytes += len(frame)

    def saw(self, marker: bytes) -> bool:
        return any(marker in f for f in self.frames)
