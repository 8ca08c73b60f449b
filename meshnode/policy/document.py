"""Documents to resources: parse YAML or JSON text, validate each document against its kind,
and check a set of resources against itself and the store (duplicates, dangling references).

Every error is one line naming the document (source and position, kind and name when known),
the field path and the fix. The same functions run in the CLI (before anything is sent) and in
the agent (which never trusts its caller). Pure: no I/O but the text handed in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from meshnode.errors import UsageError
from meshnode.policy.resources import KINDS, Reference, Resource, check_name, kind_info

_TOP = {"kind", "name", "spec", "version"}
_PATH_RE = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def load_text(text: str, source: str) -> list[tuple[str, Any]]:
    """The documents in `text` (YAML, `---`-separated, or JSON: one object or a list), each
    with where it came from ("FILE#N")."""
    import yaml  # here: only the CLI reads text; the agent gets parsed documents (1.5 MB)

    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except Exception as exc:
        # Not only YAMLError: PyYAML's scalar constructors raise ValueError, KeyError or
        # AttributeError (`!!int x`, a date like 2001-02-30) and deep nesting RecursionError.
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = (getattr(exc, "problem", None)
                   or (str(exc).splitlines() or [type(exc).__name__])[0])
        raise UsageError(f"{source}{where}: not valid YAML or JSON: {_one_line(problem)}",
                         "fix the syntax (check indentation and quotes)") from None
    out: list[tuple[str, Any]] = []
    for doc in docs:
        for d in doc if isinstance(doc, list) else [doc]:
            out.append((f"{source}#{len(out) + 1}", d))
    return out


def parse(doc: Any, where: str = "document") -> Resource:
    """One document to a validated Resource, or a UsageError naming what and how to fix."""
    if not isinstance(doc, Mapping):
        raise UsageError(f"{where}: a document must be a mapping with kind, name and spec",
                         "write e.g. {kind: Service, name: web, spec: {port: 80}}")
    unknown = sorted(set(map(str, doc)) - _TOP)
    if unknown:
        raise UsageError(f"{where}: unknown top-level field {unknown[0]!r}",
                         "a document has only kind, name, spec and (optionally) version")
    kind = doc.get("kind")
    if not isinstance(kind, str) or not kind:
        raise UsageError(f"{where}: missing kind", "add kind: " + " | ".join(sorted(KINDS)))
    if kind not in KINDS:
        raise UsageError(f"{where}: unknown kind {kind!r}",
                         "use one of: " + ", ".join(sorted(KINDS)))
    name = doc.get("name")
    if not isinstance(name, str):
        raise UsageError(f"{where} ({kind}): missing name", "add name: NAME")
    try:
        check_name(name, kind)
    except UsageError as exc:  # the message shows the name quoted: the label must not
        raise UsageError(f"{where} ({kind}): {exc.message}", exc.hint) from None
    label = f"{where} ({kind} {name})"
    version = doc.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise UsageError(f"{label}: version must be a whole number",
                         "use the version `meshnode get` printed, or leave it out")
    spec = doc.get("spec") or {}
    try:
        value = msgspec.convert(spec, kind_info(kind).spec, strict=True)
    except msgspec.ValidationError as exc:
        raise UsageError(f"{label}: {_explain(exc)}",
                         f"see the {kind} fields: meshnode schema {kind}") from None
    return Resource(kind, name, value, version)


def _explain(exc: msgspec.ValidationError) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.health.timeout`" as
    "spec.health.timeout: expected int, got str"."""
    text = str(exc)
    m = _PATH_RE.search(text)
    path = "spec" + (m.group("path") if m else "")
    msg = text[: m.start()] if m else text
    msg = msg.replace("`", "")
    return _one_line(f"{path}: {msg[:1].lower()}{msg[1:]}")


def _one_line(text: str) -> str:
    """`text` with control characters escaped: an unknown field named "a\\nb" (or a
    syntax error quoting one) must not break the error's one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def parse_all(docs: Iterable[tuple[str, Any]]) -> list[Resource]:
    """Every document validated, then the set checked against itself (a name twice)."""
    out: list[Resource] = []
    seen: dict[tuple[str, str], str] = {}
    for where, doc in docs:
        r = parse(doc, where)
        if r.key in seen:
            raise UsageError(f"{where}: {r.kind} {r.name} is also defined in {seen[r.key]}",
                             "keep one document per resource")
        seen[r.key] = where
        out.append(r)
    return out


def check_references(changed: Iterable[Resource], existing: Mapping[tuple[str, str], Resource],
                     deleted: Iterable[tuple[str, str]] = ()) -> None:
    """Every reference made by a changed resource names a resource that will exist after the
    change (in the change itself or already stored) and that meets what the reference asks
    of it (a declared port, an HTTP-family port), and what stored resources refer to still
    exists and still meets it when the change deletes or narrows it. Costs the change (and,
    when it deletes a resource or narrows a Service, the stored resources of kinds that can
    refer), not the store."""
    gone = set(deleted)
    new = {r.key: r for r in changed}

    def after(key: tuple[str, str]) -> Resource | None:
        if key in new:
            return new[key]
        return None if key in gone else existing.get(key)

    # (a resource whose references to check, and which: None, all of them)
    checks: list[tuple[Resource, set[tuple[str, str]] | None]] = [
        (r, None) for r in new.values() if kind_info(r.kind).refers]
    # a stored resource that refers to what the change deletes, or to a Service it narrows
    # (a port or its HTTP ports gone), is checked again; its other references did not change
    redone = gone | {key for key, r in new.items() if key in existing
                     and _narrows(existing[key], r)}
    if redone:
        checks += [(r, redone) for key, r in existing.items() if key not in new
                   and key not in gone and kind_info(key[0]).refers]
    for r, only in checks:
        for ref in kind_info(r.kind).references(r.spec):
            if only is None or (ref.kind, ref.name) in only:
                _check_reference(r, ref, after((ref.kind, ref.name)),
                                 (ref.kind, ref.name) in gone)


def check_sets(changed: Iterable[Resource], existing: Mapping[tuple[str, str], Resource],
               deleted: Iterable[tuple[str, str]] = ()) -> None:
    """The checks across all resources of a kind (KindInfo.check_set: two Routes for one
    service, mirror loops), for each kind the change touches, on the set after it."""
    new = {r.key: r for r in changed}
    gone = set(deleted)
    for kind in {k for k, _ in (*new, *gone)}:
        check = kind_info(kind).check_set
        if check is None:
            continue
        after = {key: r for key, r in existing.items() if key[0] == kind and key not in gone}
        after.update((key, r) for key, r in new.items() if key[0] == kind)
        check([after[key] for key in sorted(after)])


def _ports(service: Resource) -> set[int | None]:
    return {service.spec.port, *(p.port for p in service.spec.ports)}


def _narrows(old: Resource, new: Resource) -> bool:
    """Whether replacing a Service `old` by `new` can break what refers to it."""
    return old.kind == "Service" and (bool(_ports(old) - _ports(new))
                                      or (old.spec.l7 and not new.spec.l7))


def _check_reference(r: Resource, ref: Reference, target: Resource | None,
                     deleting: bool) -> None:
    what = f"{r.kind} {r.name}"
    if target is None:
        raise UsageError(
            f"{what} refers to {ref.kind} {ref.name}, which does not exist"
            + (" after this change" if deleting else ""),
            f"create {ref.kind} {ref.name} first, or remove the reference from {what}")
    if ref.kind != "Service":
        return
    if ref.port is not None:
        ports = _ports(target)
        if ref.port not in ports:
            raise UsageError(
                f"{what} refers to port {ref.port} of Service {ref.name}, which "
                f"declares {sorted(p for p in ports if p is not None) or 'no port'}",
                f"declare the port in Service {ref.name} or fix the reference")
    if ref.l7 and not target.spec.l7:
        raise UsageError(
            f"{what} has rules with HTTP methods or paths, but Service {ref.name} has no "
            "HTTP port (every port is tcp): they could never be checked",
            f"set Service {ref.name}'s protocol (or a port's) to http, http2, grpc or auto, "
            f"or remove the methods and paths from {what}")
