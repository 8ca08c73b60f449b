"""The direct dialer (a non-blocking connect that usually completes inside connect()) and the
sock_diag questions (the listening sockets by inode, the cgroup of a connected socket), on
loopback, no root needed."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address

import pytest

from meshnode.host import process
from meshnode.model import Endpoint, HostPort
from meshnode.proxy.dial import DirectDialer
from meshnode.sockdiag import SockDiag
from tests.unit.relay_rig import stuck_port

pytestmark = pytest.mark.timeout(20)
LOOPBACK = IPv4Address("127.0.0.1")


def endpoint(port: int) -> Endpoint:
    return Endpoint(HostPort(LOOPBACK, port))


def dial(port: int) -> tuple[socket.socket, int]:
    sock, err = DirectDialer(0).start(endpoint(port))
    return socket.socket(fileno=sock.detach()), err


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.create_server(("127.0.0.1", 0))
    yield s
    s.close()


def test_dial_connects_and_the_peer_sees_it(listener: socket.socket) -> None:
    sock, err = dial(listener.getsockname()[1])
    try:
        assert err == 0  # loopback: the handshake completed inside connect()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        conn, _ = listener.accept()
        sock.setblocking(True)
        sock.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.close()
    finally:
        sock.close()


def test_dial_refused_is_known_at_once(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    listener.close()
    sock, err = dial(port)
    sock.close()
    assert err == errno.ECONNREFUSED


def test_dial_in_progress_when_the_handshake_cannot_complete() -> None:
    with stuck_port() as port:
        sock, err = dial(port)
        sock.close()
    assert err == errno.EINPROGRESS


def test_listeners_by_inode_ipv4_and_ipv6(listener: socket.socket) -> None:
    v6 = socket.socket(socket.AF_INET6)
    v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    v6.bind(("::1", 0))
    v6.listen()
    client = socket.create_connection(listener.getsockname())
    try:
        found = SockDiag().tcp_listeners()
        port = listener.getsockname()[1]
        assert found[os.fstat(listener.fileno()).st_ino] == (LOOPBACK, port)
        assert found[os.fstat(v6.fileno()).st_ino] == (IPv6Address("::1"), v6.getsockname()[1])
        assert os.fstat(client.fileno()).st_ino not in found  # connected, not listening
    finally:
        client.close()
        v6.close()


def test_cgroup_of_a_connected_socket(listener: socket.socket) -> None:
    client = socket.create_connection(listener.getsockname())
    try:
        ip, port = client.getsockname()
        lip, lport = listener.getsockname()
        cgroup = SockDiag().cgroup_of((IPv4Address(ip), port), (IPv4Address(lip), lport))
        assert cgroup > 0  # this process's cgroup id (cgroup v2 inode)
        assert SockDiag().cgroup_of((IPv4Address(ip), 1), (IPv4Address(lip), lport)) == 0
    finally:
        client.close()


LISTENERS = """
import socket, sys, time
def listen(family, addr):
    s = socket.socket(family)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, addr[0] == "::1")
    s.bind(addr); s.listen(); return s
keep = [listen(socket.AF_INET, ("0.0.0.0", 0)), listen(socket.AF_INET, ("127.0.0.2", 0)),
        listen(socket.AF_INET6, ("::1", 0)), listen(socket.AF_INET6, ("::", 0))]
print(" ".join(str(s.getsockname()[1]) for s in keep), flush=True)
time.sleep(60)
"""


def test_listening_ports_of_a_process_tree() -> None:
    # the listeners live in a grandchild: a shell in between, as `meshnode run -- sh -c` has
    parent = subprocess.Popen(["sh", "-c", f'"{sys.executable}" -c "$0"; exit', LISTENERS],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        any4, lo2, v6only, dual = (int(p) for p in parent.stdout.readline().split())
        host = IPv4Address("198.19.0.10")
        found = process.listening(parent.pid, host, process.tcp_listeners())
        # wildcards are reachable at the host's address; a v6-only ::1 listener is not IPv4
        assert found == {HostPort(host, any4), HostPort(IPv4Address("127.0.0.2"), lo2),
                         HostPort(host, dual)}
        assert v6only not in {hp.port for hp in found}
    finally:
        parent.kill()
        parent.wait()
