"""The relay over real loopback TCP sockets, on a uvloop loop in a background thread.

Four sockets per test: the application (`app`) and the backend (`backend`) are the test's,
blocking with timeouts; the two in between (the proxy's accepted client socket and its upstream
socket) belong to the relay. Assertions are on what the application and the backend see: the
bytes, their order, EOF and resets.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
import threading
import time

import pytest

from meshnode.proxy.relay import COPY_LIMIT, BufferPool
from tests.unit.relay_rig import Rig, recv_all, rig

pytestmark = pytest.mark.timeout(20)
# tcp_info.tcpi_state of a socket whose peer has not sent its FIN yet: ESTABLISHED, FIN_WAIT1,
# FIN_WAIT2 (our shutdown came first)
WAITING_FOR_FIN = (1, 4, 5)
__all__ = ["rig"]  # the fixture


def test_bytes_flow_both_ways_and_are_counted(rig: Rig) -> None:
    relay, app, backend = rig.relay()
    app.sendall(b"hello " * 50)
    got = b""
    while len(got) < 300:
        got += backend.recv(4096)
    assert got == b"hello " * 50
    backend.sendall(b"world" * 7)
    assert app.recv(4096) == b"world" * 7
    assert rig.call(lambda: (relay.bytes_up, relay.bytes_down)) == (300, 35)
    assert (rig.stats.bytes_up, rig.stats.bytes_down) == (300, 35)
    assert rig.stats.active == 1 and len(rig.registry) == 1


def test_half_close_client_first(rig: Rig) -> None:
    relay, app, backend = rig.relay()
    app.sendall(b"request")
    app.shutdown(socket.SHUT_WR)
    assert recv_all(backend) == b"request"  # the FIN was passed on
    # The other direction still flows after the client's FIN.
    backend.sendall(b"response")
    backend.shutdown(socket.SHUT_WR)
    assert recv_all(app) == b"response"
    rig.wait("the relay to finish", lambda: relay.finished)
    assert relay.outcome == "ok" and rig.finished == [relay]
    assert rig.stats.active == 0 and rig.stats.closed == 1


def test_half_close_upstream_first(rig: Rig) -> None:
    relay, app, backend = rig.relay()
    backend.sendall(b"banner")
    backend.shutdown(socket.SHUT_WR)
    assert recv_all(app) == b"banner"
    app.sendall(b"late bytes")
    app.shutdown(socket.SHUT_WR)
    assert recv_all(backend) == b"late bytes"
    rig.wait("the relay to finish", lambda: relay.finished)
    assert relay.outcome == "ok"


def test_a_reset_on_one_side_resets_the_other(rig: Rig) -> None:
    relay, app, backend = rig.relay()
    app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    app.close()
    with pytest.raises(ConnectionResetError):
        backend.recv(10)
    rig.wait("the relay to finish", lambda: relay.finished)
    assert relay.outcome == "reset" and rig.stats.active == 0


def test_a_reset_after_half_close_is_still_seen(rig: Rig) -> None:
    # The client half-closed, so nobody reads it any more: its RST must still end the relay
    # (the poller reports it as an error on a socket with no interest left).
    relay, app, backend = rig.relay()
    app.shutdown(socket.SHUT_WR)
    assert recv_all(backend) == b""
    app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    app.close()
    rig.wait("the relay to finish", lambda: relay.finished)
    assert relay.outcome == "reset"
    with pytest.raises((ConnectionResetError, BrokenPipeError)):  # the reset was passed on
        backend.sendall(b"x")
        backend.recv(10)


def test_bytes_sent_before_the_upstream_connects_wait_in_the_kernel(rig: Rig) -> None:
    relay, app, backend = rig.relay(start=False)
    app.sendall(b"early")
    app.shutdown(socket.SHUT_WR)
    rig.start(relay)
    assert recv_all(backend) == b"early"
    assert rig.call(lambda: relay.bytes_up) == 5


def test_backpressure_keeps_one_read_in_user_space_and_loses_nothing(rig: Rig) -> None:
    # The backend does not read: the relay must stop reading the application (its bytes then
    # wait in the kernel) instead of buffering them, then deliver everything once it reads.
    relay, app, backend = rig.relay()
    data = bytes(range(256)) * (64 * 1024)  # 16 MiB
    sender = threading.Thread(target=lambda: (app.sendall(data), app.shutdown(socket.SHUT_WR)))
    sender.start()
    rig.wait("the upstream to fill up", lambda: relay.up is not None and not relay.up.reading)
    held = rig.call(lambda: relay.up.pending if relay.up is not None else None)
    assert held is not None and len(held) <= rig.pool.size
    assert rig.call(lambda: relay.bytes_up) < len(data)  # the rest waits in the kernel
    got = recv_all(backend)
    sender.join(10)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert rig.call(lambda: relay.bytes_up) == len(data)


def test_an_upstream_that_finishes_while_paused_is_read_to_its_end(rig: Rig) -> None:
    # The client half-closed and reads nothing for a while; the backend sends what the
    # client path cannot take yet, then closes. The upstream socket then hangs up (its FIN
    # after our shutdown) while the relay is paused with bytes in its receive queue: they
    # must all still reach the client, and the loop must idle meanwhile (a hang-up is
    # reported on every poll while the socket is in the epoll set).
    relay, app, backend = rig.relay()
    app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    relay.client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    app.shutdown(socket.SHUT_WR)
    assert recv_all(backend) == b""
    data = bytes(range(256)) * 400  # 100 KiB: more than the client path, less than it all
    backend.sendall(data)
    backend.close()
    rig.wait("the relay to pause", lambda: relay.down is not None and not relay.down.reading)
    upstream = relay.upstream
    assert upstream is not None
    rig.wait("the backend's FIN to reach the upstream socket",
             lambda: upstream.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
             not in WAITING_FOR_FIN)
    cpu = rig.call(time.thread_time)
    time.sleep(0.3)  # a measuring window, not a barrier
    assert rig.call(time.thread_time) - cpu < 0.1  # the loop idles while paused
    assert recv_all(app) == data
    rig.wait("the relay to finish", lambda: relay.finished)
    assert relay.outcome == "ok"


def test_a_large_remainder_keeps_its_buffer_and_a_small_one_is_copied(rig: Rig) -> None:
    relay, _, backend = rig.relay()
    up = relay.up
    assert up is not None
    buf = rig.pool.current
    buf[:20] = b"0123456789abcdefghij"

    def hold(sent: int, n: int) -> tuple[object, object, object]:
        up._hold(buf, sent, n)  # as if the kernel took `sent` of `n` bytes
        return up.pending, up.lent, rig.pool.current  # before the loop sends the rest

    pending, lent, current = rig.call(lambda: hold(10, 20))
    assert pending == b"abcdefghij" and lent is None and current is buf
    assert backend.recv(100) == b"abcdefghij"  # sent once the upstream was writable
    rig.wait("the pipe to drain", lambda: up.pending is None and up.reading)

    n = COPY_LIMIT + 1
    buf[:n] = b"L" * n
    pending, lent, current = rig.call(lambda: hold(0, n))
    assert lent is buf and current is not buf  # the next reads go elsewhere
    got = b""
    while len(got) < n:
        got += backend.recv(n)
    assert got == b"L" * n
    rig.wait("the lent buffer to come back", lambda: up.lent is None and up.reading)
    assert buf in rig.pool._free


def test_close_while_connecting_abandons_the_attempt(rig: Rig) -> None:
    relay, app, _ = rig.relay(start=False)
    cancelled = []
    relay.connecting = lambda: cancelled.append(True)
    rig.call(relay.reset)
    assert cancelled == [True] and relay.finished and relay.outcome == "reset"
    with pytest.raises(ConnectionResetError):
        app.recv(10)


def test_idle_sweep_uses_the_injected_clock_and_spares_busy_relays(rig: Rig) -> None:
    idle, idle_app, _ = rig.relay()
    busy, busy_app, busy_backend = rig.relay()
    registry = rig.registry
    rig.clock.now += 20
    assert rig.call(lambda: registry.sweep(idle_timeout=30)) == 0
    busy_app.sendall(b"ping")
    assert busy_backend.recv(10) == b"ping"
    rig.clock.now += 20  # 40 s idle for one, the other moved a byte since the last sweep
    assert rig.call(lambda: registry.sweep(idle_timeout=30)) == 1
    assert idle.finished and idle.outcome == "idle_timeout" and not busy.finished
    assert recv_all(idle_app) == b""  # a clean close: FIN, not RST
    rig.clock.now += 29
    assert rig.call(lambda: registry.sweep(idle_timeout=30)) == 0
    rig.clock.now += 1
    assert rig.call(lambda: registry.sweep(idle_timeout=30)) == 1 and busy.finished


def test_idle_sweep_skips_relays_still_connecting(rig: Rig) -> None:
    relay, _, _ = rig.relay(start=False)
    rig.clock.now += 1000
    assert rig.call(lambda: rig.registry.sweep(idle_timeout=1)) == 0
    assert not relay.finished


def test_registry_reset_all_and_wait_empty(rig: Rig) -> None:
    relay, app, _ = rig.relay()
    waiter = asyncio.run_coroutine_threadsafe(rig.registry.wait_empty(), rig.loop)
    assert not waiter.done()
    assert rig.call(rig.registry.reset_all) == 1
    waiter.result(5)
    assert relay.outcome == "drain"
    with pytest.raises(ConnectionResetError):
        app.recv(10)


def test_buffer_pool_keeps_a_bounded_number_of_spares() -> None:
    pool = BufferPool(size=8, keep=2)
    lent = [pool.lend() for _ in range(4)]
    for v in lent:
        pool.give_back(v)
    assert len(pool._free) == 2
    assert pool.lend() in lent
