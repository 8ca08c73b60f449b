"""Fuzzing every decoder a stranger or a broken peer can reach (issue 13, item 8): the wire's
two channels, policy documents, stored resources, the embedded registry's snapshot and journal,
the ledger, the enrollments file, state files, the etcd mirror's cache and key values, the DNS
zone and the admin port's WSGI app.

Each surface gets two kinds of input: structured-but-wrong values from hypothesis strategies
(valid JSON of the wrong shape, plausible messages with fields of the wrong type, huge numbers,
Infinity, deep nesting, unicode and control characters), and a bounded mutation fuzzer
(`mutations`: a fixed seed and count; random bytes, and byte-level edits and splices of a
corpus of valid inputs, so the fuzz reaches past the first parse). The property is the same
everywhere: a valid value or the surface's own typed error, never another exception, and never
a hang (SLOW per input). A found bug stays below as a regression example.

Deterministic: fixed seeds, hypothesis derandomized without a database. `pytest -s` prints one
line per surface: `fuzz SURFACE: N inputs, 0 crashes (outcomes)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from dnslib import (
    EDNS0,
    QTYPE,
    RCODE,
    RR,
    A,
    DNSBuffer,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from meshnode.agent.enrollment import Enrollment, EnrollmentManager
from meshnode.discovery import catalog, embedded
from meshnode.discovery.catalog import Catalog
from meshnode.discovery.dns_zone import (
    TCP_LIMIT,
    UDP_PLAIN_LIMIT,
    Forward,
    MeshZone,
    Reply,
    SrvTarget,
    check_suffix,
    fit,
    node_label,
    udp_limit,
)
from meshnode.discovery.embedded import EmbeddedRegistry
from meshnode.discovery.etcd_keys import KeyLayout, decode_endpoint, encode_endpoint
from meshnode.discovery.etcd_mirror import Mirror, write_cache
from meshnode.discovery.registry import EndpointRecord, VipRange
from meshnode.errors import (
    AccessError,
    KernelError,
    RegistryError,
    StateError,
    UsageError,
    WireError,
)
from meshnode.host import process
from meshnode.host.ledger import Ledger
from meshnode.host.statefile import write_atomic, write_json
from meshnode.model import Endpoint, HostPort, ServicePolicy, ServiceSpec
from meshnode.policy import store
from meshnode.policy.document import load_text, parse, parse_all
from meshnode.policy.resources import NAME_RE, Resource
from meshnode.telemetry.admin import AdminServer
from meshnode.telemetry.aggregate import Totals
from meshnode.telemetry.metrics import Snapshot
from meshnode.wire import (
    PROTOCOL,
    CgroupSources,
    ConnEvent,
    EndpointsAdded,
    EndpointsRemoved,
    ErrorInfo,
    Failure,
    Hello,
    HistogramCounts,
    Listening,
    PairCounters,
    Request,
    Result,
    ServiceGone,
    ServiceReset,
    StartError,
    StatsReply,
    StatsRequest,
    StreamItem,
    StreamStart,
    Sync,
    Synced,
    Tap,
    agent_codec,
    decode_reply,
    decode_request,
    encode,
    worker_codec,
)

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")

SEED = 138  # issue 13, item 8
COUNT = 2000  # mutation-fuzzer inputs per surface
SLOW = 2.0  # seconds one input may take before it counts as a hang
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


# -- the harness -----------------------------------------------------------------------------
def fuzz(surface: str, inputs: Iterable[T], call: Callable[[T], object],
         typed: tuple[type[BaseException], ...]) -> Counter[str]:
    """Feed every input to `call`, which must return (a string: the outcome to count) or
    raise one of `typed` within SLOW seconds; a failure names the input, ready to paste as a
    regression example. Prints the surface's one-line summary and returns its outcomes."""
    tally: Counter[str] = Counter()
    for n, data in enumerate(inputs):
        fuzz_one(f"{surface}: input #{n}", data, call, typed, tally)
    report(surface, tally)
    return tally


def report(surface: str, tally: Counter[str]) -> None:
    outcomes = ", ".join(f"{n} {what}" for what, n in tally.most_common())
    print(f"\nfuzz {surface}: {tally.total()} inputs, 0 crashes ({outcomes})")


def examples(surface: str, strategy: st.SearchStrategy[T], call: Callable[[T], object],
             typed: tuple[type[BaseException], ...], max_examples: int = 300) -> None:
    """`fuzz` for hypothesis-generated inputs (structured but wrong)."""
    tally: Counter[str] = Counter()

    @settings(FUZZ, max_examples=max_examples)
    @given(strategy)
    def check(data: T) -> None:
        fuzz_one(surface, data, call, typed, tally)

    check()
    report(surface, tally)


def fuzz_one(where: str, data: T, call: Callable[[T], object],
             typed: tuple[type[BaseException], ...], tally: Counter[str]) -> None:
    """One input: its outcome counted in `tally`, or an AssertionError naming it."""
    t0 = time.perf_counter()
    try:
        outcome = call(data)
    except typed as exc:
        tally[type(exc).__name__] += 1
    except Exception as exc:
        raise AssertionError(f"{where} {data!r:.400} raised {type(exc).__name__}: "
                             f"{exc}") from exc
    else:
        tally[outcome if isinstance(outcome, str) else "ok"] += 1
    took = time.perf_counter() - t0
    assert took < SLOW, f"{where} {data!r:.400} took {took:.2f} s"


# Byte strings that make decoders work: numbers beyond 64 bits and beyond a double, JSON's
# non-standard constants, deep nesting, bad UTF-8, separators and quotes.
_TOKENS = (b"Infinity", b"-Infinity", b"NaN", b"1e400", b"-1e400", b"18446744073709551616",
           b"-9223372036854775809", b"1" * 5000, b"null", b"true", b"[]", b"{}", b'""', b"0",
           b"-1", b'"\\u0000"', b'"\\ud800"', b"\xff", b"\xc3\x28", b"\xf0\x9f\x98", b"\n",
           b'"', b",", b":", b"[" * 3000, b'{"a":' * 3000, b"\\", b"\t", b"\x00",
           "é\u202e\U0001f600".encode())


def mutations(corpus: Sequence[bytes], seed: int, count: int = COUNT,
              tokens: Sequence[bytes] = _TOKENS) -> Iterator[bytes]:
    """`count` inputs from a fixed seed: one in four random bytes, the rest a corpus entry
    with one to four edits (flips, cuts, inserts, repeats, splices, tokens)."""
    rng = random.Random(seed)
    for i in range(count):
        if i % 4 == 0:
            yield rng.randbytes(rng.choice((0, 1, 2, 11, 12, 13, 64, 300, 2000)))
            continue
        data = bytearray(rng.choice(corpus))
        for _ in range(rng.randrange(1, 5)):
            _mutate(rng, data, corpus, tokens)
        yield bytes(data)


def _mutate(rng: random.Random, data: bytearray, corpus: Sequence[bytes],
            tokens: Sequence[bytes]) -> None:
    at = rng.randrange(len(data) + 1)
    end = min(len(data), at + rng.randrange(1, 40))
    match rng.randrange(8):
        case 0 if data:
            data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
        case 1:
            data[at:end] = b""
        case 2:
            data[at:at] = rng.randbytes(rng.randrange(1, 16))
        case 3:
            data[at:at] = data[at:end] * rng.randrange(2, 50)
        case 4:
            other = rng.choice(corpus)
            start = rng.randrange(len(other) + 1)
            data[at:end] = other[start:start + rng.randrange(1, 200)]
        case 5:
            del data[at:]
        case _:
            data[at:end if rng.random() < 0.5 else at] = rng.choice(tokens)


@dataclass(frozen=True)
class Raw:
    """JSON text put as is where a value goes: what json.dumps cannot write (deep nesting,
    Infinity, more digits than Python's int() takes)."""

    text: str


_RAW = st.sampled_from([
    Raw("[" * 3000 + "]" * 3000), Raw('{"a":' * 3000 + "1" + "}" * 3000), Raw("Infinity"),
    Raw("-Infinity"), Raw("NaN"), Raw("1e400"), Raw("-1e400"), Raw("1" * 5000),
    Raw("18446744073709551616"), Raw("-9223372036854775809"), Raw("1e-400")])
_ODD_TEXT = st.sampled_from([
    "", " ", "\n", "\x00", "web\n", "Web", "é", "\u202e", "\ud800", "a" * 300, "-", "..",
    "127.0.0.1:80", "127.0.0.1:0", "300.1.1.1:1", "1.2.3.4:99999", "127.0.0.1:\u0663", "::1",
    "127.240.0.5", "10.0.0.1", "0.0.0.0", "Service", "/x"])
TEXT = st.text(max_size=10) | _ODD_TEXT
SCALAR = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                                allow_infinity=False)
          | st.sampled_from([2**63, 2**64, 2**64 - 1, -(2**63) - 1, 10**30, -1, 0]) | TEXT)
# Any JSON value, now and then with raw text json.dumps cannot write.
NASTY: st.SearchStrategy[Any] = st.recursive(
    SCALAR | _RAW, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner,
                                                                               max_size=4),
    max_leaves=12)


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each `weight` times in the weights' sum (st.one_of of one
    strategy twice does not weigh it twice)."""
    def pick(n: int) -> st.SearchStrategy[Any]:
        for weight, s in choices:
            if n < weight:
                return s
            n -= weight
        raise AssertionError(n)

    return st.integers(0, sum(w for w, _ in choices) - 1).flatmap(pick)


def maybe(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the right shape, sometimes anything."""
    return weighted((2, s), (1, NASTY))


def mostly(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The right shape four times in five: documents nearly valid, so that the checks behind
    the first one run too."""
    return weighted((4, s), (1, NASTY))


def render(value: Any) -> str:
    """`value` as JSON text, Raw parts as they are."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{render(v)}"
                              for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(map(render, value)) + "]"
    return json.dumps(value)


def rendered(s: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return s.map(lambda v: render(v).encode(errors="surrogatepass"))


def now(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (the embedded registry's writes) to its end."""
    try:
        coro.send(None)
    except StopIteration as done:
        value: T = done.value
        return value
    coro.close()
    raise AssertionError("the coroutine suspended")


# -- the wire: control socket and agent <-> worker channel -----------------------------------
SPEC = ServiceSpec("web", 3, IPv4Address("127.240.0.9"), ServicePolicy(port=80))
EPS = (Endpoint(HostPort.parse("127.0.0.1:8001"), "n1", "z1", 3),
       Endpoint(HostPort.parse("127.0.0.1:8002")))
WIRE_CORPUS = [encode(m) for m in (
    Hello(PROTOCOL, "1.0"), ServiceReset(SPEC, EPS), EndpointsAdded("web", EPS),
    EndpointsRemoved("web", EPS[:1]), ServiceGone("web"), Sync(7), StatsRequest(8),
    CgroupSources({"1234": "web"}), Tap(("web", "*")), Listening(3, 1234),
    StartError("cannot listen", "ss -ltnp", 69), Synced(9),
    ConnEvent({"event": "close", "src": "web", "bytes_up": 5}),
    StatsReply(1, 0, 99, (PairCounters("web", "api", {"connections": 3}, {"refused": 1},
                                       {"connect": HistogramCounts([1, 2, 0], 0.25)}),),
               {"api": {"127.0.0.1:1": {"active": 1, "ewma_ms": 1.5}}},
               {"api": {"127.0.0.1:1": 3}}, {"unrouted": 2}),
    Request("explain", {"pid": 1, "dest": "web.mesh:80"}), Request("status"),
    Result({"ready": True, "pid": 1}), StreamStart(), StreamItem({"event": "open"}),
    Failure(ErrorInfo.of(KernelError("bpf_prog_load failed", "see dmesg", errno=1))),
)]


def _decode_everywhere(data: bytes) -> str:
    """Every decoder of both channels; what one accepts must encode and decode back equal
    (the agent re-encodes what it reads: a worker's events into a tap stream)."""
    accepted = 0
    for codec in (agent_codec(), worker_codec()):
        with contextlib.suppress(WireError):
            msg = codec.decode(data)
            if msg is not None:
                assert codec.decode(encode(msg)) == msg
            accepted += 1
    for decode in (decode_request, decode_reply):
        with contextlib.suppress(WireError):
            value = decode(data)
            assert decode(encode(value)) == value
            accepted += 1
    return "decoded (or skipped) somewhere" if accepted else "WireError everywhere"


def test_mutated_wire_messages_decode_or_are_wire_errors() -> None:
    # test_wire.py throws random bytes and random JSON; these are edits of real messages
    fuzz("wire (4 decoders)", mutations(WIRE_CORPUS, SEED), _decode_everywhere, ())


def _fields(cls: type[msgspec.Struct]) -> list[str]:
    return [f.encode_name for f in msgspec.structs.fields(cls)]


_KINDS: dict[str, list[str]] = {
    "hello": _fields(Hello), "reset": _fields(ServiceReset), "add": _fields(EndpointsAdded),
    "remove": _fields(EndpointsRemoved), "gone": _fields(ServiceGone), "sync": _fields(Sync),
    "stats": _fields(StatsReply), "sources": _fields(CgroupSources), "tap": _fields(Tap),
    "listening": _fields(Listening), "error": [*_fields(StartError), "error"],
    "synced": _fields(Synced), "event": _fields(ConnEvent), "result": ["value"],
    "stream": [], "item": ["item"],
}
_SERVICE = st.fixed_dictionaries({}, optional={
    "name": maybe(st.just("web")), "id": maybe(st.integers(-1, 2**32)),
    "vip": maybe(st.sampled_from(["127.240.0.9", "300.1.1.1", ""])),
    "policy": maybe(st.fixed_dictionaries({}, optional={
        "port": maybe(st.integers(-1, 70000)), "failMode": maybe(st.just("closed")),
        "balancer": maybe(st.fixed_dictionaries({}, optional={
            "algorithm": maybe(st.just("ring-hash"))}))}))})
_ENDPOINT = st.fixed_dictionaries({}, optional={
    "addr": maybe(st.fixed_dictionaries({"ip": maybe(st.just("127.0.0.1")),
                                         "port": maybe(st.integers(-1, 70000))})),
    "node": TEXT, "zone": TEXT, "weight": maybe(st.integers(-5, 2**64))})
# A value per field name the wire uses, the right shape or not.
_VALUE_OF: dict[str, st.SearchStrategy[Any]] = {
    "service": maybe(st.just("web") | _SERVICE), "endpoints": maybe(st.lists(_ENDPOINT,
                                                                              max_size=3)),
    "error": maybe(st.fixed_dictionaries({"type": maybe(st.just("KernelError")),
                                          "message": TEXT}, optional={
        "exit_code": maybe(st.integers(-1, 300)), "details": NASTY})),
}


@st.composite
def _plausible_messages(draw: st.DrawFn) -> bytes:
    """One message of a known kind with its own field names, their values right or wrong."""
    kind = draw(st.sampled_from(sorted(_KINDS)))
    names = _KINDS[kind]
    msg: dict[str, Any] = {"t": kind}
    for name in draw(st.lists(st.sampled_from(names), unique=True)) if names else []:
        msg[name] = draw(_VALUE_OF.get(name, NASTY))
    if draw(st.booleans()):
        msg[draw(TEXT)] = draw(NASTY)
    if kind in ("result", "error") and draw(st.booleans()):  # the control socket's envelope
        msg = {"op": draw(maybe(st.just("status"))), "args": draw(maybe(
            st.dictionaries(TEXT, NASTY, max_size=3)))}
    return render(msg).encode(errors="surrogatepass")


def test_plausible_wire_messages_with_wrong_fields_decode_or_are_wire_errors() -> None:
    examples("wire (plausible messages)", _plausible_messages(), _decode_everywhere, (),
             max_examples=500)


# -- policy documents and stored resources ---------------------------------------------------
DOC_CORPUS = [t.encode() for t in (
    "kind: Service\nname: web\nspec:\n  port: 80\n  failMode: closed\n"
    "  balancer: {algorithm: ring-hash, locality: false}\n"
    "  health: {kind: http, path: /ready, interval: 2, timeout: 0.5}\n"
    "  outlier: {consecutiveFailures: 3, baseEjection: 5}\n"
    "  timeouts: {connect: 0.25, idle: 30}\n  maxConnections: 100\n"
    "  ports: [{port: 81, protocol: tcp}]\n  vip: 127.240.0.4\n",
    '[{"kind": "Service", "name": "a", "version": 3}, '
    '{"kind": "Service", "name": "b", "spec": {"port": 1}}]',
    "---\nkind: Service\nname: a\n---\nkind: Service\nname: b\nversion: 3\n...\n",
    "a: &x [1, 2]\nb: *x\nc: !!binary aGk=\nd: 2001-12-14\ne: {? [1]: 2}\n<<: {f: 1}\n",
)]
# What a YAML document may hold that JSON may not: dates, bytes, sets, non-string keys.
_YAML_SCALAR = (SCALAR | st.floats() | st.dates() | st.datetimes() | st.binary(max_size=4)
                | st.frozensets(st.integers(), max_size=2))
_YAML_VALUE: st.SearchStrategy[Any] = st.recursive(
    _YAML_SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        TEXT | st.integers() | st.none() | st.booleans(), inner, max_size=3), max_leaves=10)
_SPEC_KEYS = ["port", "protocol", "ports", "vip", "failMode", "balancer", "health", "outlier",
              "timeouts", "maxConnections", "algorithm", "locality", "kind", "path",
              "interval", "timeout", "healthyThreshold", "unhealthyThreshold",
              "consecutiveFailures", "baseEjection", "maxEjection", "maxEjectedShare",
              "connect", "idle"]
_SPEC: st.SearchStrategy[Any] = st.recursive(
    _YAML_SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(_SPEC_KEYS) | TEXT, inner, max_size=5), max_leaves=14)
_SECONDS = st.floats(-1, 100_000) | st.integers(-1, 10)
_NEAR_SPEC = st.fixed_dictionaries({}, optional={
    "port": mostly(st.integers(-1, 70_000)), "protocol": mostly(st.sampled_from(["tcp", "udp"])),
    "ports": mostly(st.lists(st.fixed_dictionaries({"port": mostly(st.integers(0, 70_000))},
                                                   optional={"protocol": mostly(st.just("tcp"))}),
                             max_size=3)),
    "vip": mostly(st.sampled_from(["127.240.0.4", "10.0.0.1", "1.2.3", "127.240.0.4\n"])),
    "failMode": mostly(st.sampled_from(["open", "closed", "Open"])),
    "balancer": mostly(st.fixed_dictionaries({}, optional={
        "algorithm": mostly(st.sampled_from(["p2c-ewma", "round-robin", "random", "ring-hash",
                                             "fastest"])), "locality": mostly(st.booleans())})),
    "health": mostly(st.fixed_dictionaries({}, optional={
        "kind": mostly(st.sampled_from(["tcp", "http", "none", "grpc"])),
        "path": mostly(st.sampled_from(["/ready", "ready", "/\x00", "/" + "a" * 3000])),
        "interval": mostly(_SECONDS), "timeout": mostly(_SECONDS),
        "healthyThreshold": mostly(st.integers(-1, 5)),
        "unhealthyThreshold": mostly(st.integers(-1, 5))})),
    "outlier": mostly(st.fixed_dictionaries({}, optional={
        "consecutiveFailures": mostly(st.integers(-1, 10)), "baseEjection": mostly(_SECONDS),
        "maxEjection": mostly(_SECONDS), "maxEjectedShare": mostly(st.floats(-1, 2))})),
    "timeouts": mostly(st.fixed_dictionaries({}, optional={
        "connect": mostly(st.none() | _SECONDS), "idle": mostly(st.none() | _SECONDS)})),
    "maxConnections": mostly(st.integers(-1, 2**64))})
DOCUMENTS = st.fixed_dictionaries({}, optional={
    "kind": maybe(st.just("Service")), "name": maybe(st.sampled_from(["web", "a-1", "x" * 64])),
    "spec": _SPEC, "version": maybe(st.integers(-1, 2**70)),
    "status": _YAML_VALUE}) | _YAML_VALUE | st.fixed_dictionaries({
        "kind": mostly(st.just("Service")), "name": mostly(st.sampled_from(["web", "a-1"])),
        "spec": mostly(_NEAR_SPEC)}, optional={"version": mostly(st.integers(0, 2**64))})
_YAML_TOKENS = ["!!binary ", "!!float ", "!!int ", "!!timestamp ", "!!set ", "!!omap ",
                "!!python/object:os.system ", "&a ", "*a", "<<: ", "2001-13-01", "2001-02-30",
                "2002-12-14 25:00:00", "2001-12-14 21:59:43.10 -51", "1e400", ".inf", ".nan",
                "0x1F", "~", "? ", ": ", "- ", "{", "}", "[", "]", "\t", "\n", "'", '"', "|",
                "%YAML 1.1\n", "%TAG ! x\n", "---\n", "...\n", "\x00", "\ufeff", "!", "@"]


def _one_line_usage_error(text: str) -> None:
    try:
        resources = parse_all(load_text(text, "f.yaml"))
    except UsageError as exc:
        assert "\n" not in exc.message, exc.message
        raise
    for r in resources:
        assert parse(r.to_doc()) == r  # what validates round-trips through its document


def test_mutated_documents_give_resources_or_one_line_usage_errors() -> None:
    # YAML's tokens rather than 3000-deep nesting: the pure-Python loader takes a second to
    # refuse that (deep nesting is a regression example below)
    tokens = [t for t in _TOKENS if len(t) < 100] + [t.encode() for t in _YAML_TOKENS]
    fuzz("policy documents (text)", mutations(DOC_CORPUS, SEED, tokens=tokens),
         lambda data: _one_line_usage_error(data.decode(errors="replace")), (UsageError,))


def test_yaml_text_with_tags_dates_and_anchors_gives_usage_errors() -> None:
    pieces = st.sampled_from(_YAML_TOKENS) | st.text(max_size=4) | st.sampled_from(
        [t.decode() for t in DOC_CORPUS])
    examples("policy documents (YAML tokens)", st.lists(pieces, max_size=12).map("".join),
             _one_line_usage_error, (UsageError,), max_examples=400)


def _parse_document(doc: Any) -> None:
    try:
        r = parse(doc, "f.yaml#1")
    except UsageError as exc:
        assert "\n" not in exc.message, exc.message
        raise
    assert parse(r.to_doc()) == r
    assert store.decode(store.encode(r), r.version)[0] == r


def test_documents_of_wrong_shapes_give_resources_or_one_line_usage_errors() -> None:
    examples("policy documents (parsed values)", DOCUMENTS, _parse_document, (UsageError,),
             max_examples=500)


@pytest.mark.parametrize("text", [
    "a: 2001-02-30",  # PyYAML: ValueError (day is out of range for month)
    "kind: Service\nname: web\nspec: {port: 2002-12-14 25:00:00}",  # ValueError
    "kind: !!int Service",  # ValueError (invalid literal for int())
    "kind: !!float Service",  # ValueError
    '{"kind": !!bool "Service"}',  # KeyError
    '{"kind": !!timestamp "Service"}',  # AttributeError
    "[" * 5000,  # RecursionError
    "- " * 3000 + "a",  # RecursionError
    'kind: Service\nname: web\nspec: {"a\\nb": 1}',  # an error message of two lines
    'kind: Service\nname: "\\n"',  # the same, through the name
])
def test_yaml_the_loader_chokes_on_is_a_one_line_usage_error(text: str) -> None:
    """Regressions: each once escaped load_text or parse as another exception, or broke the
    error's one line."""
    with pytest.raises(UsageError) as info:
        _one_line_usage_error(text)
    assert "\n" not in info.value.message


@pytest.mark.parametrize("name", ["web\n", "a-1\n"])
def test_a_name_with_a_trailing_newline_is_refused(name: str) -> None:
    with pytest.raises(UsageError):
        parse({"kind": "Service", "name": name})


def test_documents_name_only_valid_names() -> None:
    """Whatever parses names a resource by the rule (but for the newline above)."""
    def check(doc: Any) -> None:
        assert NAME_RE.fullmatch(parse(doc).name)

    examples("policy documents (names)", st.fixed_dictionaries({
        "kind": st.just("Service"), "name": st.text(max_size=70).filter(
            lambda n: not n.endswith("\n"))}), check, (UsageError,))


STORED_CORPUS = [store.encode(parse_all(load_text(DOC_CORPUS[0].decode(), "c"))[0],
                              {"vip": "127.240.0.4"}),
                 store.encode(parse({"kind": "Service", "name": "a"}))]


def test_mutated_stored_resources_decode_or_are_registry_errors() -> None:
    fuzz("stored resources", mutations(STORED_CORPUS, SEED), lambda d: store.decode(d, 1),
         (RegistryError,))


# -- the embedded registry's snapshot and journal --------------------------------------------
def _docs(*names: str, **spec: Any) -> list[Resource]:
    return [parse({"kind": "Service", "name": n, "spec": spec}) for n in names]


@pytest.fixture(scope="module")
def registry_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """A real snapshot and journal: services (one with a pinned VIP), endpoints, history."""
    path = tmp_path_factory.mktemp("reg") / "registry.json"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(embedded.time, "time", lambda: 1_700_000_000.0)  # history: the same bytes
        reg = EmbeddedRegistry(path)
        now(reg.apply(_docs("web", "api", port=80)))
        now(reg.apply(_docs("db", port=5432, vip="127.240.0.200", failMode="closed")))
        now(reg.add_endpoints("web", [EndpointRecord(HostPort.parse("127.0.0.1:8001"),
                                                     "process", 42, "n1", "z1", 2, True)]))
        journal = reg.journal.read_bytes()
        reg._compact()  # the snapshot: otherwise written only once the journal is 1 MiB
        now(reg.apply(_docs("web", port=81)))
        now(reg.apply([], [store.Delete("Service", "api")]))
    return path.read_bytes(), journal + reg.journal.read_bytes()


def _load_registry(path: Path) -> str:
    """Load; then what loaded must serve: its records, its documents, one more write."""
    reg = EmbeddedRegistry(path)
    for rec in reg.services().values():
        rec.settings_json()
        assert reg._vips.id_of(rec.vip) == rec.id
    for r in reg.resources().values():
        r.to_doc()
    reg.describe()
    now(reg.apply(_docs("fuzz-probe")))
    return "loaded"


def _write_and_load(directory: Path, snapshot: bytes | None, journal: bytes | None) -> str:
    path = directory / "registry.json"
    for p, data in ((path, snapshot), (path.with_suffix(".journal"), journal)):
        p.unlink(missing_ok=True)
        if data is not None:
            p.write_bytes(data)
    return _load_registry(path)


def test_a_garbage_registry_snapshot_is_a_registry_error(
        tmp_path: Path, registry_files: tuple[bytes, bytes]) -> None:
    snapshot, _ = registry_files
    fuzz("registry snapshot", mutations([snapshot], SEED),
         lambda d: _write_and_load(tmp_path, d, None), (RegistryError,))


def test_a_garbage_registry_journal_is_a_registry_error(
        tmp_path: Path, registry_files: tuple[bytes, bytes]) -> None:
    # test_policy.py feeds random bytes; these are edits of a real journal (and of its lines)
    _, journal = registry_files
    corpus = [journal, *(line + b"\n" for line in journal.splitlines())]
    fuzz("registry journal", mutations(corpus, SEED),
         lambda d: _write_and_load(tmp_path, None, d), (RegistryError,))


_VIP = maybe(st.sampled_from(["127.240.0.5", "127.240.0.0", "10.0.0.1", "x", ""])
             | st.integers(0, 2**32))
_RECORD = st.fixed_dictionaries({"addr": maybe(st.sampled_from(
    ["127.0.0.1:8080", "127.0.0.1:0", "1.2.3.4:65536", "x", "127.0.0.1:\u0663"]))}, optional={
    "source": maybe(st.just("process")), "pid": NASTY, "node": maybe(TEXT),
    "zone": maybe(TEXT), "weight": maybe(st.integers(-5, 5)), "healthy": NASTY})
_ITEM = st.fixed_dictionaries({"doc": maybe(DOCUMENTS.filter(lambda d: not isinstance(
    d, frozenset | bytes | datetime.date))), "version": maybe(st.integers(0, 9))}, optional={
    "status": maybe(st.fixed_dictionaries({"vip": _VIP})), "vip": _VIP})
_HISTORY = st.fixed_dictionaries({"version": maybe(st.integers(0, 9)),
                                  "at": maybe(st.floats(0, 2e9))}, optional={"spec": NASTY})


def _jsonable(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Drop what only YAML holds (dates, bytes, sets): these values stand for JSON files."""
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        if isinstance(v, datetime.date | bytes | frozenset):
            return str(v)
        return v

    return s.map(clean)


SNAPSHOTS = _jsonable(st.fixed_dictionaries({}, optional={
    "format": maybe(st.sampled_from([1, 2])), "revision": maybe(st.integers(0, 9)),
    "resources": maybe(st.lists(_ITEM, max_size=3)),
    "history": maybe(st.dictionaries(st.sampled_from(["Service/web", "x", "/"]) | TEXT,
                                     maybe(st.lists(_HISTORY, max_size=2)), max_size=2)),
    "endpoints": maybe(st.dictionaries(st.sampled_from(["web", "x"]),
                                       maybe(st.lists(_RECORD, max_size=2)), max_size=2)),
    "services": maybe(st.lists(st.fixed_dictionaries({}, optional={
        "name": maybe(st.just("web")), "vip": _VIP, "port": maybe(st.integers(-1, 70000)),
        "fail_closed": NASTY, "lb": maybe(st.dictionaries(TEXT, NASTY, max_size=2)),
        "endpoints": maybe(st.lists(_RECORD, max_size=2))}), max_size=2)),
}))
_OPS = st.one_of(
    st.fixed_dictionaries({"put": maybe(_ITEM)}),
    st.fixed_dictionaries({"delete": maybe(st.tuples(maybe(st.just("Service")),
                                                     maybe(st.just("web"))))}),
    st.fixed_dictionaries({"history": maybe(st.tuples(st.just("Service"), maybe(st.just(
        "web")), maybe(_HISTORY)))}),
    st.fixed_dictionaries({"endpoints": maybe(st.tuples(maybe(st.just("web")), maybe(
        st.lists(_RECORD, max_size=2))))}),
    st.dictionaries(TEXT, NASTY, max_size=2))
JOURNAL_LINES = _jsonable(st.fixed_dictionaries({"revision": maybe(st.integers(0, 5)),
                                                 "ops": maybe(st.lists(_OPS, max_size=3))}))


def test_snapshots_and_journals_of_wrong_shapes_are_registry_errors(tmp_path: Path) -> None:
    examples("registry snapshot (wrong shapes)", rendered(SNAPSHOTS),
             lambda d: _write_and_load(tmp_path, d, None), (RegistryError,))
    journals = st.lists(rendered(JOURNAL_LINES), min_size=1, max_size=3).map(
        lambda lines: b"\n".join(lines) + b"\n")
    examples("registry journal (wrong shapes)", journals,
             lambda d: _write_and_load(tmp_path, None, d), (RegistryError,))


@pytest.mark.parametrize(("snapshot", "journal"), [
    (b"[]", None),  # AttributeError: 'list' object has no attribute 'get'
    (b"null", None),
    (b'{"format": Infinity}', None),  # OverflowError
    (b"[" * 100_000, None),  # RecursionError
    (b'{"format":2,"revision":1,"resources":[],"history":[]}', None),  # AttributeError
    (b'{"format":2,"revision":1,"resources":[],"endpoints":{"web":[{"addr":5}]}}', None),
    (b'{"format":2,"revision":1,"resources":[],"endpoints":{"w":[{"addr":"1.2.3.4:0",'
     b'"source":"x"}]}}', None),  # UsageError, which did not name the file
    (None, b'{"revision":1e400,"ops":[]}\n{"revision":2,"ops":[]}\n'),  # OverflowError
    (None, b'{"revision":1,"ops":[{"history":[1,2,[3]]}]}\n{"revision":2,"ops":[]}\n'),
    (None, b'{"revision":1,"ops":[{"endpoints":["w",[{"addr":"1.2.3.4:0","source":"x"}]]}]}'
           b'\n{"revision":2,"ops":[]}\n'),  # UsageError
])
def test_registry_files_that_crashed_the_load_are_registry_errors(
        tmp_path: Path, snapshot: bytes | None, journal: bytes | None) -> None:
    with pytest.raises(RegistryError) as info:
        _write_and_load(tmp_path, snapshot, journal)
    assert "registry" in info.value.message and info.value.hint


# -- the ledger ------------------------------------------------------------------------------
def _ledger_corpus(tmp_path: Path) -> list[bytes]:
    ledger = Ledger(tmp_path / "corpus.json")
    ledger.record("cgroup", path="/sys/fs/cgroup/meshnode-t1.slice")
    ledger.record("bpf_attach", cgroup="/sys/fs/cgroup/x", prog="connect4", pin="/sys/fs/bpf/x")
    ledger.record("iptables_chain", table="nat", chain="MESHNODE-T1")
    return [ledger.path.read_bytes()]


def _load_ledger(path: Path, data: bytes) -> str:
    """A garbage ledger starts empty or keeps its good entries; its sweep runs through."""
    path.write_bytes(data)
    ledger = Ledger(path)
    entries = ledger.entries()
    assert all(isinstance(e, dict) and isinstance(e["kind"], str) for e in entries)
    failures = ledger.undo_all({"cgroup": lambda e: None, "bpf_attach": lambda e: None})
    assert all(isinstance(f, str) for f in failures)
    return "entries kept" if entries else "started empty"


def test_a_garbage_ledger_starts_empty_or_keeps_its_entries(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    fuzz("ledger.json", mutations(_ledger_corpus(tmp_path), SEED),
         lambda d: _load_ledger(path, d), ())
    entries = st.lists(maybe(st.fixed_dictionaries({"kind": maybe(st.sampled_from(
        ["cgroup", "bpf_attach", "nope"]))}, optional={"path": NASTY})), max_size=4)
    examples("ledger.json (wrong shapes)", rendered(maybe(entries)),
             lambda d: _load_ledger(path, d), ())


@pytest.mark.parametrize("data", [b"5", b"null", b'"x"', b'[{"kind": ["x"]}]',
                                  b'[{"kind": {}}]', b"[" * 100_000])
def test_ledgers_that_crashed_the_agent_start_empty(tmp_path: Path, data: bytes) -> None:
    """Regressions: TypeError (not iterable; an unhashable kind in the undo dispatch) and
    RecursionError escaped Ledger()."""
    _load_ledger(tmp_path / "ledger.json", data)


# -- enrollments.json ------------------------------------------------------------------------
# Garbage in enrollments.json is ignored (with a warning): nothing escapes _load, or the
# agent's restore() would fail its start (inputs below once did).
ENROLLMENT_ESCAPES: tuple[type[BaseException], ...] = ()


def _enrollments(tmp_path: Path) -> tuple[EnrollmentManager, list[bytes]]:
    state = tmp_path / "enrollments.json"
    mgr = EnrollmentManager(EmbeddedRegistry(tmp_path / "registry.json"), tmp_path / "apps",
                            tmp_path, state, "127.0.0.1", set())
    mgr.by_pid = {e.pid: e for e in (
        Enrollment(1234, 5678.25, "web", "/sys/fs/cgroup/user.slice",
                   {HostPort.parse("127.0.0.1:8080"), HostPort.parse("127.0.0.1:8081")}),
        Enrollment(99, 1.0, "api", "/sys/fs/cgroup"))}
    mgr._save()
    return mgr, [state.read_bytes()]


def _load_enrollments(mgr: EnrollmentManager, data: bytes) -> str:
    mgr.state_file.write_bytes(data)
    loaded = mgr._load()
    assert all(isinstance(e, Enrollment) for e in loaded)
    return "loaded" if loaded else "ignored"


def test_a_garbage_enrollments_file_is_ignored(tmp_path: Path) -> None:
    mgr, corpus = _enrollments(tmp_path)
    fuzz("enrollments.json", mutations(corpus, SEED), lambda d: _load_enrollments(mgr, d),
         ENROLLMENT_ESCAPES)
    records = st.lists(maybe(st.fixed_dictionaries({
        "pid": maybe(st.integers(0, 2**22)), "start_time": maybe(st.floats(0, 1e6)),
        "service": maybe(st.just("web")), "origin_cgroup": maybe(TEXT)}, optional={
        "ports": maybe(st.lists(maybe(st.sampled_from(["127.0.0.1:80", "x:1", "1.2.3.4:0"])),
                                max_size=2))})), max_size=3)
    examples("enrollments.json (wrong shapes)", rendered(maybe(records)),
             lambda d: _load_enrollments(mgr, d), ENROLLMENT_ESCAPES)


@pytest.mark.parametrize("data", [
    b"5",  # TypeError: 'int' object is not iterable
    b"[5]",  # TypeError: 'int' object is not subscriptable
    b'[{"pid":1,"start_time":1,"service":"w","origin_cgroup":"/","ports":[5]}]',  # AttributeError
    b'[{"pid":Infinity,"start_time":1,"service":"w","origin_cgroup":"/"}]',  # OverflowError
    b'[{"pid":1,"start_time":1,"service":"w","origin_cgroup":"/","ports":["1.2.3.4:0"]}]',
    b"[" * 100_000,  # RecursionError
])
def test_enrollments_that_crash_the_agent_start_are_ignored(tmp_path: Path,
                                                            data: bytes) -> None:
    mgr, _ = _enrollments(tmp_path)
    mgr.state_file.write_bytes(data)
    assert mgr._load() == []


# -- a control operation's argument ----------------------------------------------------------
def test_a_process_whose_namespace_cannot_be_read_is_an_access_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression, found fuzzing the control socket (test_fuzz_agent.py): `explain` of PID 1
    in a container, where even root may not read /proc/1/ns/net, failed untyped
    (PermissionError out of process.same_netns)."""
    def refuse(path: str, *args: Any, **kwargs: Any) -> os.stat_result:
        raise PermissionError(13, "Permission denied", path)

    with monkeypatch.context() as m:
        m.setattr(process.os, "stat", refuse)
        with pytest.raises(AccessError, match="PID 1"):
            process.same_netns(1)


# -- state files -----------------------------------------------------------------------------
def test_state_files_hold_exactly_what_was_written(tmp_path: Path) -> None:
    """Any JSON value (unicode, huge numbers, nesting) and any bytes come back as written,
    0600, without a temporary left; fewer inputs than elsewhere: each write fsyncs twice."""
    path = tmp_path / "state" / "f.json"

    def round_trip(value: Any) -> None:
        write_json(path, value)
        assert json.loads(path.read_text()) == value
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert os.listdir(path.parent) == ["f.json"]

    values = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(TEXT, inner, max_size=4), max_leaves=20)
    examples("state files (JSON values)", values, round_trip, (), max_examples=150)

    def raw(data: bytes) -> None:
        write_atomic(path, data)
        assert path.read_bytes() == data

    fuzz("state files (bytes)", mutations([b"{}"], SEED, 200), raw, ())


@pytest.mark.parametrize("garbage", ["target is a directory", "parent is a file",
                                     "parent is a dangling symlink", "target is a fifo"])
def test_garbage_in_the_state_directory_is_a_state_error(tmp_path: Path, garbage: str) -> None:
    target = tmp_path / "state" / "ledger.json"
    target.parent.mkdir()
    if garbage == "target is a directory":
        (target / "child").mkdir(parents=True)
    elif garbage == "parent is a file":
        target.parent.rmdir()
        target.parent.write_text("in the way")
    elif garbage == "parent is a dangling symlink":
        target.parent.rmdir()
        target.parent.symlink_to(tmp_path / "gone" / "deeper")
        (tmp_path / "gone").write_text("a file where a directory belongs")
    else:
        os.mkfifo(target)  # rename() replaces a fifo like a file: the write succeeds
    try:
        write_json(target, [{"kind": "cgroup"}])
    except StateError as exc:
        assert exc.errno and exc.hint
    else:
        assert json.loads(target.read_text()) == [{"kind": "cgroup"}]
    if target.parent.is_dir():
        assert not [p for p in os.listdir(target.parent) if p.endswith(".tmp")]


# -- the etcd mirror: its cache file and the values of the keys it watches -------------------
K = KeyLayout()
WEB = parse({"kind": "Service", "name": "web", "spec": {"port": 80, "failMode": "closed"}})
EP = EndpointRecord(HostPort.parse("10.0.0.1:80"), "process", 42, "n1", "z1", 2, True)
KEY_VALUES = {
    K.service("web"): store.encode(WEB, {"vip": "127.240.0.1"}),
    K.endpoint("web", "n1", EP.addr): encode_endpoint(EP),
    K.host("n1"): json.dumps({"ready": True, "capture": "ebpf", "revision": 3}).encode(),
    K.vip(IPv4Address("127.240.0.1")): b"web",
    K.claim(EP.addr, "web", "n1"): b"",
    K.history("Service", "web", "t1"): json.dumps({"version": 1, "spec": {}, "at": 1}).encode(),
}


def _mirror() -> Mirror:
    m = Mirror(K, VipRange())
    m.reset([(k, v, i + 1, 7) for i, (k, v) in enumerate(KEY_VALUES.items())], 10)
    return m


def _check_mirror(m: Mirror) -> None:
    """What the mirror serves is consistent whatever it was fed."""
    for rec in m.services().values():
        assert m.vips.id_of(rec.vip) == rec.id
        rec.settings_json()


def test_a_garbage_etcd_cache_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "etcd-cache.json"
    write_cache(path, _mirror().cache_snapshot())

    def load(data: bytes) -> str:
        path.write_bytes(data)
        m = Mirror(K, VipRange())
        loaded = m.load(path)
        assert loaded in (True, False)
        _check_mirror(m)
        return "loaded" if loaded else "ignored"

    fuzz("etcd cache", mutations([path.read_bytes()], SEED), load, ())
    caches = _jsonable(st.fixed_dictionaries({
        "format": maybe(st.just(2)), "prefix": maybe(st.just(K.prefix))}, optional={
        "revision": maybe(st.integers(0, 9)), "data_revision": maybe(st.integers(0, 9)),
        "resources": maybe(st.lists(_ITEM, max_size=3)),
        "endpoints": maybe(st.dictionaries(st.just("web"), maybe(st.lists(_RECORD,
                                                                           max_size=2))))}))
    examples("etcd cache (wrong shapes)", rendered(caches), load, ())


@pytest.mark.parametrize("cache", [
    b'{"format":2,"prefix":"/meshnode/","revision":1,"resources":[{"doc":{"kind":"Service",'
    b'"name":"web"},"version":1,"vip":"zz"}]}',  # AddressValueError, after the reset
    b'{"format":2,"prefix":"/meshnode/","revision":"x","resources":[]}',  # ValueError
    b'{"format":2,"prefix":"/meshnode/","revision":1,"resources":[{"doc":{"kind":"Service",'
    b'"name":"web"},"version":1,"vip":"1.2.3.4"}]}',  # RegistryError: VIP outside the range
])
def test_etcd_caches_that_crashed_the_load_are_ignored(tmp_path: Path, cache: bytes) -> None:
    path = tmp_path / "etcd-cache.json"
    path.write_bytes(cache)
    m = _mirror()
    assert m.load(path) is False
    assert set(m.services()) == {"web"}  # and what it held is untouched


def test_garbage_values_of_etcd_keys_are_skipped() -> None:
    """Someone wrote a key by hand, or a newer meshnode did: the mirror skips it and keeps
    serving; the endpoint codec says RegistryError."""
    corpus = list(KEY_VALUES.values())
    keys = list(KEY_VALUES)
    m = _mirror()

    def put(data: bytes) -> str:
        served = 0
        for rev, key in enumerate(keys, start=m.revision + 1):
            changed = m.put(key, data, rev, 7)
            assert changed is None or isinstance(changed, str)
            served += changed is not None
        m.advance(m.revision + len(keys))
        _check_mirror(m)
        return "applied to a served key" if served else "skipped (or not served)"

    fuzz("etcd key values", mutations(corpus, SEED), put, ())
    fuzz("etcd endpoint values", mutations([KEY_VALUES[keys[1]]], SEED), decode_endpoint,
         (RegistryError,))
    values = rendered(maybe(st.fixed_dictionaries({}, optional={
        "kind": maybe(st.just("Service")), "name": maybe(st.just("web")), "spec": NASTY,
        "status": maybe(st.fixed_dictionaries({"vip": _VIP})), "addr": NASTY,
        "source": NASTY, "ready": NASTY})))
    examples("etcd key values (wrong shapes)", values, put, ())


@pytest.mark.parametrize("value", [b"[]", b"5", b"null", b'"x"', b"[" * 100_000])
def test_a_host_report_that_is_no_object_is_skipped(value: bytes) -> None:
    """Regression: TypeError ('list' object is not a mapping) escaped Mirror.put."""
    m = _mirror()
    assert m.put(K.host("n2"), value, 20, 7) is None
    assert "n2" not in m.hosts() and "n1" in m.hosts()


def test_random_keys_parse_or_are_ignored() -> None:
    corpus = [*KEY_VALUES, b"/meshnode/endpoints/web/n1/10.0.0.1:\xd9\xa3",
              b"/meshnode/vips/999.1.1.1"]
    fuzz("etcd keys", mutations(corpus, SEED), K.parse, ())


# -- the DNS zone ----------------------------------------------------------------------------
_ZONE = MeshZone({"web": IPv4Address("127.240.0.9"), "big": IPv4Address("127.240.0.10")}.get,
                 "mesh", 5, lambda s: {
                     "web": [SrvTarget(0, HostPort.parse("127.0.0.1:8080"), 1, "n1")],
                     "big": [SrvTarget(i % 3, HostPort(IPv4Address(f"10.0.{i // 200}.{i % 200}"),
                                                       1000 + i), i, f"node-{i}")
                             for i in range(1, 150)]}.get(s, []))


def _question(name: str, qtype: str, edns: int | None = None) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = 0x1234  # dnslib picks a random one: the corpus must not vary
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns))
    return bytes(q.pack())


DNS_CORPUS = [_question(n, t) for n in ("web.mesh", "_web._tcp.mesh", "10-0-0-1.n1.ep.mesh",
                                        "example.org", "mesh", "nope.mesh")
              for t in ("A", "SRV", "ANY", "AAAA")] + [_question("_big._tcp.mesh", "SRV", 4096),
                                                       _question("web.mesh", "A", 0)]


def _respond(data: bytes) -> str:
    """A query gets nothing (no header, or a response), Forward of itself, or a Reply to it
    that parses and fits every limit."""
    out = _ZONE.respond(data)
    if out is None:
        return "dropped"
    if isinstance(out, Forward):
        assert out.query == data
        return "forwarded"
    assert isinstance(out, Reply)
    reply = DNSRecord.parse(out.data)
    assert reply.header.qr == 1 and reply.header.id == DNSHeader.parse(DNSBuffer(data)).id
    assert reply.header.rcode == out.rcode and reply.header.tc == 0
    assert out.rcode in (RCODE.NOERROR, RCODE.FORMERR, RCODE.NXDOMAIN, RCODE.NOTIMP,
                         RCODE.REFUSED)
    for limit in (UDP_PLAIN_LIMIT, udp_limit(data), TCP_LIMIT):
        answer, _ = fit(out.data, limit)
        assert len(answer) <= limit
        DNSRecord.parse(answer)
    return RCODE.get(out.rcode)


def test_mutated_dns_queries_are_answered_forwarded_or_dropped() -> None:
    fuzz("dns zone (bytes)", mutations(DNS_CORPUS, SEED), _respond, ())


_HEADER = bytes.fromhex("123401000001000000000000")  # id 0x1234, RD, one question
_TAIL = b"\x04mesh\x00\x00\x01\x00\x01"  # .mesh, A, IN


@pytest.mark.parametrize("query", [
    _HEADER + b"\x40" + b"a" * 64 + _TAIL,  # a 64-byte label: length byte 0x40
    _HEADER + b"\x80" + b"a" * 128 + _TAIL,  # 0x80: the other reserved label type
    _HEADER + (b"\x3f" + b"a" * 63) * 4 + _TAIL,  # a 260-byte name of 63-byte labels
])
def test_a_name_dns_cannot_carry_is_formerr(query: bytes) -> None:
    """Regression: dnslib parsed these, then raised DNSLabelError packing the answer, out
    of MeshZone.respond (an exception in the UDP server's datagram_received, a dead TCP
    connection handler)."""
    out = _ZONE.respond(query)
    assert isinstance(out, Reply) and out.rcode == 1  # FORMERR
    _respond(query)


_LABELS = weighted(
    (6, st.sampled_from([b"web", b"WEB", b"big", b"_web", b"_big", b"_tcp", b"_udp", b"ep",
                         b"mesh", b"MeSh", b"10-0-0-1", b"n1", b"127-0-0-1", b"-", b"a.b",
                         b"\x00", b"\xff", b"x" * 63])),
    (3, st.text(st.characters(codec="utf-8"), min_size=1, max_size=20).map(str.encode)),
    (1, st.binary(min_size=1, max_size=63)))  # dnslib refuses labels not UTF-8: FORMERR


@st.composite
def _dns_messages(draw: st.DrawFn) -> bytes:
    """Well-formed DNS messages that are wrong as queries: any opcode, flags, rcode, count
    of questions, type and class; answers in a query; EDNS of any size."""
    usually = weighted((6, st.just(0)), (1, st.integers(0, 15)))
    header = DNSHeader(id=draw(st.integers(0, 65535)), qr=draw(usually) & 1,
                       opcode=draw(usually), rd=draw(st.integers(0, 1)), tc=draw(usually) & 1,
                       rcode=draw(usually))
    record = DNSRecord(header)
    types = st.sampled_from([QTYPE.A, QTYPE.AAAA, QTYPE.SRV, QTYPE.ANY, QTYPE.TXT, QTYPE.OPT,
                             0, 65535]) | st.integers(0, 65535)
    for _ in range(draw(weighted((6, st.just(1)), (1, st.integers(0, 3))))):
        labels = draw(st.lists(_LABELS, max_size=4)) + draw(st.sampled_from([[b"mesh"], []]))
        assume(sum(len(x) + 1 for x in labels) < 250)
        record.add_question(DNSQuestion(DNSLabel(labels), draw(types),
                                        draw(st.sampled_from([1, 255, 3, 0, 65535]))))
    if draw(st.booleans()):
        record.add_ar(EDNS0(udp_len=draw(st.integers(0, 65535))))
    if draw(st.booleans()):
        record.add_answer(RR("web.mesh", QTYPE.A, ttl=draw(st.integers(0, 2**31)),
                             rdata=A("127.0.0.1")))
    return bytes(record.pack())


def test_dns_messages_that_are_wrong_as_queries_get_an_answer_or_nothing() -> None:
    examples("dns zone (messages)", _dns_messages(), _respond, (), max_examples=500)


def test_a_query_with_rcode_or_tc_set_gets_a_plain_answer() -> None:
    """Regression: the answer copied the query's flag bits, so a query with RCODE 9 set got
    NOTAUTH (counted as an error) and one with TC set a truncated-looking full answer."""
    q = DNSRecord.question("web.mesh", "A")
    q.header.rcode, q.header.tc = 9, 1
    out = _ZONE.respond(bytes(q.pack()))
    assert isinstance(out, Reply) and out.rcode == RCODE.NOERROR
    answer = DNSRecord.parse(out.data)
    assert answer.header.rcode == RCODE.NOERROR and not answer.header.tc
    assert [str(rr.rdata) for rr in answer.rr] == ["127.240.0.9"]


def test_suffixes_and_node_names_become_labels_or_usage_errors() -> None:
    def label(text: str) -> None:
        out = node_label(text)
        assert out == "" or (len(out) <= 63 and NAME_RE.match(out))
        suffix = check_suffix(text)
        assert suffix == suffix.lower() and suffix.strip(".") == suffix

    examples("dns suffixes and node labels", TEXT | st.text(alphabet="abc-.\n \t", max_size=70),
             label, (UsageError,))


# -- the admin port's WSGI app ---------------------------------------------------------------
class _Provider:
    """The agent as the admin port sees it: a fixed snapshot."""

    ready = True

    async def snapshot(self) -> Snapshot:
        return Snapshot(info={"version": "0", "node": "n1", "instance": "t", "capture": "ebpf"},
                        ready=True, totals=Totals(), kernel={}, dns={}, registry={},
                        services=[], enrolled={}, workers=[])

    async def overview(self, window: float) -> dict[str, Any]:
        return {"window": window}


@pytest.fixture
def admin(monkeypatch: pytest.MonkeyPatch) -> Iterator[AdminServer]:
    """An AdminServer (its app, not its socket) over a loop in a thread, as in the agent;
    blocking catalog queries wait milliseconds, not minutes."""
    monkeypatch.setattr(catalog, "MAX_WAIT", 0.01)
    monkeypatch.setattr(catalog, "DEFAULT_WAIT", 0.01)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    cat = Catalog(dict, lambda service, addr: True)
    try:
        yield AdminServer("127.0.0.1", 0, _Provider(), loop, catalog=cat, hosts=dict)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


_PATHS = st.sampled_from(["/metrics", "/ready", "/api/overview", "/api/hosts", "/",
                          "/index.html", "/static/", "/static/app.js", "/static/../x",
                          "/static/a\n", "/static/%00", "/v1/catalog/services",
                          "/v1/catalog/service/web", "/v1/catalog/service/", "/v1/catalog/",
                          "/v1/catalog/service/a/b", "", "//", "*"])
_QUERIES = st.sampled_from(["", "window=nan", "window=inf", "window=-1", "window=1e999",
                            "window=abc", "window=5&window=6", "index=1&wait=5ms",
                            "index=" + "9" * 5000, "wait=1e999s", "index=x", "x=1", "%ff",
                            "index=\u0663", "wait=5s\n"])
_ACCEPTS = st.sampled_from(["", "application/openmetrics-text; version=abc",
                            "application/openmetrics-text; version=1.0.0; escaping=values",
                            "text/plain; version=\u00e90.0.4", "application/openmetrics-text",
                            "*/*;q=0.1,text/plain", "text/plain;version=1.0.0;escaping=zz"])
ENVIRONS = st.fixed_dictionaries({
    "REQUEST_METHOD": weighted((7, st.sampled_from(["GET", "GET", "HEAD"])), (1, TEXT),
                               (2, st.sampled_from(["POST", "PUT", "DELETE", "OPTIONS", "TRACE",
                                                    "CONNECT", "get", "", "G\x00T"]))),
    "PATH_INFO": _PATHS | _PATHS.flatmap(lambda p: TEXT.map(lambda t: p + t)) | TEXT,
    "QUERY_STRING": _QUERIES | TEXT,
    "HTTP_ACCEPT": _ACCEPTS | TEXT})


def _serve(admin: AdminServer, environ: dict[str, str]) -> str:
    """One request: answered once, with a status the admin port means (never a 500) and
    the body its Content-Length says."""
    started: list[tuple[str, dict[str, str]]] = []
    body = b"".join(admin._app(dict(environ), lambda s, h: started.append((s, dict(h)))))
    [(status, headers)] = started
    assert status.split()[0] in {"200", "400", "404", "405", "429", "503"}, status
    assert int(headers["Content-Length"]) == len(body)
    return status.split()[0]


def test_any_request_to_the_admin_app_gets_a_meant_status(admin: AdminServer) -> None:
    examples("admin app (environ)", ENVIRONS, lambda env: _serve(admin, env), (),
             max_examples=500)


@pytest.mark.parametrize("accept", ["application/openmetrics-text; version=abc",
                                    "text/plain; version=\u00e90.0.4"])
def test_an_accept_header_prometheus_cannot_read_gets_the_text_format(
        admin: AdminServer, accept: str) -> None:
    """Regression: prometheus-client's choose_encoder raised TypeError, a 500 and a
    traceback in the agent's log for one header any client can send."""
    statuses: list[tuple[str, dict[str, str]]] = []
    body = admin._app({"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "HTTP_ACCEPT": accept},
                      lambda status, headers: statuses.append((status, dict(headers))))
    [(status, headers)] = statuses
    assert status == "200 OK" and headers["Content-Type"].startswith("text/plain")
    assert b"meshnode_" in b"".join(body)
