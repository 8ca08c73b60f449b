"""`meshnode explain`'s kernel-path step: what the connect hook does with a connect it
balances itself (route.classify's KERNEL verdict), in words and as data.

Read-only and pure over its inputs: imports the model, the route verdict and the policy
records; explain.py folds the step into its result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshnode import constants
from meshnode.model import HostPort, LbTable
from meshnode.policy.records import ServiceRecord
from meshnode.route import KernelVerdict

__all__ = ["KernelStep", "kernel_step", "table_shares"]

_PICK_WORDS = {constants.LB_PICK_ROTATE: "the next slot in turn (weights exact per round)",
               constants.LB_PICK_RANDOM: "a random slot",
               constants.LB_PICK_HASH: "the slot the client process's id hashes to "
                                       "(consistent: it keeps its endpoint)"}


@dataclass
class KernelStep:
    outcome: str  # kernel | no-endpoint
    step: str
    verdict: str
    candidates: list[dict[str, Any]] = field(default_factory=list)


def table_shares(table: LbTable | None) -> dict[str, str]:
    """Each endpoint of a kernel-path table with its share of the slots ("2/6")."""
    if table is None:
        return {}
    return {addr: f"{n}/{len(table.slots)}" for addr, n in table.shares().items()}


def kernel_step(k: KernelVerdict, rec: ServiceRecord, addr: HostPort, backend: str,
                fallback: bool) -> KernelStep:
    """The connect hook balances, no proxy on the path. `fallback`: it does so because the
    proxy is not ready (not the service's datapath)."""
    why = "the proxy is not ready: fallback" if fallback else f"datapath {rec.policy.datapath}"
    head = f"kernel ({backend}): kernel path ({why})"
    if k.match == "endpoint":
        return KernelStep("kernel", f"{head}, an endpoint's own address → straight to it, "
                          "counted",
                          f"kernel path: straight to endpoint {addr} of {rec.name}; no proxy "
                          "on the path")
    if k.table is None:
        return KernelStep("no-endpoint", f"{head}, but no healthy endpoint of {rec.name} on "
                          f"port {addr.port} → left to the VIP",
                          f"no endpoint: {rec.name} has no healthy endpoint for port "
                          f"{addr.port}; the connect goes on to {addr}, where nothing listens "
                          "(refused)")
    shares = table_shares(k.table)
    return KernelStep(
        "kernel",
        f"{head} → the connect hook picks {_PICK_WORDS.get(k.table.pick, 'a slot')} of "
        f"{len(k.table.slots)}: " + ", ".join(f"{a} {s}" for a, s in shares.items()),
        f"kernel path: balanced in the kernel over {len(shares)} endpoint(s) of {rec.name}; "
        f"the app connects straight to the endpoint and getpeername() shows {addr}; no proxy "
        "on the path",
        [{"addr": a, "share": s} for a, s in shares.items()])
