"""Names for the agent: its DNS server and the capture switch that sends enrolled processes'
queries there, started and stopped in the one safe order.

`MeshNames.start` (after capture install): serve DNS on 127.0.0.1:<dns_port>, then turn the
DNS redirect on. `MeshNames.stop` (before capture removal): redirect off, then stop serving.
The redirect is thus only on while something answers (fail open): queries never vanish into
a closed port. The zone reads the registry's snapshot (VIPs) and, for SRV answers, the health
checks' verdicts through a narrow `Healthy` callable, never the agent itself. Imports the
capture interface, discovery and the pure balancers' locality rule; never bcc or the proxy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from meshnode import constants
from meshnode.balance.load import tier_of
from meshnode.capture import CaptureBackend
from meshnode.config import AgentConfig
from meshnode.discovery.dns import MeshDns
from meshnode.discovery.dns_upstream import RESOLV_CONF, Upstream, resolv_conf_upstreams
from meshnode.discovery.dns_zone import Instances, Resolve, SrvTarget, no_instances
from meshnode.discovery.registry import Registry
from meshnode.errors import MeshnodeError
from meshnode.model import HostPort

log = logging.getLogger(__name__)

# Whether an endpoint of a service passes its health checks (HealthMonitor.healthy).
Healthy = Callable[[str, HostPort], bool]


def upstreams_for(configured: Sequence[str], own: Upstream,
                  resolv_conf: Path = RESOLV_CONF) -> tuple[Upstream, ...]:
    """The configured upstreams (IPv4[:PORT]), or the resolv.conf nameservers but our own
    address; either way never our own address (a forwarding loop)."""
    if configured:
        ups = tuple(Upstream.parse(text) for text in configured)
    else:
        ups = resolv_conf_upstreams(resolv_conf, exclude=[own])
    return tuple(u for u in ups if u != own)


def registry_resolver(registry: Registry) -> Resolve:
    """Look a service's VIP up in the registry's local snapshot (never blocks)."""

    def resolve(service: str) -> IPv4Address | None:
        rec = registry.services().get(service)
        return rec.vip if rec is not None else None

    return resolve


def registry_instances(registry: Registry, healthy: Healthy, node: str = "",
                       zone: str = "") -> Instances:
    """A service's healthy endpoints for SRV answers, from the registry's local snapshot and
    the health verdicts (never blocks). Priorities follow the balancers' locality tiers (0 on
    `node`, 1 in `zone`, 2 elsewhere), so a client that balances itself prefers what the
    proxy would; a service with locality off lists every endpoint at priority 0."""

    def instances(service: str) -> list[SrvTarget]:
        rec = registry.services().get(service)
        if rec is None:
            return []
        local = rec.lb.locality
        return [SrvTarget(tier_of(e.endpoint, node, zone) if local else 0, e.addr, e.weight,
                          e.node)
                for e in rec.endpoints if healthy(service, e.addr)]

    return instances


class MeshNames:
    """The DNS server plus the capture switch. `start` -> `describe`* -> `stop`."""

    def __init__(self, capture: CaptureBackend, resolve: Resolve, *,
                 port: int = constants.DNS_PORT, suffix: str = "mesh",
                 upstreams: Sequence[str] = (), host: str = constants.PROXY_ADDR,
                 resolv_conf: Path = RESOLV_CONF, instances: Instances = no_instances) -> None:
        self.capture = capture
        own = Upstream(IPv4Address(host), port)
        self.server = MeshDns(resolve, suffix, upstreams_for(upstreams, own, resolv_conf),
                              host, port, instances=instances)
        self.redirecting = False

    @classmethod
    def for_agent(cls, cfg: AgentConfig, capture: CaptureBackend, registry: Registry,
                  healthy: Healthy) -> MeshNames:
        return cls(capture, registry_resolver(registry), port=cfg.dns_port,
                   suffix=cfg.dns_suffix, upstreams=cfg.dns_upstreams,
                   instances=registry_instances(registry, healthy, cfg.node_name, cfg.zone))

    async def start(self, held: Mapping[str, int] | None = None) -> None:
        """Serve (on the sockets the last agent left with the workers, if any), then redirect.
        All or nothing: a failed switch stops the server again."""
        await self.server.start(held)
        try:
            await asyncio.to_thread(self.capture.set_dns, self.server.port)
        except BaseException:
            await self.server.stop()
            raise
        self.redirecting = True

    async def stop(self) -> None:
        """Redirect off first (new queries go to their own resolvers), then stop serving.
        A failed switch is logged, not raised: capture removal turns it off regardless."""
        if self.redirecting:
            try:
                await asyncio.to_thread(self.capture.set_dns, None)
            except MeshnodeError as exc:
                log.error("turning the DNS redirect off: %s", exc)
            self.redirecting = False
        await self.server.stop()

    async def detach(self) -> None:
        """An agent restart: stop serving, but leave the redirect on. The workers hold the
        sockets, so queries wait in them until the next agent answers."""
        await self.server.stop()

    def describe(self) -> dict[str, Any]:
        """For `meshnode status`."""
        return {"address": f"{self.server.host}:{self.server.port}",
                "suffix": self.server.zone.suffix,
                "upstreams": [str(u) for u in self.server.upstreams],
                "redirecting": self.redirecting,
                "counters": self.server.stats()}
