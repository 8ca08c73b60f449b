"""Authorization: which callers may reach which services, per connection and per request.

`AuthzTable` is the compiled form of every `AuthorizationPolicy` resource plus the `Mesh`
resource's `authorization` default; it travels to the workers whole (wire.Security) and
`decide` is the one function the workers (per connection, and per request where requests
are routed) and `meshnode explain` call.

How caller C's connection to port P of service S, or its request (method M, path) on it, is
decided (Istio's order):
  1. an enforced DENY policy targeting S (by name, or "*") that matches → denied, by it;
  2. else, when any enforced ALLOW policy targets S: allowed if one of them matches, else
     denied ("no rule allows C to S:P", naming the ALLOW policy);
  3. else the mesh default (`Mesh.spec.authorization.default`, ALLOW unless set to DENY).
A policy matches when any of its rules does (a policy without rules: every caller). A rule
matches when its `to.ports` lists P (none listed: any port), its `from` matches C, and its
HTTP conditions hold. `from` matches: a listed service's identity `spiffe://<any trust
domain>/svc/NAME` (TLS already checked the trust domain), a listed identity pattern (exact,
`spiffe://td/svc/*`: every ID under that path, `*`: any authenticated service; a host
identity must be named), or, with `unauthenticated`, a caller with no identity (plaintext
from another host, C = ""); an empty `from`: any caller, authenticated or not.
P is the destination endpoint's port (where the connection arrives), not the VIP's.

HTTP conditions (`to.methods`, `to.paths`; none: the rule is about connections only) depend
on what is decided:
  - a request (`method` given): M is one of the methods (none listed: any) and the path,
    normalized (resources.normalize_path: no query, escapes and dot segments resolved, so
    "/a/../admin" is "/admin"), is one of the paths: exact, "/a/*" (/a and below, whole
    segments: not /ab), "*" (any); gRPC calls are paths "/package.Service/Method";
  - a connection before its requests (`method` None: an endpoint chosen for a connection, the
    inbound mTLS listener): the requests are not known yet and are each decided where they are
    routed, so an ALLOW rule's HTTP conditions count as holding (it lets the connection in)
    and a DENY rule with HTTP conditions does not match (it denies requests, not connections);
  - an opaque connection (`opaque=True`: its bytes are relayed and no request of it is ever
    decided: a tcp port, an `auto` port whose client did not speak HTTP): the conditions
    cannot be checked, so, as Istio does for TCP, an ALLOW rule with them does not match and a
    DENY rule with them matches on its other conditions. Without `opaque`, an ALLOW rule with
    paths would let a tcp connection through unchecked.
A request to a service no policy with HTTP conditions applies to gets its connection's
decision (the same Decision: the method and the path play no part, its reason names none).

Dry run: the same evaluation runs a second time with the dry-run policies added and the mesh
default as written (the enforced one is ALLOW while `Mesh.authorization.dryRun` is set). When
it denies what the enforced one allows, the connection (or the request) goes through with
`would_deny` set and the policy that would deny it named: what turning the dry run off would
change.

Cost: `decide` is on the data path, once per connection and once per request. The table is
indexed by target service when compiled and remembers its connection decisions, so a
connection costs a dictionary lookup, plus, the first time, the rules of the policies that
target the service (a few µs). A request to a service without HTTP conditions is the same
lookup; one with them is evaluated: its path normalized (a few string scans when there is
nothing to rewrite), the rules' methods a set, their paths a set of exact paths and a tuple of
prefixes for one `str.startswith`; what is left to check for a (caller, service, port) is
planned once, and the reason is a template the method and path fill. Measured with timeit
(tests/unit/test_authz_l7.py::test_request_decision_cost prints it; 50 policies, 4 with paths
on the destination, one in dry run): 0.18 µs a request to a service without HTTP conditions,
as a remembered connection; 1.4-1.7 µs one with them; 2.7 µs when its path needs rewriting.

Pure: imports nothing of meshnode's but the policy resources.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

import msgspec

from meshnode.policy.resources import (
    AUTHZ_TARGET_ALL,
    MESH_NAME,
    AuthorizationPolicySpec,
    MeshAuthorization,
    MeshSpec,
    Resource,
    normalize_path,
)

__all__ = ["AuthzTable", "Decision", "compile_authz", "service_of"]

KIND = "AuthorizationPolicy"
_SVC = "/svc/"
_SCHEME = "spiffe://"
_SHOWN = 200  # characters of a request's method or path a reason shows
_HOLE = "\x00request\x00"  # where a request's method and path go in a reason's template


class Decision(NamedTuple):
    """A NamedTuple, not a dataclass: one is made per request, and it costs half as much."""

    allowed: bool  # what happens to the connection (or the request)
    would_deny: bool = False  # a dry-run policy (or a dry-run default) would have denied it
    policy: str = ""  # the deciding AuthorizationPolicy's name; "" is the mesh default
    reason: str = ""  # one line, for the log, the access log and explain

    @property
    def verdict(self) -> str:
        """"allowed", "denied" or "would deny" (allowed, denied once the dry run ends)."""
        if not self.allowed:
            return "denied"
        return "would deny" if self.would_deny else "allowed"


# What is decided (the module docstring): a connection whose requests are decided later, a
# connection relayed as bytes, a request.
_CONNECTION, _OPAQUE, _REQUEST = range(3)


class _Rule(msgspec.Struct, frozen=True, array_like=True):
    """One rule, ready to match: its `from` split by how each entry matches, its paths into
    exact ones and prefixes."""

    any_caller: bool  # empty `from`
    unauthenticated: bool
    any_authenticated: bool  # the identity pattern "*"
    services: frozenset[str]
    identities: frozenset[str]  # exact SPIFFE IDs
    prefixes: tuple[str, ...]  # "spiffe://td/svc/" for the pattern spiffe://td/svc/*
    ports: frozenset[int]  # empty: any
    http: bool = False  # it has HTTP conditions (the fields below); else any request
    methods: frozenset[str] = frozenset()  # empty: any
    any_path: bool = True
    paths: frozenset[str] = frozenset()  # exact paths, and "/a" of each prefix "/a/*"
    path_prefixes: tuple[str, ...] = ()  # "/a/" of each prefix "/a/*"

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
    http: bool = False  # some rule has HTTP conditions

    def match(self, src: str, svc: str | None, port: int, deny: bool = False,
              level: int = _CONNECTION) -> int:
        """The number (from 1) of the first rule that matches a connection (`level`
        _CONNECTION or _OPAQUE; requests are decided by a _Plan); 0: none."""
        for i, r in enumerate(self.rules, 1):
            if r.http:
                if level == _CONNECTION:
                    if deny:
                        continue  # a DENY on requests is enforced on each of them
                elif not deny:
                    continue  # opaque: an ALLOW on requests cannot allow bytes
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

    def evaluate(self, src: str, svc: str | None, dst: str, port: int,
                 level: int = _CONNECTION) -> _Outcome:
        """A connection's (allowed, how, the policies that decided, the matching rule's
        number)."""
        for p in self.deny.get(dst, self.deny_any):
            if rule := p.match(src, svc, port, True, level):
                return False, _BY_DENY, (p,), rule
        allow = self.allow.get(dst, self.allow_any)
        if allow:
            for p in allow:
                if rule := p.match(src, svc, port, False, level):
                    return True, _BY_ALLOW, (p,), rule
            return False, _BY_NO_ALLOW, allow, 0
        return self.default_allow, _BY_DEFAULT, (), 0

    def choices(self, src: str, svc: str | None, dst: str, port: int) -> _Choices:
        """For requests: the rules whose `from` and ports match, in the order `evaluate`
        tries them (DENY first), each with the outcome it gives when it takes the request,
        and last the outcome when none does. A rule without HTTP conditions takes every
        request: nothing after it is listed."""
        rules: list[_Rule] = []
        outcomes: list[_Outcome] = []
        allow = self.allow.get(dst, self.allow_any)
        for allowed, how, policies in ((False, _BY_DENY, self.deny.get(dst, self.deny_any)),
                                       (True, _BY_ALLOW, allow)):
            for p in policies:
                for i, r in enumerate(p.rules, 1):
                    if r.matches(src, svc, port):
                        rules.append(r)
                        outcomes.append((allowed, how, (p,), i))
                        if not r.http:
                            return _Choices(tuple(rules), (*outcomes, outcomes[-1]))
        last = (False, _BY_NO_ALLOW, allow, 0) if allow else \
            (self.default_allow, _BY_DEFAULT, (), 0)
        return _Choices(tuple(rules), (*outcomes, last))


class _Choices(NamedTuple):
    rules: tuple[_Rule, ...]
    outcomes: tuple[_Outcome, ...]  # one per rule, then the one when no rule takes it

    def pick(self, method: str, path: str) -> int:
        """The index of the outcome of a request (`path` normalized): the first rule whose
        HTTP conditions it meets (inline: this runs per request)."""
        i = 0
        for r in self.rules:
            if not r.http or ((not r.methods or method in r.methods) and (
                    r.any_path or path in r.paths or path.startswith(r.path_prefixes))):
                return i
            i += 1
        return i


_BY_DENY, _BY_ALLOW, _BY_NO_ALLOW, _BY_DEFAULT = range(4)  # how a view decided
_Outcome = tuple[bool, int, tuple[_Policy, ...], int]


_MEMO_SIZE = 4096  # decisions a table remembers (then it forgets them all and starts over)


class AuthzTable(msgspec.Struct, frozen=True, dict=True):
    """Compiled authorization, as the workers evaluate it. `shadow`: the evaluation with the
    dry-run policies and default (None: nothing is in dry run). `http_targets`: the services
    a policy with HTTP conditions targets by name (`http_all`: a "*" one has some): requests
    to the others are decided as their connections are.

    A table remembers its last connection decisions (not encoded: `dict=True` gives it a
    __dict__ of its own): callers are few (identities TLS verified, the local services) and
    connections between the same ones many, so most connections cost one lookup."""

    enforced: _View = msgspec.field(default_factory=_View)
    shadow: _View | None = None
    policies: int = 0  # AuthorizationPolicy resources compiled in (enforced and dry run)
    http_targets: frozenset[str] = frozenset()
    http_all: bool = False

    def decide(self, src_identity: str, dst_service: str, port: int,
               method: str | None = None, path: str | None = None, *,
               opaque: bool = False) -> Decision:
        """`src_identity`: the caller's SPIFFE ID ("" when unauthenticated: plaintext from
        another host); `dst_service`/`port`: the destination service and the endpoint port;
        `method`/`path`: a request's (None: the connection, before its requests);
        `opaque`: a connection relayed as bytes, none of its requests decided (see the
        module docstring). Never raises, whatever the method and path."""
        if (method is not None or opaque) and (self.http_all
                                               or dst_service in self.http_targets):
            return self._http(src_identity, dst_service, port, method, path)
        memo: dict[tuple[str, str, int], Decision] = self.__dict__.setdefault("_memo", {})
        key = (src_identity, dst_service, port)
        decision = memo.get(key)
        if decision is None:
            if len(memo) >= _MEMO_SIZE:
                memo.clear()
            decision = memo[key] = self._connection(src_identity, dst_service, port,
                                                    _CONNECTION)
        return decision

    def _http(self, src: str, dst: str, port: int, method: str | None,
              path: str | None) -> Decision:
        """`decide` for a request (its plan remembered) or an opaque connection (remembered)
        to a service with HTTP conditions."""
        key = (src, dst, port)
        if method is None:
            memo: dict[tuple[str, str, int], Decision] = self.__dict__.setdefault("_opaque", {})
            decision = memo.get(key)
            if decision is None:
                if len(memo) >= _MEMO_SIZE:
                    memo.clear()
                decision = memo[key] = self._connection(src, dst, port, _OPAQUE)
            return decision
        plans: dict[tuple[str, str, int], _Plan] = self.__dict__.setdefault("_plans", {})
        plan = plans.get(key)
        if plan is None:
            if len(plans) >= _MEMO_SIZE:
                plans.clear()
            plan = plans[key] = self._plan(src, dst, port)
        return plan.decide(method, "" if path is None else path)

    def evaluate(self, src_identity: str, dst_service: str, port: int,
                 method: str | None = None, path: str | None = None, *,
                 opaque: bool = False) -> Decision:
        """`decide` without the memory (what the benchmark measures as the cold cost)."""
        level = _CONNECTION
        if (method is not None or opaque) and (self.http_all
                                               or dst_service in self.http_targets):
            if method is not None:
                return self._plan(src_identity, dst_service, port).decide(
                    method, "" if path is None else path)
            level = _OPAQUE
        return self._connection(src_identity, dst_service, port, level)

    def http_policies(self, dst_service: str) -> list[tuple[str, str, bool]]:
        """(name, "ALLOW" or "DENY", dry run) of the policies with HTTP conditions that apply
        to `dst_service`'s requests, in the order they are tried (for explain)."""
        view = self.shadow or self.enforced  # the dry-run view holds every policy
        out = [(p.name, "DENY", p.dry_run) for p in view.deny.get(dst_service, view.deny_any)
               if p.http]
        return out + [(p.name, "ALLOW", p.dry_run)
                      for p in view.allow.get(dst_service, view.allow_any) if p.http]

    def _connection(self, src: str, dst: str, port: int, level: int) -> Decision:
        svc = service_of(src)
        out = self.enforced.evaluate(src, svc, dst, port, level)
        ask = _Ask(src, dst, port, level)
        if out[0] and self.shadow is not None:
            dry = self.shadow.evaluate(src, svc, dst, port, level)
            if not dry[0]:
                return _dry_decision(self.enforced, out, self.shadow, dry, ask)
        return Decision(out[0], False, _named(out), _why(self.enforced, out, ask))

    def _plan(self, src: str, dst: str, port: int) -> _Plan:
        svc = service_of(src)
        shadow = self.shadow
        return _Plan(_Ask(src, dst, port, _REQUEST), self.enforced,
                     self.enforced.choices(src, svc, dst, port), shadow,
                     None if shadow is None else shadow.choices(src, svc, dst, port))


def _dry_decision(view: _View, out: _Outcome, shadow: _View, dry: _Outcome,
                  ask: _Ask) -> Decision:
    """Allowed by `out`, denied by the dry run's `dry`."""
    return Decision(True, True, _named(dry, prefer_dry=True),
                    f"{_why(view, out, ask)}; would be {_why(shadow, dry, ask)}")


class _Plan:
    """What is left to decide for the requests of one (caller, service, port), made once:
    per evaluation the rules still in play (`_Choices`), and per pair of outcomes the
    decision with its reason as a template the request's method and path fill. A request
    then costs its path normalized, the rules' methods and paths checked, and a join."""

    __slots__ = ("ask", "dry", "enforced", "made", "shadow", "view")

    def __init__(self, ask: _Ask, view: _View, enforced: _Choices, shadow: _View | None,
                 dry: _Choices | None) -> None:
        self.ask = ask
        self.view = view  # the views, not the table: the table holds its plans
        self.enforced = enforced
        self.shadow = shadow
        self.dry = dry
        # (enforced outcome, dry-run outcome or -1) -> allowed, would_deny, policy, and the
        # reason split at _HOLE
        self.made: dict[tuple[int, int], tuple[bool, bool, str, list[str]]] = {}

    def decide(self, method: str, raw_path: str) -> Decision:
        path = normalize_path(raw_path)
        i = self.enforced.pick(method, path)
        j = -1
        if self.dry is not None and self.enforced.outcomes[i][0]:
            j = self.dry.pick(method, path)
        made = self.made.get((i, j))
        if made is None:
            made = self.made[i, j] = self._make(i, j)
        allowed, would_deny, policy, parts = made
        shown = _shown(raw_path)
        if path != raw_path:
            shown += f" (normalized {_shown(path)})"
        return Decision(allowed, would_deny, policy, f"{_shown(method)} {shown}".join(parts))

    def _make(self, i: int, j: int) -> tuple[bool, bool, str, list[str]]:
        view, out = self.view, self.enforced.outcomes[i]
        if j >= 0 and self.dry is not None and self.shadow is not None \
                and not self.dry.outcomes[j][0]:
            d = _dry_decision(view, out, self.shadow, self.dry.outcomes[j], self.ask)
        else:
            d = Decision(out[0], False, _named(out), _why(view, out, self.ask))
        return d.allowed, d.would_deny, d.policy, d.reason.split(_HOLE)


class _Ask(NamedTuple):
    """What was asked, for the reason (a request's method and path: _HOLE)."""

    src: str
    dst: str
    port: int
    level: int

    @property
    def target(self) -> str:
        on = f"{self.dst}:{self.port}"
        if self.level == _OPAQUE:
            return f"{on} as opaque TCP (no request to check methods or paths on)"
        return on if self.level == _CONNECTION else f"{_HOLE} on {on}"


def _shown(text: str) -> str:
    """`text` on one line: control characters escaped, cut at _SHOWN characters; '""' when
    empty."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(text) > _SHOWN:
        text = text[:_SHOWN] + "…"
    return text or '""'


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


def _why(view: _View, out: _Outcome, ask: _Ask) -> str:
    """The one-line reason (the dry-run case prefixes "would be " to it)."""
    _, how, by, rule = out
    caller = ask.src or "an unauthenticated caller"
    target = ask.target
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
        later = "; its methods and paths are checked per request" \
            if ask.level == _CONNECTION and by[0].rules[rule - 1].http else ""
        return f"{verb} by AuthorizationPolicy {name} ({dry}{which} {caller} to {target}{later})"
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
    src, to = r.from_, r.to
    exact = frozenset(i for i in src.identities if not i.endswith("/*") and i != "*")
    prefixes = tuple(sorted(i[:-1] for i in src.identities if i.endswith("/*")))
    # "*" and "/*" take every (normalized) path: no path condition
    any_path = not to.paths or "*" in to.paths or "/*" in to.paths
    paths: set[str] = set()
    path_prefixes: set[str] = set()
    if not any_path:
        for p in to.paths:
            if p.endswith("/*"):
                paths.add(p[:-2])
                path_prefixes.add(p[:-1])
            else:
                paths.add(p)
    methods = frozenset(to.methods)
    return _Rule(any_caller=src.any, unauthenticated=src.unauthenticated,
                 any_authenticated="*" in src.identities, services=frozenset(src.services),
                 identities=exact, prefixes=prefixes, ports=frozenset(to.ports),
                 http=bool(methods) or not any_path, methods=methods, any_path=any_path,
                 paths=frozenset(paths), path_prefixes=tuple(sorted(path_prefixes)))


_EVERY_CALLER = _Rule(True, True, True, frozenset(), frozenset(), (), frozenset())


def _policy(name: str, spec: AuthorizationPolicySpec) -> _Policy:
    rules = tuple(_rule(spec, i) for i in range(len(spec.rules)))
    return _Policy(name, spec.dry_run, rules or (_EVERY_CALLER,), not rules,
                   any(r.http for r in rules))
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
    views = (enforced,) if shadow is None else (enforced, shadow)
    http_all = any(p.http for v in views for p in (*v.deny_any, *v.allow_any))
    http_targets = frozenset() if http_all else frozenset(
        t for v in views for named in (v.deny, v.allow) for t, ps in named.items()
        if any(p.http for p in ps))
    return AuthzTable(enforced, shadow, len(policies), http_targets, http_all)
