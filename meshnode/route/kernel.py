"""What the kernel's connect hooks do with one TCP connect from an enrolled process, as a pure
function of the capture state the agent last handed to the backend.

`classify` is the decision of `bpf/mn_connect.c` (`mn_classify` and `mn_connect4`) followed by
`bpf/mn_dns.c` (`mn_dns_connect4`, attached after it on the same hook):
  1. mesh lookup (mn_dest): the destination's exact ip:port first (an endpoint), then its ip on
     any port (a VIP, stored with port 0). Found: the service id; its flags (mn_svc) decide:
     kernel path (on it always, or falling back while not ready) -> KERNEL: an endpoint of
       the service's table for the dialled port (else the port-0 table) is picked in the
       kernel; with no table the connect goes on to the VIP (refused there, or, on port 53,
       step 2 takes it); a connect to an endpoint's own address goes there;
     ready -> REDIRECT to the proxy on 127.0.0.1:<outbound port>;
     fail-closed and not ready -> REFUSE (connect fails with EPERM, nothing else runs);
     otherwise -> PASS (fail open; counted as passthrough).
  2. a connect that still goes to its own destination (not a mesh destination, or one that
     failed open) on port 53, while the agent's DNS redirect is on -> DNS: to the agent's DNS
     server on 127.0.0.1:<dns port>. A connect redirected to the proxy does not match: its
     port is the proxy's by then. A refused one does: the kernel runs every program attached
     to the hook whatever the one before returned, so mn_dns_connect4 still rewrites (and
     counts) it, but the connect fails with EPERM all the same.
Not modelled, because they are no property of the destination: connects from outside the apps
cgroup and sockets carrying the proxy's SO_MARK (never touched), and an original-destination
entry that cannot be stored (the connect then proceeds untouched, failing open). An AF_INET6
socket dialling a v4-mapped address gets step 1 alike (`mn_connect6`), but no DNS redirect.

The iptables backend installs the same decision as rules (a REDIRECT per ready destination, a
REJECT per refused one, the DNS REDIRECT after them), with one known difference: nat runs
before filter there, so a refused destination on port 53 goes to the DNS server instead. The
integration tier (tests/integration/test_route_kernel.py) checks this function against the
eBPF programs themselves, destination by destination, counters included.

Pure and shared: imports only meshnode.model and meshnode.constants; never a process package.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Literal

from meshnode import constants
from meshnode.model import CaptureState, HostPort, LbTable

__all__ = ["KernelAction", "KernelVerdict", "classify"]

_PROXY_IP = IPv4Address(constants.PROXY_ADDR)


class KernelAction(enum.Enum):
    """The named verdicts of the connect hooks (mn_connect.c's `enum mn_action`, plus DNS)."""

    PASS = "pass"  # untouched: straight to the destination
    REDIRECT = "redirect"  # to the proxy, the original destination saved
    REFUSE = "refuse"  # connect fails with EPERM at once
    DNS = "dns"  # a DNS query, to the agent's DNS server
    KERNEL = "kernel"  # balanced in the kernel: straight to an endpoint of `table`


@dataclass(frozen=True, slots=True)
class KernelVerdict:
    """One destination's fate. `service_id` and `match` say what mn_dest answered (None: not a
    mesh destination); `target` is where the connect then goes (KERNEL to a VIP: one of
    `table`'s slots, picked per connect; no table: the VIP itself)."""

    action: KernelAction
    target: HostPort
    service_id: int | None = None
    match: Literal["endpoint", "vip"] | None = None
    table: LbTable | None = None

    @property
    def mesh(self) -> bool:
        """Whether the destination is a mesh destination (a VIP or an endpoint)."""
        return self.service_id is not None


def classify(state: CaptureState, dst: HostPort, *,
             outbound_port: int = constants.OUTBOUND_PORT,
             dns_port: int | None = None) -> KernelVerdict:
    """What the connect hooks do with a TCP connect to `dst` from an enrolled process, given
    the capture `state` and the agent's DNS redirect (`dns_port`; None: off)."""
    service_id, match = _lookup(state, dst)
    if service_id is not None:
        if state.balanced(service_id):
            table = None
            if match == "vip":
                table = state.lb.get((service_id, dst.port)) or state.lb.get((service_id, 0))
            if table is not None or match == "endpoint" or not (
                    dns_port is not None and dst.port == constants.DNS_SERVICE_PORT):
                return KernelVerdict(KernelAction.KERNEL, dst, service_id, match, table)
            # no endpoint: the connect goes on as dialled, so port 53 meets the DNS hook
        if service_id in state.ready:
            return KernelVerdict(KernelAction.REDIRECT, HostPort(_PROXY_IP, outbound_port),
                                 service_id, match)
        if service_id in state.fail_closed:
            # refused even on port 53: the DNS program's rewrite cannot undo the EPERM
            return KernelVerdict(KernelAction.REFUSE, dst, service_id, match)
    if dns_port is not None and dst.port == constants.DNS_SERVICE_PORT:
        return KernelVerdict(KernelAction.DNS, HostPort(_PROXY_IP, dns_port), service_id, match)
    return KernelVerdict(KernelAction.PASS, dst, service_id, match)


def _lookup(state: CaptureState, dst: HostPort,
            ) -> tuple[int | None, Literal["endpoint", "vip"] | None]:
    """mn_dest's answer: the exact address first, then the VIP entry (port 0). Rules are read
    in sorted order, later ones winning, as bpf.maps.MapContents fills the map when two
    services claim one address. A scan: this runs per `explain`, never per connection."""
    exact: int | None = None
    vip: int | None = None
    for rule in sorted(state.rules):
        if rule.ip != dst.ip:
            continue
        if rule.port == dst.port:
            exact = rule.service_id
        elif rule.port == 0:
            vip = rule.service_id
    if exact is not None:
        return exact, "endpoint"
    return (vip, "vip") if vip is not None else (None, None)
