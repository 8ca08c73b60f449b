"""The routing decision, written once: where a captured connection goes.

Two steps, each one pure function that every consumer calls instead of restating it:
- `kernel.classify`: what the kernel's connect hooks do with a destination, from the capture
  state (redirect to the proxy, refuse, pass, or send a DNS query to the agent's server);
- `table.ServiceTable.route`: what the proxy does with a connection it accepted (rules a, b, c:
  the candidate endpoints, the outlier filter, the balancer's order).
The proxy workers route every connection through the table; the agent's `meshnode explain`
calls both on the agent's snapshot; the integration tier checks `classify` against the BPF C.

Shared and pure: imports only meshnode.model, meshnode.balance, meshnode.errors and
meshnode.constants. Never a process package (agent, proxy, capture, bpf, host, discovery, cli),
nor uvloop, bcc or pyroute2: an import-linter contract in pyproject.toml says so.
"""

from meshnode.route.kernel import KernelAction, KernelVerdict, classify
from meshnode.route.table import (
    NoEndpoint,
    Passthrough,
    Route,
    ServiceTable,
    ToEndpoint,
    ToService,
)

__all__ = ["KernelAction", "KernelVerdict", "NoEndpoint", "Passthrough", "Route",
           "ServiceTable", "ToEndpoint", "ToService", "classify"]
