"""The connector's attempt loop over real loopback sockets: failover to the next endpoint,
handshakes that complete late or never (the poller and a loop timer), feedback to the balancer
and the outlier detector, and a relay that ends while its upstream is still connecting."""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Any

import pytest

from meshnode.balance.outlier import OutlierDetector
from meshnode.model import Endpoint, HostPort, OutlierConfig
from meshnode.proxy.connect import Connector
from meshnode.proxy.dial import Dialers
from meshnode.proxy.relay import Relay
from meshnode.proxy.stats import WorkerStats
from meshnode.proxy.telemetry import ConnInfo
from tests.unit.relay_rig import Rig, pair, recv_all, rig, stuck_port

pytestmark = pytest.mark.timeout(20)
__all__ = ["rig"]  # the fixture
LOOPBACK = IPv4Address("127.0.0.1")


class Feedback:
    """A balancer that records what the connector tells it (order() is the route's job)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.inflight = 0

    def on_start(self, ep: Endpoint) -> Any:
        self.inflight += 1
        self.events.append(("start", ep.addr.port))
        return ep.addr.port

    def on_connected(self, token: int, latency: float) -> None:
        self.events.append(("connected", token))

    def on_failed(self, token: int, elapsed: float) -> None:
        self.events.append(("failed", token))

    def on_done(self, token: int) -> None:
        self.inflight -= 1
        self.events.append(("done", token))


def ep(port: int) -> Endpoint:
    return Endpoint(HostPort(LOOPBACK, port))


@pytest.fixture
def dead_port() -> int:
    s = socket.create_server(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def backend() -> Iterator[socket.socket]:
    s = socket.create_server(("127.0.0.1", 0))
    yield s
    s.close()


@pytest.fixture
def stuck() -> Iterator[int]:
    with stuck_port() as port:
        yield port


class Dialing:
    """A connector on the rig's loop, and a relay per `connect` whose client is a socket the
    test holds (the application)."""

    def __init__(self, rig: Rig, timeout: float = 0.3) -> None:
        self.rig = rig
        self.stats = WorkerStats()
        self.pair = self.stats.pair("client", "svc")
        self.started: list[Relay] = []
        self.connector = rig.call(lambda: Connector(
            rig.loop, rig.poller, Dialers("node", 0), self.stats, timeout, time.monotonic,
            self.started.append))

    def connect(self, ports: list[int], balancer: Feedback | None = None,
                outlier: OutlierDetector | None = None) -> tuple[Relay, socket.socket]:
        app, client = pair(self.rig.listener)
        client.setblocking(False)
        self.rig.sockets += [app, client]

        def go() -> Relay:
            relay = Relay(self.rig.poller, self.rig.pool, self.rig.registry, client,
                          self.pair, ConnInfo(time.monotonic(), ("127.0.0.1", 1)))
            self.connector.connect(relay, [ep(p) for p in ports], self.pair,
                                   balancer,  # type: ignore[arg-type]
                                   outlier)
            return relay

        return self.rig.call(go), app


def test_a_refused_endpoint_fails_over_to_the_next(rig: Rig, dead_port: int,
                                                    backend: socket.socket) -> None:
    d = Dialing(rig)
    fb = Feedback()
    outlier = OutlierDetector(OutlierConfig(consecutive_failures=1), time.monotonic)
    outlier.retain([ep(dead_port), ep(backend.getsockname()[1])])
    good = backend.getsockname()[1]
    relay, app = d.connect([dead_port, good], fb, outlier)
    served, _ = backend.accept()
    app.sendall(b"hi")
    assert served.recv(2) == b"hi"
    assert d.started == [relay] and relay.info is not None
    assert relay.info.attempts == 2 and relay.info.endpoint == HostPort(LOOPBACK, good)
    assert d.pair.connect_errors == 1 and d.pair.connect.count == 1
    assert fb.events == [("start", dead_port), ("failed", dead_port), ("done", dead_port),
                         ("start", good), ("connected", good)]
    assert fb.inflight == 1  # the relay holds the in-flight count until it ends
    assert outlier.ejected_for(HostPort(LOOPBACK, dead_port)) > 0
    served.close()
    app.close()
    rig.wait("the relay to finish", lambda: relay.finished)
    assert fb.inflight == 0
    assert d.stats.selections == {("svc", HostPort(LOOPBACK, dead_port)): 1,
                                  ("svc", HostPort(LOOPBACK, good)): 1}


def test_every_endpoint_failing_refuses_the_client_with_the_reason(rig: Rig,
                                                                   dead_port: int) -> None:
    d = Dialing(rig)
    relay, app = d.connect([dead_port, dead_port], Feedback())
    with pytest.raises(ConnectionResetError):
        app.recv(1)
    assert relay.finished and relay.outcome == "refused"
    assert d.pair.failures == {"refused": 1} and d.pair.connect_errors == 2


def test_a_handshake_that_never_completes_times_out_then_fails_over(
        rig: Rig, stuck: int, backend: socket.socket) -> None:
    d = Dialing(rig, timeout=0.3)
    fb = Feedback()
    t0 = time.monotonic()
    relay, app = d.connect([stuck, backend.getsockname()[1]], fb)
    served, _ = backend.accept()
    assert 0.25 < time.monotonic() - t0 < 2.0
    app.sendall(b"late")
    assert served.recv(4) == b"late"
    assert relay.info is not None and relay.info.attempts == 2
    assert ("failed", stuck) in fb.events and d.pair.connect_errors == 1
    served.close()


def test_a_handshake_that_completes_later_starts_the_relay(rig: Rig) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    port = s.getsockname()[1]
    blocker = socket.create_connection(("127.0.0.1", port))  # fills the accept queue
    try:
        d = Dialing(rig, timeout=5.0)
        relay, app = d.connect([port])
        assert not rig.call(lambda: relay.started)  # still handshaking
        first, _ = s.accept()  # room again: the retransmitted SYN gets through
        served, _ = s.accept()
        rig.wait("the relay to start", lambda: relay.started)
        app.sendall(b"x")
        assert served.recv(1) == b"x"
        for c in (first, served):
            c.close()
    finally:
        blocker.close()
        s.close()


def test_the_relay_ending_while_connecting_abandons_the_attempt(rig: Rig, stuck: int) -> None:
    d = Dialing(rig, timeout=5.0)
    fb = Feedback()
    relay, app = d.connect([stuck], fb)
    assert rig.call(lambda: relay.connecting is not None)
    rig.call(relay.reset)
    assert relay.finished and relay.connecting is None and fb.inflight == 0
    assert len(rig.poller) == 0  # the pending socket left the poller
    with pytest.raises(ConnectionResetError):
        app.recv(1)


def test_an_early_eof_from_the_client_still_reaches_the_upstream(
        rig: Rig, backend: socket.socket) -> None:
    d = Dialing(rig)
    relay, app = d.connect([backend.getsockname()[1]])
    app.sendall(b"bye")
    app.shutdown(socket.SHUT_WR)
    served, _ = backend.accept()
    assert recv_all(served) == b"bye"
    served.close()
    assert recv_all(app) == b""
    rig.wait("the relay to finish", lambda: relay.finished)
    assert relay.outcome == "ok"


def test_dialers_start_reports_refused_without_raising(dead_port: int) -> None:
    sock, err = Dialers("node", 0).for_endpoint(ep(dead_port)).start(ep(dead_port))
    sock.close()
    assert err == errno.ECONNREFUSED
