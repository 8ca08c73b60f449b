"""The records the registries hold and the compiler reads: a service (its policy, VIP, id and
endpoints) and an endpoint as registered (by whom, for which process). Immutable: a store
hands out the same record object until that service changes, which is what lets the compiler
(policy/compiler.py) find what changed by identity.

Pure: imports nothing of meshnode's but the model, the policy resources and labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

import msgspec

from meshnode.model import Endpoint, HostPort, PolicyView, ServicePolicy, ServiceSpec
from meshnode.policy.labels import LabelError, Labels, labels_from, labels_json


@dataclass(frozen=True, slots=True)
class EndpointRecord:
    addr: HostPort
    source: str  # "process" (an enrolled process's listener) or "static" (service add)
    pid: int | None = None
    node: str = ""  # the agent that registered it (its lease owns it, with etcd)
    zone: str = ""
    weight: int = 1
    # the verdict of the active checks run by the endpoint's own agent (None: not checked)
    healthy: bool | None = None
    labels: Labels = ()  # canonical (policy/labels.py): enroll --label, service add --label

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.addr, self.node, self.zone, self.weight, self.labels)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"addr": str(self.addr), "source": self.source, "pid": self.pid,
                               "node": self.node, "zone": self.zone, "weight": self.weight}
        if self.healthy is not None:
            out["healthy"] = self.healthy
        if self.labels:  # absent when none: the records stored before labels read the same
            out["labels"] = labels_json(self.labels)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EndpointRecord:
        healthy = d.get("healthy")
        labels = d.get("labels") or {}
        if not isinstance(labels, dict):
            raise LabelError(f"endpoint {d.get('addr')}: labels must be an object",
                             'store them as {"version": "v2"}')
        return cls(HostPort.parse(d["addr"]), str(d["source"]), d.get("pid"),
                   str(d.get("node", "")), str(d.get("zone", "")), int(d.get("weight", 1)),
                   None if healthy is None else bool(healthy), labels_from(labels))


@dataclass(frozen=True, slots=True)
class ServiceRecord(PolicyView):
    """A service as the agent uses it: the Service resource's policy at `version`, the VIP the
    registry gave it (the id is the VIP's offset, the same on every host), and its endpoints."""

    name: str
    id: int  # keys the kernel's service flags; VipRange.id_of(vip) on every host
    vip: IPv4Address
    policy: ServicePolicy = field(default_factory=ServicePolicy)
    version: int = 0
    endpoints: frozenset[EndpointRecord] = field(default_factory=frozenset)

    @property
    def spec(self) -> ServiceSpec:
        return ServiceSpec(self.name, self.id, self.vip, self.policy)

    def endpoint_set(self) -> frozenset[Endpoint]:
        return frozenset(e.endpoint for e in self.endpoints)

    def settings_json(self) -> dict[str, Any]:
        """Everything but the endpoints, as `status` shows it."""
        return {"name": self.name, "id": self.id, "vip": str(self.vip), "port": self.port,
                "version": self.version, "fail_closed": self.fail_closed,
                "lb": _snake(self.lb),
                "outlier": _snake(self.outlier), "health": _snake(self.health),
                "policy": msgspec.to_builtins(self.policy)}


def _snake(value: Any) -> dict[str, Any]:
    """A policy struct with every field, by its Python name (status and explain read these)."""
    return {f: getattr(value, f) for f in value.__struct_fields__}
