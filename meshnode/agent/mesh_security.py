"""What the workers need from the mesh-wide resources, kept in step with the registry:
which hosts serve the mesh's mTLS (wire.Peers, from the hosts' reports), the mesh-wide mTLS
default and the compiled authorization (wire.Security, from the Mesh and AuthorizationPolicy
resources), this host's identities (wire.Identities, from agent/identity.py), and where
request spans go (wire.Tracing, from the Mesh resource's `tracing`, naming this node).

`all()` is every message, for a worker that starts or is adopted; `changes()` returns only the
messages whose content moved since they were last sent, so a reconcile pass costs nothing when
nothing changed. Takes the registry, the identity client and the node name, not the agent.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from meshnode.discovery.registry import Registry
from meshnode.listen import listen_tcp
from meshnode.policy.authz import compile_authz
from meshnode.policy.resources import MESH_NAME, MeshSpec
from meshnode.wire import AgentMessage, Identities, Peers, Security, Tracing, Traffic

__all__ = ["HELD_INBOUND", "MeshSecurity", "bind_inbound"]

HELD_INBOUND = "inbound"  # the inbound listener, as workers hold it (wire.Hello.held)


class MeshSecurity:
    def __init__(self, registry: Registry, identities: Callable[[], Identities],
                 node: str, workers: int = 1) -> None:
        self.registry = registry
        self.identities = identities
        self.node = node
        self.workers = workers
        self._sent: dict[str, bytes] = {}

    def mesh(self) -> MeshSpec:
        res = self.registry.resources().get(("Mesh", MESH_NAME))
        return res.spec if res is not None else MeshSpec()

    def peers(self) -> Peers:
        return Peers({node: str(r["inbound"]) for node, r in self.registry.hosts().items()
                      if r.get("inbound")})

    def security(self) -> Security:
        return Security(self.mesh().mtls.mode, compile_authz(self.registry.resources()))

    def tracing(self) -> Tracing:
        t = self.mesh().tracing
        return Tracing(t.otlp_endpoint, t.sampling, self.node)

    def traffic(self) -> Traffic:
        return Traffic({name: r.spec for (kind, name), r in
                        sorted(self.registry.resources().items()) if kind == "Route"},
                       self.workers)

    def all(self) -> list[AgentMessage]:
        """Everything, for a worker that starts from nothing: authorization before the
        identities, so no handshake completes under a worker's allow-all start."""
        return [self.security(), self.peers(), self.identities(), self.tracing(),
                self.traffic()]

    def changes(self) -> list[AgentMessage]:
        out: list[AgentMessage] = []
        for msg in self.all():
            kind = type(msg).__name__
            data = msgspec.json.encode(msg)
            if self._sent.get(kind) != data:
                self._sent[kind] = data
                out.append(msg)
        return out


def bind_inbound(host: str, port: int) -> int:
    """The inbound mTLS listener (host address:port), as a descriptor every worker accepts
    from; the workers hold it across agent restarts like the outbound one."""
    sock = listen_tcp(host, port, what="for mTLS",
                      hint="choose another port with --inbound-port (0: no mTLS listener)")
    return sock.detach()  # close-on-exec: handed to workers by pass_fds only
