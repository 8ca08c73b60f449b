"""The agent's side of the kernel path (bpf/mn_connect.c balancing connects itself): which
services the kernel balances and over what (policy/datapath.py's Planner), what the kernel is
given while no worker serves, and the connections left queued for a dead proxy
(stragglers.py). The reconcile calls these three steps in order around its capture sync.

Runs in the agent: imports the pure policy and route packages and its own siblings.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Collection, Mapping
from dataclasses import replace
from ipaddress import IPv4Address

from meshnode.agent.stragglers import Stragglers
from meshnode.capture import CaptureBackend
from meshnode.model import CaptureState, Endpoint, HostPort
from meshnode.policy import compiler, datapath
from meshnode.policy.records import ServiceRecord
from meshnode.policy.resources import Resource
from meshnode.route import KernelAction, classify

__all__ = ["KernelPath"]

log = logging.getLogger(__name__)


class KernelPath:
    def __init__(self) -> None:
        self.planner = datapath.Planner()
        self.stragglers = Stragglers()

    def plan(self, services: Mapping[str, ServiceRecord], pushed: compiler.Snapshot,
             dirty: Collection[str], resources: Mapping[tuple[str, str], Resource],
             node: str, zone: str, capable: bool) -> datapath.KernelPlan:
        """The kernel path of every service, over the endpoints the workers were given
        (`pushed`: health applied); `dirty`: the services changed since the last plan."""

        def balanced_over(rec: ServiceRecord) -> frozenset[Endpoint]:
            entry = pushed.get(rec.name)
            return entry[1] if entry is not None else frozenset()

        return self.planner.plan(services, balanced_over, dirty,
                                 datapath.environment(resources, node, zone, capable))

    @staticmethod
    def while_down(state: CaptureState, ready: bool, alive: bool) -> CaptureState:
        """What the kernel takes when no worker is alive but the listening socket bridges to
        a replacement (`ready` still): the services that may are balanced in the kernel
        meanwhile instead of queueing."""
        if ready and not alive and state.fallback:
            return replace(state, ready=state.ready - state.fallback)
        return state

    def take_queued(self, state: CaptureState, capture: CaptureBackend, listener: int | None,
                    alive: bool) -> None:
        """No worker, and no service waits for one (not bridging, or all of them fall back):
        the connects queued for the proxy before capture fell back are relayed as the kernel
        would have sent them, or reset. Nothing otherwise."""
        if not state.fallback or alive or listener is None or state.ready - state.kernel:
            return
        turn = itertools.count()

        def resolve(ip: IPv4Address, port: int) -> HostPort | None:
            dst = capture.origdst(HostPort(ip, port))
            if dst is None:
                return None
            k = classify(state, dst)
            if k.action is not KernelAction.KERNEL:
                return None
            if k.table is None:
                return dst if k.match == "endpoint" else None
            return k.table.slots[next(turn) % len(k.table.slots)]

        taken = self.stragglers.drain(listener, resolve)
        if taken:
            log.info("took %d connections queued for the proxy (relayed %d, reset %d so far)",
                     taken, self.stragglers.relayed, self.stragglers.reset)

    async def close(self) -> None:
        """Cut what is still being relayed (the agent is stopping)."""
        await self.stragglers.close()
