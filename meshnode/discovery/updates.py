"""Turn registry snapshots into what consumers need: the four discovery updates for the proxy
workers (Reset/Add/Remove/DoesNotExist) and the capture state for the kernel. Pure functions."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from meshnode.discovery.registry import ServiceRecord
from meshnode.model import (
    Add,
    CaptureRule,
    CaptureState,
    DoesNotExist,
    Endpoint,
    HostPort,
    Remove,
    Reset,
    ServiceSpec,
    Update,
)

Snapshot = Mapping[str, tuple[ServiceSpec, frozenset[Endpoint]]]


def snapshot(services: Mapping[str, ServiceRecord],
             healthy: Callable[[str, HostPort], bool] | None = None,
             ) -> dict[str, tuple[ServiceSpec, frozenset[Endpoint]]]:
    """What the workers should balance over: every endpoint, less those failing health checks."""
    return {name: (rec.spec, frozenset(e.endpoint for e in rec.endpoints
                                       if healthy is None or healthy(name, e.addr)))
            for name, rec in services.items()}


def resets(snap: Snapshot) -> list[Update]:
    """Everything, for a worker that starts from nothing."""
    return [Reset(spec, tuple(sorted(eps))) for spec, eps in snap.values()]


def diff(old: Snapshot, new: Snapshot) -> list[Update]:
    out: list[Update] = []
    for name in sorted(old.keys() - new.keys()):
        out.append(DoesNotExist(name))
    for name in sorted(new):
        spec, eps = new[name]
        prev = old.get(name)
        if prev is None or prev[0] != spec:
            out.append(Reset(spec, tuple(sorted(eps))))
            continue
        # removals first: an endpoint whose weight or zone changed is removed, then added
        if removed := prev[1] - eps:
            out.append(Remove(name, tuple(sorted(removed))))
        if added := eps - prev[1]:
            out.append(Add(name, tuple(sorted(added))))
    return out


def capture_state(services: Mapping[str, ServiceRecord], ready: bool) -> CaptureState:
    """VIPs capture every port; endpoints their own address. `ready`: the proxy can serve all
    of these services now (workers alive and synced)."""
    rules: set[CaptureRule] = set()
    for rec in services.values():
        rules.add(CaptureRule(rec.vip, 0, rec.id))
        rules.update(CaptureRule(e.addr.ip, e.addr.port, rec.id) for e in rec.endpoints)
    ids = frozenset(rec.id for rec in services.values())
    return CaptureState(
        rules=frozenset(rules),
        ready=ids if ready else frozenset(),
        fail_closed=frozenset(rec.id for rec in services.values() if rec.fail_closed),
    )
