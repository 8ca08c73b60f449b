"""A real OTLP/HTTP traces receiver for tests: POST /v1/traces with a protobuf
ExportTraceServiceRequest, decoded and kept as `ReceivedSpan`s.

    with OtlpReceiver() as rx:
        ... configure the proxy with rx.endpoint ("127.0.0.1:PORT") ...
        spans = rx.wait_for(lambda spans: len(spans) >= 2, timeout=10)

`status` and `delay` make it a failing or slow collector. Binds 127.0.0.1 only.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

__all__ = ["OtlpReceiver", "ReceivedSpan"]


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str  # hex
    span_id: str
    parent_span_id: str  # "" for a root span
    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind (3: CLIENT)
    attributes: dict[str, Any]
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str
    start_ns: int
    end_ns: int
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which) if which else None


def decode(body: bytes) -> list[ReceivedSpan]:
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    out = []
    for rs in req.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(ReceivedSpan(
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex(), name=s.name, kind=s.kind,
                    attributes={kv.key: _value(kv.value) for kv in s.attributes},
                    status_code=s.status.code, status_message=s.status.message,
                    start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                    resource=resource, scope=ss.scope.name))
    return out


class OtlpReceiver:
    """Threaded HTTP server on 127.0.0.1:<free port>. `status`: what POSTs get (200: the spans
    are kept); `delay`: seconds before answering (a slow collector). Both may be changed while
    it runs."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.status = status
        self.delay = delay
        self.spans: list[ReceivedSpan] = []
        self.arrived = 0  # POSTs to /v1/traces received (counted before `delay`)
        self.requests = 0  # POSTs to /v1/traces answered, whatever the status
        self.batches: list[int] = []  # spans per request kept
        self._cond = threading.Condition()
        self._release = threading.Event()  # set on stop: a delayed answer stops waiting
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.path != "/v1/traces":
                    self._answer(404, b"")
                    return
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                with receiver._cond:
                    receiver.arrived += 1
                    receiver._cond.notify_all()
                if receiver.delay:
                    receiver._release.wait(receiver.delay)
                status = receiver.status
                spans = decode(body) if status == 200 else []
                with receiver._cond:
                    receiver.requests += 1
                    receiver.spans.extend(spans)
                    if spans:
                        receiver.batches.append(len(spans))
                    receiver._cond.notify_all()
                self._answer(status, ExportTraceServiceResponse().SerializeToString()
                             if status == 200 else b"")

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self.endpoint = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._release.set()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool],
                 timeout: float = 10.0) -> list[ReceivedSpan]:
        """The spans received so far once `predicate(spans)` holds; AssertionError after
        `timeout` seconds (with what did arrive)."""
        self.wait_until(lambda: predicate(self.spans), timeout)
        with self._cond:
            return list(self.spans)

    def wait_until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until `condition()` (about this receiver's state) holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"OTLP receiver: condition not met in {timeout}s; "
                        f"{len(self.spans)} spans: {[s.name for s in self.spans][:20]}")
                self._cond.wait(left)
