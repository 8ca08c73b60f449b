"""gRPC over HTTP/2 as the proxy sees it: the status a call ended with, the answers the proxy
makes itself, and the client's deadline.

A gRPC call's status travels in the `grpc-status` trailer, or in the headers of a
"trailers-only" response (HEADERS with END_STREAM: how servers, and this proxy, answer a call
that failed before any message). When a call has no grpc-status, its client derives one from
what it saw: the HTTP status (grpc/doc/http-grpc-status-mapping.md) or the RST_STREAM code
(grpc/doc/PROTOCOL-HTTP2.md, "Errors"); `status_of_http` and `status_of_reset` make the same
derivation, so the status_class label counts what the client got.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import re

__all__ = ["CANCELLED", "DEADLINE_EXCEEDED", "UNAVAILABLE", "UNKNOWN", "grpc_timeout",
           "is_grpc", "is_server_error", "local_status", "message", "status_of_http",
           "status_of_reset", "trailers_only"]

CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
INTERNAL = 13
UNAVAILABLE = 14

# outcome of a request the proxy answers itself -> the gRPC status it answers with
_LOCAL = {"timeout": DEADLINE_EXCEEDED, "per_try_timeout": DEADLINE_EXCEEDED,
          "denied": PERMISSION_DENIED, "body_too_large": RESOURCE_EXHAUSTED,
          "proxy_error": INTERNAL, "bad_request": INTERNAL, "rate_limited": RESOURCE_EXHAUSTED,
          "no_route": 12}  # 12: UNIMPLEMENTED, as Envoy answers a call no route takes
_HTTP = {400: INTERNAL, 401: 16, 403: PERMISSION_DENIED, 404: 12, 429: UNAVAILABLE,
         502: UNAVAILABLE, 503: UNAVAILABLE, 504: UNAVAILABLE}
# RST_STREAM error code -> status: CANCEL, REFUSED_STREAM, ENHANCE_YOUR_CALM,
# INADEQUATE_SECURITY; every other code is INTERNAL
_RESET = {0x8: CANCELLED, 0x7: UNAVAILABLE, 0xb: RESOURCE_EXHAUSTED, 0xc: PERMISSION_DENIED}
_SERVER_ERRORS = frozenset({UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, 15})
_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_TIMEOUT = re.compile(rb"(\d{1,8})([HMSmun])")


def is_grpc(content_type: bytes | None) -> bool:
    """application/grpc, with or without a +proto/+json suffix or parameters."""
    return content_type is not None and content_type.startswith(b"application/grpc") and \
        content_type[16:17] in (b"", b"+", b";")


def local_status(outcome: str) -> int:
    """The status of a call the proxy fails itself (UNAVAILABLE unless the outcome says
    otherwise: a gRPC client may retry UNAVAILABLE on its own)."""
    return _LOCAL.get(outcome, UNAVAILABLE)


def status_of_http(status: int) -> int:
    """The status a client derives from a response that ended without grpc-status (UNKNOWN
    for a 200: a call must end with one)."""
    return _HTTP.get(status, UNKNOWN)


def is_server_error(code: int | None) -> bool:
    """A status that counts against the endpoint like a 5xx (outlier detection, the
    balancer): UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS (Envoy maps them
    to 500/504/500/503/500 likewise)."""
    return code in _SERVER_ERRORS


def status_of_reset(code: int) -> int:
    """The status a client derives from an RST_STREAM with `code`."""
    return _RESET.get(code, INTERNAL)


def message(text: str) -> bytes:
    """A grpc-message value: UTF-8, percent-encoded outside printable ASCII (and '%')."""
    out = bytearray()
    for b in text.encode("utf-8", "replace"):
        if 0x20 <= b <= 0x7e and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def trailers_only(code: int, text: str, reason: str) -> list[tuple[bytes, bytes]]:
    """A trailers-only response failing a call with `code` (the proxy's own answer; `reason`
    goes in x-meshnode-error as for HTTP)."""
    return [(b":status", b"200"), (b"content-type", b"application/grpc"),
            (b"grpc-status", b"%d" % code), (b"grpc-message", message(text)),
            (b"x-meshnode-error", reason.encode("ascii", "replace"))]


def grpc_timeout(value: bytes) -> float | None:
    """Seconds of a grpc-timeout header ("100m", "5S"), None when it is not one."""
    m = _TIMEOUT.fullmatch(value)
    if m is None:
        return None
    return int(m.group(1)) * _UNITS[m.group(2)]
