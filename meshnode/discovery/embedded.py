"""The embedded registry: one host's services in a JSON file that survives agent restarts.

VIPs come from the loopback range in constants.VIP_CIDR, so a connection to a VIP that capture
missed is refused on the host and never leaves it. Writes are atomic (tmp + fsync + rename).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from meshnode import constants as C
from meshnode.discovery.registry import (
    EndpointRecord,
    Listener,
    ServiceRecord,
    apply_settings,
    check_service_args,
)
from meshnode.errors import ConflictError, NotFoundError, RegistryError
from meshnode.model import (
    BalancerConfig,
    HealthConfig,
    HostPort,
    OutlierConfig,
)


class EmbeddedRegistry:
    def __init__(self, path: Path, vip_cidr: str = C.VIP_CIDR) -> None:
        self.path = path
        self._net = IPv4Network(vip_cidr)
        self._listeners: list[Listener] = []
        self._services: dict[str, ServiceRecord] = {}
        self._next_id = 1
        self._load()

    # -- persistence ----------------------------------------------------------------------
    def _load(self) -> None:
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise RegistryError(f"registry file {self.path} is unreadable: {exc}",
                                "fix or move the file away; the agent starts empty without it"
                                ) from exc
        self._next_id = int(data.get("next_id", 1))
        for d in data.get("services", []):
            rec = ServiceRecord.from_json(d)
            self._services[rec.name] = rec

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"next_id": self._next_id,
                "services": [s.to_json() for s in sorted(self._services.values(),
                                                          key=lambda s: s.name)]}
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _changed(self) -> None:
        self._save()
        for listener in list(self._listeners):
            listener()

    # -- queries --------------------------------------------------------------------------
    def services(self) -> dict[str, ServiceRecord]:
        return dict(self._services)

    def owner_of(self, addr: HostPort) -> str | None:
        for s in self._services.values():
            if any(e.addr == addr for e in s.endpoints):
                return s.name
        return None

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    # -- changes --------------------------------------------------------------------------
    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"backend": "embedded", "path": str(self.path), "connected": True}

    def _allocate_vip(self) -> IPv4Address:
        used = {s.vip for s in self._services.values()}
        for ip in self._net.hosts():
            if ip not in used:
                return ip
        raise RegistryError(f"no free VIP left in {self._net}",
                            "remove unused services with: meshnode service remove NAME")

    async def ensure_service(self, name: str, *, port: int | None = None,
                             fail_closed: bool | None = None, lb: BalancerConfig | None = None,
                             outlier: OutlierConfig | None = None,
                             health: HealthConfig | None = None) -> ServiceRecord:
        check_service_args(name, port)
        rec = self._services.get(name)
        if rec is None:
            rec = ServiceRecord(name, self._next_id, self._allocate_vip())
            self._next_id += 1
        rec = apply_settings(rec, port=port, fail_closed=fail_closed, lb=lb, outlier=outlier,
                             health=health)
        if rec == self._services.get(name):
            return rec
        self._services[name] = rec
        self._changed()
        return rec

    async def remove_service(self, name: str) -> None:
        if self._services.pop(name, None) is None:
            raise NotFoundError(f"no service named {name!r}", "list services: meshnode status")
        self._changed()

    async def add_endpoints(self, name: str, endpoints: Iterable[EndpointRecord]) -> None:
        rec = self._get(name)
        new = {e for e in endpoints if e not in rec.endpoints}
        for e in new:
            owner = self.owner_of(e.addr)
            if owner is not None and owner != name:
                raise ConflictError(f"endpoint {e.addr} already belongs to service {owner!r}",
                                    f"remove it there first: meshnode service remove {owner} "
                                    f"--endpoint {e.addr}")
        if new:
            self._services[name] = replace(rec, endpoints=rec.endpoints | new)
            self._changed()

    async def remove_endpoints(self, name: str, addrs: Iterable[HostPort]) -> None:
        rec = self._services.get(name)
        if rec is None:
            return
        gone = set(addrs)
        kept = frozenset(e for e in rec.endpoints if e.addr not in gone)
        if kept != rec.endpoints:
            self._services[name] = replace(rec, endpoints=kept)
            self._changed()

    def _get(self, name: str) -> ServiceRecord:
        rec = self._services.get(name)
        if rec is None:
            raise NotFoundError(f"no service named {name!r}",
                                f"create it: meshnode service add {name}")
        return rec
