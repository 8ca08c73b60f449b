"""The mesh's hosts as an operator sees them: every agent's last report (agent/report.py) and
whether each has caught up with the newest change to served data, so a rollout can be watched
converging (the `hosts` control operation, the dashboard's GET /api/hosts).

Owns that one judgement, "current or behind", so the control operation and the dashboard
cannot disagree about it. A pure function over a registry snapshot: it reads `hosts()`,
`resources()` and `revision()` and nothing else, and imports no agent, telemetry or process
module.

"Current" means the host's applied revision reaches the registry's `revision()`: the newest
change to what agents serve (resources, VIPs, endpoints, deletions included). Agents' own
reports are writes too (etcd: hosts/<node>) but do not move it, so agents that run the same
data report the same number.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

__all__ = ["ClusterSource", "hosts_view"]


class ClusterSource(Protocol):
    """What the view reads of the registry (discovery.registry.Registry has both)."""

    def hosts(self) -> dict[str, dict[str, Any]]: ...

    def revision(self) -> int: ...


def hosts_view(registry: ClusterSource, local: Mapping[str, Any]) -> dict[str, Any]:
    """{"revision": the registry's, "current_revision": the same (kept for readers of
    earlier reports), "hosts": [report + "local", "current"]}, by node name. `local` is this
    agent's report as of now: the registry's copy of it may be a publish behind."""
    reports = {**registry.hosts(), str(local.get("node", "")): dict(local)}
    newest = registry.revision()
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
