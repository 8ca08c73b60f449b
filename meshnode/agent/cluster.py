"""The mesh's hosts as an operator sees them: every agent's last report (agent/report.py) and
whether each has caught up with the newest resource change, so a rollout can be watched
converging (the `hosts` control operation, the dashboard's GET /api/hosts).

Owns that one judgement, "current or behind", so the control operation and the dashboard
cannot disagree about it. A pure function over a registry snapshot: it reads `hosts()`,
`resources()` and `revision()` and nothing else, and imports no agent, telemetry or process
module.

Why "current" is measured against the newest *resource* version and not `revision()`: a
report is itself a registry write (etcd: the key hosts/<node>), so the store's revision moves
past every agent's applied revision the moment they publish that they applied it; no agent
could ever look current. A host whose applied revision covers the newest resource version
runs every resource as it is now (the same test `meshnode get KIND --hosts` makes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from meshnode.policy.resources import Resource

__all__ = ["ClusterSource", "hosts_view"]


class ClusterSource(Protocol):
    """What the view reads of the registry (discovery.registry.Registry has all three)."""

    def hosts(self) -> dict[str, dict[str, Any]]: ...

    def resources(self) -> dict[tuple[str, str], Resource]: ...

    def revision(self) -> int: ...


def hosts_view(registry: ClusterSource, local: Mapping[str, Any]) -> dict[str, Any]:
    """{"revision": the store's, "current_revision": the newest resource version, "hosts":
    [report + "local", "current"]}, by node name. `local` is this agent's report
    as of now: the registry's copy of it may be a publish behind."""
    reports = {**registry.hosts(), str(local.get("node", "")): dict(local)}
    newest = max((r.version for r in registry.resources().values()), default=0)
    hosts = []
    for node in sorted(reports):
        report = reports[node]
        applied = _int(report.get("applied_revision"))
        # a host that is not ready does not route what it applied: never "current"
        current = bool(report.get("ready")) and applied >= newest
        hosts.append({**report, "node": node, "applied_revision": applied,
                      "local": node == local.get("node"), "current": current})
    return {"revision": registry.revision(), "current_revision": newest, "hosts": hosts}


def _int(value: Any) -> int:
    """A report field as a number: reports come from other agents, maybe other versions."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0
