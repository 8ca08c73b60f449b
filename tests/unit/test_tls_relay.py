"""The relay with one side a non-blocking TLS socket (proxy/tlspipe.py), over loopback TCP on
the relay rig's uvloop thread.

Two layouts, as the worker uses them: `outbound` (the app's plain socket, the relay, then TLS
to the test's TLS server standing in for the peer host) and `inbound` (the test's TLS client
standing in for the remote worker, the relay, then a plain backend). The test's ends are
blocking sockets with timeouts; assertions are on what they receive.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from meshnode.proxy.relay import Relay
from meshnode.proxy.tls import _context
from meshnode.proxy.tlspipe import INBOUND, OUTBOUND
from tests.tls_certs import make_pki
from tests.unit.relay_rig import Rig, pair, recv_all, rig

pytestmark = pytest.mark.timeout(30)
__all__ = ["rig"]
BULK = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    server = _context(True, str(pki.bundle), str(pki.node("b")))
    client = _context(False, str(pki.bundle), str(pki.service("web", "a")))
    return client, server


@dataclass
class Tunnel:
    relay: Relay
    app: socket.socket  # the test's end before the relay (TLS for inbound)
    backend: socket.socket  # the test's end after it (TLS for outbound)
    tls: ssl.SSLSocket  # the relay's TLS socket


def _tls_pair(r: Rig, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
              ) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """A handshaken (client, server) TLS pair over loopback TCP."""
    client_ctx, server_ctx = contexts
    outer, inner = pair(r.listener)
    inner.settimeout(5)
    # suppress_ragged_eofs=False on both ends: a reset must not read as a clean end
    c = client_ctx.wrap_socket(outer, do_handshake_on_connect=False, suppress_ragged_eofs=False)
    s = server_ctx.wrap_socket(inner, server_side=True, do_handshake_on_connect=False,
                               suppress_ragged_eofs=False)
    t = threading.Thread(target=s.do_handshake)
    t.start()
    c.do_handshake()
    t.join(5)
    r.sockets += [c, s]
    return c, s


@pytest.fixture(params=["outbound", "inbound"])
def tunnel(request: pytest.FixtureRequest, rig: Rig,
           contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> Iterator[Tunnel]:
    c, s = _tls_pair(rig, contexts)
    if request.param == "outbound":
        app, client = pair(rig.listener)
        client.setblocking(False)
        c.setblocking(False)
        rig.sockets += [app, client]
        relay = rig.call(lambda: Relay(rig.poller, rig.pool, rig.registry, client, rig.stats))
        rig.call(lambda: relay.start(c, OUTBOUND))
        yield Tunnel(relay, app, s, c)
    else:
        upstream, backend = pair(rig.listener)
        upstream.setblocking(False)
        s.setblocking(False)
        rig.sockets += [upstream, backend]
        relay = rig.call(lambda: Relay(rig.poller, rig.pool, rig.registry, s, rig.stats))
        rig.call(lambda: relay.start(upstream, INBOUND))
        yield Tunnel(relay, c, backend, s)


def _shut(sock: socket.socket) -> None:
    """Half-close the way the relay does: the raw socket's FIN (TLS keeps the other way)."""
    socket.socket.shutdown(sock, socket.SHUT_WR)


def test_bulk_both_ways_intact(rig: Rig, tunnel: Tunnel) -> None:
    # One direction after the other: an SSLSocket must not be used by two threads at once.
    up, down = os.urandom(BULK), os.urandom(BULK)
    got: dict[str, bytes] = {}
    reader = threading.Thread(target=lambda: got.update(up=recv_all(tunnel.backend)))
    reader.start()
    tunnel.app.sendall(up)
    _shut(tunnel.app)
    reader.join(20)
    writer = threading.Thread(target=lambda: (tunnel.backend.sendall(down),
                                              _shut(tunnel.backend)))
    writer.start()
    got["down"] = recv_all(tunnel.app)
    writer.join(20)
    assert hashlib.sha256(got["up"]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got["down"]).digest() == hashlib.sha256(down).digest()
    rig.wait("the relay to finish", lambda: tunnel.relay.finished)
    assert tunnel.relay.outcome == "ok"
    assert (rig.stats.bytes_up, rig.stats.bytes_down) == (BULK, BULK)


def test_small_exchanges_are_not_left_in_openssl(rig: Rig, tunnel: Tunnel) -> None:
    """Request/response turns: each answer must come through without more bytes behind it
    to wake the relay (a record left decrypted in OpenSSL would hang here)."""
    for i in range(200):
        msg = b"x" * (1 + i * 97 % 40000)
        tunnel.app.sendall(msg)
        got = b""
        while len(got) < len(msg):
            got += tunnel.backend.recv(65536)
        assert got == msg
        tunnel.backend.sendall(msg[::-1])
        got = b""
        while len(got) < len(msg):
            got += tunnel.app.recv(65536)
        assert got == msg[::-1]


@pytest.mark.parametrize("first", ["app", "backend"])
def test_half_close_either_side_first(rig: Rig, tunnel: Tunnel, first: str) -> None:
    a, b = (tunnel.app, tunnel.backend) if first == "app" else (tunnel.backend, tunnel.app)
    a.sendall(b"request")
    _shut(a)
    assert recv_all(b) == b"request"  # data then the FIN, passed on
    b.sendall(b"the other direction still flows")
    _shut(b)
    assert recv_all(a) == b"the other direction still flows"
    rig.wait("the relay to finish", lambda: tunnel.relay.finished)
    assert tunnel.relay.outcome == "ok"


@pytest.mark.parametrize("side", ["app", "backend"])
def test_a_reset_on_either_side_resets_the_other(rig: Rig, tunnel: Tunnel, side: str) -> None:
    a, b = (tunnel.app, tunnel.backend) if side == "app" else (tunnel.backend, tunnel.app)
    a.sendall(b"some bytes")
    a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    a.close()
    with pytest.raises((ConnectionResetError, ssl.SSLError)):
        while b.recv(65536):
            pass
    rig.wait("the relay to finish", lambda: tunnel.relay.finished)
    assert tunnel.relay.outcome == "reset"


def test_a_slow_reader_holds_the_writer_back(rig: Rig, tunnel: Tunnel) -> None:
    """Backpressure toward the app: the backend writes far more than the sockets hold; the
    relay stops reading the backend while the app does not read, then everything arrives."""
    total = 64 * 1024 * 1024
    data = os.urandom(1024 * 1024)
    sent = threading.Event()

    def write() -> None:
        for _ in range(total // len(data)):
            tunnel.backend.sendall(data)
        _shut(tunnel.backend)
        sent.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    down = tunnel.relay.down
    assert down is not None
    rig.wait("the relay to hold a remainder", lambda: down.pending is not None
             and not down.reading)
    assert not sent.is_set()  # the writer is blocked: nothing unbounded in between
    h = hashlib.sha256()
    n = 0
    while chunk := tunnel.app.recv(1 << 20):
        h.update(chunk)
        n += len(chunk)
    assert n == total
    assert h.digest() == hashlib.sha256(data * (total // len(data))).digest()
    writer.join(10)


def test_tls_garbage_from_the_peer_resets(rig: Rig, tunnel: Tunnel) -> None:
    """A record that does not decrypt (bytes injected under TLS) is a reset, not a crash."""
    raw = socket.socket(fileno=os.dup(tunnel.backend.fileno() if isinstance(
        tunnel.backend, ssl.SSLSocket) else tunnel.app.fileno()))
    other = tunnel.app if isinstance(tunnel.backend, ssl.SSLSocket) else tunnel.backend
    raw.sendall(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # application_data, bad tag
    raw.close()
    with pytest.raises(ConnectionResetError):
        while other.recv(65536):
            pass
    rig.wait("the relay to finish", lambda: tunnel.relay.finished)
    assert tunnel.relay.outcome == "reset"

