"""The running agent's collaborators, as the control operations, the status and the
telemetry see them: handed over once all of them run, so none of those modules reaches into
the HostAgent (which is the only place that creates or replaces them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshnode.capture import CaptureBackend
from meshnode.config import AgentConfig
from meshnode.discovery.health import HealthMonitor
from meshnode.discovery.registry import Registry
from meshnode.model import CaptureState
from meshnode.policy.compiler import Compiler
from meshnode.policy.datapath import Planner

if TYPE_CHECKING:  # these modules take Parts themselves
    from meshnode.agent.enrollment import EnrollmentManager
    from meshnode.agent.gateway import GatewayListeners
    from meshnode.agent.identity import IdentityClient
    from meshnode.agent.names import MeshNames
    from meshnode.agent.observe import Telemetry
    from meshnode.agent.report import HostReport
    from meshnode.agent.workers import WorkerPool


@dataclass(frozen=True)
class Parts:
    """The running agent's collaborators, as the operations see them."""

    cfg: AgentConfig
    node: str
    registry: Registry
    enrollments: EnrollmentManager
    workers: WorkerPool
    capture: CaptureBackend
    capture_reason: str
    names: MeshNames
    telemetry: Telemetry
    health: HealthMonitor
    compiler: Compiler
    report: HostReport
    mount: Path
    root_cgroup: Path
    ready: Callable[[], bool]
    ready_after: Callable[[], float]
    settle: Callable[[], Awaitable[None]]  # apply a change now, before answering
    uninstall: Callable[[], None]  # stop with a removal, once the answer is out
    identity: IdentityClient
    # the CA service of this host (None: another host holds the CA), and what to call when
    # `meshnode ca init` creates one in the running agent
    ca: Callable[[], Any]
    ca_started: Callable[[Any], Awaitable[None]]
    gateway: GatewayListeners | None = None  # this host's ingress gateway listeners
    planner: Planner | None = None  # which path each service takes (meshnode.policy.datapath)
    synced: Callable[[], CaptureState | None] = lambda: None  # what the kernel last took
