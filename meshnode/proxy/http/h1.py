"""HTTP/1.1 through the proxy: each request of a client connection routed, balanced, retried,
timed out, counted and traced on its own.

`H1Downstream` (this module) is the client's connection (llhttp through httptools parses
it); each request on it becomes an `Exchange` (h1_exchange.py), which picks an endpoint per
request (the service's balancer, fresh per request: a keep-alive client's requests spread
over the endpoints), takes a keep-alive connection from the pool (proxy/http/pool.py:
`H1Upstream`, h1_upstream.py), forwards the request, and the response back. Requests are
answered in order; a pipelined request waits (its connection is not read meanwhile) until
the one before it is answered.

What is forwarded is what the parser understood, re-framed, never the client's raw bytes: the
head is rebuilt (hop-by-hop headers dropped, `traceparent`/`tracestate` set), a body is sent
with its validated Content-Length or re-chunked (trailers dropped); a request the parser
refuses (both lengths, bad chunk sizes, obs-fold, bad methods...) or that has no Host or two
gets 400 and the connection closes (a reset when its head went to an endpoint already, whose
connection closes too: no half request stays on it). So a client's
ambiguous framing never reaches an endpoint, and no client's bytes can land in another's
request. Responses likewise: a response the parser refuses, or one not asked for (a second
one, a 101 to no Upgrade), is a 502, and that endpoint connection is not reused. A head is
held to limits.maxHeaderBytes while it arrives (httptools keeps a header until it ends).

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools

from meshnode.proxy.http.exchange import RequestRecord
from meshnode.proxy.http.h1_exchange import Exchange
from meshnode.proxy.http.h1_wire import _STATUS, _BadRequest, _TooLarge, error_response

if TYPE_CHECKING:
    from meshnode.model import OrigDstAddr
    from meshnode.proxy.http.front import HttpFront
    from meshnode.proxy.telemetry import ConnInfo

__all__ = ["H1Downstream"]

log = logging.getLogger("meshnode.proxy.http")

HEAD_TIMEOUT = 10.0  # seconds from a request's first byte to its last header (slowloris)
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class H1Downstream(asyncio.Protocol):
    """A client's HTTP/1.1 connection."""

    def __init__(self, front: HttpFront, info: ConnInfo, service: str,
                 dst: OrigDstAddr) -> None:
        self.front = front
        self.info = info
        self.service = service
        self.dst = dst
        self.gateway = ""  # the Gateway's name when it accepted this connection (by host)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Exchange] = deque()  # answered in order; [0] is being answered
        self.parsing: Exchange | None = None  # the request whose bytes are being read
        self._url: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._size = 0
        self._head_timer: asyncio.TimerHandle | None = None
        # httptools hands a header over only once it is whole (a value is buffered until its
        # end): the bytes read into an unfinished head are counted here, against
        # limits.maxHeaderBytes, from the read after the one where the head began
        self._in_head = False
        self._head_fed = 0
        self._begun = 0  # requests begun on this connection
        self._starting: Exchange | None = None  # head complete, started after its read
        self._pauses: set[str] = set()
        self.closing = False  # drain: close after the current response
        self.closed = False
        self.opaque: Exchange | None = None
        self.last_active = front.clock()
        self.bytes_in = 0
        self.bytes_out = 0

    # -- transport events -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.front.opened(self)

    def data_received(self, data: bytes) -> None:
        self.last_active = self.front.clock()
        self.bytes_in += len(data)
        if self.opaque is not None:
            self.opaque.opaque_data(data)
            return
        begun = self._begun
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = int(exc.args[0]) if exc.args else len(data)
            ex = self.parsing
            if ex is not None and not ex.done:
                # The rest is the upgraded protocol's: held until the endpoint accepts it.
                ex.early = data[offset:]
                ex.req_complete = True
                self.pause("upgrade")
            self._start()
            return
        except _TooLarge:
            self._refuse("header_too_large", "the request's header block is larger than "
                         f"{self._limits_header()} bytes (limits.maxHeaderBytes)")
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _TooLarge) or isinstance(exc.__cause__, _TooLarge):
                self._refuse("header_too_large", "the request's header block is larger "
                             f"than {self._limits_header()} bytes (limits.maxHeaderBytes)")
            elif isinstance(exc.__context__, _BadRequest):
                self._refuse("bad_request", str(exc.__context__))
            else:
                log.error("HTTP/1.1 handler error", exc_info=exc.__context__ or exc)
                self._refuse("proxy_error", "the proxy failed handling the request (its log "
                             "says why)")
        except httptools.HttpParserError as exc:
            if "last" in self._pauses:
                # bytes after a request that closes the connection: never read as a request
                # (RFC 9112 9.6), and no reason to cut that request's response short
                self._start()
                return
            self._refuse("bad_request", f"malformed HTTP/1.1 request: {exc}")
        else:
            if self._in_head and self._begun == begun:
                self._head_fed += len(data)
                if self._head_fed > self._limits_header():
                    self._refuse("header_too_large", "the request's header block is larger "
                                 f"than {self._limits_header()} bytes (limits.maxHeaderBytes)")
                    return
            self._start()

    def _start(self) -> None:
        """Start the request whose head the last read completed. Not from the parser's
        callback: llhttp refuses some heads (a Transfer-Encoding not ending in chunked) only
        after it, and such a request must not reach an endpoint."""
        ex, self._starting = self._starting, None
        if ex is not None and not ex.done and self.queue and self.queue[0] is ex:
            ex.start()

    def eof_received(self) -> bool | None:
        # A client that half-closes after its request still gets its response. (Over TLS
        # there is no half-close: the transport closes whatever this returns, and asyncio
        # warns when it is True.)
        if self.queue:
            self.closing = True
            return None if self.gateway else True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._head_timer is not None:
            self._head_timer.cancel()
        for ex in list(self.queue):
            ex.cancel("client_gone")
        self.queue.clear()
        self.front.closed(self)

    def pause_writing(self) -> None:
        ex = self.queue[0] if self.queue else None
        conn = ex.conn if ex is not None else None
        if conn is not None and conn.transport is not None and not conn.paused:
            conn.paused = True
            conn.transport.pause_reading()

    def resume_writing(self) -> None:
        ex = self.queue[0] if self.queue else None
        conn = ex.conn if ex is not None else None
        if conn is not None and conn.transport is not None and conn.paused:
            conn.paused = False
            conn.transport.resume_reading()

    # -- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = []
        self._headers = []
        self._size = 0
        self._in_head = True
        self._head_fed = 0
        self._begun += 1
        if self.queue:
            self.pause("pipeline")  # one request answered at a time; the next waits
        self._head_timer = self.front.loop.call_later(HEAD_TIMEOUT, self._head_timeout)

    def on_url(self, url: bytes) -> None:
        self._size += len(url)
        if self._size > self._limits_header():
            raise _TooLarge
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._size += len(name) + len(value) + 4
        if self._size > self._limits_header():
            raise _TooLarge
        if self._in_head:
            # not a trailer (after a chunked body): those are dropped (the body is re-chunked
            # without them), never added to the request's headers (a retry re-sends those)
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        p = self.parser
        method = p.get_method().decode("latin-1")
        version = p.get_http_version()
        chunked = False
        hosts = 0
        for n, _ in self._headers:
            n = n.lower()
            if n == b"transfer-encoding":
                chunked = True
            elif n == b"host":
                hosts += 1
        if hosts > 1 or (hosts == 0 and version == "1.1"):
            # RFC 9112 3.2: which authority would an endpoint take?
            raise _BadRequest(f"an HTTP/1.1 request needs exactly one Host header, not {hosts}")
        ex = Exchange(self, method, b"".join(self._url), self._headers, version,
                      p.should_keep_alive(), chunked, p.should_upgrade() or method == "CONNECT")
        self.parsing = ex
        self.queue.append(ex)
        if len(self.queue) == 1:
            self._starting = ex

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is not None and not ex.done:
            ex.body_data(body)

    def on_message_complete(self) -> None:
        ex = self.parsing
        if ex is not None:
            ex.request_complete()
            if not ex.keep_alive:
                self.pause("last")  # nothing after a request that closes the connection

    def _limits_header(self) -> int:
        return self.front.table.policy(self.service).http.limits.max_header_bytes

    # -- driving ----------------------------------------------------------------------------

    def exchange_done(self, ex: Exchange) -> None:
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
        elif ex in self.queue:
            self.queue.remove(ex)
        if self.parsing is ex and ex.req_complete:
            self.parsing = None
        if ex.close_after or self.closing:
            self.close()
            return
        self.last_active = self.front.clock()
        if self.queue:
            self.queue[0].start()
        # Read on: the next request's body may still be coming (it was held at its head),
        # and a request after it pauses reading again when it begins.
        if not self.closed:
            self.resume("pipeline")

    def refuse_body(self, ex: Exchange) -> None:
        limit = self.front.table.policy(self.service).http.limits.max_body_bytes
        ex.close_after = True
        if ex.resp_started:
            ex._abort("body_too_large")
        else:
            ex._end_attempt(False)
            ex._release(False)
            ex._fail("body_too_large",
                     f"the request body is larger than {limit} bytes (limits.maxBodyBytes)")
        self.pause("refused")

    def go_opaque(self, ex: Exchange) -> None:
        self.opaque = ex
        rest, ex.early = ex.early, b""
        if rest:
            ex.opaque_data(rest)
        self.resume("upgrade")

    def _refuse(self, outcome: str, detail: str) -> None:
        """The request cannot be parsed or is too large: answer (if nothing is in flight to
        this client) and close."""
        pending, self._starting = self._starting, None
        if pending is not None and pending in self.queue:
            # never started (its read failed): it holds nothing, the answer below is its own
            self.queue.remove(pending)
            pending.done = True
        ex = self.parsing
        if ex is not None and not ex.done and ex in self.queue and ex is not self.queue[0]:
            self.queue.remove(ex)
            ex.cancel(outcome)
        if self.queue:
            # the response in flight is cut short: the stream is unusable after a bad request
            for pending in list(self.queue):
                pending.cancel(outcome)
            self.queue.clear()
            self.abort()
            return
        status = _STATUS.get(outcome, 400)
        rec = RequestRecord(self.front.clock(), time.time(), self.info.src, self.service,
                            "http/1.1", status=status, outcome=outcome)
        rec.t_end = rec.t0
        self.front.finisher.finish(rec)
        self.write(error_response(status, outcome, detail, close=True))
        self.close()

    def _head_timeout(self) -> None:
        self._head_timer = None
        if "pipeline" in self._pauses and not self.closed:
            # the proxy is not reading this head (a request before it is being answered):
            # it gets another HEAD_TIMEOUT
            self._head_timer = self.front.loop.call_later(HEAD_TIMEOUT, self._head_timeout)
            return
        if not self.closed:
            self._refuse("header_timeout", f"the request head did not arrive within "
                         f"{HEAD_TIMEOUT:.0f}s")

    def pause(self, why: str) -> None:
        if not self._pauses and self.transport is not None:
            self.transport.pause_reading()
        self._pauses.add(why)

    def resume(self, why: str) -> None:
        if why in self._pauses:
            self._pauses.discard(why)
            if not self._pauses and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.bytes_out += len(data)
            self.transport.write(data)

    @property
    def idle(self) -> bool:
        return not self.queue and self._head_timer is None

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()  # after what is buffered is written

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            # A reset, not a FIN (which is all a transport's abort sends): a response cut
            # short must not look whole to a client reading to the connection's end (one
            # close-delimited to an HTTP/1.0 client).
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            self.transport.abort()
