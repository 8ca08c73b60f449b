"""The policy core: documents to typed resources, one-line errors, cross-resource checks, the
apply plan; and random documents never crash the validator."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.discovery.embedded import EmbeddedRegistry
from meshnode.errors import ConflictError, NotFoundError, RegistryError, UsageError
from meshnode.policy import resources, store
from meshnode.policy.document import load_text, parse, parse_all
from meshnode.policy.resources import KINDS, KindInfo, Reference, Resource, ServicePolicy
from meshnode.policy.store import Delete, plan


def doc(name: str = "web", **spec: Any) -> dict[str, Any]:
    return {"kind": "Service", "name": name, "spec": spec}


def error(text: str) -> str:
    with pytest.raises(UsageError) as exc:
        parse_all(load_text(text, "f.yaml"))
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_a_service_document_becomes_a_typed_resource() -> None:
    [r] = parse_all(load_text("""
kind: Service
name: web
spec:
  port: 80
  failMode: closed
  balancer: {algorithm: ring-hash}
  health: {kind: http, path: /ready, interval: 2, timeout: 0.5}
  timeouts: {connect: 0.25}
  maxConnections: 100
""", "web.yaml"))
    assert r.key == ("Service", "web") and isinstance(r.spec, ServicePolicy)
    assert r.spec.fail_closed and r.spec.balancer.algorithm == "ring-hash"
    assert r.spec.health.timeout == 0.5 and r.spec.timeouts.connect == 0.25
    assert r.spec.max_connections == 100
    # defaults are not written back: a document round-trips to what the operator wrote
    assert r.to_doc()["spec"]["health"] == {"kind": "http", "path": "/ready", "interval": 2.0,
                                             "timeout": 0.5}


@pytest.mark.parametrize(("text", "expected"), [
    ("kind: Service\nname: web\nspec: {prot: 80}", "f.yaml#1 (Service web): spec: object "
                                                   "contains unknown field prot"),
    ("kind: Service\nname: web\nspec: {port: '80'}", "spec.port: expected int | null, got str"),
    ("kind: Service\nname: web\nspec: {port: 70000}", "port 70000 is out of range"),
    ("kind: Service\nname: web\nspec: {health: {timeout: 9}}",
     "spec.health: use 0 < timeout <= interval"),
    ("kind: Service\nname: web\nspec: {balancer: {algorithm: fastest}}",
     "spec.balancer.algorithm: invalid enum value 'fastest'"),
    ("kind: Service\nname: web\nspec: {vip: 1.2.3}", "vip '1.2.3' is not an IPv4 address"),
    ("kind: Routes\nname: web", "unknown kind 'Routes'"),
    ("name: web", "missing kind"),
    ("kind: Service\nname: Web", "invalid Service name 'Web'"),
    ("kind: Service\nname: web\nspek: {}", "unknown top-level field 'spek'"),
    ("kind: Service\nname: web\nversion: -1", "version must be a whole number"),
    ("- 1", "a document must be a mapping"),
    ("kind: [", "f.yaml line 1: not valid YAML or JSON"),
    ("---\nkind: Service\nname: a\n---\nkind: Service\nname: a",
     "f.yaml#2: Service a is also defined in f.yaml#1"),
])
def test_bad_documents_get_one_line_naming_document_field_and_fix(text: str,
                                                                 expected: str) -> None:
    assert expected in error(text)


def test_json_and_lists_of_documents_are_read_too() -> None:
    rs = parse_all(load_text('[{"kind": "Service", "name": "a"}, '
                             '{"kind": "Service", "name": "b", "spec": {"port": 1}}]', "x.json"))
    assert [r.name for r in rs] == ["a", "b"]


@pytest.fixture
def route_kind() -> Iterator[None]:
    """A kind that names a Service's port (as the routing kinds will), registered for a test:
    the stores and the validator need no change for a new kind."""
    class Split(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel"):
        service: str
        port: int | None = None

    KINDS["Split"] = KindInfo(Split, "test kind",
                              lambda s: [Reference("Service", s.service, s.port)])
    try:
        yield
    finally:
        del KINDS["Split"]


def test_references_must_resolve(route_kind: None) -> None:
    web = parse(doc("web", port=80))
    split = parse({"kind": "Split", "name": "s", "spec": {"service": "web", "port": 80}})
    plan({}, [web, split])  # both in one apply: fine
    with pytest.raises(UsageError, match="Split s refers to Service web, which does not exist"):
        plan({}, [split])
    stored = {web.key: Resource("Service", "web", web.spec, 3)}
    bad_port = parse({"kind": "Split", "name": "s", "spec": {"service": "web", "port": 81}})
    with pytest.raises(UsageError, match="refers to port 81 of Service web, which declares"):
        plan(stored, [bad_port])
    stored[split.key] = Resource("Split", "s", split.spec, 4)
    with pytest.raises(UsageError, match="does not exist after this change"):
        plan(stored, [], [Delete("Service", "web")])


def test_the_plan_names_each_outcome_and_checks_versions() -> None:
    stored = {("Service", "a"): Resource("Service", "a", ServicePolicy(port=1), 5)}
    out = plan(stored, [parse(doc("a", port=1)), parse(doc("b"))])
    assert [(o.name, o.action) for o in out] == [("a", "unchanged"), ("b", "created")]
    with pytest.raises(ConflictError, match="changed since version 4 \\(now version 5\\)"):
        plan(stored, [parse({**doc("a", port=2), "version": 4})])
    with pytest.raises(NotFoundError):
        plan(stored, [], [Delete("Service", "zz")])


documents = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["kind", "name", "spec", "port", "health", "balancer", "vip",
                         "timeout", "interval", "algorithm", "failMode", "x"]) | st.text(
            max_size=6), inner, max_size=5),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["kind", "name", "spec", "version"]), documents)
       .map(lambda d: {**d, "kind": "Service"} if d.get("kind") is None else d))
def test_random_documents_give_a_resource_or_a_usage_error(d: dict[str, Any]) -> None:
    try:
        r = parse(d, "random")
    except UsageError as exc:
        assert str(exc) and "\n" not in exc.message
    else:
        assert r.kind in resources.KINDS


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_random_text_gives_documents_or_a_usage_error(text: str) -> None:
    with contextlib.suppress(UsageError):
        parse_all(load_text(text, "t"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | documents.map(lambda d: json.dumps(d).encode()))
def test_stored_values_decode_or_raise_a_registry_error(data: bytes) -> None:
    """What a store hands back (etcd values, registry files) may have been written by hand or
    by another version: a typed error, never a crash."""
    try:
        store.decode(data, 1)
    except RegistryError as exc:
        assert exc.hint


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_a_garbage_registry_journal_is_a_registry_error(tmp_path_factory: Any,
                                                         data: bytes) -> None:
    path = tmp_path_factory.mktemp("j") / "r.json"
    path.with_suffix(".journal").write_bytes(data)
    try:
        EmbeddedRegistry(path)
    except RegistryError as exc:
        assert "journal" in str(exc) and exc.hint
