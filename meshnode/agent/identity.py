"""This host's identities: its node certificate and one workload certificate per service
enrolled here, obtained from the mesh CA, renewed at half-life, handed to the workers.

The CA is reached through the registry (meshnode.policy.identity): this agent writes a
`CertificateRequest` and the CA's agent answers with a `Certificate` of the same name. A host
with no node certificate yet joins with a single-use token (`--join-token`), or brings one
(`--node-cert/--node-key`), or is the CA's own host. Renewals and workload requests are signed
with the node key. The trust bundle is taken from the registry only when its signature verifies
against the roots this host already trusts (the first ones are pinned by the join token's root
fingerprint, or by the provisioned certificate's chain), so the registry is a transport, not
trusted.

Keys never leave the host: the node key in the state directory (0600, it must survive a
restart), workload keys in memory and in the files the workers load (the run directory, tmpfs,
0600; the ssl module loads keys only from files). Each file is written once under a new name
and the old ones are removed once the workers have the new message.

Expiry is checked against meshnode.security.clock (tests push it forward): a certificate past
its end is dropped at once, so an expired leaf is never presented.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from meshnode.config import AgentConfig
from meshnode.discovery.registry import Registry
from meshnode.errors import ConfigError, MeshnodeError
from meshnode.host.statefile import write_atomic
from meshnode.policy.identity import (
    BUNDLE_NAME,
    CertificateRequestSpec,
    CertificateSpec,
    TrustBundleSpec,
    node_id,
    request_name,
    service_id,
)
from meshnode.policy.resources import Resource
from meshnode.security import bundle as bundles
from meshnode.security import certs, clock, tokens
from meshnode.wire import Identities

__all__ = ["Held", "IdentityClient"]

log = logging.getLogger(__name__)

TICK = 1.0  # seconds between checks (renewals, answers) when nothing wakes the loop
RETRY_REFUSED = 2.0  # seconds before a refused request is asked again (with a new key)


@dataclass
class Held:
    """A certificate this host holds, with its key."""

    identity: str
    chain: tuple[str, ...]  # PEM, leaf first
    key_pem: str
    not_before: float
    not_after: float
    issuer_fp: str  # the issuing CA certificate's fingerprint (a rotation renews early)
    root: str = ""  # the short fingerprint of the bundle root it chains to (ca status's)
    path: Path | None = None  # the workers' file (chain + key)

    def due(self, now: float) -> bool:
        """Past half its life: renew."""
        return now >= self.not_before + (self.not_after - self.not_before) / 2

    def expired(self, now: float) -> bool:
        return now >= self.not_after


@dataclass
class Pending:
    name: str  # the request resource's name
    key: Any
    key_pem: str
    csr_pem: str
    csr_sha256: str
    asked_at: float
    refused_at: float = 0.0


class IdentityClient:
    def __init__(self, cfg: AgentConfig, node: str, registry: Registry,
                 enrolled: Callable[[], Iterable[str]], on_change: Callable[[], None],
                 local_ca: Any = None) -> None:
        """`enrolled`: the services enrolled on this host now; `on_change`: the workers'
        material (message()) or the host report changed; `local_ca`: this host's CA service
        when it holds the CA (its own node certificate needs no round trip)."""
        self.cfg = cfg
        self.node = node
        self.registry = registry
        self.enrolled = enrolled
        self.on_change = on_change
        self.local_ca = local_ca
        self.token = cfg.join_token_value()
        self.dir = cfg.state_path / "identity"
        self.files = cfg.run_dir / "identity"
        self.bundle: TrustBundleSpec | None = None
        self.node_cert: Held | None = None
        self.services: dict[str, Held] = {}
        self.pending: dict[str, Pending] = {}  # identity -> its open request
        self.generation = 0
        self.workers_have = 0  # the generation every worker has applied (agent's barrier)
        self.problem = ""  # why this host has no identity (said once), for status/doctor
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._old_files: list[Path] = []

    # -- life ---------------------------------------------------------------------------------
    def load(self) -> None:
        """What this host held before (a restart): read before the workers are adopted, so
        the first message they get from this agent is the material they already serve with,
        not an empty one (which would stop mTLS until the first pass)."""
        for d in (self.dir, self.files):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(d, 0o700)
        self._load()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def changed(self) -> None:
        """The registry changed (a bundle, an answer, a report): look now."""
        self._wake.set()

    @property
    def trust_domain(self) -> str:
        return self.bundle.trust_domain if self.bundle is not None else ""

    @property
    def ready(self) -> bool:
        """This host can speak the mesh's mTLS: a valid node certificate and a bundle."""
        return self.node_cert is not None and self.bundle is not None

    def node_identity(self) -> str:
        return node_id(self.trust_domain, self.node) if self.bundle else ""

    # -- what others read ---------------------------------------------------------------------
    def message(self) -> Identities:
        if not self.ready or self.bundle is None or self.node_cert is None:
            return Identities(generation=self.generation)
        return Identities(
            trust_domain=self.bundle.trust_domain, bundle=str(self._bundle_file()),
            node=str(self.node_cert.path),
            services={name: str(h.path) for name, h in sorted(self.services.items())},
            revoked_nodes=tuple(self.bundle.revoked_nodes), generation=self.generation)

    def expiries(self) -> list[tuple[str, str, float]]:
        """(identity, kind, seconds left) of everything held: the cert expiry gauge."""
        now = clock.now()
        out = []
        if self.bundle is not None:
            for pem in self.bundle.roots:
                out.append((certs.subject_of(pem), "root", certs.not_after_pem(pem) - now))
            if self.bundle.issuer_chain:
                pem = self.bundle.issuer_chain[0]
                out.append((certs.subject_of(pem), "issuer", certs.not_after_pem(pem) - now))
        if self.node_cert is not None:
            out.append((self.node_cert.identity, "node", self.node_cert.not_after - now))
        for h in self.services.values():
            out.append((h.identity, "workload", h.not_after - now))
        return out

    def describe(self) -> dict[str, Any]:
        now = clock.now()
        return {
            "trust_domain": self.trust_domain, "ready": self.ready, "problem": self.problem,
            "bundle_serial": self.bundle.serial if self.bundle else None,
            "node": _held(self.node_cert, now) if self.node_cert else None,
            "services": {name: _held(h, now) for name, h in sorted(self.services.items())},
            "pending": sorted(self.pending), "generation": self.generation,
            "workers_generation": self.workers_have}

    # -- the loop -----------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                await self.step()
            except MeshnodeError as exc:
                self._say(f"identity: {exc}")
            except Exception:
                log.exception("identity step failed")
            # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancellation that lands
            # as the wake-up does, and stop() would wait for this loop forever
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK):
                    await self._wake.wait()
            self._wake.clear()

    async def step(self) -> None:
        """One pass: bundle, node certificate, workload certificates, expiry."""
        before = self._fingerprint()
        self._take_bundle()
        now = clock.now()
        await self._node(now)
        if self.node_cert is not None and self.bundle is not None:
            await self._workloads(now)
        self._expire(now)
        if self._fingerprint() != before:
            self._publish()

    def _fingerprint(self) -> tuple[Any, ...]:
        return (self.bundle.serial if self.bundle else None,
                self.node_cert.path if self.node_cert else None,
                tuple(sorted((n, h.path) for n, h in self.services.items())))

    def _publish(self) -> None:
        self.generation += 1
        self.on_change()
        # files the previous message named: the workers read them when building contexts,
        # which happens as the message arrives; a little later they can go
        stale, self._old_files = self._old_files, []
        live = {h.path for h in [*self.services.values(), self.node_cert]
                if h is not None and h.path is not None}
        if self.bundle is not None:
            live.add(self._bundle_file())
        for p in stale:
            if p not in live:
                asyncio.get_running_loop().call_later(10.0, _unlink, p)
        self._old_files = list(live)
        # what the next agent takes back at once (a restart must not wait for the CA)
        write_atomic(self.files / "held.json", msgspec.json.encode(
            {name: str(h.path) for name, h in self.services.items()}), mode=0o600)

    # -- the trust bundle ---------------------------------------------------------------------
    def _take_bundle(self) -> None:
        res = self.registry.resources().get(("TrustBundle", BUNDLE_NAME))
        if res is None:
            return
        spec: TrustBundleSpec = res.spec
        held = self.bundle
        if held is not None and spec.serial <= held.serial:
            return
        trusted = self._pinned_roots(spec)
        if trusted is None:
            return
        try:
            bundles.verify(spec, trusted, held.serial + 1 if held else 0)
        except MeshnodeError as exc:
            self._say(f"trust bundle {spec.serial} refused: {exc}")
            return
        if held is not None and spec.trust_domain != held.trust_domain:
            self._say(f"trust bundle names trust domain {spec.trust_domain}, this host is in "
                      f"{held.trust_domain}: refused")
            return
        self.bundle = spec
        write_atomic(self.dir / "bundle.json", msgspec.json.encode(spec), mode=0o600)
        write_atomic(self._bundle_file(), "".join(spec.roots).encode(), mode=0o600)
        log.info("trust bundle %d: %d root(s), trust domain %s, %d revoked host(s)",
                 spec.serial, len(spec.roots), spec.trust_domain, len(spec.revoked_nodes))
        if self.node in spec.revoked_nodes and self.node_cert is not None:
            self._say(f"this host ({self.node}) is revoked: its certificates are dropped")
            self.node_cert = None
            self.services.clear()

    def _pinned_roots(self, spec: TrustBundleSpec) -> tuple[str, ...] | None:
        """The roots a new bundle must be signed under: the ones held, or for a first bundle
        a root the join token names (or that the provisioned certificate chains to)."""
        if self.bundle is not None:
            return self.bundle.roots
        if self.local_ca is not None:
            # this host holds the CA: its own roots, never what the registry claims they are
            return tuple(self.local_ca.require().root_pems())
        if self.token:
            _, _, fp = tokens.parse(self.token)
            roots = tuple(r for r in spec.roots if certs.fingerprint(r).startswith(fp))
            if not roots:
                self._say("the registry's trust bundle has no root with the join token's "
                          f"fingerprint {fp}: not trusted")
                return None
            return roots
        if self.cfg.node_cert is not None:
            chain = _read_chain(self.cfg.node_cert)
            for root in spec.roots:
                with contextlib.suppress(MeshnodeError):
                    certs.verify_chain(chain, (root,), clock.now())
                    return (root,)
            self._say("the registry's trust bundle has no root that signed --node-cert")
            return None
        return None

    def _bundle_file(self) -> Path:
        assert self.bundle is not None
        return self.files / f"bundle-{self.bundle.serial}.pem"

    # -- the node certificate -----------------------------------------------------------------
    def _load(self) -> None:
        try:
            self.bundle = msgspec.json.decode((self.dir / "bundle.json").read_bytes(),
                                              type=TrustBundleSpec)
            write_atomic(self._bundle_file(), "".join(self.bundle.roots).encode(), mode=0o600)
        except FileNotFoundError:
            pass
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("pinned trust bundle unreadable (%s): taking the registry's again", exc)
        try:
            chain = _read_chain(self.dir / "node.pem")
            key_pem = (self.dir / "node.key").read_text()
        except FileNotFoundError:
            if self.cfg.node_cert is None or self.cfg.node_key is None:
                self._load_workloads()
                return
            try:
                chain = _read_chain(self.cfg.node_cert)
                key_pem = self.cfg.node_key.read_text()
            except OSError as exc:
                raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}",
                                  "check --node-cert and --node-key") from None
        named = node_id_any(chain)
        if not named.endswith(f"/node/{self.node}"):
            raise ConfigError(f"the node certificate names {named}, not this host "
                              f"({self.node})", "use this host's certificate, or --node NAME")
        held = self._check(chain, key_pem, named, trust=False)
        if held is not None and held.expired(clock.now()):
            self._say(f"node certificate {named} expired: not presented")
        elif held is not None:
            self.node_cert = self._install(held, "node")
            self._save_node(held)
        self._load_workloads()
        # an earlier agent's files: removed once a message no longer names them
        self._old_files = list(self.files.glob("*.pem"))

    def _load_workloads(self) -> None:
        """The workload certificates an earlier agent held (run directory, tmpfs): kept when
        still valid, so a restart serves on without a round trip to the CA."""
        try:
            index = msgspec.json.decode((self.files / "held.json").read_bytes(),
                                        type=dict[str, str])
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return
        for name, path in index.items():
            try:
                text = Path(path).read_text()
            except OSError:
                continue
            cut = text.find("-----BEGIN", text.rfind("-----END CERTIFICATE-----"))
            if cut < 0 or self.bundle is None:
                continue
            chain = certs.split_pem(text[:cut])
            held = self._check(chain, text[cut:], service_id(self.bundle.trust_domain, name))
            if held is not None and not held.expired(clock.now()):
                held.path = Path(path)
                self.services[name] = held

    def _save_node(self, held: Held) -> None:
        write_atomic(self.dir / "node.key", held.key_pem.encode(), mode=0o600)
        write_atomic(self.dir / "node.pem", "".join(held.chain).encode(), mode=0o600)

    async def _node(self, now: float) -> None:
        held = self.node_cert
        if held is not None and (held.expired(now) or not self._trusted(held, now)):
            self._say(f"node certificate {held.identity} no longer valid: dropped")
            self.node_cert = held = None
        if self.bundle is None:
            if self.local_ca is None and not self.token and self.cfg.node_cert is None:
                self._say("no mesh identity: mTLS is off on this host (start the agent with "
                          "--join-token from `meshnode ca token create`, or "
                          "--node-cert/--node-key)")
            return
        if self.node in self.bundle.revoked_nodes:
            self._say(f"this host ({self.node}) is revoked by the mesh CA: no mTLS")
            return
        identity = node_id(self.bundle.trust_domain, self.node)
        if held is not None and not held.due(now) and held.issuer_fp == self._issuer_fp():
            return
        if self.local_ca is not None:
            key = certs.make_key()
            csr = certs.make_csr(key, identity, self.node)
            chain = tuple(self.local_ca.issue_local(identity, csr))
            new = self._check(chain, certs.key_pem(key), identity)
            if new is not None:
                self._adopt_node(new)
            return
        answer = self._answer(identity)
        if answer is not None:
            self._adopt_node(answer)
            return
        if identity in self.pending:
            return
        if held is None and not self.token:
            self._say("no valid node certificate and no --join-token: mTLS is off on this "
                      "host (meshnode ca token create, on the CA's host)")
            return
        await self._ask(identity, join=held is None)

    def _adopt_node(self, held: Held) -> None:
        self.node_cert = self._install(held, "node")
        self._save_node(held)
        self.problem = ""
        log.info("node identity %s, valid until %s", held.identity,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(held.not_after)))

    # -- workload certificates ----------------------------------------------------------------
    async def _workloads(self, now: float) -> None:
        assert self.bundle is not None
        want = set(self.enrolled())
        for name in list(self.services):
            if name not in want:  # no longer enrolled here: nothing presents it
                del self.services[name]
        reported = self._reported()
        if want - reported:
            self.on_change()  # the host report lists enrolled services: publish it again
        for name in sorted(want):
            identity = service_id(self.bundle.trust_domain, name)
            held = self.services.get(name)
            if held is not None and not held.due(now) and held.issuer_fp == self._issuer_fp():
                continue
            answer = self._answer(identity)
            if answer is not None:
                self.services[name] = self._install(answer, name)
                log.info("workload identity %s, valid until %s", identity,
                         time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(answer.not_after)))
                continue
            # the CA checks this host's report: ask once it lists the service, or be refused
            if identity not in self.pending and name in reported:
                await self._ask(identity, join=False)
        for identity in list(self.pending):
            kind_name = identity.rsplit("/", 2)
            if kind_name[-2] == "svc" and kind_name[-1] not in want:
                del self.pending[identity]

    def _reported(self) -> set[str]:
        """The services this host's published report lists as enrolled (what the CA sees)."""
        return set(self.registry.hosts().get(self.node, {}).get("enrolled", ()))

    # -- requests and answers -----------------------------------------------------------------
    async def _ask(self, identity: str, join: bool) -> None:
        key = certs.make_key()
        csr_pem = certs.make_csr(key, identity, self.node)
        der = certs.csr_der(csr_pem)
        if join:
            token_id, secret, _ = tokens.parse(self.token)
            auth: dict[str, Any] = {"token_id": token_id, "token_mac": tokens.mac(secret, der)}
        else:
            assert self.node_cert is not None
            node_key = certs.load_key(self.node_cert.key_pem)
            auth = {"node_chain": self.node_cert.chain,
                    "node_signature": certs.sign(node_key, der)}
        name = request_name(self.node, identity)
        spec = CertificateRequestSpec(node=self.node, identity=identity, csr=csr_pem,
                                      created=clock.now(), **auth)
        await self.registry.apply([Resource("CertificateRequest", name, spec)])
        self.pending[identity] = Pending(name, key, certs.key_pem(key), csr_pem,
                                         hashlib.sha256(der).hexdigest(), time.monotonic())
        log.info("asked the mesh CA for %s%s", identity, " (joining)" if join else "")

    def _answer(self, identity: str) -> Held | None:
        """The CA's answer to our open request for `identity`, checked; None: none yet."""
        p = self.pending.get(identity)
        if p is None:
            return None
        res = self.registry.resources().get(("Certificate", p.name))
        if res is None:
            return None
        spec: CertificateSpec = res.spec
        if spec.csr_sha256 != p.csr_sha256:
            return None  # an answer to an earlier request
        if spec.error:
            if not p.refused_at:
                p.refused_at = time.monotonic()
                self._say(f"the mesh CA refused {identity}: {spec.error}")
            elif time.monotonic() - p.refused_at > RETRY_REFUSED:
                del self.pending[identity]  # asked again on the next pass
            return None
        held = self._check(spec.chain, p.key_pem, identity)
        del self.pending[identity]
        return held

    def _check(self, chain: Iterable[str], key_pem: str, identity: str,
               trust: bool = True) -> Held | None:
        """A certificate we may present: it names `identity`, matches the key, chains to a
        trusted root now (unless `trust` is False: loading before any bundle is known)."""
        chain = tuple(chain)
        try:
            leaf = certs.load_chain(chain)[0]
            if certs.identity_of(leaf) != identity:
                raise MeshnodeError(f"certificate names {certs.identity_of(leaf)}, "
                                    f"not {identity}")
            if not certs.key_matches(leaf, key_pem):
                raise MeshnodeError("certificate does not match its key")
            now = clock.now()
            if trust and self.bundle is not None:
                certs.verify_chain(chain, self.bundle.roots, now)
            issuer = chain[1] if len(chain) > 1 else chain[0]
            return Held(identity, chain, key_pem, certs.not_before(leaf), certs.not_after(leaf),
                        certs.fingerprint(issuer), self._root_of(chain, now))
        except MeshnodeError as exc:
            self._say(f"certificate for {identity} not usable: {exc}")
            return None

    def _root_of(self, chain: tuple[str, ...], now: float) -> str:
        for root in self.bundle.roots if self.bundle is not None else ():
            with contextlib.suppress(MeshnodeError):
                certs.verify_chain(chain, (root,), now)
                return certs.fp16(root)
        return ""

    def _trusted(self, held: Held, now: float) -> bool:
        if self.bundle is None:
            return True  # not known yet: kept until a bundle says otherwise
        try:
            certs.verify_chain(held.chain, self.bundle.roots, now)
            return True
        except MeshnodeError:
            return False

    def _issuer_fp(self) -> str:
        if self.bundle is None or not self.bundle.issuer_chain:
            return ""
        return certs.fingerprint(self.bundle.issuer_chain[0])

    def _install(self, held: Held, name: str) -> Held:
        """Write the workers' file (chain + key), under a name never used before."""
        digest = hashlib.sha256("".join(held.chain).encode()).hexdigest()[:16]
        path = self.files / f"{name}-{digest}.pem"
        write_atomic(path, ("".join(held.chain) + held.key_pem).encode(), mode=0o600)
        held.path = path
        return held

    def _expire(self, now: float) -> None:
        for name, h in list(self.services.items()):
            if h.expired(now):
                self._say(f"workload certificate {h.identity} expired: no longer presented")
                del self.services[name]
        if self.node_cert is not None and self.node_cert.expired(now):
            self._say(f"node certificate {self.node_cert.identity} expired: mTLS off")
            self.node_cert = None

    def _say(self, problem: str) -> None:
        """A problem, logged once (not once per second)."""
        if problem != self.problem:
            log.warning("%s", problem)
            self.problem = problem


def _held(h: Held, now: float) -> dict[str, Any]:
    return {"identity": h.identity, "expires_in": round(h.not_after - now), "root": h.root}


def node_id_any(chain: tuple[str, ...]) -> str:
    """The identity a provisioned node certificate names (checked against this node later)."""
    return certs.identity_of(certs.load_chain(chain)[0])


def _read_chain(path: Path) -> tuple[str, ...]:
    return certs.split_pem(path.read_text())


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

