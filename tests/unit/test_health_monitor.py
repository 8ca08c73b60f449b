"""The health monitor: probes only this host's endpoints, reads other hosts' verdicts from
their registry records, and follows only the services that changed."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address

from meshnode.discovery.health import HealthMonitor
from meshnode.model import HealthConfig, HostPort
from meshnode.policy.records import EndpointRecord, ServiceRecord
from meshnode.policy.resources import ServicePolicy


def rec(*eps: EndpointRecord, kind: str = "tcp") -> ServiceRecord:
    policy = ServicePolicy(health=HealthConfig(kind=kind, interval=0.01, timeout=0.01,
                                               unhealthy_threshold=1))
    return ServiceRecord("web", 1, IPv4Address("127.240.0.1"), policy,
                         endpoints=frozenset(eps))


def ep(addr: str, node: str, healthy: bool | None = None) -> EndpointRecord:
    return EndpointRecord(HostPort.parse(addr), "static", node=node, healthy=healthy)


def test_only_own_endpoints_are_probed_and_remote_verdicts_are_read() -> None:
    async def go() -> None:
        probed: list[HostPort] = []

        async def probe(addr: HostPort, cfg: HealthConfig) -> tuple[bool, str]:
            probed.append(addr)
            return False, "refused"

        flips: list[int] = []
        m = HealthMonitor(lambda: flips.append(1), probes={"tcp": probe}, node="a")
        own, down, up = ep("127.0.0.1:1", "a"), ep("10.0.0.2:1", "b", False), ep(
            "10.0.0.3:1", "b")
        m.update({"web": rec(own, down, up)})
        for _ in range(50):
            if not m.healthy("web", own.addr):
                break
            await asyncio.sleep(0.01)
        assert set(probed) == {own.addr}  # never another host's endpoint
        assert not m.healthy("web", own.addr) and m.take_dirty() == {"web"} and flips
        assert not m.healthy("web", down.addr) and m.healthy("web", up.addr)
        assert m.describe("web", down.addr)["reason"] == "checked by b"
        # the record changes: b's verdict comes back; a removed service forgets it all
        m.update({"web": rec(own, ep("10.0.0.2:1", "b", True), up)})
        assert m.healthy("web", down.addr)
        m.update({"web": None})
        assert m.describe("web", own.addr)["reason"] == "no active check"
        await m.close()

    asyncio.run(go())
