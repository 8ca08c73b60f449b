"""The control socket's CA operations: `ca.init`, `ca.status`, `ca.token.create`,
`ca.node.issue` (a pre-provisioned node certificate), `ca.revoke_host`, `ca.root.add`,
`ca.root.activate`, `ca.root.remove`.

Arguments are checked again here (the agent never trusts its caller); the CA's files change
in meshnode.security.ca, and every change of what the trust bundle says is published before
the operation answers. An operator's root key arrives as PEM text over the root-only control
socket and is used once, in memory, to sign the intermediate. Takes the CaService, not the
agent.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from meshnode.agent.ca_service import CaService
from meshnode.agent.control import Handler
from meshnode.discovery.registry import Registry
from meshnode.errors import NotFoundError, UsageError
from meshnode.policy.identity import BUNDLE_NAME, node_id
from meshnode.policy.resources import check_name
from meshnode.security import certs, clock
from meshnode.security.ca import CA_HINT, CertificateAuthority

MAX_NODE_TTL = 30 * 86_400.0


class CaApi:
    """`current()`: this host's running CA service, None when it holds no CA; `started`: what
    to call with the service `ca init` starts (the agent's identity client uses it too)."""

    def __init__(self, registry: Registry, ca_dir: Path, node: str,
                 current: Callable[[], CaService | None],
                 started: Callable[[CaService], Awaitable[None]]) -> None:
        self.registry = registry
        self.ca_dir = ca_dir
        self.node = node
        self.current = current
        self.started = started

    @property
    def service(self) -> CaService:
        service = self.current()
        if service is None or service.ca is None:
            raise NotFoundError(f"this host holds no mesh CA ({self.ca_dir})",
                                CA_HINT + " (or run this on the CA's host)")
        return service

    def handlers(self) -> dict[str, Handler]:
        return {"ca.init": self.init, "ca.status": self.status,
                "ca.token.create": self.token_create, "ca.revoke_host": self.revoke_host,
                "ca.root.add": self.root_add, "ca.root.activate": self.root_activate,
                "ca.root.remove": self.root_remove, "ca.node.issue": self.node_issue}

    async def init(self, args: dict[str, Any]) -> Any:
        td = _str(args, "trust_domain")
        leaf_ttl = _seconds(args, "leaf_ttl", 86_400.0)
        CertificateAuthority.init(self.ca_dir, td, clock.now(),
                                  root_cert_pem=_str(args, "root_cert"),
                                  root_key_pem=_str(args, "root_key"), leaf_ttl=leaf_ttl)
        service = self.current()
        if service is None:
            service = CaService(self.registry, self.ca_dir, self.node)
            await service.start()
            await self.started(service)
        else:
            service.load()
        await service.changed()
        return self._status()

    def _status(self) -> dict[str, Any]:
        ca = self.service.require()
        out = ca.status(clock.now())
        stored = self.registry.resources().get(("TrustBundle", BUNDLE_NAME))
        out["published_serial"] = stored.spec.serial if stored is not None else None
        out["node"] = self.node
        return out

    async def status(self, _: dict[str, Any]) -> Any:
        return self._status()

    async def token_create(self, args: dict[str, Any]) -> Any:
        ca = self.service.require()
        ttl = _seconds(args, "ttl", 600.0)
        node = _str(args, "node")
        if node and not any(c in node for c in "*?["):
            check_name(node, "node")
        now = clock.now()
        token = ca.tokens.create(ttl, ca.active.fp, now, node)
        return {"token": token.text(), "id": token.id, "expires": token.expires,
                "node": node or "*", "root": token.root_fp}

    async def node_issue(self, args: dict[str, Any]) -> Any:
        """A node certificate to pre-provision a host with (`ca node-cert`): the caller made
        the key and sends only the CSR. For hosts that cannot be given a join token."""
        ca = self.service.require()
        node = check_name(_str(args, "node"), "node")
        ttl = _seconds(args, "ttl", ca.leaf_ttl)
        if ttl > MAX_NODE_TTL:
            raise UsageError(f"a pre-provisioned node certificate lives at most 30 days, not "
                             f"{ttl / 86_400:g}", "use e.g. --ttl 7d; the agent renews it")
        if node in ca.revoked:
            raise UsageError(f"host {node} is revoked", "give the host another --node name")
        identity = node_id(ca.trust_domain, node)
        csr, san, ou = certs.verify_csr(_str(args, "csr"))
        if san != identity or ou != node:
            raise UsageError(f"the CSR is for {san} on {ou!r}, not {identity}",
                             "upgrade the CLI")
        chain = ca.issue(csr, identity, node, clock.now(), ttl)
        return {"node": node, "identity": identity, "chain": chain,
                "not_after": certs.not_after(certs.load_chain(chain[:1])[0])}

    async def revoke_host(self, args: dict[str, Any]) -> Any:
        ca = self.service.require()
        node = _str(args, "node")
        if not node:
            raise UsageError("revoke-host needs a host name", "meshnode ca revoke-host NAME")
        if node == self.node:
            raise UsageError(f"{node} is the CA's own host", "revoke other hosts only")
        changed = ca.revoke(node)
        await self.service.changed()
        return {"node": node, "changed": changed, "serial": ca.serial}

    async def root_add(self, args: dict[str, Any]) -> Any:
        ca = self.service.require()
        fp = ca.add_root(clock.now(), _str(args, "root_cert"), _str(args, "root_key"))
        await self.service.changed()
        return {"fingerprint": fp, "serial": ca.serial}

    async def root_activate(self, args: dict[str, Any]) -> Any:
        ca = self.service.require()
        fp = ca.activate(_str(args, "fingerprint"))
        await self.service.changed()
        return {"fingerprint": fp, "serial": ca.serial}

    async def root_remove(self, args: dict[str, Any]) -> Any:
        ca = self.service.require()
        fp = ca.remove_root(_str(args, "fingerprint"), clock.now(), bool(args.get("force")))
        await self.service.changed()
        return {"fingerprint": fp, "serial": ca.serial}


def _str(args: dict[str, Any], key: str) -> str:
    value = args.get(key) or ""
    if not isinstance(value, str):
        raise UsageError(f"{key} must be a string", "upgrade the CLI")
    return value


def _seconds(args: dict[str, Any], key: str, default: float) -> float:
    value = args.get(key)
    if value is None:
        return default
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise UsageError(f"invalid {key} {value!r}", "give a duration such as 10m, 24h or 7d")
    return seconds
