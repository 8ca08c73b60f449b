"""One proxy worker process: `python -m meshnode.proxy.worker <WorkerConfig argv>`.

Owns the worker's life: accept on the listening socket (the first worker binds it; the agent
copies it and hands it to every later worker, so all accept from one queue and a worker's exit
loses nothing queued), talk to the agent over its worker socket, route each accepted
connection by its original destination, connect upstream (SO_MARK before connect, so capture
skips the proxy's own sockets), hand the pair to the relay, sweep idle relays, and drain on
SIGTERM/SIGINT. The worker outlives its agent: when the channel closes it keeps serving with
the routes it has and reconnects until a new agent answers (which adopts it). Without an agent
socket (standalone explicit proxy) a closed channel means drain and exit.

Control channel: the typed messages of meshnode.wire (framing in control.py). The agent opens
with Hello and the worker answers with its own protocol version; then discovery updates, sync
barriers, stats requests, the cgroup -> source service map, the tap filter and the mTLS
state (Identities, Peers, Security: proxy/tunnel.py; inbound_fd: proxy/inbound.py) and the
ingress gateway's listeners (GatewayConfig: proxy/gateway.py) come in, and
listening, start-up errors, synced, stats replies and tap events go out.
Exit codes: 0 after a drain, 69 when the listener cannot be bound, 77 when SO_MARK is refused
(needs CAP_NET_ADMIN; mark 0 skips it), 64 for a bad explicit target.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable

import uvloop

from meshnode import __version__
from meshnode.config import WorkerConfig
from meshnode.errors import MeshnodeError, UsageError
from meshnode.model import DoesNotExist, Endpoint, OrigDstAddr, ServicePolicy
from meshnode.proxy.accesslog import AccessLog
from meshnode.proxy.connect import Connector
from meshnode.proxy.control import ControlChannel, connect_control, open_control
from meshnode.proxy.dial import Dialers
from meshnode.proxy.gateway import GatewayServers
from meshnode.proxy.http.detect import Detector
from meshnode.proxy.http.front import HttpFront
from meshnode.proxy.inbound import Inbound, open_inbound
from meshnode.proxy.listener import (
    BACKLOG,
    bind_listener,
    check_mark,
    inherited_listener,
    own_addresses,
    relay_capacity,
)
from meshnode.proxy.origdst import OrigDstError, OrigDstSource, origdst_source
from meshnode.proxy.poller import READ, Poller
from meshnode.proxy.relay import BufferPool, Relay, RelayRegistry
from meshnode.proxy.stats import PairStats, WorkerStats
from meshnode.proxy.telemetry import ConnInfo, Sources
from meshnode.proxy.tunnel import MeshSecurity
from meshnode.route.table import NoEndpoint, Passthrough, ServiceTable, ToService
from meshnode.route.traffic import TrafficTable
from meshnode.wire import (
    GATEWAY_FDS_SOCKET,
    MIN_PROTOCOL,
    PROTOCOL,
    AgentMessage,
    CgroupSources,
    EndpointsAdded,
    EndpointsRemoved,
    GatewayConfig,
    Hello,
    Listening,
    Retain,
    ServiceGone,
    ServiceReset,
    StartError,
    StatsRequest,
    Sync,
    Synced,
    Tap,
    Tracing,
    Traffic,
    WorkerMessage,
    as_update,
)

__all__ = ["ProxyWorker", "main"]

log = logging.getLogger("meshnode.proxy")


ROUTES_WAIT = 5.0  # seconds a started worker waits for the agent's routes before accepting
RECONNECT_MAX = 0.5  # seconds between tries to reach a new agent, at most
ACCEPT_BATCH = 64  # connections taken per listener wake-up (libuv's accept loop takes all)
ACCEPT_PAUSE = 0.1  # seconds without accepting after accept() failed (out of descriptors)


class ProxyWorker:
    """The worker's state and its asyncio wiring; `run()` is its whole life."""

    def __init__(self, config: WorkerConfig, origdst: OrigDstSource,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.origdst = origdst
        self.clock = clock
        self.dialers = Dialers(config.node, config.mark)
        # Seeded from the OS per process, so workers sharing a port do not draw in lockstep.
        self.table = ServiceTable(config.node, config.zone, clock, random.Random())
        self.stats = WorkerStats()
        self.security = MeshSecurity(config.node, self.stats, self.table.policy,
                                     config.handshake_timeout)
        self._inbound: Inbound | None = None  # mTLS from other hosts (config.inbound_fd)
        self.http: HttpFront | None = None  # HTTP, HTTP/2 and gRPC ports (made in run())
        self._tracing: Tracing | None = None
        self.gateways: GatewayServers | None = None  # ingress listeners (proxy/gateway.py)
        self._gateway_config: GatewayConfig | None = None  # arrived before run() made them
        self.traffic = TrafficTable()  # the Route resources, compiled (route/traffic.py)
        self.pool = BufferPool()
        self.registry = RelayRegistry(clock, self._finished)
        # conntrack (iptables) does not name the client: ask sock_diag for its cgroup
        self.sources = Sources(lookup_missing=config.explicit_target is None)
        self.tap: frozenset[str] = frozenset()
        self.access = (AccessLog(config.access_log, config.access_log_sample)
                       if config.access_log else None)
        self._control: ControlChannel | None = None
        self.agent_protocol = PROTOCOL  # until the agent's Hello says otherwise
        # Kept, not asked for per connection: asyncio.get_running_loop() costs a getpid(2).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lsock: _socket.socket | None = None
        self._connector: Connector | None = None
        self._poller: Poller | None = None
        self._accept_trouble = False  # accept() failing (out of descriptors): said once
        # Relays this worker takes at once: two descriptors each must fit its RLIMIT_NOFILE
        # (set in run()). At the limit the listener leaves the poller and the backlog keeps the
        # rest, instead of accepting a client whose upstream socket could not be made.
        self._capacity = sys.maxsize
        self._full = False
        self._min_idle = float("inf")  # the shortest per-service idle timeout seen
        self._sweep_sooner = asyncio.Event()  # set when that shrinks
        self._limited: dict[str, int] = {}  # active relays of services with maxConnections
        self._counted: dict[int, str] = {}  # id(relay) -> its service, for those relays
        self._stop: asyncio.Event | None = None
        self._force = False
        self._reconnecting: asyncio.Task[None] | None = None
        self._greeted = False  # the agent's Hello arrived on the current channel
        self._early: list[WorkerMessage] = []
        # Set by the agent's first Sync: its routes are in. Accepting waits for it, because
        # the listening socket is shared: what waits in its queue must find its service.
        self._routed = asyncio.Event()
        # name -> descriptor held for the agent: never touched here, only reported back
        self._held = {k: int(v) for k, _, v in (i.partition("=") for i in config.held_fds)}
        # Destinations that are this proxy's own listener (connecting there would loop).
        self._own_port = config.listen_port
        self._own_ips = own_addresses(config.listen_host)

    # -- control channel ---------------------------------------------------------------------

    def on_message(self, msg: AgentMessage) -> None:
        match msg:
            case ServiceReset() | EndpointsAdded() | EndpointsRemoved() | ServiceGone():
                try:
                    self.table.apply(as_update(msg))
                except (MeshnodeError, KeyError, TypeError, ValueError) as exc:
                    log.error("bad %s update ignored: %s", type(msg).__name__, exc)
                idle = msg.service.policy.timeouts.idle if isinstance(msg, ServiceReset) else None
                if idle and idle < self._min_idle:
                    # the idle sweep runs often enough for the shortest idle timeout seen
                    self._min_idle = idle
                    self._sweep_sooner.set()
            case Sync(seq):
                # Every message before this one has been applied: they are handled in order.
                self._routed.set()
                self._send(Synced(seq))
            case StatsRequest(seq):
                control = self._control
                self._send(self.stats.to_wire(seq, self.config.worker_id, os.getpid(),
                                              len(self.registry), self.table.endpoint_report,
                                              control.unknown if control else 0))
            case CgroupSources(cgroups):
                self.sources.replace(cgroups)
            case Tap(services):
                self.tap = frozenset(services)
                if self.http is not None:
                    self.http.set_tap(self.tap, self._send)
            case Tracing():
                self._tracing = msg
                if self.http is not None:
                    self.http.tracer.configure(msg)
            case Traffic(routes, workers):
                self.traffic = TrafficTable(routes, workers, old=self.traffic)
                if self.http is not None:
                    self.http.traffic = self.traffic
            case GatewayConfig():
                if self.gateways is not None:
                    self.gateways.configure(msg)
                else:
                    self._gateway_config = msg
            case Retain(services):
                for name in set(self.table.services()) - set(services):
                    self.table.apply(DoesNotExist(name))
            case Hello(protocol):
                if protocol < MIN_PROTOCOL:
                    log.error("the agent speaks protocol %d, this worker needs %d or later",
                              protocol, MIN_PROTOCOL)
                self.agent_protocol = protocol
                self._greeted = True
                self._send(Hello(PROTOCOL, __version__, self.config.worker_id, os.getpid(),
                                 self.config.build, self._held))
                early, self._early = self._early, []
                for queued in early:  # a start-up error said before the agent asked
                    self._send(queued)
                if self.config.agent_socket:  # a new agent (or the first): say we accept
                    self._announce()
            case _:  # Identities, Peers, Security: mTLS and authorization
                self.security.apply(msg)

    def _announce(self) -> None:
        """Tell the agent this worker accepts (again, to an agent that adopts it)."""
        if self._lsock is not None:
            self._send(Listening(self.config.worker_id, os.getpid(), self._lsock.fileno()))

    def on_control_open(self, channel: ControlChannel) -> None:
        self._control = channel

    def on_control_closed(self) -> None:
        self._control = None
        self._greeted = False
        stopping = self._stop is None or self._stop.is_set()
        if self.config.agent_socket and not stopping:
            # The agent stopped or crashed: serve on with the routes we have, and find the next
            # one (a restart or an upgrade adopts this worker; an uninstall sends SIGTERM).
            log.warning("agent channel closed: serving with the last routes, reconnecting")
            assert self._loop is not None
            self._reconnecting = self._loop.create_task(self._reconnect())
            return
        if not stopping:
            log.info("agent channel closed: draining")
        self.request_stop()

    async def _reconnect(self) -> None:
        delay = 0.05
        while self._stop is not None and not self._stop.is_set():
            try:
                self._control = await connect_control(self.config.agent_socket, self)
                return
            except OSError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)

    def _send(self, msg: WorkerMessage) -> None:
        if self.config.agent_socket and not self._greeted:
            # the agent speaks first (its Hello), and knows us by our answer: hold the rest
            if not isinstance(msg, Listening):  # announced anyway once greeted
                self._early.append(msg)
            return
        if self._control is not None:
            self._control.send(msg)

    # -- accept, route, connect --------------------------------------------------------------

    def _on_accept(self, events: int) -> None:
        """The listener is readable: take what the backlog holds, up to a batch, so one busy
        listener cannot starve the relays sharing the loop."""
        self._accept(ACCEPT_BATCH)

    def _accept(self, most: int) -> None:
        """Accept and relay up to `most` connections, or until the backlog is empty."""
        lsock = self._lsock
        assert lsock is not None  # watched only while listening
        registry, capacity = self.registry, self._capacity
        for _ in range(most):
            if len(registry) + (len(self.http) if self.http is not None else 0) >= capacity:
                self._pause_full()
                return
            try:
                # The raw accept: a descriptor and the peer's address, no socket.socket
                # wrapper built in Python, and no getpeername call.
                fd, peer = lsock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._accept_failed(exc)
                return
            # accept4 leaves it blocking (Python passes no SOCK_NONBLOCK): one FIONBIO. The
            # C-level socket class: socket.socket would add a Python __init__ and close().
            client = _socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
            client.setblocking(False)  # TCP_NODELAY comes from the listener
            if self._accept_trouble:
                self._accept_trouble = False
                log.warning("accepting again")
            self._accepted(client, peer)

    def _pause_full(self) -> None:
        poller, lsock = self._poller, self._lsock
        assert poller is not None and lsock is not None
        if not self._full:
            self._full = True
            log.warning("at %d connections, as many as the descriptor limit allows: "
                        "accepting resumes as connections end (raise LimitNOFILE for more)",
                        self._capacity)
            poller.unregister(lsock.fileno())

    def _accept_failed(self, exc: OSError) -> None:
        """Out of descriptors (EMFILE/ENFILE) or memory: the backlog stays readable, so stop
        watching it for a moment instead of spinning. Said once until accepts work again."""
        if not self._accept_trouble:
            self._accept_trouble = True
            log.warning("accept failed: %s; pausing accepts %.1fs at a time until it works",
                        exc.strerror, ACCEPT_PAUSE)
        loop, poller, lsock = self._loop, self._poller, self._lsock
        assert loop is not None and poller is not None and lsock is not None
        poller.unregister(lsock.fileno())

        def resume() -> None:
            if self._lsock is lsock:  # still listening (not draining)
                poller.register(lsock.fileno(), READ, self._on_accept)

        loop.call_later(ACCEPT_PAUSE, resume)

    def _accepted(self, client: _socket.socket, peer: tuple[str, int]) -> None:
        info = ConnInfo(self.clock(), peer)
        try:
            origin = self.origdst.lookup(client)
        except OrigDstError:
            origin = None
        if origin is None or self._is_own(origin.dst):
            # Unreadable, or the proxy itself (a connection that would loop forever).
            self.stats.origdst_errors += 1
            relay = self._relay(client, info, self.stats.passthrough)
            relay.outcome = "origdst_error"
            relay.reset()
            return
        dst = info.orig_dst = origin.dst
        info.pid = origin.pid
        src = info.src = self.sources.source(origin, peer)
        route = self.table.route(dst, peer)
        connector = self._connector
        assert connector is not None  # connections arrive only while run() runs the loop
        if isinstance(route, Passthrough):
            self.stats.unrouted += 1
            relay = self._relay(client, info, self.stats.passthrough)
            connector.connect(relay, (Endpoint(route.dst),), self.stats.passthrough)
            return
        policy = self.table.policy(route.service)
        protocol = policy.protocol_for(dst.port)
        if protocol == "tcp" and type(route) is ToService and self.traffic:
            # A Route's tcp split: this connection goes to the backend of its turn (a client
            # that dialled an endpoint's own address, ToEndpoint, is never split). Without a
            # Route for the service, one dict lookup.
            pick = self.traffic.tcp(route.service)
            if pick is not None:
                route = self.table.route_backend(pick.service, dst.port, pick.subset, pick.port,
                                                 peer)
        info.service = route.service
        stats = self.stats.pair(src, route.service)
        stats.connections += 1
        if protocol != "tcp" and self.http is not None:
            if protocol == "auto":
                self._detect(client, info, route, stats, policy.http.detect_timeout)
            else:
                self.http.accept(client, info, route.service, dst, protocol)
            return
        self._relay_service(client, info, route, stats)

    def _detect(self, client: _socket.socket, info: ConnInfo, route: ToService | NoEndpoint,
                stats: PairStats, window: float) -> None:
        """An auto port: HTTP/1.1 or HTTP/2 go to the HTTP side, anything else is relayed."""
        assert self._loop is not None and self._poller is not None
        service = route.service

        def detected(verdict: str) -> None:
            self.stats.count("protocol_detections", service, verdict)
            if verdict == "closed":
                client.close()
            elif verdict in ("http1", "h2") and self.http is not None:
                assert info.orig_dst is not None
                self.http.accept(client, info, service, info.orig_dst,
                                 "http" if verdict == "http1" else "h2")
            else:
                self._relay_service(client, info, route, stats)

        Detector(self._loop, self._poller, client, window, detected)

    def _relay_service(self, client: _socket.socket, info: ConnInfo,
                       route: ToService | NoEndpoint, stats: PairStats) -> None:
        """The L4 relay to a service's endpoints (tcp ports, and what auto finds is not HTTP)."""
        connector = self._connector
        assert connector is not None
        relay = self._relay(client, info, stats)
        if isinstance(route, ToService):
            policy = self.table.policy(route.service)
            if policy.max_connections and not self._admit(route.service, relay, policy):
                stats.fail("max_connections")
                relay.outcome = "max_connections"
                relay.reset()
                return
            timeouts = policy.timeouts
            relay.idle_limit = timeouts.idle
            connector.connect(relay, route.attempts, stats, route.balancer, route.outlier,
                              timeout=timeouts.connect)
        else:
            stats.fail("no_endpoint")
            relay.outcome = "no_endpoint"
            relay.reset()

    def _relay(self, client: _socket.socket, info: ConnInfo, stats: PairStats) -> Relay:
        poller = self._poller
        assert poller is not None
        return Relay(poller, self.pool, self.registry, client, stats, info)

    def _is_own(self, dst: OrigDstAddr) -> bool:
        return dst.port == self._own_port and int(dst.ip) in self._own_ips

    def _started(self, relay: Relay) -> None:
        """A relay's upstream answered: its tap event."""
        info = relay.info
        if self.tap and info is not None and info.tapped(self.tap):
            self._send(info.tap_event("open", relay, self.config.worker_id, self.clock()))

    def _admit(self, service: str, relay: Relay, policy: ServicePolicy) -> bool:
        """The service's maxConnections (per worker): count this relay against it, or refuse
        it. Counted relays are remembered, so a limit set or changed while connections run
        never drives the count below what this worker admitted."""
        limit = policy.max_connections
        active = self._limited.get(service, 0)
        if active >= limit:
            return False
        self._limited[service] = active + 1
        self._counted[id(relay)] = service
        return True

    def _finished(self, relay: Relay) -> None:
        """A relay ended: its duration, and its access log line and tap event."""
        if self._counted and (service := self._counted.pop(id(relay), None)) is not None:
            self._limited[service] -= 1
        if self._full and len(self.registry) < self._capacity:
            self._full = False
            if self._lsock is not None and self._poller is not None:  # not draining
                self._poller.register(self._lsock.fileno(), READ, self._on_accept)
        info = relay.info
        if info is None:
            return
        now = self.clock()
        relay.stats.duration.observe(now - info.t0)
        if self.tap and info.tapped(self.tap):
            self._send(info.tap_event("close", relay, self.config.worker_id, now))
        if self.access is not None and self.access.wants():
            self.access.write(info.log_line(relay, self.config.worker_id, now))

    # -- life --------------------------------------------------------------------------------

    def request_stop(self) -> None:
        if self._stop is None:
            return
        if self._stop.is_set():
            self._force = True  # a second signal: skip the grace period
            self.registry.reset_all()
        self._stop.set()

    async def _sweep_idle(self) -> None:
        idle = self.config.idle_timeout
        while True:
            # closes within a relay's idle timeout + an eighth of the shortest one (<= 5 s)
            interval = min(max(min(idle, self._min_idle) / 8, 0.05), 5.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sweep_sooner.wait(), interval)
            self._sweep_sooner.clear()
            self.registry.sweep(idle)

    async def run(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self.config.control_fd >= 0:
            self._control = await open_control(self.config.control_fd, self)
        elif self.config.agent_socket:
            try:
                self._control = await connect_control(self.config.agent_socket, self)
            except OSError:  # the agent that started us is gone already: find the next one
                self._reconnecting = loop.create_task(self._reconnect())
        try:
            check_mark(self.config.mark)
            lsock = (inherited_listener(self.config.listen_fd) if self.config.listen_fd >= 0
                     else bind_listener(self.config.listen_host, self.config.listen_port))
            poller = self._poller = Poller(loop)
            self._connector = Connector(loop, poller, self.dialers, self.stats,
                                        self.config.connect_timeout, self.clock, self._started,
                                        self.security)
            self.http = HttpFront(loop, self.table, self.stats, self.security, self.access,
                                  self.config.worker_id, self.config.node, self.config.mark,
                                  self.config.connect_timeout, self.clock)
            if self._tracing is not None:
                self.http.tracer.configure(self._tracing)
            self.http.traffic = self.traffic
            if self.tap:
                self.http.set_tap(self.tap, self._send)
            if self.config.agent_socket:
                self.gateways = GatewayServers(
                    loop, self.http, self._held,
                    os.path.join(os.path.dirname(self.config.agent_socket), GATEWAY_FDS_SOCKET),
                    self.config.handshake_timeout)
                if self._gateway_config is not None:
                    self.gateways.configure(self._gateway_config)
            if self.config.inbound_fd >= 0:
                self._inbound = open_inbound(self.config.inbound_fd, loop, poller, self.security,
                                             self.table, self._connector, self.pool,
                                             self.registry, self.clock, self.access,
                                             self.config.worker_id)
        except MeshnodeError as err:
            log.error("%s", err)
            self._send(StartError(err.message, err.hint, err.exit_code))
            if self._control is not None:
                await self._control.close(timeout=2.0)
            return err.exit_code
        self._lsock = lsock
        self._capacity = relay_capacity()
        if self.config.agent_socket:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._routed.wait(), ROUTES_WAIT)
        poller.register(lsock.fileno(), READ, self._on_accept)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        self._announce()
        sweeper = loop.create_task(self._sweep_idle())
        await self._stop.wait()
        await self._shutdown(sweeper)
        return 0

    async def _shutdown(self, sweeper: asyncio.Task[None]) -> None:
        # The order follows uvicorn's Server.shutdown.
        # 1. Stop accepting: close the listener. With SO_REUSEPORT the kernel sends new
        #    connections to the workers still listening (or, last one out, refuses them).
        #    Those already in its queue have completed their handshake, and closing would
        #    reset them: they are accepted and relayed first (at most a full queue's worth,
        #    so a flood cannot hold the drain).
        #    With an agent the listening socket is shared: the other workers (and the agent's
        #    copy) keep it open, and what is queued stays for them.
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self._inbound is not None:
            self._inbound.close()
        if self.gateways is not None:
            self.gateways.close()
        if self._lsock is not None and self._poller is not None:
            if not self.config.agent_socket:
                self._accept(BACKLOG)
            lsock, self._lsock = self._lsock, None
            self._poller.unregister(lsock.fileno())
            lsock.close()
        # 2. Ask connections to close: a byte relay has no way to ask politely (no GOAWAY at
        #    L4), so connections simply get the grace period to finish on their own. HTTP
        #    connections can be asked: idle ones close now, busy ones after their response.
        http = self.http
        if http is not None:
            http.drain()
        # 3. Wait for active connections to finish, up to drain_grace. The control channel and
        #    the idle sweep keep working meanwhile (stats requests are answered).
        if (len(self.registry) or (http is not None and len(http))) and not self._force:
            try:
                async with asyncio.timeout(self.config.drain_grace):
                    await self.registry.wait_empty()
                    if http is not None:
                        await http.wait_empty()
            except TimeoutError:
                open_ = len(self.registry)
                clean = self.registry.close_all()
                log.warning("drain: %d connections still open after %.1fs: %d closed cleanly "
                            "(nothing in flight), %d reset", open_, self.config.drain_grace,
                            clean, open_ - clean)
        # 4. Reset whatever is left (a second signal skips the grace), so no client mistakes
        #    a cut-off stream for a clean end.
        self.registry.reset_all()
        if http is not None:
            http.close()
        if self._poller is not None:
            self._poller.close()
        sweeper.cancel()
        if self.access is not None:
            self.access.close()
        self.sources.close()
        # 5. Flush the control channel: replies already written (a last stats answer) go out
        #    before the socket closes.
        if self._control is not None:
            await self._control.close(timeout=2.0)


def main(argv: list[str] | None = None) -> int:
    config = WorkerConfig.from_argv(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=os.environ.get("MESHNODE_PROXY_LOG", "WARNING").upper(),
        format=f"meshnode-proxy[{config.worker_id}] %(levelname)s %(name)s: %(message)s")
    try:
        source = origdst_source(config.explicit_target)
    except UsageError as err:
        log.error("%s", err)
        return err.exit_code
    profile = os.environ.get("MESHNODE_PROXY_PROFILE")  # a developer's cProfile of a worker
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(ProxyWorker(config, source).run())
    finally:
        if profile:
            prof.disable()
            prof.dump_stats(f"{profile}.{os.getpid()}")


if __name__ == "__main__":
    sys.exit(main())
