"""Span export: sampled requests, queued on the event loop thread as small tuples, turned into
OpenTelemetry SDK spans and sent over OTLP/HTTP (protobuf) by one daemon thread per worker.

Why this shape: the SDK's own Tracer and BatchSpanProcessor build and end a Span on the loop
thread (about 18 µs of CPU a span, measured with a null exporter: attributes, locks); here
the loop thread appends one tuple to a bounded deque (thread-safe under the GIL, no lock) and
everything else happens on the export thread. The thread wakes every INTERVAL seconds, or as
soon as BATCH spans wait, and exports them in batches of at most BATCH with OTLPSpanExporter
(a TIMEOUT per export, the exporter's own retries included).

The export thread holds the GIL while it builds and encodes spans, 50-70 µs of CPU a span (the
OTLP encoder builds protobuf messages in Python; `python -m meshnode.proxy.http.spans`), time
the loop thread waits for. So it exports at most QUEUE spans per INTERVAL (2048/s, about 12%
of a core); past that, spans find the queue full and are dropped: sampling 1.0 on a busy
worker degrades the trace, not the requests.

A collector that is down or slow costs spans, never requests: a span that finds QUEUE spans
waiting is dropped and counted (`dropped`); a failed export counts its spans
(`failed`) and is logged once until an export succeeds again (the exporter's own per-batch
messages are silenced after the first). close() stops the thread within a bounded time;
spans still queued then are dropped and counted.

The OpenTelemetry SDK is imported on the export thread, so neither a worker that never exports
nor the loop thread pays for the import.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

    from meshnode.proxy.http.exchange import RequestRecord

__all__ = ["BATCH", "INTERVAL", "QUEUE", "SERVICE_NAME", "TIMEOUT", "SpanCounts",
           "SpanExport"]

log = logging.getLogger(__name__)

SERVICE_NAME = "meshnode-proxy"
QUEUE = 2048  # spans waiting at most (about 0.5 MB); more are dropped
BATCH = 512  # spans per export request; also wakes the thread early
INTERVAL = 1.0  # seconds between exports when fewer than BATCH spans wait
TIMEOUT = 2.0  # seconds per export call, the exporter's retries included
GRACE = 2.0  # seconds a closed export may still spend flushing

# The exporter logs every failed batch (and every retry) itself; while a collector is down that
# is a line a second per worker. The first failure goes through, with its reason; after that
# the export thread sets _quiet.on until an export succeeds again.
_EXPORTER_LOGGERS = ("opentelemetry.exporter.otlp.common.http",
                     "opentelemetry.exporter.otlp.proto.http.trace_exporter")
_quiet = threading.local()


class _QuietFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_quiet, "on", False)


_QUIET_FILTER = _QuietFilter()


class SpanCounts:
    """Span export figures of a worker (shared by the exports a reconfiguration replaces)."""

    __slots__ = ("dropped", "errors", "exported", "failed", "unsent")

    def __init__(self) -> None:
        # `dropped` is written by the loop thread only, the others by the export thread only:
        # no lock, and no increment lost to the other thread.
        self.dropped = 0  # found the queue full
        self.unsent = 0  # still queued when the export closed (or could not start)
        self.exported = 0
        self.failed = 0  # in a batch the collector did not take
        self.errors = 0  # failed export calls


# The queued form of a span (made on the loop thread, so: no conversions, just references):
# trace_id, span_id, parent_span_id, wall, duration, src, dst, route, method, path, status,
# grpc_status, endpoint, retries, outcome, protocol
_Queued = tuple[Any, ...]


class SpanExport:
    """Spans of sampled requests to one OTLP/HTTP traces URL. `exporter` makes the
    SpanExporter from the URL on the export thread (tests; default: OTLPSpanExporter)."""

    def __init__(self, url: str, node: str, counts: SpanCounts | None = None, *,
                 queue: int = QUEUE, batch: int = BATCH, interval: float = INTERVAL,
                 timeout: float = TIMEOUT,
                 exporter: Callable[[str, float], SpanExporter] | None = None) -> None:
        self.url = url
        self.node = node
        self.counts = counts if counts is not None else SpanCounts()
        self._queue: collections.deque[_Queued] = collections.deque()
        self._max = queue
        self._batch = batch
        self._interval = interval
        self._timeout = timeout
        self._make = exporter
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._deadline = float("inf")  # monotonic; set by close()
        self._lock = threading.Lock()  # guards _exporter and _shut
        self._exporter: SpanExporter | None = None
        self._shut = False
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="meshnode-spans", daemon=True)
        self._thread.start()

    def add(self, rec: RequestRecord) -> None:
        """Queue rec's span. Loop thread, per sampled request: never blocks."""
        queue = self._queue
        if len(queue) >= self._max:
            # The newest is dropped: only the loop thread appends, so the count is exact
            # (evicting the oldest could race with the export thread's popleft).
            self.counts.dropped += 1
            return
        queue.append((rec.trace_id, rec.span_id, rec.parent_span_id, rec.wall, rec.duration,
                      rec.src, rec.dst, rec.route, rec.method, rec.path, rec.status,
                      rec.grpc_status, rec.endpoint, rec.retries, rec.outcome, rec.protocol))
        if len(queue) >= self._batch and not self._wake.is_set():
            self._wake.set()

    def close(self, timeout: float = GRACE) -> None:
        """Export what is queued and stop the thread. Waits at most `timeout` seconds (0: not
        at all; the thread then stops taking batches after GRACE seconds and ends once the
        export under way returns, TIMEOUT at most); past that, an export in progress is
        abandoned and what is still queued is dropped."""
        self._deadline = time.monotonic() + (timeout if timeout > 0 else GRACE)
        self._stop.set()
        self._wake.set()
        if timeout <= 0:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._shutdown()  # aborts the exporter's retry wait; the thread then drops the rest

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _shutdown(self) -> None:
        with self._lock:
            exporter, shut = self._exporter, self._shut
            self._shut = True
        if exporter is not None and not shut:
            with contextlib.suppress(Exception):
                exporter.shutdown()

    def _run(self) -> None:
        try:
            convert = _Converter(self.node)
            exporter = (self._make or _otlp_exporter)(self.url, self._timeout)
        except Exception:
            log.exception("span export to %s cannot start; spans are dropped", self.url)
            self._stop.wait()
            self._discard()
            return
        with self._lock:
            self._exporter = exporter
            shut = self._shut
        if shut:  # closed while the SDK loaded
            exporter.shutdown()
        try:
            while True:
                self._wake.wait(self._interval)
                self._wake.clear()
                stopping = self._stop.is_set()
                started = time.monotonic()
                sent = self._drain(convert, exporter, None if stopping else self._max)
                if stopping:
                    return
                if sent >= self._max:  # the ceiling: no more this interval (close ends it)
                    self._stop.wait(started + self._interval - time.monotonic())
        finally:
            self._shutdown()

    def _drain(self, convert: _Converter, exporter: SpanExporter, limit: int | None) -> int:
        """Export queued spans in batches, at most `limit`; returns how many were taken."""
        queue, taken = self._queue, 0
        while queue and (limit is None or taken < limit):
            if time.monotonic() > self._deadline or self._shut:
                self._discard()
                break
            batch: list[_Queued] = []
            with contextlib.suppress(IndexError):  # the queue only grows meanwhile
                for _ in range(min(len(queue), self._batch)):
                    batch.append(queue.popleft())
            taken += len(batch)
            self._export(convert, exporter, batch)
        return taken

    def _discard(self) -> None:
        queue, n = self._queue, 0
        with contextlib.suppress(IndexError):
            while True:
                queue.popleft()
                n += 1
        self.counts.unsent += n

    def _export(self, convert: _Converter, exporter: SpanExporter,
                batch: Sequence[_Queued]) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            spans = [convert.span(item) for item in batch]
            ok = exporter.export(spans) is SpanExportResult.SUCCESS
        except Exception:  # the exporter catches its own errors; this is a bug, not the network
            log.exception("span export to %s failed", self.url)
            ok = False
        counts = self.counts
        if ok:
            counts.exported += len(batch)
            if self._failing:
                self._failing = _quiet.on = False
                log.info("span export to %s works again", self.url)
            return
        counts.failed += len(batch)
        counts.errors += 1
        if not self._failing:
            self._failing = _quiet.on = True
            log.warning("span export to %s failed; spans are dropped (and counted, not logged) "
                        "until it works again", self.url)


def _otlp_exporter(url: str, timeout: float) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    for name in _EXPORTER_LOGGERS:
        logger = logging.getLogger(name)
        if _QUIET_FILTER not in logger.filters:
            logger.addFilter(_QUIET_FILTER)
    return OTLPSpanExporter(endpoint=url, timeout=timeout)


class _Converter:
    """Queued tuples to SDK spans (export thread). Kind CLIENT: the proxy's span is the call
    from the source service to the destination's endpoint."""

    def __init__(self, node: str) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        from meshnode import __version__
        from meshnode.proxy.http.exchange import GRPC_STATUS

        self._node = node
        self._resource = Resource.create({"service.name": SERVICE_NAME, "host.name": node})
        self._scope = InstrumentationScope("meshnode.proxy.http", __version__)
        self._readable = ReadableSpan
        self._context = SpanContext
        self._client = SpanKind.CLIENT
        self._flags = TraceFlags(TraceFlags.SAMPLED)
        self._status = Status
        self._ok = Status(StatusCode.UNSET)
        self._error = StatusCode.ERROR
        self._grpc = GRPC_STATUS

    def span(self, item: _Queued) -> ReadableSpan:
        (trace_id, span_id, parent_id, wall, duration, src, dst, route, method, path, status,
         grpc_status, endpoint, retries, outcome, protocol) = item
        tid = int(trace_id, 16)
        context = self._context(tid, int(span_id, 16), False, self._flags)
        parent = (self._context(tid, int(parent_id, 16), True, self._flags)
                  if parent_id else None)
        bare = path.split("?", 1)[0][:1024]  # the query may hold secrets; paths can be long
        grpc = protocol == "grpc"
        attrs: dict[str, str | int] = {
            "meshnode.src": src, "meshnode.dst": dst, "meshnode.route": route,
            "meshnode.retries": retries, "meshnode.node": self._node,
            "meshnode.outcome": outcome,
            "network.protocol.name": "http",
            "network.protocol.version": "1.1" if protocol == "http/1.1" else "2",
        }
        if method:
            attrs["http.request.method"] = method
        if bare:
            attrs["url.path"] = bare
        if status:
            attrs["http.response.status_code"] = status
        if grpc:
            attrs["rpc.system"] = "grpc"
        if grpc_status is not None:
            attrs["rpc.grpc.status_code"] = grpc_status
        if endpoint is not None:
            attrs["server.address"] = str(endpoint.ip)
            attrs["server.port"] = endpoint.port
        error = (status >= 500 or status == 0
                 or (grpc_status is not None and grpc_status != 0))
        if error:
            why = outcome if outcome != "ok" else (
                self._grpc[grpc_status] if grpc_status is not None
                and 0 <= grpc_status < len(self._grpc) else f"status {status}")
            span_status = self._status(self._error, why)
        else:
            span_status = self._ok
        name = (bare.lstrip("/") or dst) if grpc else f"{method or 'HTTP'} {dst}"
        start = int(wall * 1e9)
        return self._readable(
            name, context=context, parent=parent, resource=self._resource, attributes=attrs,
            kind=self._client, status=span_status, start_time=start,
            end_time=start + int(duration * 1e9), instrumentation_scope=self._scope)


def _bench() -> None:
    """Export-thread cost per span: conversion to an SDK span plus OTLP protobuf encoding (the
    docstring's figure; the HTTP POST is not included)."""
    import timeit
    from ipaddress import IPv4Address

    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from meshnode.model import HostPort

    convert = _Converter("bench")
    now = time.time()
    items = [(f"{i + 1:032x}", f"{i + 1:016x}", "00f067aa0ba902b7", now, 0.002, "web", "api",
              "default", "GET", "/orders/7?x=1", 200, None,
              HostPort(IPv4Address("198.19.0.2"), 8080), 0, "ok", "http/1.1")
             for i in range(BATCH)]

    def batch() -> None:
        encode_spans([convert.span(item) for item in items]).SerializePartialToString()

    best = min(timeit.repeat(batch, number=5, repeat=5, timer=time.process_time)) / 5 / BATCH
    print(f"convert + encode: {best * 1e6:.1f} µs per span ({BATCH} per batch)")


if __name__ == "__main__":
    _bench()
