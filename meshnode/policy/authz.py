"""Authorization: which callers may reach which services.

`AuthzTable` is the compiled form of every `AuthorizationPolicy` resource plus the `Mesh`
resource's `authorization` default; it travels to the workers whole (wire.Security) and
`decide` is the one function both the workers (where the destination is) and
`meshnode explain` call.

How a connection from caller C to port P of service S is decided (Istio's order):
  1. an enforced DENY policy targeting S (by name, or "*") that matches → denied, by it;
  2. else, when any enforced ALLOW policy targets S: allowed if one of them matches, else
     denied ("no rule allows C to S:P", naming the ALLOW policy);
  3. else the mesh default (`Mesh.spec.authorization.default`, ALLOW unless set to DENY).
A policy matches when any of its rules does (a policy without rules: every caller). A rule
matches when its `to.ports` lists P (none listed: any port) and its `from` matches C: a
listed service's identity `spiffe://<any trust domain>/svc/NAME` (TLS already checked the
trust domain), a listed identity pattern (exact, `spiffe://td/svc/*`: every ID under that
path, `*`: any authenticated service; a host identity must be named), or, with
`unauthenticated`, a caller with no identity
(plaintext from another host, C = ""); an empty `from`: any caller, authenticated or not.
P is the destination endpoint's port (where the connection arrives), not the VIP's.

Dry run: the same evaluation runs a second time with the dry-run policies added and the mesh
default as written (the enforced one is ALLOW while `Mesh.authorization.dryRun` is set). When
it denies what the enforced one allows, the connection goes through with `would_deny` set and
the policy that would deny it named: what turning the dry run off would change.

`decide` is on the data path (once per connection): the table is indexed by target service
when compiled, so a decision costs a dictionary lookup and the rules of the policies that
target the service (a few µs; tests/unit/test_authz.py prints the measure).

Pure: imports nothing of meshnode's but the policy resources.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import msgspec

from meshnode.policy.resources import (
    AUTHZ_TARGET_ALL,
    MESH_NAME,
    AuthorizationPolicySpec,
    MeshAuthorization,
    MeshSpec,
    Resource,
)

__all__ = ["AuthzTable", "Decision", "compile_authz", "service_of"]

KIND = "AuthorizationPolicy"
_SVC = "/svc/"
_SCHEME = "spiffe://"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool  # what happens to the connection
    would_deny: bool = False  # a dry-run policy (or a dry-run default) would have denied it
    policy: str = ""  # the deciding AuthorizationPolicy's name; "" is the mesh default
    reason: str = ""  # one line, for the log, the access log and explain

    @property
    def verdict(self) -> str:
        """"allowed", "denied" or "would deny" (allowed, denied once the dry run ends)."""
        if not self.allowed:
            return "denied"
        return "would deny" if self.would_deny else "allowed"


class _Rule(msgspec.Struct, frozen=True, array_like=True):
    """One rule, ready to match: its `from` split by how each entry matches."""

    any_caller: bool  # empty `from`
    unauthenticated: bool
    any_authenticated: bool  # the identity pattern "*"
    services: frozenset[str]
    identities: frozenset[str]  # exact SPIFFE IDs
    prefixes: tuple[str, ...]  # "spiffe://td/svc/" for the pattern spiffe://td/svc/*
    ports: frozenset[int]  # empty: any

    def matches(self, src: str, svc: str | None, port: int) -> bool:
        if self.ports and port not in self.ports:
            return False
        if self.any_caller:
            return True
        if not src:
            return self.unauthenticated
        if src in self.identities:
            return True
        # "*": any authenticated *workload*; a host's own identity (what an unenrolled
        # process's connection presents) is not one, and must be named to be admitted
        if self.any_authenticated and svc is not None:
            return True
        if svc is not None and svc in self.services:
            return True
        return any(src.startswith(p) for p in self.prefixes)


class _Policy(msgspec.Struct, frozen=True, array_like=True):
    name: str
    dry_run: bool
    rules: tuple[_Rule, ...]  # a policy without rules: one that matches every caller
    ruleless: bool = False

    def match(self, src: str, svc: str | None, port: int) -> int:
        """The number (from 1) of the first rule that matches; 0: none."""
        for i, r in enumerate(self.rules, 1):
            if r.matches(src, svc, port):
                return i
        return 0


class _View(msgspec.Struct, frozen=True, array_like=True):
    """One evaluation: per target service, the DENY and the ALLOW policies that apply to it
    ("*" ones included); `*_any`: those of a service no policy names."""

    default_allow: bool = True
    dry_default: bool = False  # the default is the Mesh's dry-run one (for the reason)
    deny: dict[str, tuple[_Policy, ...]] = {}
    deny_any: tuple[_Policy, ...] = ()
    allow: dict[str, tuple[_Policy, ...]] = {}
    allow_any: tuple[_Policy, ...] = ()

    def evaluate(self, src: str, svc: str | None, dst: str, port: int) -> _Outcome:
        """(allowed, how, the policies that decided, the matching rule's number)."""
        for p in self.deny.get(dst, self.deny_any):
            if rule := p.match(src, svc, port):
                return False, _BY_DENY, (p,), rule
        allow = self.allow.get(dst, self.allow_any)
        if allow:
            for p in allow:
                if rule := p.match(src, svc, port):
                    return True, _BY_ALLOW, (p,), rule
            return False, _BY_NO_ALLOW, allow, 0
        return self.default_allow, _BY_DEFAULT, (), 0


_BY_DENY, _BY_ALLOW, _BY_NO_ALLOW, _BY_DEFAULT = range(4)  # how a view decided
_Outcome = tuple[bool, int, tuple[_Policy, ...], int]


_MEMO_SIZE = 4096  # decisions a table remembers (then it forgets them all and starts over)


class AuthzTable(msgspec.Struct, frozen=True, dict=True):
    """Compiled authorization, as the workers evaluate it. `shadow`: the evaluation with the
    dry-run policies and default (None: nothing is in dry run).

    A table remembers its last decisions (not encoded: `dict=True` gives it a __dict__ of
    its own): callers are few (identities TLS verified, the local services) and connections
    between the same ones many, so most connections cost one lookup."""

    enforced: _View = msgspec.field(default_factory=_View)
    shadow: _View | None = None
    policies: int = 0  # AuthorizationPolicy resources compiled in (enforced and dry run)

    def decide(self, src_identity: str, dst_service: str, port: int) -> Decision:
        """`src_identity`: the caller's SPIFFE ID ("" when unauthenticated: plaintext from
        another host); `dst_service`/`port`: the destination service and the endpoint port."""
        memo: dict[tuple[str, str, int], Decision] = self.__dict__.setdefault("_memo", {})
        key = (src_identity, dst_service, port)
        decision = memo.get(key)
        if decision is None:
            if len(memo) >= _MEMO_SIZE:
                memo.clear()
            decision = memo[key] = self.evaluate(src_identity, dst_service, port)
        return decision

    def evaluate(self, src_identity: str, dst_service: str, port: int) -> Decision:
        """`decide` without the memory (what the benchmark measures as the cold cost)."""
        svc = service_of(src_identity)
        out = self.enforced.evaluate(src_identity, svc, dst_service, port)
        if out[0] and self.shadow is not None:
            dry = self.shadow.evaluate(src_identity, svc, dst_service, port)
            if not dry[0]:
                first = _why(self.enforced, out, src_identity, dst_service, port)
                then = _why(self.shadow, dry, src_identity, dst_service, port)
                return Decision(True, True, _named(dry, prefer_dry=True),
                                f"{first}; would be {then}")
        return Decision(out[0], False, _named(out),
                        _why(self.enforced, out, src_identity, dst_service, port))


def _named(out: _Outcome, prefer_dry: bool = False) -> str:
    """The deciding policy's name ("": the mesh default); when several ALLOW policies failed
    to match, the first, or the first dry-run one (what the dry run adds)."""
    by = out[2]
    if not by:
        return ""
    if prefer_dry:
        for p in by:
            if p.dry_run:
                return p.name
    return by[0].name


def _why(view: _View, out: _Outcome, src: str, dst: str, port: int) -> str:
    """The one-line reason (the dry-run case prefixes "would be " to it)."""
    _, how, by, rule = out
    caller = src or "an unauthenticated caller"
    target = f"{dst}:{port}"
    if how == _BY_DEFAULT:
        default = "ALLOW" if view.default_allow else "DENY"
        verb = "allowed" if view.default_allow else "denied"
        dry = " (dry run)" if view.dry_default else ""
        return (f"{verb} by the mesh default {default}{dry}: no AuthorizationPolicy decides "
                f"{caller} to {target}")
    name = _named(out, prefer_dry=True)
    dry = "dry run: " if any(p.dry_run for p in by) else ""
    if how in (_BY_DENY, _BY_ALLOW):
        verb = "denied" if how == _BY_DENY else "allowed"
        which = "it has no rules: it matches every caller, here" if by[0].ruleless else \
            f"rule {rule} matches"
        return f"{verb} by AuthorizationPolicy {name} ({dry}{which} {caller} to {target})"
    others = [p.name for p in by if p.name != name]
    of = f" of {', '.join([name, *others])}" if others else ""
    return f"denied by AuthorizationPolicy {name} ({dry}no rule{of} allows {caller} to {target})"


def service_of(src_identity: str) -> str | None:
    """NAME of a service identity spiffe://<trust domain>/svc/NAME (None: not one)."""
    if not src_identity.startswith(_SCHEME):
        return None
    i = src_identity.find("/", len(_SCHEME))
    if i < 0 or not src_identity.startswith(_SVC, i):
        return None
    name = src_identity[i + len(_SVC):]
    return name if name and "/" not in name else None


# -- compiling --------------------------------------------------------------------------------
def _rule(spec: AuthorizationPolicySpec, index: int) -> _Rule:
    r = spec.rules[index]
    src = r.from_
    exact = frozenset(i for i in src.identities if not i.endswith("/*") and i != "*")
    prefixes = tuple(sorted(i[:-1] for i in src.identities if i.endswith("/*")))
    return _Rule(any_caller=src.any, unauthenticated=src.unauthenticated,
                 any_authenticated="*" in src.identities, services=frozenset(src.services),
                 identities=exact, prefixes=prefixes, ports=frozenset(r.to.ports))


_EVERY_CALLER = _Rule(True, True, True, frozenset(), frozenset(), (), frozenset())


def _policy(name: str, spec: AuthorizationPolicySpec) -> _Policy:
    rules = tuple(_rule(spec, i) for i in range(len(spec.rules)))
    return _Policy(name, spec.dry_run, rules or (_EVERY_CALLER,), not rules)


def _view(policies: Iterable[tuple[str, AuthorizationPolicySpec]], default_allow: bool,
          dry_default: bool) -> _View:
    by_target: dict[str, dict[str, list[_Policy]]] = {"DENY": {}, "ALLOW": {}}
    for name, spec in sorted(policies, key=lambda p: p[0]):
        by_target[spec.action].setdefault(spec.target, []).append(_policy(name, spec))

    def index(action: str) -> tuple[dict[str, tuple[_Policy, ...]], tuple[_Policy, ...]]:
        targets = by_target[action]
        every = tuple(targets.get(AUTHZ_TARGET_ALL, ()))
        named = {t: tuple(sorted([*ps, *every], key=lambda p: p.name))
                 for t, ps in targets.items() if t != AUTHZ_TARGET_ALL}
        return named, every

    deny, deny_any = index("DENY")
    allow, allow_any = index("ALLOW")
    return _View(default_allow, dry_default, deny, deny_any, allow, allow_any)


def compile_authz(resources: Mapping[tuple[str, str], Resource]) -> AuthzTable:
    """Every AuthorizationPolicy and the Mesh default, indexed for `decide`. Equal inputs give
    equal tables (the agent sends the workers a table only when it changed)."""
    mesh_res = resources.get(("Mesh", MESH_NAME))
    mesh: MeshAuthorization = (mesh_res.spec if mesh_res is not None else MeshSpec()
                               ).authorization
    policies = [(r.name, r.spec) for (kind, _), r in resources.items() if kind == KIND]
    default_allow = mesh.default == "ALLOW"
    dry_default = mesh.dry_run and not default_allow
    enforced = _view([p for p in policies if not p[1].dry_run], default_allow or dry_default,
                     False)
    shadow = None
    if dry_default or any(spec.dry_run for _, spec in policies):
        shadow = _view(policies, default_allow, dry_default)
    return AuthzTable(enforced, shadow, len(policies))
