"""Per-connection telemetry of a worker: who dialed (source service), the connection's record
for the access log and the tap stream, and the failure reasons the metrics count.

A connection's record (one access log line; the tap stream adds "t":"event" and "event"):
  start, end      ISO 8601 UTC times (end only once closed)
  duration_ms     accept → close
  worker          the worker's id
  src, pid        source service ("unknown" when the capture cannot tell) and process id (eBPF
                  capture only; null otherwise)
  client          the client's address as the proxy saw it
  orig_dst        where the client meant to connect
  dst, endpoint   the destination service and the endpoint that served it (null: passthrough
                  connections have no service; refused ones no endpoint)
  connect_ms      the successful upstream connect's latency; attempts: connects tried
  bytes_up/down   client → upstream and back
  src_identity,   the SPIFFE IDs the connection was authorized with (mTLS between hosts: the
  dst_identity    peer's certificate and the destination service's; local: the attested source
                  service's), null when no authorization was made
  outcome         ok, reset, idle_timeout, drain, no_endpoint, refused, timeout, unreachable,
                  error, origdst_error, denied, or a tunnel refusal (tls_*, tunnel_*)

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import errno
import json
import time
from datetime import UTC, datetime
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Any

from meshnode.model import HostPort, OrigDstAddr
from meshnode.proxy.origdst import Origin
from meshnode.proxy.stats import UNKNOWN_SOURCE
from meshnode.sockdiag import SockDiag
from meshnode.wire import ConnEvent

if TYPE_CHECKING:
    from meshnode.proxy.relay import Relay

__all__ = ["ConnInfo", "Sources", "failure_reason", "iso_ms", "json_str"]

_CGROUP_MASK = 0xFFFFFFFF  # the eBPF capture hands over the low 32 bits of the cgroup id
_UNREACHABLE = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL})


def failure_reason(exc: BaseException) -> str:
    """A connect failure as a bounded label value."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError):
        if exc.errno == errno.ECONNREFUSED:
            return "refused"
        if exc.errno in _UNREACHABLE:
            return "unreachable"
        if exc.errno == errno.ETIMEDOUT:
            return "timeout"
    return "error"


class Sources:
    """Cgroup id → source service, as the agent last sent it (every enrolled service's
    cgroup). `lookup_missing`: when the capture did not name the client's cgroup (iptables),
    ask sock_diag for it."""

    __slots__ = ("_by_cgroup", "_diag")

    def __init__(self, lookup_missing: bool) -> None:
        self._by_cgroup: dict[int, str] = {}
        self._diag = SockDiag() if lookup_missing else None

    def replace(self, cgroups: dict[str, str]) -> None:
        self._by_cgroup = {int(k) & _CGROUP_MASK: str(v) for k, v in cgroups.items()}

    def source(self, origin: Origin, peer: Any) -> str:
        cgroup = origin.cgroup
        if not cgroup and self._diag is not None and self._by_cgroup:
            try:
                client = (IPv4Address(peer[0]), int(peer[1]))
            except (TypeError, ValueError, IndexError):
                return UNKNOWN_SOURCE
            cgroup = self._diag.cgroup_of(client, (origin.dst.ip, origin.dst.port))
        return self._by_cgroup.get(cgroup & _CGROUP_MASK, UNKNOWN_SOURCE)

    def close(self) -> None:
        if self._diag is not None:
            self._diag.close()


_second: tuple[int, str] = (-1, "")


def _iso(epoch: float) -> str:
    """ISO 8601 UTC with milliseconds; the part up to the second is formatted once a second
    (the access log writes two per connection)."""
    global _second
    sec = int(epoch)
    if sec != _second[0]:
        _second = (sec, datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_second[1]}.{int((epoch - sec) * 1000):03d}Z"


def _str(value: str | None) -> str:
    return "null" if value is None else json.dumps(value)


iso_ms = _iso  # for the other records of the access log (proxy/http/exchange.py)
json_str = _str


def _num(value: float | None) -> str:
    return "null" if value is None else f"{value * 1000:.3f}"


class ConnInfo:
    """What the worker knows of one connection; `t0` is the worker clock at accept."""

    __slots__ = ("attempts", "connect_s", "dst_identity", "endpoint", "orig_dst", "peer", "pid",
                 "service", "src", "src_identity", "t0", "wall0")

    def __init__(self, t0: float, peer: Any) -> None:
        self.t0 = t0
        self.wall0 = time.time()
        self.peer = peer
        self.src = UNKNOWN_SOURCE
        self.pid = 0
        self.orig_dst: OrigDstAddr | None = None
        self.service: str | None = None
        self.endpoint: HostPort | None = None
        self.connect_s: float | None = None
        self.attempts = 0
        # Set once authorized (the inbound side: after the peer's certificate was checked).
        self.src_identity: str | None = None
        self.dst_identity: str | None = None

    def tapped(self, services: frozenset[str]) -> bool:
        return "*" in services or self.src in services or self.service in services

    def log_line(self, relay: Relay, worker: int, now: float) -> str:
        """The access log line: the close event's fields, in the same order, as JSON. Written
        out directly: this runs for every connection, and json.dumps of a dict costs several
        times more. Strings that are not addresses or fixed words go through json.dumps."""
        elapsed = now - self.t0
        peer = self.peer
        return (f'{{"start":"{_iso(self.wall0)}","end":"{_iso(self.wall0 + elapsed)}",'
                f'"duration_ms":{elapsed * 1000:.3f},"worker":{worker},'
                f'"src":{_str(self.src)},"pid":{self.pid or "null"},'
                f'"client":{_str(f"{peer[0]}:{peer[1]}" if peer else None)},'
                f'"orig_dst":{_str(str(self.orig_dst) if self.orig_dst else None)},'
                f'"dst":{_str(self.service)},'
                f'"src_identity":{_str(self.src_identity)},'
                f'"dst_identity":{_str(self.dst_identity)},'
                f'"endpoint":{_str(str(self.endpoint) if self.endpoint else None)},'
                f'"connect_ms":{_num(self.connect_s)},"attempts":{self.attempts},'
                f'"bytes_up":{relay.bytes_up},"bytes_down":{relay.bytes_down},'
                f'"outcome":"{relay.outcome}"}}')

    def tap_event(self, kind: str, relay: Relay, worker: int, now: float) -> ConnEvent:
        """The tap stream's message: the record without the inline tag (ConnEvent has its
        own)."""
        record = self.event(kind, relay, worker, now)
        record.pop("t", None)
        return ConnEvent(record)

    def event(self, kind: str, relay: Relay, worker: int, now: float) -> dict[str, Any]:
        """The tap event (and, without "t" and "event", the access log record)."""
        elapsed = now - self.t0
        peer = self.peer
        rec: dict[str, Any] = {
            "t": "event", "event": kind, "start": _iso(self.wall0),
        }
        if kind == "close":
            rec["end"] = _iso(self.wall0 + elapsed)
        rec.update({
            "duration_ms": round(elapsed * 1000, 3),
            "worker": worker,
            "src": self.src,
            "pid": self.pid or None,
            "client": f"{peer[0]}:{peer[1]}" if peer else None,
            "orig_dst": str(self.orig_dst) if self.orig_dst else None,
            "dst": self.service,
            "src_identity": self.src_identity,
            "dst_identity": self.dst_identity,
            "endpoint": str(self.endpoint) if self.endpoint else None,
            "connect_ms": None if self.connect_s is None else round(self.connect_s * 1000, 3),
            "attempts": self.attempts,
            "bytes_up": relay.bytes_up,
            "bytes_down": relay.bytes_down,
            "outcome": relay.outcome,
        })
        return rec
