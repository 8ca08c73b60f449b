"""The outbound side of mTLS between hosts, and the worker's security state.

`MeshSecurity` holds what the agent said (wire.Identities → TLS material, wire.Peers, wire.Security:
the default mTLS mode and the compiled authorization) and decides, per connect attempt, how an
endpoint is reached (`plan`, DESIGN "Data path"):
- an endpoint of this host: directly, once the attested source service is authorized
  (Security.authz.decide; a denial resets the client);
- an endpoint of another host, its service's mode (its own, else the mesh default):
  DISABLE directly; otherwise through a tunnel when the host is in Peers and this host has an
  identity; else STRICT refuses the attempt (counted) and PERMISSIVE goes directly (plaintext).

`TunnelAttempt` is one tunnel connect, driven by the worker's poller with no Task: TCP to the
peer's inbound listener (SO_MARK), the TLS 1.3 handshake presenting the source service's
certificate (the node's if it has none) and resuming the session kept for (that identity, that
host), the server checked to be spiffe://<td>/node/<host>, the preamble (tunnel_wire), and the
one answer. Only then does the relay start: the client's bytes wait in the kernel meanwhile.
The session is saved after the answer is read, which is after the server's NewSessionTicket
(the ticket arrives right after the handshake; saving earlier saves a session that cannot
resume). A failed attempt is the connector's like a failed connect (next endpoint); a peer's
`denied` ends the connection (another endpoint of the service would decide the same).

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import _socket
import errno
import logging
import os
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshnode import __version__
from meshnode.balance import Balancer
from meshnode.balance.outlier import OutlierDetector
from meshnode.model import Endpoint, HostPort, ServicePolicy
from meshnode.policy.authz import AuthzTable, Decision
from meshnode.policy.identity import node_id, service_id
from meshnode.proxy.poller import READ, WRITE
from meshnode.proxy.stats import UNKNOWN_SOURCE, PairStats, WorkerStats
from meshnode.proxy.tls import ClientIdentity, PeerError, TlsMaterial, handshake_cause
from meshnode.proxy.tlspipe import OUTBOUND
from meshnode.tunnel_wire import (
    HEADER,
    FrameError,
    Preamble,
    decode_answer,
    encode_frame,
    frame_length,
)
from meshnode.wire import Identities, Peers, Security

if TYPE_CHECKING:
    from meshnode.balance import EndpointLoad
    from meshnode.proxy.connect import Connector
    from meshnode.proxy.relay import Relay
    from meshnode.proxy.telemetry import ConnInfo

__all__ = ["DENIED", "MeshSecurity", "TunnelAttempt", "TunnelPlan"]

log = logging.getLogger("meshnode.proxy")

DENIED = "denied"  # plan(): the local endpoint's authorization refused the source
_DECISIONS_MAX = 65536


@dataclass(frozen=True, slots=True)
class TunnelPlan:
    """How to reach one remote endpoint through its host's inbound listener."""

    peer: Endpoint  # the host's inbound listener, as an endpoint to dial
    node: str  # the host
    expect: str  # the SPIFFE ID its certificate must carry
    client: ClientIdentity  # what we present, and its sessions
    target: HostPort
    service: str
    # the connection carries HTTP requests this proxy authorizes one by one (else it is
    # relayed as bytes, and the peer decides it as opaque: policy/authz.py)
    requests: bool = False


class MeshSecurity:
    """The worker's mTLS and authorization state (agent messages) and its decisions."""

    def __init__(self, node: str, stats: WorkerStats,
                 policy_of: Callable[[str], ServicePolicy], handshake_timeout: float) -> None:
        self.node = node
        self.stats = stats
        self.policy_of = policy_of
        self.handshake_timeout = handshake_timeout
        self.tls = TlsMaterial(node)
        self.peers: dict[str, Endpoint] = {}
        self.mtls_default = "PERMISSIVE"
        self.authz = AuthzTable()
        # Whether any of it was said: until then every connection takes today's path.
        self.active = False
        self.enforcing = False  # a Security message arrived: local connections are authorized
        self._decisions: dict[tuple[str, str, int, bool], Decision] = {}
        self._said: set[str] = set()

    # -- agent messages ----------------------------------------------------------------------

    def apply(self, msg: object) -> None:
        """Take one of Identities, Peers, Security (any other message is not ours)."""
        match msg:
            case Identities():
                self.tls.apply(msg)
                if not self.tls.ready:
                    self.once("no_identity", "this host has no usable identity: no mTLS "
                              "(inbound refuses, outbound to STRICT services fails)")
            case Peers(nodes):
                peers = {}
                for name, addr in nodes.items():
                    try:
                        peers[name] = Endpoint(HostPort.parse(addr), name)
                    except (ValueError, TypeError) as exc:
                        log.error("peer %s: bad inbound address %r: %s", name, addr, exc)
                self.peers = peers
            case Security(default, authz):
                self.mtls_default = default
                self.authz = authz
                self.enforcing = True
                self._decisions.clear()
            case _:
                return
        self.active = True

    def once(self, cause: str, message: str, *args: object) -> None:
        """Log a cause the first time it happens in this worker; counters count the rest."""
        if cause not in self._said:
            self._said.add(cause)
            log.warning(message + " (said once; counted in meshnode_tunnel_* and "
                        "meshnode_tls_handshakes)", *args)

    # -- decisions ---------------------------------------------------------------------------

    def identity_of(self, src: str) -> str:
        """The SPIFFE ID of a source service the capture attested ("" when unknown)."""
        td = self.tls.trust.trust_domain
        return service_id(td, src) if td and src and src != UNKNOWN_SOURCE else ""

    def dst_identity(self, service: str) -> str:
        td = self.tls.trust.trust_domain
        return service_id(td, service) if td else ""

    def authorize(self, src_identity: str, service: str, port: int,
                  opaque: bool = False) -> Decision:
        """Security.authz.decide, remembered per (source, service, port, opaque) until the
        next Security message; denials and dry-run denials counted per connection.
        `opaque`: the connection is relayed as bytes, its requests never decided one by one
        (so a rule that allows only some paths cannot allow it)."""
        key = (src_identity, service, port, opaque)
        d = self._decisions.get(key)
        if d is None:
            if len(self._decisions) >= _DECISIONS_MAX:
                self._decisions.clear()
            d = self._decisions[key] = self.authz.decide(src_identity, service, port,
                                                         opaque=opaque)
        if not d.allowed:
            self.stats.count("authz_denied", src_identity or "unknown", service, d.policy)
            self.once(f"denied:{service}", "authorization denied %s -> %s: %s",
                      src_identity or "an unknown source", service, d.reason)
        elif d.would_deny:
            self.stats.count("authz_would_deny", src_identity or "unknown", service, d.policy)
        return d

    def authorize_request(self, src_identity: str, service: str, port: int, method: str,
                          path: str) -> Decision:
        """Security.authz.decide for one request (`port`: the endpoint's), counted like
        `authorize`, per request. Not remembered here: the table already answers a service
        without HTTP conditions from its connection memory, and keeps per (source, service,
        port) what is left to check of the others (policy/authz.py)."""
        d = self.authz.decide(src_identity, service, port, method, path)
        if not d.allowed:
            self.stats.count("authz_denied", src_identity or "unknown", service, d.policy)
            self.once(f"denied:{service}", "authorization denied %s -> %s: %s",
                      src_identity or "an unknown source", service, d.reason)
        elif d.would_deny:
            self.stats.count("authz_would_deny", src_identity or "unknown", service, d.policy)
        return d

    def mode(self, service: str) -> str:
        return self.policy_of(service).mtls or self.mtls_default

    def plan(self, ep: Endpoint, info: ConnInfo,
             requests: bool = False) -> TunnelPlan | str | None:
        """How to reach `ep` for this connection: None directly, a TunnelPlan, DENIED (refuse
        the client), or another refusal reason (this attempt fails). `requests`: the
        connection carries HTTP requests authorized one by one (proxy/http/); else it is an
        L4 relay, authorized as opaque."""
        service = info.service
        if service is None:
            return None  # passthrough: not a mesh destination
        node = ep.node
        if not node or node == self.node:
            if not self.enforcing or info.src_identity is not None:
                return None  # nothing to enforce, or authorized already (inbound tunnel)
            src = self.identity_of(info.src)
            if not self.authorize(src, service, ep.addr.port, opaque=not requests).allowed:
                return DENIED
            if src:  # authorized as this identity (for the access log, and no re-check)
                info.src_identity, info.dst_identity = src, self.dst_identity(service)
            return None
        mode = self.mode(service)
        if mode == "DISABLE":
            return None
        peer = self.peers.get(node)
        client = self.tls.client(info.src) if peer is not None else None
        if peer is None or client is None:
            if mode != "STRICT":
                return None  # PERMISSIVE: plaintext to a host that does not serve mTLS
            reason = "no_peer" if peer is None else "no_identity"
            self.refused("client", reason, "STRICT %s: %s has no mTLS tunnel (%s)",
                         service, node, reason)
            return reason
        return TunnelPlan(peer, node, node_id(self.tls.trust.trust_domain, node), client,
                          ep.addr, service, requests)

    def refused(self, side: str, reason: str, message: str, *args: object) -> None:
        self.stats.count("tunnel_refusals", side, reason)
        self.once(f"{side}:{reason}", message, *args)

    def handshake_failed(self, side: str, cause: str, detail: object) -> None:
        self.stats.count("tls_handshakes", side, cause)
        self.once(f"tls:{side}:{cause}", "TLS handshake (%s side) failed: %s (%s)",
                  side, cause, detail)


class TunnelAttempt:
    """One connect through a tunnel; the connector's attempt loop goes on when it fails."""

    __slots__ = ("answer", "attempts", "balancer", "connector", "fd", "index", "outlier",
                 "plan", "relay", "security", "sock", "ssock", "started", "stats", "step",
                 "timeout", "timer", "token", "wants")

    def __init__(self, connector: Connector, security: MeshSecurity, relay: Relay,
                 plan: TunnelPlan, attempts: Sequence[Endpoint], index: int,
                 stats: PairStats, balancer: Balancer | None,
                 outlier: OutlierDetector | None, token: EndpointLoad | None,
                 started: float, timeout: float) -> None:
        self.connector = connector
        self.security = security
        self.relay = relay
        self.plan = plan
        self.attempts = attempts
        self.index = index
        self.stats = stats
        self.balancer = balancer
        self.outlier = outlier
        self.token = token
        self.started = started
        self.timeout = timeout
        self.ssock: ssl.SSLSocket | None = None
        self.answer = bytearray()
        self.wants = 0  # the events the poller watches for us (0: not registered)
        self.step: Callable[[int], None] = self._connected
        self.sock: _socket.socket | None = None
        self.fd = -1
        relay.connecting = self.cancel
        self.timer = connector.loop.call_later(timeout, self._expired)
        try:
            sock, err = connector.dialers.direct.start(plan.peer)
        except OSError as exc:
            self._fail("connect", exc)
            return
        self.sock = sock
        self.fd = sock.fileno()
        if err == errno.EINPROGRESS:
            self._watch(WRITE, self._connected)
        elif err:
            self._fail("connect", OSError(err, os.strerror(err)))
        else:
            self._handshake_start()

    def _watch(self, events: int, step: Callable[[int], None]) -> None:
        """Call `step` when the socket is ready for `events`."""
        self.step = step
        if events == self.wants:
            return
        poller = self.connector.poller
        if self.wants:
            poller.modify(self.fd, events)
        else:
            poller.register(self.fd, events, self._ready)
        self.wants = events

    def _ready(self, events: int) -> None:
        try:
            self.step(events)
        except Exception as exc:  # a bug must cost this connection, not the worker
            log.exception("tunnel attempt")
            if not self.relay.finished and self.relay.connecting == self.cancel:
                self._fail("tls", exc)

    def _unwatch(self) -> None:
        if self.wants:
            self.connector.poller.unregister(self.fd)
            self.wants = 0

    def _stop(self) -> None:
        self.relay.connecting = None
        self.timer.cancel()
        self._unwatch()

    def _close(self) -> None:
        sock = self.ssock if self.ssock is not None else self.sock
        if sock is not None:
            sock.close()

    def cancel(self) -> None:
        """The relay ended meanwhile (client gone, drain): abandon the attempt."""
        self._stop()
        self._close()
        if self.balancer is not None and self.token is not None:
            self.balancer.on_done(self.token)

    def _connected(self, events: int) -> None:
        assert self.sock is not None
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail("connect", OSError(err, os.strerror(err)))
            return
        self._handshake_start()

    def _handshake_start(self) -> None:
        sock, plan = self.sock, self.plan
        assert sock is not None
        self.timer.cancel()  # from here the handshake timeout bounds the attempt
        self.timer = self.connector.loop.call_later(self.security.handshake_timeout,
                                                    self._expired)
        try:
            raw = socket.socket(fileno=sock.detach())
            # Non-blocking in Python's eyes too (timeout 0), not only O_NONBLOCK: the ssl
            # module busy-waits inside SSL_read/SSL_write on a socket it thinks blocking.
            raw.setblocking(False)
            self.ssock = plan.client.context.wrap_socket(
                raw, do_handshake_on_connect=False,
                suppress_ragged_eofs=False,
                session=plan.client.session(plan.node))
        except (OSError, ValueError) as exc:
            self._fail("tls", exc)
            return
        self._handshake(0)

    def _handshake(self, events: int) -> None:
        ssock = self.ssock
        assert ssock is not None
        try:
            ssock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(READ, self._handshake)
            return
        except ssl.SSLWantWriteError:
            self._watch(WRITE, self._handshake)
            return
        except (OSError, ValueError) as exc:
            self._fail("tls", exc)
            return
        sec = self.security
        try:
            sec.tls.trust.check(ssock.getpeercert(), self.plan.expect)
        except PeerError as exc:
            sec.handshake_failed("client", exc.cause, exc)
            self._fail("peer", exc, counted=True)
            return
        plan = self.plan
        frame = encode_frame(Preamble(str(plan.target), plan.service, software=__version__,
                                      requests=plan.requests))
        try:
            ssock.send(frame)  # ~100 bytes into an empty socket buffer: taken whole
        except (OSError, ValueError) as exc:
            self._fail("tls", exc)
            return
        self._watch(READ, self._read_answer)

    def _read_answer(self, events: int) -> None:
        ssock = self.ssock
        assert ssock is not None
        buf = self.answer
        while True:
            need = HEADER - len(buf) if len(buf) < HEADER else \
                HEADER + frame_length(buf) - len(buf)
            if need <= 0:
                break
            try:
                data = ssock.recv(need)  # exactly the frame: what follows stays unread
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return  # the ticket came first, or the answer is not here yet
            except (OSError, ValueError) as exc:
                self._fail("tls", exc)
                return
            if not data:
                self._fail("answer", ConnectionResetError("the peer closed before answering"))
                return
            buf += data
            try:
                if len(buf) >= HEADER:
                    frame_length(buf)
            except FrameError as exc:
                self._fail("answer", exc)
                return
        try:
            answer = decode_answer(bytes(buf[HEADER:]))
        except FrameError as exc:
            self._fail("answer", exc)
            return
        plan, sec = self.plan, self.security
        if not answer.ok:
            sec.stats.count("tls_handshakes", "client",
                            "resumed" if ssock.session_reused else "full")
            reason = answer.reason if answer.reason.isidentifier() else "unknown"
            sec.refused("client", f"peer_{reason}", "%s refused a tunnel to %s (%s): %s",
                        plan.node, plan.target, plan.service, reason)
            self._fail("refused", None, reason=f"tunnel_{reason}", counted=True)
            return
        # Counted here, not when do_handshake returned: in TLS 1.3 the server checks our
        # certificate after that, and a refusal arrives as an alert instead of the answer.
        sec.stats.count("tls_handshakes", "client", "resumed" if ssock.session_reused else "full")
        if not ssock.session_reused:
            # Reading .session costs ~250 µs (the ssl module copies it through DER), so a
            # resumed connection keeps the session it resumed (and its server sends no new
            # ticket: tls.skip_ticket): tickets are reusable until they expire, and a stale
            # one is not offered (ClientIdentity.session), so a fresh one comes well before.
            session = ssock.session
            if session is not None and session.has_ticket:
                plan.client.save(plan.node, session)
        self._stop()
        sec.stats.count("tunnels", "out", plan.node)
        info = self.relay.info
        if info is not None:
            info.src_identity = plan.client.identity
            info.dst_identity = sec.dst_identity(plan.service)
        c = self.connector
        c.succeeded(self.relay, ssock, self.attempts[self.index], self.stats, self.balancer,
                    self.outlier, self.token, self.started, OUTBOUND)
        down = self.relay.down
        if ssock.pending() and down is not None and not self.relay.finished:
            down.readable()  # bytes already decrypted behind the answer: epoll cannot tell

    def _expired(self) -> None:
        phase = "connect" if self.ssock is None else "tls"
        self._fail(phase, TimeoutError(f"tunnel to {self.plan.node} timed out ({phase})"))

    def _fail(self, phase: str, exc: BaseException | None, reason: str = "",
              counted: bool = False) -> None:
        """The attempt failed: count it once, then the connector tries the next endpoint
        (or, for a peer's denial, refuses the client)."""
        self._stop()
        self._close()
        sec, c = self.security, self.connector
        if phase == "tls" and exc is not None and not counted:
            cause = handshake_cause(exc)
            sec.handshake_failed("client", cause, exc)
            reason = f"tls_{cause}"
        elif phase == "peer" and isinstance(exc, PeerError):
            reason = f"tls_{exc.cause}"
        relay = self.relay
        if reason == "tunnel_denied":
            if self.balancer is not None and self.token is not None:
                self.balancer.on_done(self.token)
            self.stats.fail("denied")
            relay.outcome = "denied"
            relay.reset()
            return
        err = exc if isinstance(exc, OSError | TimeoutError) else OSError(errno.EPROTO, reason)
        why = c.failed(err, self.attempts[self.index], self.stats, self.balancer,
                       self.outlier, self.token, self.started, reason or None)
        c.connect(relay, self.attempts, self.stats, self.balancer, self.outlier,
                  self.index + 1, why, self.timeout)

