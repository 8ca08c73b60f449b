"""HTTP/1.1 bytes the proxy writes itself: the hop-by-hop header sets a forwarded head
drops, a body's chunk framing and its Transfer-Encoding codings, the errors the parsers'
callbacks raise, and `error_response` (a response the proxy answers with itself, carrying
`x-meshnode-error: <reason>`; h1_exchange.py lists the reasons).

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

from http import HTTPStatus

from meshnode.proxy.http.exchange import ERROR_STATUS

__all__ = ["error_response"]

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the proxy sets itself: never forwarded.
_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                  b"te", b"trailer", b"upgrade", b"traceparent", b"tracestate"})
_HOP_RESPONSE = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                           b"transfer-encoding", b"te", b"trailer", b"upgrade"})
_PHRASES = {500: "Internal Server Error", 400: "Bad Request", 403: "Forbidden",
            404: "Not Found", 408: "Request Timeout", 413: "Content Too Large",
            429: "Too Many Requests",
            431: "Request Header Fields Too Large", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}
_STATUS = ERROR_STATUS


def error_response(status: int, reason: str, detail: str, close: bool,
                   headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A response the proxy makes itself: a one-line body saying why."""
    body = (detail + "\n").encode("utf-8", "replace")
    extra = "".join(f"{n}: {v}\r\n" for n, v in headers)
    return (f"HTTP/1.1 {status} {_phrase(status)}\r\n"
            f"content-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
            f"x-meshnode-error: {reason}\r\n{extra}"
            + ("connection: close\r\n" if close else "") + "\r\n").encode() + body


def _phrase(status: int) -> str:
    phrase = _PHRASES.get(status)
    if phrase is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
    return phrase


class _TooLarge(Exception):
    pass


class _BadRequest(Exception):
    """A request the parser takes that HTTP/1.1 still refuses (RFC 9112 3.2: Host)."""


class _BadResponse(Exception):
    """A response llhttp reads that is still not one to pass on (an unsolicited one)."""


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _codings(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The Transfer-Encoding to send with a re-chunked body: the message's codings other than
    chunked, lower case, then chunked."""
    codings = [c for n, v in headers if n.lower() == b"transfer-encoding"
               for c in (x.strip(b" \t").lower() for x in v.split(b",")) if c]
    return b", ".join([c for c in codings if c != b"chunked"] + [b"chunked"])
