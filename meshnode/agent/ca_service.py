"""The mesh CA's signer, inside the agent of the host whose state directory holds `ca/`.

It talks to the other agents only through the registry (meshnode.policy.identity says why):
on start, and whenever what the bundle says changes, it publishes the signed TrustBundle
(`mesh`) unless the registry already holds this one; on every registry change it answers each
CertificateRequest that has no Certificate for its CSR yet (same name, matching csr_sha256)
with a Certificate: the chain, or the reason it was refused (meshnode.security.signer). A
refused request is answered once; the host asks again with a new CSR.

The CA host's own agent skips the registry round trip: `issue_local`. Without a CA directory
the service idles until `load` (after `ca init`). Takes the registry, not the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from meshnode.discovery.registry import Registry
from meshnode.errors import MeshnodeError, NotFoundError, TrustError
from meshnode.policy.identity import (
    BUNDLE_NAME,
    CertificateRequestSpec,
    CertificateSpec,
    TrustBundleSpec,
    parse_id,
)
from meshnode.policy.resources import Resource
from meshnode.security import bundle, certs, clock, signer
from meshnode.security.ca import CA_HINT, CertificateAuthority

log = logging.getLogger(__name__)

RETRY_AFTER = 1.0  # seconds before a failed registry write is tried again


class CaService:
    def __init__(self, registry: Registry, ca_dir: Path, node: str) -> None:
        self.registry = registry
        self.ca_dir = ca_dir
        self.node = node
        self.ca: CertificateAuthority | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._digests: dict[tuple[str, int], str] = {}  # (request name, version) -> csr sha256
        self._last_error = ""
        self.answered = 0  # Certificates written (issued or refused)

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        if CertificateAuthority.exists(self.ca_dir):
            self.load()
        self.registry.subscribe(self._wake.set)
        self._wake.set()
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def enabled(self) -> bool:
        return self.ca is not None

    def require(self) -> CertificateAuthority:
        if self.ca is None:
            raise NotFoundError(f"this host has no mesh CA ({self.ca_dir})", CA_HINT)
        return self.ca

    def load(self) -> None:
        """Read the CA directory (again: `ca init` in a running agent)."""
        self.ca = CertificateAuthority.open(self.ca_dir)
        log.info("mesh CA of trust domain %s: signing on this host (%s)",
                 self.ca.trust_domain, self.ca_dir)

    async def changed(self) -> None:
        """What the bundle says changed (roots, revocations): publish it now, so the
        operator's command returns once the registry holds it."""
        await self.publish_bundle()
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.sync()
                self._last_error = ""
            except MeshnodeError as exc:
                if str(exc) != self._last_error:  # once per outage, not per retry
                    log.warning("mesh CA: %s (retrying)", exc)
                    self._last_error = str(exc)
                await asyncio.sleep(RETRY_AFTER)
                self._wake.set()
            except Exception:
                log.exception("mesh CA: signing pass failed")
                await asyncio.sleep(RETRY_AFTER)
                self._wake.set()

    async def sync(self) -> None:
        if self.ca is None:
            return
        await self.publish_bundle()
        await self.answer_requests()

    # -- the bundle ---------------------------------------------------------------------------
    async def publish_bundle(self) -> bool:
        """Write the TrustBundle unless the registry holds this one (True: written)."""
        ca = self.require()
        stored = self.registry.resources().get(("TrustBundle", BUNDLE_NAME))
        if stored is not None:
            held: TrustBundleSpec = stored.spec
            if held.serial > ca.serial and _ours(held, ca):
                ca.raise_serial(held.serial)  # a CA directory restored from a backup
            elif held.serial == ca.serial and _same(held, ca):
                return False
            # else: older, or not signed by this CA (no agent takes that one): replaced
        await self.registry.apply([Resource("TrustBundle", BUNDLE_NAME, ca.bundle())])
        log.info("mesh CA: published trust bundle serial %d", ca.serial)
        return True

    # -- requests -------------------------------------------------------------------------------
    def pending(self) -> list[tuple[str, CertificateRequestSpec]]:
        """Requests without a Certificate for their CSR."""
        res = self.registry.resources()
        out = []
        for (kind, name), r in list(res.items()):
            if kind != "CertificateRequest":
                continue
            digest = self._digest(name, r)
            answer = res.get(("Certificate", name))
            if answer is None or answer.spec.csr_sha256 != digest:
                out.append((name, r.spec))
        return out

    def _digest(self, name: str, r: Resource) -> str:
        key = (name, r.version)
        if key not in self._digests:
            if len(self._digests) > 4096:
                self._digests.clear()
            try:
                self._digests[key] = certs.csr_sha256(r.spec.csr)
            except TrustError:
                self._digests[key] = ""  # answered with csr_sha256 "" too: once
        return self._digests[key]

    async def answer_requests(self) -> int:
        ca = self.require()
        written = 0
        for name, req in self.pending():
            spec: CertificateSpec = signer.decide(req, ca, self.registry.hosts(),
                                                  self.registry.resources(), clock.now())
            if spec.error:
                log.warning("mesh CA: refused %s for host %s: %s", req.identity, req.node,
                            spec.error)
            else:
                log.info("mesh CA: issued %s to host %s (until %s)", req.identity, req.node,
                         _iso(spec.not_after))
            await self.registry.apply([Resource("Certificate", name, spec)])
            written += 1
        self.answered += written
        return written

    def issue_local(self, identity: str, csr_pem: str) -> list[str]:
        """A certificate for this host's own agent (it holds the CA: no request needed). The
        chain, leaf first; TrustError when the CSR does not fit."""
        ca = self.require()
        csr, san, ou = certs.verify_csr(csr_pem)
        if san != identity or ou != self.node:
            raise TrustError(f"the CSR is for {san} on {ou!r}, not {identity} on {self.node!r}",
                             "build it with certs.make_csr(key, identity, node)")
        td, _, _ = parse_id(identity)
        if td != ca.trust_domain:
            raise TrustError(f"{identity} is outside trust domain {ca.trust_domain}",
                             "ask for an identity of this mesh")
        return ca.issue(csr, identity, self.node, clock.now())


def _ours(held: TrustBundleSpec, ca: CertificateAuthority) -> bool:
    try:
        bundle.verify(held, ca.root_pems(), 0)
    except TrustError:
        return False
    return True


def _same(held: TrustBundleSpec, ca: CertificateAuthority) -> bool:
    """Whether the registry's bundle says what the CA would (the signature differs each time:
    ECDSA is randomised) and is validly signed by it."""
    return bundle.canonical(held) == bundle.canonical(ca.bundle()) and _ours(held, ca)


def _iso(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
