"""W3C trace context: traceparent parsing (the spec's valid and invalid forms, future versions,
fuzzed), tracestate pass-through, sampling, and the traceparent the proxy sends upstream."""

from __future__ import annotations

import random
import re
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.proxy.http.exchange import RequestRecord
from meshnode.proxy.http.trace import (
    MAX_TRACESTATE,
    Tracer,
    otlp_url,
    parse_traceparent,
    valid_tracestate,
)
from meshnode.wire import Tracing

pytestmark = pytest.mark.timeout(60)

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
PID = "00f067aa0ba902b7"
TP_RE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])")


def record() -> RequestRecord:
    return RequestRecord(t0=time.monotonic(), wall=time.time(), src="web", dst="api",
                         protocol="http/1.1", method="GET", path="/")


def tracer(sampling: float, seed: int = 1) -> Tracer:
    t = Tracer(rng=random.Random(seed))
    t.configure(Tracing(otlp_endpoint="", sampling=sampling, node="n1"))
    return t


@pytest.mark.parametrize("value, want", [
    (f"00-{TID}-{PID}-01", (TID, PID, True)),
    (f"00-{TID}-{PID}-00", (TID, PID, False)),
    (f"00-{TID}-{PID}-09", (TID, PID, True)),  # flags are bits: 0x08 is unknown, 0x01 sampled
    (f"00-{TID}-{PID}-02", (TID, PID, False)),
    (f" 00-{TID}-{PID}-01\t", (TID, PID, True)),  # optional whitespace around the value
    # a higher version: parsed by the 00 layout, further fields ignored
    (f"cc-{TID}-{PID}-01", (TID, PID, True)),
    (f"cc-{TID}-{PID}-01-what-the-future-will-be-like", (TID, PID, True)),
    (f"01-{TID}-{PID}-00-", (TID, PID, False)),
])
def test_valid_traceparent(value: str, want: tuple[str, str, bool]) -> None:
    assert parse_traceparent(value) == want


@pytest.mark.parametrize("value", [
    "",
    "00",
    f"00-{TID}-{PID}-01-extra",  # version 00 has exactly four fields
    f"00-{TID}-{PID}-1",
    f"00-{TID}-{PID}-001",
    f"00-{TID}-{PID}",
    f"00-{TID}-{PID}-0x",
    f"00-{TID.upper()}-{PID}-01",  # hex must be lowercase
    f"00-{TID}-{PID.upper()}-01",
    f"00-{TID}-{PID}-0A",
    f"00-{'0' * 32}-{PID}-01",  # all-zero ids are invalid
    f"00-{TID}-{'0' * 16}-01",
    f"ff-{TID}-{PID}-01",  # version ff is forbidden
    f"0g-{TID}-{PID}-01",
    f"0-{TID}-{PID}-01",
    f"000-{TID}-{PID}-01",
    f"00_{TID}_{PID}_01",
    f"00-{TID[:-1]}-{PID}-01",
    f"00-{TID}0-{PID}-01",
    f"00-{TID}-{PID[:-1]}-01",
    f"00-{TID}-{PID}0-01",
    f"cc-{TID}-{PID}-01.what",  # a higher version's flags must end the value or meet a dash
    f"cc-{TID}-{PID}",  # shorter than 55 characters
    f"00-{TID}-{PID}-01,00-{TID}-{PID}-01",  # two headers joined: invalid
    f"00-{TID[:-1]}g-{PID}-01",
    f"00-{TID}-{PID}-01\n",
    "00-٤bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # a non-ASCII digit
])
def test_invalid_traceparent(value: str) -> None:
    assert parse_traceparent(value) is None


def test_a_request_without_traceparent_starts_a_trace_and_is_the_parent_upstream() -> None:
    t = tracer(1.0)
    rec = record()
    sent = t.start(rec, None, "congo=t61rcWkgMzE")
    m = TP_RE.fullmatch(sent)
    assert m is not None
    assert m.groups() == (rec.trace_id, rec.span_id, "01")
    assert rec.trace_id != "0" * 32 and rec.span_id != "0" * 16
    assert rec.parent_span_id == "" and rec.sampled
    assert rec.tracestate == ""  # a tracestate without its traceparent is not carried over
    assert parse_traceparent(sent) == (rec.trace_id, rec.span_id, True)


@pytest.mark.parametrize("flags, sampling, sampled", [
    ("01", 0.0, True), ("00", 1.0, False), ("03", 0.0, True), ("00", 0.0, False),
])
def test_an_incoming_trace_is_continued_with_its_sampled_flag(
        flags: str, sampling: float, sampled: bool) -> None:
    t = tracer(sampling)
    rec = record()
    sent = t.start(rec, f"00-{TID}-{PID}-{flags}", "rojo=00f067aa0ba902b7, congo=t61rcWkgMzE")
    assert (rec.trace_id, rec.parent_span_id, rec.sampled) == (TID, PID, sampled)
    assert rec.span_id not in (PID, "") and len(rec.span_id) == 16
    assert sent == f"00-{TID}-{rec.span_id}-{'01' if sampled else '00'}"
    assert rec.tracestate == "rojo=00f067aa0ba902b7, congo=t61rcWkgMzE"  # unchanged


def test_a_future_version_is_answered_with_version_00() -> None:
    rec = record()
    sent = tracer(0.0).start(rec, f"cc-{TID}-{PID}-01-future", None)
    assert sent == f"00-{TID}-{rec.span_id}-01"


def test_an_invalid_traceparent_restarts_the_trace_and_drops_tracestate() -> None:
    t = tracer(0.0)
    rec = record()
    sent = t.start(rec, f"00-{'0' * 32}-{PID}-01", "congo=t61rcWkgMzE")
    assert rec.trace_id not in (TID, "0" * 32) and rec.parent_span_id == ""
    assert not rec.sampled  # a new trace: sampled by the configured probability (0)
    assert rec.tracestate == ""
    assert sent == f"00-{rec.trace_id}-{rec.span_id}-00"
    assert t.invalid == 1


def test_tracestate_is_kept_up_to_512_bytes_of_printable_ascii() -> None:
    t = tracer(0.0)
    tp = f"00-{TID}-{PID}-01"
    at_limit = "a=" + "x" * (MAX_TRACESTATE - 2)
    for state, kept in ((at_limit, at_limit), (at_limit + "x", ""),
                        ("a=b\r\nx-injected: 1", ""), ("a=b\x00", ""), ("a=é", ""),
                        ("", "")):
        rec = record()
        t.start(rec, tp, state)
        assert rec.tracestate == kept, state
    assert valid_tracestate("a=1,\tb=2") and not valid_tracestate("a=\x7f")


def test_sampling_probability_is_honoured_for_new_traces() -> None:
    for sampling, low, high in ((0.0, 0, 0), (1.0, 10_000, 10_000), (0.25, 2_250, 2_750)):
        t = tracer(sampling, seed=7)
        n = 0
        for _ in range(10_000):
            rec = record()
            sent = t.start(rec, None, None)
            n += rec.sampled
            assert sent.endswith("-01" if rec.sampled else "-00")
        assert low <= n <= high, (sampling, n)


def test_ids_are_distinct_and_never_zero() -> None:
    t = Tracer()  # the module-level generator, as in a worker
    t.configure(Tracing(sampling=0.5))
    seen_traces, seen_spans = set(), set()
    for _ in range(5_000):
        rec = record()
        TP_RE.fullmatch(t.start(rec, None, None))
        seen_traces.add(rec.trace_id)
        seen_spans.add(rec.span_id)
    assert len(seen_traces) == len(seen_spans) == 5_000
    assert "0" * 32 not in seen_traces and "0" * 16 not in seen_spans


def test_zero_from_the_generator_is_never_an_id() -> None:
    class Zero(random.Random):
        def getrandbits(self, k: int) -> int:
            return 0

    rec = record()
    sent = Tracer(rng=Zero()).start(rec, None, None)
    assert parse_traceparent(sent) is not None and int(rec.trace_id, 16) == 1


@pytest.mark.parametrize("endpoint, url", [
    ("collector:4318", "http://collector:4318/v1/traces"),
    ("127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
    ("http://collector:4318", "http://collector:4318/v1/traces"),
    ("http://collector:4318/", "http://collector:4318/v1/traces"),
    ("https://collector:4318/otlp/v1/traces", "https://collector:4318/otlp/v1/traces"),
    ("collector:4318/custom", "http://collector:4318/custom"),
])
def test_otlp_url(endpoint: str, url: str) -> None:
    assert otlp_url(endpoint) == url


def test_no_export_thread_without_an_endpoint() -> None:
    before = {th.name for th in threading.enumerate()}
    t = tracer(1.0)
    rec = record()
    t.start(rec, None, None)
    assert rec.sampled
    t.finish(rec)  # sampled, but nowhere to send it: nothing happens
    t.close()
    assert "meshnode-spans" not in {th.name for th in threading.enumerate()} - before
    assert t.counts() == {"exported": 0, "dropped": 0, "failed": 0, "errors": 0}


def test_unsampled_requests_cost_microseconds() -> None:
    """A loose bound (shared CI cores): the module docstring has the measured figure."""
    t = tracer(0.0)
    rec = record()
    incoming = f"00-{TID}-{PID}-00"
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        t.start(rec, incoming, None)
        t.finish(rec)
    per = (time.perf_counter() - t0) / n
    assert per < 25e-6, f"{per * 1e6:.1f} µs per request"


HEXLC = "0123456789abcdef"


def near_traceparent() -> st.SearchStrategy[str]:
    """Well-formed traceparents (of several versions), then up to two characters replaced,
    inserted or deleted and maybe a suffix: valid and nearly valid values are both common."""
    def edit(value: str, edits: list[tuple[int, str, str]], suffix: str) -> str:
        for at, how, ch in edits:
            at %= len(value) + 1
            if how == "replace":
                value = value[:at] + ch + value[at + 1:]
            elif how == "insert":
                value = value[:at] + ch + value[at:]
            else:
                value = value[:at] + value[at + 1:]
        return value + suffix

    well_formed = st.builds(
        lambda v, t, p, f: f"{v}-{t:032x}-{p:016x}-{f:02x}",
        st.sampled_from(["00", "01", "cc", "fe", "ff"]),
        st.integers(0, 2 ** 128 - 1), st.integers(0, 2 ** 64 - 1), st.integers(0, 255))
    edits = st.lists(st.tuples(st.integers(0, 60),
                               st.sampled_from(["replace", "insert", "delete"]),
                               st.sampled_from(list("0aAg- \t\n")) | st.characters()),
                     max_size=2)
    suffix = st.sampled_from(["", "", "", "-", "-future", ".x", "\n", " "])
    return st.builds(edit, well_formed, edits, suffix)


def test_the_fuzz_strategy_makes_valid_values_too() -> None:
    @settings(max_examples=300, deadline=None, database=None)
    @given(near_traceparent())
    def collect(value: str) -> None:
        seen.append(parse_traceparent(value) is not None)

    seen: list[bool] = []
    collect()
    assert 0.1 < sum(seen) / len(seen) < 0.9


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=80) | near_traceparent())
def test_fuzz_parser_never_raises_nor_returns_an_invalid_id(value: str) -> None:
    got = parse_traceparent(value)
    if got is None:
        return
    trace_id, parent_id, sampled = got
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id) and trace_id != "0" * 32
    assert re.fullmatch(r"[0-9a-f]{16}", parent_id) and parent_id != "0" * 16
    assert isinstance(sampled, bool)
    v = value.strip(" \t")
    assert v[2:3] == "-" and v[:2] != "ff" and (v[:2] != "00" or len(v) == 55)


@settings(max_examples=500, deadline=None)
@given(st.none() | st.text(max_size=80) | near_traceparent(),
       st.none() | st.text(max_size=600))
def test_fuzz_start_always_sends_a_valid_traceparent(tp: str | None, ts: str | None) -> None:
    rec = record()
    sent = tracer(0.5).start(rec, tp, ts)
    assert parse_traceparent(sent) == (rec.trace_id, rec.span_id, rec.sampled)
    parsed = parse_traceparent(tp) if tp else None
    assert rec.parent_span_id == (parsed[1] if parsed else "")
    assert rec.trace_id == parsed[0] if parsed else rec.trace_id != "0" * 32
    assert valid_tracestate(rec.tracestate)
    assert rec.tracestate in ("", ts)
