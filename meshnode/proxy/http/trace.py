"""W3C trace context for proxied HTTP, HTTP/2 and gRPC requests: `traceparent` parsed strictly,
`tracestate` passed through, trace ids made and sampled, and the `Tracer` each worker's handlers
call per request (https://www.w3.org/TR/trace-context/).

Every request gets a span id of this proxy; the traceparent sent upstream names it as the
parent, so the service behind the proxy (and the next proxy) continues the same trace. A request
without a valid traceparent starts a trace, sampled with the configured probability; an
incoming sampled flag is kept (the caller decided). Sampled requests become spans, exported by
spans.py off the event loop thread, only once `configure()` names an OTLP endpoint.

Parsing (spec section "Versioning of traceparent"): version 00 is exactly 55 characters,
`00-<32 hex>-<16 hex>-<2 hex>`, lowercase; an all-zero trace id or parent id is invalid. A
higher version (not ff) is parsed by the same layout and may carry more fields after a dash.
An invalid header counts as absent (a new trace starts) and its tracestate is dropped with it
(the spec: no tracestate without the traceparent it belongs to). tracestate is opaque to us:
kept unchanged up to 512 bytes of printable ASCII, dropped whole otherwise (it is written back
into the upstream request, so no control characters get through).

Cost (`python -m meshnode.proxy.http.trace`: timeit, CPU time, best of 5, dev VM): start()
plus finish() of an unsampled request takes 0.8-1.0 µs without a traceparent and 1.1-1.3 µs
with a valid one (the regex is 0.45 µs of it); a sampled request adds 0.6 µs to queue its
span. Ids come from random.getrandbits (0.2 µs for a span id) rather than os.urandom (0.6 µs:
a syscall each); the module-level generator is reseeded in every forked child by CPython, so
two workers never share a sequence.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshnode import wire

if TYPE_CHECKING:
    from meshnode.proxy.http.exchange import RequestRecord
    from meshnode.proxy.http.spans import SpanCounts, SpanExport

__all__ = ["MAX_TRACESTATE", "Tracer", "otlp_url", "parse_traceparent", "valid_tracestate"]

MAX_TRACESTATE = 512  # bytes of tracestate kept (the spec asks vendors to pass at least 512)

# version "-" trace-id "-" parent-id "-" flags, then (future versions only) "-" anything
_TRACEPARENT = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL)
_TRACESTATE = re.compile(r"[\x20-\x7e\t]*")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_SAMPLED = 1


def parse_traceparent(value: str) -> tuple[str, str, bool] | None:
    """(trace id, parent id, sampled) of a traceparent header value, or None when it is
    invalid. Optional whitespace around the value (RFC 9110) is ignored."""
    m = _TRACEPARENT.fullmatch(value.strip(" \t"))
    if m is None:
        return None
    version, trace_id, parent_id, flags, rest = m.groups()
    if version == "00":
        if rest is not None:  # version 00 has exactly four fields
            return None
    elif version == "ff":
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, bool(int(flags, 16) & _SAMPLED)


def valid_tracestate(value: str) -> bool:
    """Whether a tracestate value is passed on: at most MAX_TRACESTATE bytes of printable ASCII
    (its list members are other vendors' business and are not checked)."""
    return len(value) <= MAX_TRACESTATE and _TRACESTATE.fullmatch(value) is not None


def otlp_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a Mesh `tracing.otlpEndpoint`: "host:port" or a URL
    without a path means the collector's default path, /v1/traces."""
    url = endpoint if endpoint.startswith(("http://", "https://")) else f"http://{endpoint}"
    _, _, rest = url.partition("://")
    if "/" not in rest.rstrip("/"):
        url = url.rstrip("/") + "/v1/traces"
    return url


class Tracer:
    """One per worker. start() and finish() run on the event loop thread for every request of
    an HTTP port, so they only make ids and, for sampled requests, queue a tuple; spans.py does
    the rest on its own thread. `rng` is for tests (a seeded Random); the default is the
    module-level generator (reseeded after fork)."""

    __slots__ = ("_bits", "_counts", "_export", "_key", "_random", "invalid", "node",
                 "sampling")

    def __init__(self, rng: random.Random | None = None) -> None:
        self._bits: Callable[[int], int] = (rng or random).getrandbits
        self._random: Callable[[], float] = (rng or random).random
        self.sampling = 0.0
        self.node = ""
        self._export: SpanExport | None = None
        self._key: tuple[str, str] = ("", "")
        self._counts: SpanCounts | None = None
        self.invalid = 0  # traceparent headers ignored as invalid

    def configure(self, msg: wire.Tracing) -> None:
        """Apply the mesh's tracing settings. A new endpoint (or node name) replaces the span
        export: the old one flushes on its own thread, without holding up the loop; "" stops
        exporting. No export thread exists until an endpoint is given."""
        self.sampling = min(max(msg.sampling, 0.0), 1.0)
        self.node = msg.node
        key = (otlp_url(msg.otlp_endpoint) if msg.otlp_endpoint else "", msg.node)
        if key == self._key:
            return
        old, self._export, self._key = self._export, None, key
        if old is not None:
            old.close(timeout=0)
        if key[0]:
            # Imported here: a worker that never exports never loads the OpenTelemetry SDK.
            from meshnode.proxy.http.spans import SpanCounts, SpanExport

            if self._counts is None:
                self._counts = SpanCounts()
            self._export = SpanExport(key[0], msg.node, self._counts)

    def start(self, rec: RequestRecord, traceparent: str | None,
              tracestate: str | None) -> str:
        """Fill rec's trace context (a new span of this proxy, child of the incoming parent
        when the traceparent is valid) and return the traceparent to send upstream."""
        span_id = f"{self._bits(64) or 1:016x}"
        parsed = parse_traceparent(traceparent) if traceparent else None
        if parsed is None:
            if traceparent:
                self.invalid += 1
            trace_id = f"{self._bits(128) or 1:032x}"
            rec.parent_span_id = ""
            rec.tracestate = ""
            sampled = self._random() < self.sampling
        else:
            trace_id, rec.parent_span_id, sampled = parsed
            rec.tracestate = tracestate if tracestate and valid_tracestate(tracestate) else ""
        rec.trace_id = trace_id
        rec.span_id = span_id
        rec.sampled = sampled
        return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"

    def finish(self, rec: RequestRecord) -> None:
        """Queue rec's span when it is sampled and spans are exported (never blocks)."""
        export = self._export
        if rec.sampled and export is not None:
            export.add(rec)

    def close(self, timeout: float = 2.0) -> None:
        """Flush the queued spans, waiting at most `timeout` seconds (worker drain)."""
        export, self._export, self._key = self._export, None, ("", "")
        if export is not None:
            export.close(timeout)

    def counts(self) -> dict[str, int]:
        """Spans exported, dropped (queue full, or left at close) and failed (the collector
        refused them or was unreachable), and failed export calls, since the worker started."""
        c = self._counts
        if c is None:
            return {"exported": 0, "dropped": 0, "failed": 0, "errors": 0}
        return {"exported": c.exported, "dropped": c.dropped + c.unsent, "failed": c.failed,
                "errors": c.errors}


def _bench() -> None:
    """Per-request cost of start()+finish() of unsampled requests (the docstring's figures)."""
    import time
    import timeit

    from meshnode.proxy.http.exchange import RequestRecord

    tracer = Tracer()
    tracer.configure(wire.Tracing(otlp_endpoint="", sampling=0.0, node="bench"))
    rec = RequestRecord(t0=time.monotonic(), wall=time.time(), src="a", dst="b",
                        protocol="http/1.1")
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    n = 200_000
    for label, tp in (("no traceparent", None), ("valid traceparent", incoming)):
        def one(tp: str | None = tp) -> None:
            tracer.start(rec, tp, None)
            tracer.finish(rec)

        best = min(timeit.repeat(one, number=n, repeat=5, timer=time.process_time)) / n
        print(f"start()+finish(), unsampled, {label}: {best * 1e6:.2f} µs")


if __name__ == "__main__":
    _bench()
