"""`meshnode status`: the agent, its capture, registry, DNS, workers, services with their
endpoints and counters, and enrolled processes, as one JSON value.

Counters come from the telemetry's sums (the same as `stat` and /metrics read), so after a
worker restart they carry on instead of falling back.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from meshnode import __version__, constants
from meshnode.discovery.health import HealthMonitor
from meshnode.errors import MeshnodeError
from meshnode.model import CaptureState, LbKey
from meshnode.policy.datapath import PathChoice
from meshnode.policy.labels import labels_json
from meshnode.policy.records import ServiceRecord

if TYPE_CHECKING:
    from meshnode.agent.parts import Parts


_PICKS = {constants.LB_PICK_ROTATE: "rotate", constants.LB_PICK_RANDOM: "random",
          constants.LB_PICK_HASH: "hash"}


def describe_path(rec: ServiceRecord, choice: PathChoice | None,
                  state: CaptureState | None, keys: Iterable[LbKey] = ()) -> dict[str, Any]:
    """Which path the service's connections take now, and why; the kernel's tables under
    `keys` (the planner's for this service: a lookup each, not a walk of every table)."""
    if choice is None:
        return {"path": "proxy", "now": "proxy", "fallback": False, "reason": "not planned yet"}
    now = "kernel" if state is not None and state.balanced(rec.id) else (
        "proxy" if state is not None and rec.id in state.ready else "down")
    held = [] if state is None else [t for key in keys if (t := state.lb.get(key)) is not None]
    tables = [{"port": t.port, "pick": _PICKS.get(t.pick, str(t.pick)), "slots": len(t.slots),
               "endpoints": t.shares()} for t in held]
    return {"path": choice.path, "now": now, "fallback": choice.fallback,
            "local_only": choice.local_only, "reason": choice.reason,
            "pick": tables[0]["pick"] if tables else None, "tables": tables}


def describe_service(rec: ServiceRecord, counters: dict[str, Any],
                     health: HealthMonitor, path: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
    per_ep: dict[str, dict[str, Any]] = counters.get("endpoints", {})
    return {
        **rec.settings_json(),
        "datapath": path or {},
        "counters": {k: v for k, v in counters.items() if k != "endpoints"},
        "endpoints": [
            {**e.to_json(), "labels": labels_json(e.labels),
             "health": health.describe(rec.name, e.addr),
             "proxy": per_ep.get(str(e.addr), {})}
            for e in sorted(rec.endpoints, key=lambda e: e.addr)],
    }


def _path(p: Parts, name: str, rec: ServiceRecord) -> dict[str, Any]:
    planner = p.planner
    if planner is None:
        return describe_path(rec, None, None)
    return describe_path(rec, planner.choices.get(name), p.synced(), planner.keys_of(name))


async def status(p: Parts) -> dict[str, Any]:
    totals = await p.telemetry.sample()
    per_service = totals.by_service()
    try:
        kernel: dict[str, Any] = dict(await asyncio.to_thread(p.capture.stats))
    except MeshnodeError as exc:
        kernel = {"error": str(exc)}
    return {
        "instance": p.cfg.instance,
        "node": p.node,
        "zone": p.cfg.zone,
        "version": __version__,
        "pid": os.getpid(),
        "ready": p.ready(),
        "ready_after_s": round(p.ready_after(), 3),
        "capture": {"backend": p.capture.name, "reason": p.capture_reason, "kernel": kernel},
        "registry": {**p.registry.describe(), "applied_revision": p.report.applied_revision},
        "dns": p.names.describe(),
        "telemetry": p.telemetry.describe(),
        "cgroup": str(p.root_cgroup),
        "workers": p.workers.describe(),
        "proxy": dict(totals.values),
        "services": [describe_service(rec, per_service.get(name, {}), p.health,
                                      _path(p, name, rec))
                     for name, rec in sorted(p.registry.services().items())],
        "enrolled": p.enrollments.describe(),
        "identity": p.identity.describe(),
        "gateway": p.gateway.describe() if p.gateway is not None else {},
    }
