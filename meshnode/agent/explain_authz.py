"""`meshnode explain`'s authorization step (agent/explain.py, step 4): what `AuthzTable.decide`
(policy/authz.py, the function the workers call) says for a captured connection on each
endpoint port it may land on; on an HTTP-family port, that its requests are authorized one
by one where they are routed and which policies have HTTP conditions; and, asked with
`--method`/`--path`, what that one request gets.

A tcp port is decided as the workers relay it, opaque (`decide(..., opaque=True)`): rules
with methods or paths cannot be checked on its bytes. An `auto` port is explained as HTTP,
plus what the connection gets when its client does not speak HTTP (relayed as tcp).

Handed the table, the caller's identity, the service, its port's protocol and the endpoint
ports; reads nothing else. Runs in the agent; imports only the policy package.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from meshnode.errors import UsageError
from meshnode.policy.authz import AuthzTable, Decision
from meshnode.policy.resources import check_method

__all__ = ["AuthzExplained", "explain_authz", "parse_request"]


@dataclass
class AuthzExplained:
    info: dict[str, Any]  # explain's "authorization" object
    steps: list[str] = field(default_factory=list)
    denied: Decision | None = None  # every port denies the connection: the first denial
    note: str = ""  # for the verdict, after what routing says


def parse_request(method: str | None, path: str | None) -> tuple[str, str] | None:
    """`--method`/`--path` as a request to explain (one given: GET, or /, for the other);
    None: explain the connection only."""
    if method is None and path is None:
        return None
    method, path = method or "GET", path or "/"
    if not isinstance(method, str) or not isinstance(path, str):
        raise UsageError("method and path must be strings", "pass e.g. --method GET --path /")
    try:
        check_method(method)
    except ValueError as exc:
        raise UsageError(str(exc), "pass e.g. --method GET") from None
    if not path.startswith("/") or not path.isprintable():
        raise UsageError(f"path {path!r} is not a request path",
                         "pass the path as the client sends it, e.g. --path /api/users "
                         "(gRPC: /package.Service/Method)")
    return method, path


def explain_authz(table: AuthzTable, caller: str, service: str, port: int, protocol: str,
                  ports: Sequence[int], request: tuple[str, str] | None) -> AuthzExplained:
    """`caller`: the SPIFFE ID ("" unknown); `port`/`protocol`: the port dialed and its
    protocol; `ports`: the endpoint ports the connection may land on (not empty)."""
    opaque = protocol == "tcp"
    conn = {p: table.decide(caller, service, p, opaque=opaque) for p in ports}
    out = AuthzExplained(_verdicts(conn))
    out.steps += _lines("authorization (decided where the destination is)",
                        "authorization, endpoint port", conn)
    first = next(iter(conn.values()))
    denied = [p for p, d in conn.items() if not d.allowed]
    if len(denied) == len(conn):
        out.denied = first
    elif denied:
        out.note = (f"; authorization denies it on endpoint port{'s' if len(denied) > 1 else ''}"
                    f" {', '.join(map(str, denied))}")
    elif dry := [d for d in conn.values() if d.would_deny]:
        out.note = f"; authorization would deny it once the dry run ends ({_by(dry[0])})"

    conditioned = table.http_policies(service)
    names = ", ".join(f"{n} ({a}{', dry run' if dry_run else ''})"
                      for n, a, dry_run in conditioned)
    out.info.update(protocol=protocol, http_policies=[
        {"name": n, "action": a, "dry_run": dry_run} for n, a, dry_run in conditioned])
    if opaque:
        if conditioned:
            out.steps.append(f"requests: port {port} is tcp, relayed as bytes: the methods and "
                             f"paths of {names} are never checked on it (an ALLOW rule with "
                             "them does not match, a DENY rule matches on its other conditions)")
    else:
        out.steps.append(
            f"requests: port {port} is {protocol}: each request is authorized where it is "
            "routed, by its method and path; " + (
                f"policies with HTTP conditions: {names}" if conditioned else
                "no policy has HTTP conditions: each is decided as the connection"))
        if protocol == "auto" and conditioned:
            tcp = table.decide(caller, service, ports[0], opaque=True)
            out.steps.append(f"if the client does not speak HTTP (auto relays it as tcp): "
                             f"{tcp.reason}")
    if request is not None:
        _request(out, table, caller, service, port, ports, opaque, request)
    return out


def _request(out: AuthzExplained, table: AuthzTable, caller: str, service: str, port: int,
             ports: Sequence[int], opaque: bool, request: tuple[str, str]) -> None:
    method, path = request
    info: dict[str, Any] = {"method": method, "path": path, "applies": not opaque}
    out.info["request"] = info
    if opaque:
        out.steps.append(f"request {method} {path}: port {port} is tcp: the proxy sees no "
                         "requests on it, only the connection is decided")
        return
    decisions = {p: table.decide(caller, service, p, method, path) for p in ports}
    info.update(_verdicts(decisions))
    out.steps += _lines(f"request {method} {path} (decided where it is routed)",
                        f"request {method} {path}, endpoint port", decisions)
    if out.denied is not None:
        return  # the connection is reset: no request is sent
    denied = [p for p, d in decisions.items() if not d.allowed]
    first = decisions[denied[0]] if denied else next(iter(decisions.values()))
    if len(denied) == len(decisions):
        out.note += f"; the request {method} {path} is denied ({_by(first)})"
    elif denied:
        out.note += (f"; the request {method} {path} is denied on endpoint "
                     f"port{'s' if len(denied) > 1 else ''} {', '.join(map(str, denied))}")
    elif dry := [d for d in decisions.values() if d.would_deny]:
        out.note += (f"; the request {method} {path} would be denied once the dry run ends "
                     f"({_by(dry[0])})")


def _verdicts(decisions: dict[int, Decision]) -> dict[str, Any]:
    verdicts = {d.verdict for d in decisions.values()}
    return {"applies": True, "ports": list(decisions),
            "verdict": verdicts.pop() if len(verdicts) == 1 else "mixed",
            "decisions": [{"port": port, "verdict": d.verdict, "allowed": d.allowed,
                           "would_deny": d.would_deny, "policy": d.policy or None,
                           "reason": d.reason} for port, d in decisions.items()]}


def _lines(alike: str, each: str, decisions: dict[int, Decision]) -> list[str]:
    """One line when every port decides alike, else one per port."""
    ports = list(decisions)
    first = decisions[ports[0]]
    if len({(d.verdict, d.policy) for d in decisions.values()}) == 1:
        same = f" (alike on port{'s' if len(ports) > 2 else ''} " \
               f"{', '.join(map(str, ports[1:]))})" if len(ports) > 1 else ""
        return [f"{alike}: {first.reason}{same}"]
    return [f"{each} {port}: {d.reason}" for port, d in decisions.items()]


def _by(d: Decision) -> str:
    return f"AuthorizationPolicy {d.policy}" if d.policy else "the mesh default DENY"
