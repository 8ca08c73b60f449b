"""TLS material and peer checks for the mTLS tunnel between hosts.

Owns: the SSLContexts built from a wire.Identities (the server context presenting this host's
node certificate, a client context per source service's certificate, the node's when a
service has none), the checks every peer certificate must pass after every handshake, full
or resumed (`Trust.check`), and naming why a handshake failed (`handshake_cause`, a bounded
label value).

Contexts and resumption. Session tickets are encrypted with keys that live in the server
SSLContext: every worker installs the same keys, derived from the node key (tickets.py), so a
ticket resumes on any worker of the host (and on the next one after a restart); they are
derived again when the node certificate rotates, so tickets issued before a rotation (every
~12 h) cost one full handshake. The server context itself is built once and kept across
identity refreshes (a rotated certificate is loaded into it; a changed bundle builds anew). A
client context belongs to one certificate file; its sessions (per peer node) go with it, so a
rotated workload certificate starts with full handshakes and a resumed session never carries
an old certificate past the rotation. A client keeps the ticket it resumed with, so a resumed
handshake gets no new one (`skip_ticket`: ~300 µs of server CPU each); a ticket past a quarter
of its lifetime is not offered, and that full handshake brings the next.

Checks OpenSSL cannot make: OpenSSL verifies the chain to the bundle (and validity at the
real time) on a full handshake only; a resumed session carries the peer certificate of its
first handshake. So after every handshake `Trust.check` reads the peer's leaf: exactly one
SPIFFE URI in this trust domain, its host (subject OU) not revoked, valid at
meshnode.security.clock.now() (the clock tests push forward).

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any

from meshnode.policy.identity import node_id, parse_id, service_id
from meshnode.proxy.tickets import share_ticket_keys
from meshnode.security import clock
from meshnode.wire import Identities

__all__ = ["ClientIdentity", "Peer", "PeerError", "TlsMaterial", "Trust", "handshake_cause",
           "skip_ticket"]

log = logging.getLogger("meshnode.proxy")

# X509_V_ERR_* codes OpenSSL's verification reports (SSLCertVerificationError.verify_code)
_NOT_YET_VALID, _EXPIRED = 9, 10
_CACHE_MAX = 4096  # parsed peer certificates kept by serial number


class PeerError(Exception):
    """A peer that completed a handshake but may not be talked to: `cause` says why."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause


@dataclass(frozen=True, slots=True)
class Peer:
    """What a verified peer certificate says: its SPIFFE ID, kind ("svc" or "node"), name and
    host (subject OU), and its validity (epoch seconds)."""

    identity: str
    kind: str
    name: str
    node: str
    not_before: float
    not_after: float


class Trust:
    """The checks beyond the chain, with what the last Identities said."""

    def __init__(self, trust_domain: str = "", revoked: frozenset[str] = frozenset()) -> None:
        self.trust_domain = trust_domain
        self.revoked = revoked
        self._parsed: dict[str, Peer] = {}

    def check(self, cert: dict[str, Any] | None, expect: str = "") -> Peer:
        """The peer of `cert` (SSLSocket.getpeercert()), or PeerError. `expect`: the SPIFFE ID
        it must have (a client checking that the server is the host it dialed)."""
        if not cert:
            raise PeerError("no_client_cert", "the peer presented no certificate")
        serial = str(cert.get("serialNumber", ""))
        peer = self._parsed.get(serial) if serial else None
        if peer is None:
            peer = _parse(cert)
            if serial:
                if len(self._parsed) >= _CACHE_MAX:
                    self._parsed.clear()
                self._parsed[serial] = peer
        td = peer.identity.split("/", 3)[2]
        if td != self.trust_domain:
            raise PeerError("trust_domain", f"{peer.identity} is not in {self.trust_domain}")
        if peer.node in self.revoked:
            raise PeerError("revoked", f"{peer.identity}: host {peer.node} is revoked")
        now = clock.now()
        if now >= peer.not_after:
            raise PeerError("expired", f"{peer.identity}: certificate expired")
        if now < peer.not_before:
            raise PeerError("not_yet_valid", f"{peer.identity}: certificate not yet valid")
        if expect and peer.identity != expect:
            raise PeerError("wrong_peer", f"expected {expect}, the peer is {peer.identity}")
        return peer


def _parse(cert: dict[str, Any]) -> Peer:
    uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
    if len(uris) != 1:
        raise PeerError("bad_identity", f"{len(uris)} URI SANs (a mesh identity has one)")
    try:
        _, kind, name = parse_id(uris[0])
    except ValueError as exc:
        raise PeerError("bad_identity", str(exc)) from None
    ou = ""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "organizationalUnitName":
                ou = value
    if not ou:
        raise PeerError("bad_identity", f"{uris[0]}: no host (subject OU)")
    try:
        nb = ssl.cert_time_to_seconds(cert["notBefore"])
        na = ssl.cert_time_to_seconds(cert["notAfter"])
    except (KeyError, ValueError) as exc:
        raise PeerError("bad_identity", f"unreadable validity: {exc}") from None
    return Peer(uris[0], kind, name, ou, float(nb), float(na))


def handshake_cause(exc: BaseException) -> str:
    """Why a handshake failed, as a bounded label value."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = getattr(exc, "verify_code", 0)
        return {_EXPIRED: "expired", _NOT_YET_VALID: "not_yet_valid"}.get(code, "untrusted")
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "eof"
    if isinstance(exc, ssl.SSLError):
        reason = str(getattr(exc, "reason", "") or "")
        if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
            return "no_client_cert"
        if "EOF" in reason:
            return "eof"
        if reason.endswith("CERTIFICATE_EXPIRED"):
            return "expired"  # the other side refused ours
        if reason.endswith(("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN")):
            return "untrusted"
        return "protocol"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionError):
        return "eof"
    return "error"


@dataclass(slots=True)
class ClientIdentity:
    """A client context (one certificate file), the SPIFFE ID it presents, and its sessions
    by peer node: one ticket each, with the (monotonic) time it was taken."""

    context: ssl.SSLContext
    identity: str
    sessions: dict[str, tuple[ssl.SSLSession, float]]

    def session(self, node: str) -> ssl.SSLSession | None:
        """The session to resume with `node`: None when none is held or it is stale (a full
        handshake then brings a fresh ticket: a resumed one brings none, see skip_ticket)."""
        held = self.sessions.get(node)
        return held[0] if held is not None and not self.stale(node) else None

    def save(self, node: str, session: ssl.SSLSession) -> None:
        self.sessions[node] = (session, time.monotonic())

    def stale(self, node: str) -> bool:
        """Whether the ticket held for `node` is past a quarter of its lifetime (then the
        next connection makes a full handshake, and takes the ticket it brings)."""
        held = self.sessions.get(node)
        return held is None or time.monotonic() - held[1] > held[0].timeout / 4


@functools.cache
def _libssl() -> ctypes.CDLL:
    lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]  # resolves libssl's symbols
    lib.SSL_get_SSL_CTX.restype = ctypes.c_void_p
    lib.SSL_get_SSL_CTX.argtypes = [ctypes.c_void_p]
    lib.SSL_get_num_tickets.restype = ctypes.c_size_t
    lib.SSL_get_num_tickets.argtypes = [ctypes.c_void_p]
    lib.SSL_set_num_tickets.restype = ctypes.c_int
    lib.SSL_set_num_tickets.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return lib


def skip_ticket(ssock: ssl.SSLSocket | ssl.SSLObject) -> bool:
    """No NewSessionTicket on this server-side connection (SSL_set_num_tickets(ssl, 0)).

    For a resumed handshake: its client keeps the ticket it resumed with (ClientIdentity), and
    a new one costs the server ~300 µs of the ~800 µs of a resumed handshake (OpenSSL 3.0
    encodes and encrypts the session again, the client's certificate with it). Call it once the
    handshake knows it resumed and before it reads the client's Finished (OpenSSL decides then
    whether to send tickets). The ssl module has no API for it: the SSL pointer is the second
    field after the object header of its _SSLSocket, the third its context (as tickets.py reads
    an SSL_CTX); checked (that context must be ours, its SSL_CTX the SSL's, its ticket count
    the SSL's) before anything is written. False, nothing written, when this Python/OpenSSL
    does not let us: the ticket is then sent, as before."""
    try:
        lib = _libssl()
        obj = ssock._sslobj  # type: ignore[union-attr]
        ctx = ssock.context
        word = ctypes.sizeof(ctypes.c_void_p)
        base = id(obj) + object.__basicsize__
        ssl_ptr = ctypes.c_void_p.from_address(base + word).value
        ctx_obj = ctypes.c_void_p.from_address(base + 2 * word).value
        ctx_ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not ssl_ptr or ctx_obj != id(ctx) or not ctx_ptr \
                or lib.SSL_get_SSL_CTX(ssl_ptr) != ctx_ptr \
                or lib.SSL_get_num_tickets(ssl_ptr) != ctx.num_tickets:
            return False
        return bool(lib.SSL_set_num_tickets(ssl_ptr, 0) == 1)
    except (OSError, AttributeError, ValueError, TypeError):
        return False


def _context(server: bool, bundle: str, chain: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SPIFFE: the identity is the URI SAN, checked by Trust
    ctx.verify_mode = ssl.CERT_REQUIRED  # the server asks for (and needs) a client cert
    # A FIN without close_notify is the end of one direction (our half-close), not an error
    # that would poison the connection for the other direction.
    ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    if server:
        ctx.num_tickets = 1  # the client keeps only the newest ticket per peer
    ctx.load_verify_locations(bundle)
    ctx.load_cert_chain(chain)
    return ctx


class TlsMaterial:
    """The worker's current TLS material (from wire.Identities)."""

    def __init__(self, node_name: str) -> None:
        self.node_name = node_name  # this host's name in the mesh (its node identity's)
        self.trust = Trust()
        self.server: ssl.SSLContext | None = None
        self.node = ""  # this host's node certificate file ("": no identity)
        self.node_identity = ""
        self.generation = -1
        self._services: dict[str, str] = {}  # source service -> certificate file
        self._bundle = b""
        self._bundle_path = ""
        self._clients: dict[str, ClientIdentity] = {}  # certificate file -> context

    @property
    def ready(self) -> bool:
        return self.server is not None

    def apply(self, ids: Identities) -> None:
        """Take a new Identities message; keep what it does not change. A file that cannot be
        loaded leaves this host without mTLS (said in the log) rather than half-configured."""
        self.trust.trust_domain = ids.trust_domain
        self.trust.revoked = frozenset(ids.revoked_nodes)
        self.generation = ids.generation
        if not ids.node or not ids.bundle or not ids.trust_domain:
            self._clear()
            return
        try:
            with open(ids.bundle, "rb") as f:
                bundle = f.read()
            # the same anchors may come under a new file name (a new serial: a revocation);
            # the old file is removed soon after, so new client contexts load this one
            self._bundle_path = ids.bundle
            if bundle != self._bundle or self.server is None:
                server = _context(True, ids.bundle, ids.node)
                self._clients.clear()  # other anchors: sessions made under the old go too
                self._bundle = bundle
                self.server = server
                self.node = ""
            elif ids.node != self.node:
                self.server.load_cert_chain(ids.node)
            if ids.node != self.node:
                # Ticket keys from the node key and the anchors: every worker of the host,
                # started before or after a rotation, holds the same ones once it has this
                # message; a change of anchors (a root removed) ends the old sessions too.
                with open(ids.node, "rb") as f:
                    if not share_ticket_keys(self.server, f.read() + bundle):
                        log.warning("cannot share TLS ticket keys between workers: each "
                                    "resumes only the sessions it began")
            keep = {ids.node, *ids.services.values()}
            for path in set(self._clients) - keep:
                del self._clients[path]  # a rotated certificate: its sessions go with it
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS material of generation %d unusable, no mTLS until the next: %s",
                      ids.generation, exc)
            self._clear()
            return
        self.node = ids.node
        self.node_identity = node_id(ids.trust_domain, self.node_name)
        self._services = dict(ids.services)

    def _clear(self) -> None:
        self.server = None
        self.node = ""
        self._services = {}
        self._clients.clear()
        self._bundle = b""

    def client(self, src: str) -> ClientIdentity | None:
        """The identity a connection from source service `src` presents: the service's own,
        else the node's; None without TLS material."""
        if self.server is None:
            return None
        path = self._services.get(src) or self.node
        entry = self._clients.get(path)
        if entry is None:
            try:
                ctx = _context(False, self._bundle_path, path)
            except (OSError, ssl.SSLError) as exc:
                log.error("cannot load %s: %s", path, exc)
                return None
            identity = (service_id(self.trust.trust_domain, src) if path != self.node
                        else self.node_identity)
            entry = self._clients[path] = ClientIdentity(ctx, identity, {})
        return entry

