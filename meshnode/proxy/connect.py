"""Connecting a relay's upstream: each endpoint of the route in turn until one answers.

Owns the attempt loop and its feedback: every attempt is counted, reported to the balancer
(in-flight, connect latency) and to the outlier detector (consecutive failures); the first
endpoint that answers becomes the relay's upstream and the relay starts; when all fail, the
client is refused with the last failure's reason. Passthrough connections have no balancer or
detector and one attempt. With mTLS configured, each attempt first asks MeshSecurity.plan
(proxy/tunnel.py): an endpoint on another host may go through a TunnelAttempt (TCP, TLS,
preamble, answer) that reports back here like a connect; a local one is authorized first.

No Task or Future per connection: the dialer's connect usually completes inside connect()
(loopback, nearby hosts), and then everything happens in the accept callback. Only a handshake
still under way waits for the socket to turn writable (the poller), bounded by a loop timer.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from meshnode.balance import Balancer
from meshnode.balance.outlier import OutlierDetector
from meshnode.model import Endpoint
from meshnode.proxy.dial import Dialers
from meshnode.proxy.poller import WRITE, Poller
from meshnode.proxy.stats import PairStats, WorkerStats
from meshnode.proxy.telemetry import failure_reason
from meshnode.proxy.tunnel import DENIED, MeshSecurity, TunnelAttempt

if TYPE_CHECKING:
    from meshnode.balance import EndpointLoad
    from meshnode.proxy.relay import Pipe, Relay

__all__ = ["Connector"]

log = logging.getLogger("meshnode.proxy")


class Connector:
    """One per worker: dials upstreams for relays. `on_started(relay)` runs once a relay's
    upstream answered and it relays (the worker's tap event)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, poller: Poller, dialers: Dialers,
                 stats: WorkerStats, timeout: float, clock: Callable[[], float],
                 on_started: Callable[[Relay], None],
                 security: MeshSecurity | None = None) -> None:
        self.loop = loop
        self.poller = poller
        self.dialers = dialers
        self.stats = stats
        self.timeout = timeout
        self.clock = clock
        self.on_started = on_started
        # mTLS between hosts and authorization (None or inactive: every endpoint direct)
        self.security = security

    def connect(self, relay: Relay, attempts: Sequence[Endpoint], stats: PairStats,
                balancer: Balancer | None = None, outlier: OutlierDetector | None = None,
                first: int = 0, reason: str = "error", timeout: float | None = None) -> None:
        """Try attempts[first:] in order; `reason` is the last failure's so far. `timeout`:
        the service's connect timeout per attempt (None: the worker's)."""
        info = relay.info
        assert info is not None  # the worker records the connection before connecting
        clock = self.clock
        security = self.security
        for i in range(first, len(attempts)):
            ep = attempts[i]
            if security is not None and security.active:
                plan = security.plan(ep, info)
                if plan is not None:
                    if isinstance(plan, str):
                        if plan == DENIED:
                            stats.fail(DENIED)
                            relay.outcome = DENIED
                            relay.reset()
                            return
                        reason = plan  # this endpoint cannot be reached as its mode says
                        continue
                    token = None
                    if balancer is not None:
                        token = balancer.on_start(ep)
                        self.stats.selected(stats.dst, ep.addr)
                    info.attempts += 1
                    TunnelAttempt(self, security, relay, plan, attempts, i, stats, balancer,
                                  outlier, token, clock(), timeout or self.timeout)
                    return
            token = None
            if balancer is not None:
                token = balancer.on_start(ep)
                self.stats.selected(stats.dst, ep.addr)
            info.attempts += 1
            started = clock()
            try:
                sock, err = self.dialers.for_endpoint(ep).start(ep)
            except OSError as exc:
                err, sock = exc.errno or errno.EIO, None
            if err == errno.EINPROGRESS and sock is not None:
                _Handshake(self, relay, sock, attempts, i, stats, balancer, outlier, token,
                           started, timeout or self.timeout)
                return
            if not err and sock is not None:
                self.succeeded(relay, sock, ep, stats, balancer, outlier, token, started)
                return
            if sock is not None:
                sock.close()
            reason = self.failed(OSError(err, os.strerror(err)), ep, stats, balancer,
                                 outlier, token, started)
        if balancer is not None:
            stats.fail(reason)
        relay.outcome = reason
        relay.reset()  # every endpoint failed: refuse the client

    def succeeded(self, relay: Relay, sock: _socket.socket, ep: Endpoint, stats: PairStats,
                  balancer: Balancer | None, outlier: OutlierDetector | None,
                  token: EndpointLoad | None, started: float,
                  pipes: tuple[type[Pipe], type[Pipe]] | None = None) -> None:
        elapsed = self.clock() - started
        info = relay.info
        assert info is not None
        info.endpoint, info.connect_s = ep.addr, elapsed
        stats.connect.observe(elapsed)
        if balancer is not None and token is not None:
            balancer.on_connected(token, elapsed)
            # From here the relay owns the in-flight count: on_done when it finishes.
            relay.hold(balancer, token)
        if outlier is not None:
            outlier.success(ep.addr)
        relay.start(sock, pipes)
        self.on_started(relay)

    def failed(self, exc: OSError | TimeoutError, ep: Endpoint, stats: PairStats,
               balancer: Balancer | None, outlier: OutlierDetector | None,
               token: EndpointLoad | None, started: float, reason: str | None = None) -> str:
        """Count a failed attempt; returns its reason (`reason`, else the error's)."""
        stats.connect_errors += 1
        if balancer is not None and token is not None:
            balancer.on_failed(token, self.clock() - started)
            balancer.on_done(token)
        if outlier is not None and outlier.failure(ep.addr):
            log.warning("%s ejected after %d consecutive connect failures",
                        ep.addr, outlier.config.consecutive_failures)
        return reason or failure_reason(exc)


class _Handshake:
    """A connect still under way: wait until the socket turns writable (then SO_ERROR says how
    it went) or the timeout passes, then carry on with the connector's attempt loop."""

    __slots__ = ("attempts", "balancer", "connector", "fd", "index", "outlier", "relay",
                 "sock", "started", "stats", "timeout", "timer", "token")

    def __init__(self, connector: Connector, relay: Relay, sock: _socket.socket,
                 attempts: Sequence[Endpoint], index: int, stats: PairStats,
                 balancer: Balancer | None, outlier: OutlierDetector | None,
                 token: EndpointLoad | None, started: float, timeout: float) -> None:
        self.connector = connector
        self.relay = relay
        self.sock = sock
        self.fd = sock.fileno()
        self.attempts = attempts
        self.index = index
        self.stats = stats
        self.balancer = balancer
        self.outlier = outlier
        self.token = token
        self.started = started
        self.timeout = timeout
        connector.poller.register(self.fd, WRITE, self._ready)
        self.timer = connector.loop.call_later(timeout, self._expired)
        relay.connecting = self.cancel

    def _stop(self) -> None:
        self.relay.connecting = None
        self.timer.cancel()
        self.connector.poller.unregister(self.fd)

    def cancel(self) -> None:
        """The relay ended while we connected (client gone, drain): abandon the attempt."""
        self._stop()
        self.sock.close()
        if self.balancer is not None and self.token is not None:
            self.balancer.on_done(self.token)

    def _ready(self, events: int) -> None:
        self._stop()
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not err:
            self.connector.succeeded(self.relay, self.sock, self.attempts[self.index],
                                      self.stats, self.balancer, self.outlier, self.token,
                                      self.started)
            return
        self._next(OSError(err, os.strerror(err)))

    def _expired(self) -> None:
        self._stop()
        self._next(TimeoutError(f"connect timed out after {self.timeout}s"))

    def _next(self, exc: OSError | TimeoutError) -> None:
        self.sock.close()
        c = self.connector
        reason = c.failed(exc, self.attempts[self.index], self.stats, self.balancer,
                           self.outlier, self.token, self.started)
        c.connect(self.relay, self.attempts, self.stats, self.balancer, self.outlier,
                  self.index + 1, reason, self.timeout)
