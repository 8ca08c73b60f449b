"""Relay pipes for a relay whose one side is a non-blocking ssl.SSLSocket (the mTLS tunnel):
`OUTBOUND` (the app's plain socket, then the tunnel) and `INBOUND` (the tunnel, then the
local endpoint's plain socket), the `pipes` argument of Relay.start.

What differs from a plain socket, each forced by the ssl module or OpenSSL:
- "Again" is SSLWantReadError / SSLWantWriteError, both OSError subclasses (SSLError): caught
  before OSError, or the relay would reset a connection that only has to wait.
- Reading: OpenSSL decrypts a whole record (up to 16 KiB) and hands out what was asked for;
  the rest would stay in OpenSSL where epoll cannot see it. So a TLS source is read in a loop
  while at least one record's worth of buffer space remains, until it would block: every
  record read is read whole, and what is left waits in the kernel (epoll sees it).
- Writing: OpenSSL writes all or nothing (no partial-write mode); on SSLWantWriteError it may
  have sent some records already and must be called again with the same bytes, which is what
  a pending remainder is (the whole chunk). Moving the bytes is allowed (Python sets
  SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER), so a copied remainder is fine.
- Half-close: SSLSocket.shutdown() drops its TLS object, so EOF is passed on with the raw
  socket's shutdown(SHUT_WR) (a FIN, no close_notify); the contexts set
  OP_IGNORE_UNEXPECTED_EOF, so the far side reads that FIN as the end of one direction and
  keeps writing the other (proxy/tls.py).
- EOF versus reset: with that option a FIN reads as 0 bytes, while a TCP reset surfaces from
  OpenSSL as SSLEOFError (its errno lost on the way). `suppress_ragged_eofs` would turn that
  into 0 bytes too, and pass a reset on as a clean end: the tunnel's sockets are made with
  suppress_ragged_eofs=False, so SSLEOFError is an OSError here and resets the relay.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import _socket
import socket
import ssl

from meshnode.proxy.relay import Pipe, _Down, _Up

__all__ = ["INBOUND", "OUTBOUND", "RECORD"]

RECORD = 16 * 1024  # the largest TLS plaintext record
_SHUT_WR = socket.SHUT_WR
_AGAIN = (BlockingIOError, InterruptedError)
_TLS_AGAIN = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError)


class _TlsSource(Pipe):
    """src is the TLS socket, dst a plain one."""

    __slots__ = ()

    def readable(self) -> None:
        buf = self.pool.current
        src = self.src
        room = len(buf) - RECORD
        n = 0
        eof = False
        while n <= room:
            try:
                got = src.recv_into(buf[n:])
            except _TLS_AGAIN:
                break
            except OSError:  # a reset, or a TLS error (a bad record, an alert)
                self.relay.reset()
                return
            if not got:
                eof = True
                break
            n += got
        if n:
            self.count(n)
            try:
                sent = self.dst.send(buf[:n])
            except _AGAIN:
                sent = 0
            except OSError:
                self.relay.reset()
                return
            if sent < n:
                # The EOF (if seen) is read again once dst drains: a TLS socket at its end
                # keeps answering 0, and a socket at EOF stays readable for epoll.
                self._hold(buf, sent, n)
                return
        if eof:
            self._eof()


class _TlsSink(Pipe):
    """src is a plain socket, dst the TLS socket."""

    __slots__ = ()

    def readable(self) -> None:
        buf = self.pool.current
        try:
            n = self.src.recv_into(buf)
        except _AGAIN:
            return
        except OSError:
            self.relay.reset()
            return
        if not n:
            self._eof()
            return
        self.count(n)
        try:
            sent = self.dst.send(buf[:n])
        except _TLS_AGAIN:
            sent = 0  # retried with the same bytes (the whole chunk) once writable
        except OSError:
            self.relay.reset()
            return
        if sent < n:
            self._hold(buf, sent, n)

    def writable(self) -> None:
        pending = self.pending
        assert pending is not None
        try:
            sent = self.dst.send(pending)
        except _TLS_AGAIN:
            return
        except OSError:
            self.relay.reset()
            return
        if sent < len(pending):
            self.pending = pending[sent:]
            return
        self._drained()

    def _shut(self) -> None:
        _socket.socket.shutdown(self.dst, _SHUT_WR)  # the raw socket's: keeps the TLS object


class _OutUp(_TlsSink, _Up):
    __slots__ = ()


class _OutDown(_TlsSource, _Down):
    __slots__ = ()


class _InUp(_TlsSource, _Up):
    __slots__ = ()


class _InDown(_TlsSink, _Down):
    __slots__ = ()


OUTBOUND: tuple[type[Pipe], type[Pipe]] = (_OutUp, _OutDown)  # client plain, upstream TLS
INBOUND: tuple[type[Pipe], type[Pipe]] = (_InUp, _InDown)  # client TLS, upstream plain
