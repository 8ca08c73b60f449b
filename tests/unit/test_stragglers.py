"""The agent's bridge for connections queued on the proxy's listening socket when no worker
serves (meshnode/agent/stragglers.py): each is relayed where `resolve` says, byte for byte and
with the half-close passed on, or reset at once."""

from __future__ import annotations

import asyncio
import socket
from ipaddress import IPv4Address

import pytest

from meshnode.agent.stragglers import Stragglers
from meshnode.model import HostPort


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


async def _echo_upper() -> tuple[asyncio.Server, int]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read()  # to EOF: the client's half-close must arrive
        w.write(data.upper())
        await w.drain()
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


def test_queued_connections_are_relayed_or_reset() -> None:
    async def main() -> None:
        srv, port = await _echo_upper()
        queue = _listener()
        loop = asyncio.get_running_loop()
        clients = []
        for _ in range(3):  # established, never accepted: what a dead worker leaves queued
            c = socket.socket()
            c.setblocking(False)
            await loop.sock_connect(c, queue.getsockname())
            clients.append(c)
        refused = clients.pop()
        refused_port = refused.getsockname()[1]

        def resolve(ip: IPv4Address, client_port: int) -> HostPort | None:
            assert ip == IPv4Address("127.0.0.1")
            return None if client_port == refused_port else HostPort(ip, port)

        bridge = Stragglers()
        assert bridge.drain(queue.fileno(), resolve) == 3
        assert queue.fileno() >= 0  # the agent's copy stays open
        for i, c in enumerate(clients):
            await loop.sock_sendall(c, f"call {i}".encode())
            c.shutdown(socket.SHUT_WR)
            got = b""
            while data := await loop.sock_recv(c, 1024):
                got += data
            assert got == f"CALL {i}".encode()
            c.close()
        with pytest.raises(ConnectionResetError):  # a reset: no FIN to mistake for a reply
            await loop.sock_recv(refused, 16)
        assert (bridge.relayed, bridge.reset) == (2, 1)
        await bridge.close()
        refused.close()
        queue.close()
        srv.close()

    asyncio.run(main())
