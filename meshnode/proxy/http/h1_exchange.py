"""One HTTP/1.1 request through the proxy: `Exchange`, made by h1.H1Downstream for each
request of a client connection, picks an endpoint per request, takes a keep-alive
connection to it from the pool (h1_upstream.H1Upstream), forwards the request (head rebuilt,
body re-framed: h1_wire.py), relays the response back, and keeps the request's record.

Retries: a request whose body the proxy still holds (up to `http.bufferBytes`) and whose
response has not started is tried again on another endpoint for the route's retry
conditions (connect failure, reset before the response, 502/503/504), within the service's
retry budget (proxy/http/exchange.py). Errors the proxy answers itself carry
`x-meshnode-error: <reason>`: 400 bad_request, 403 denied, 408 header_timeout, 413
body_too_large, 431 header_too_large, 502 upstream_error/reset/connect failures, 503
no_endpoint/circuit_open/budget, 504 timeout.

Upgrade (101) and CONNECT (2xx) continue as opaque bytes both ways after the handshake.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import httptools

from meshnode.model import Endpoint
from meshnode.proxy.http.attempt import begin_attempt
from meshnode.proxy.http.dial import DialError
from meshnode.proxy.http.exchange import RequestRecord, RoutePlan, ServiceHttp, backoff
from meshnode.proxy.http.h1_wire import (
    _HOP,
    _HOP_RESPONSE,
    _STATUS,
    _BadResponse,
    _chunk,
    _codings,
    _TooLarge,
    error_response,
)
from meshnode.proxy.http.pool import PoolFull
from meshnode.proxy.http.steer import Refusal, dialled_port, header_map, peer_ip, steer
from meshnode.route.table import ToService

if TYPE_CHECKING:
    from meshnode.balance import Balancer, EndpointLoad
    from meshnode.balance.outlier import OutlierDetector
    from meshnode.proxy.http.h1 import H1Downstream
    from meshnode.proxy.http.h1_upstream import H1Upstream

__all__ = ["Exchange"]

log = logging.getLogger("meshnode.proxy.http")


class Exchange:
    """One request: its attempts, its response, its record."""

    __slots__ = (
        "attempt_t0",
        "balancer",
        "body",
        "body_size",
        "buffered",
        "chunk_out",
        "chunk_up",
        "close_after",
        "conn",
        "connecting",
        "discard",
        "done",
        "down",
        "early",
        "ep",
        "head_fed",
        "headers",
        "informational",
        "keep_alive",
        "method",
        "opaque",
        "outlier",
        "plan",
        "rec",
        "req_complete",
        "resp_close_delimited",
        "resp_head",
        "resp_headers",
        "resp_len",
        "resp_started",
        "retry_cause",
        "route",
        "rparser",
        "rsize",
        "steer",
        "svc",
        "timer",
        "token",
        "tp",
        "tried",
        "try_timer",
        "upgrade",
        "url",
        "version",
    )

    def __init__(self, down: H1Downstream, method: str, url: bytes,
                 headers: list[tuple[bytes, bytes]], version: str, keep_alive: bool,
                 chunked: bool, upgrade: bool) -> None:
        self.down = down
        self.method = method
        self.url = url
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.chunk_up = chunked
        self.upgrade = upgrade
        front = down.front
        now = front.clock()
        host = b""
        tp: bytes | None = None
        ts: bytes | None = None
        for name, value in headers:
            n = name.lower()
            if n == b"host":
                host = value
            elif n == b"traceparent":  # several: invalid, and joined they fail to parse
                tp = value if tp is None else tp + b"," + value
            elif n == b"tracestate":  # several are one list (W3C trace context 3.3.1)
                ts = value if ts is None else ts + b"," + value
        self.rec = rec = RequestRecord(now, time.time(), down.info.src, down.service,
                                       "http/1.1", method, url.decode("latin-1"),
                                       host.decode("latin-1"))
        self.steer = st = steer(front, down.gateway, down.service, rec,
                                lambda: header_map(headers), peer_ip(down))
        self.svc: ServiceHttp = st.svc
        self.plan: RoutePlan = st.plan
        self.tp = front.tracer.start(rec, tp.decode("latin-1") if tp else None,
                                     ts.decode("latin-1") if ts else None)
        self.body: list[bytes] = []
        self.body_size = 0
        self.buffered = True  # the whole body so far is held (retryable)
        self.req_complete = False
        self.conn: H1Upstream | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.ep: Endpoint | None = None
        self.token: EndpointLoad | None = None
        self.balancer: Balancer | None = None
        self.outlier: OutlierDetector | None = None
        self.tried: list[Endpoint] = []
        self.route: ToService | None = None
        self.attempt_t0 = now
        self.timer: asyncio.TimerHandle | None = None
        self.try_timer: asyncio.TimerHandle | None = None
        self.rparser: httptools.HttpResponseParser | None = None
        self.resp_head: list[bytes] = []
        self.resp_headers: list[tuple[bytes, bytes]] = []
        self.resp_len = False
        self.resp_close_delimited = False
        self.rsize = 0
        self.head_fed = -1  # bytes read into a response head not complete yet (-1: none)
        self.resp_started = False
        self.informational = False
        self.discard = False
        self.retry_cause = ""
        self.chunk_out = False
        self.close_after = not keep_alive
        self.opaque = False
        self.early = b""  # bytes after an upgrade request: the new protocol's, held till 101
        self.done = False

    # -- the request side ------------------------------------------------------------------

    def start(self) -> None:
        front = self.down.front
        st = self.steer
        if st.refusal is not None:
            self._fail(st.refusal.outcome, st.refusal)
            return
        timeout = self.plan.timeouts.request
        if timeout:
            self.timer = front.loop.call_later(timeout, self._timed_out, "timeout")
        self.svc.budget.deposit()
        if st.delay:  # fault injection: held, then sent (the request timeout runs meanwhile)
            self.try_timer = front.loop.call_later(st.delay, self._attempt)
            return
        self._attempt()

    def body_data(self, data: bytes) -> None:
        self.body_size += len(data)
        self.rec.bytes_in += len(data)
        limit = self.svc.limits.max_body_bytes
        if limit and self.body_size > limit:
            self.down.refuse_body(self)
            return
        if self.buffered and self.body_size > self.svc.http.buffer_bytes:
            self.buffered = False  # too large to hold for a retry
        conn = self.conn
        if conn is not None and conn.transport is not None:
            if not self.done:
                conn.transport.write(_chunk(data) if self.chunk_up else data)
            if self.buffered:
                self.body.append(data)
            elif self.body:
                self.body.clear()
        else:
            self.body.append(data)  # sent once connected
            if not self.buffered:
                self.down.pause("connecting")  # hold no more than that until then

    def request_complete(self) -> None:
        self.req_complete = True
        mirror = self.steer.mirror
        if mirror is not None and self.steer.refusal is None:
            down = self.down
            down.front.mirror.send(mirror, self.rec.src, self.method, self.url.decode("latin-1"),
                                   self.headers, b"".join(self.body) if self.buffered else None,
                                   "http/1.1", dialled_port(down))
        conn = self.conn
        if conn is not None and conn.transport is not None and self.chunk_up and not self.done:
            conn.transport.write(b"0\r\n\r\n")

    def _head(self) -> bytes:
        parts = [self.method.encode("latin-1"), b" ", self.url, b" HTTP/1.1\r\n"]
        upgrade = self.upgrade
        for name, value in self.headers:
            n = name.lower()
            if n in _HOP and not (upgrade and n in (b"connection", b"upgrade")):
                continue
            parts += (name, b": ", value, b"\r\n")
        if self.tp:
            parts += (b"traceparent: ", self.tp.encode("latin-1"), b"\r\n")
            if self.rec.tracestate:
                parts += (b"tracestate: ", self.rec.tracestate.encode("latin-1"), b"\r\n")
        if self.chunk_up:
            # the body is re-chunked; codings before chunked (llhttp made sure it is last)
            # are the body's and go with it, normalized
            parts += (b"transfer-encoding: ", _codings(self.headers), b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    # -- attempts ---------------------------------------------------------------------------

    def _attempt(self) -> None:
        key = begin_attempt(self)
        if key is None:
            return
        front = self.down.front
        assert self.ep is not None
        conn = front.pool.idle(key)
        if conn is not None:
            self._send(conn)
        else:
            self.connecting = front.loop.create_task(self._connect(self.ep, key))

    async def _connect(self, ep: Endpoint, key: tuple[Any, str]) -> None:
        front = self.down.front
        limits = self.svc.limits
        try:
            conn = await front.pool.get(key, lambda: front.dial_h1(ep, self.down.info.src,
                                                                    self.rec.dst, key),
                                        limits.max_connections, limits.max_pending)
        except PoolFull as exc:
            self.connecting = None
            self._attempt_failed("circuit_open", "circuit_open", str(exc), counted=False)
            return
        except DialError as exc:
            self.connecting = None
            if self.outlier is not None and self.ep is not None and \
                    self.outlier.failure(self.ep.addr):
                log.warning("%s ejected after %d consecutive connect failures", self.ep.addr,
                            self.outlier.config.consecutive_failures)
            self._attempt_failed("connect-failure", exc.reason, str(exc), counted=False)
            return
        except asyncio.CancelledError:
            raise
        self.connecting = None
        if self.done:
            front.pool.release(key, conn)
            return
        self._send(conn)

    def _send(self, conn: H1Upstream) -> None:
        self.conn = conn
        conn.exchange = self
        if self.rec.src_identity == "" and conn.identity:
            self.rec.src_identity = conn.identity
        self.rparser = httptools.HttpResponseParser(self)
        self.resp_head = []
        self.resp_headers = []
        self.rsize = 0
        self.head_fed = -1
        self.informational = False
        self.discard = False
        transport = conn.transport
        assert transport is not None
        # the endpoint's latency is the response's, from here: a dial is not its fault
        self.attempt_t0 = self.down.front.clock()
        body = b"".join(self.body) if self.body else b""
        data = self._head()
        if body:
            data += _chunk(body) if self.chunk_up else body
        if self.req_complete and self.chunk_up:
            data += b"0\r\n\r\n"
        transport.write(data)
        if not self.buffered:
            self.body.clear()
            self.down.resume("connecting")

    def _release(self, reuse: bool) -> None:
        """The attempt's connection: back to the pool, or closed."""
        conn, self.conn = self.conn, None
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        if conn is None:
            return
        conn.exchange = None
        if conn.paused:
            conn.paused = False
            if conn.transport is not None:
                conn.transport.resume_reading()
        front = self.down.front
        if reuse and not conn.closed:
            front.pool.release(conn.key, conn)
        else:
            conn.close()
            front.pool.discard(conn.key, conn)

    def _end_attempt(self, ok: bool) -> None:
        """Feedback for the endpoint of the attempt that ends."""
        ep, balancer, token = self.ep, self.balancer, self.token
        self.token = None
        if ep is None:
            return
        self.svc.done(ep.addr)
        if balancer is not None and token is not None:
            if not ok:
                balancer.on_failed(token, self.down.front.clock() - self.attempt_t0)
            balancer.on_done(token)

    def _attempt_failed(self, cause: str, outcome: str, detail: str, counted: bool = True,
                        grpc_status: int | None = None, decided: bool = False) -> None:
        """The attempt got no usable response: retry elsewhere, or answer the client.
        `decided`: the retry was granted already (by policy and budget)."""
        self._end_attempt(False)
        self._release(False)
        if self.done:
            return
        if counted and self.outlier is not None and self.ep is not None and \
                self.outlier.failure(self.ep.addr, http=True):
            log.warning("%s ejected after %d consecutive 5xx/resets", self.ep.addr,
                        self.outlier.config.consecutive_5xx)
        front = self.down.front
        verdict = "retry" if decided else self.svc.retry(
            self.plan, self.rec, cause, self.buffered and not self.resp_started, grpc_status)
        if verdict == "retry":
            self.rec.retries += 1
            delay = backoff(self.plan.retry, self.rec.retries)
            if delay:
                front.loop.call_later(delay, self._retry)
            else:
                self._retry()
            return
        if verdict == "budget":
            rec = self.rec
            front.stats.count("retry_budget_exhausted", rec.src, rec.dst, rec.route)
        self._fail(outcome, detail)

    def _retry(self) -> None:
        if not self.done:
            self._attempt()

    # -- the response side (httptools callbacks) --------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        if self.opaque:
            self.down.write(data)
            return
        parser = self.rparser
        if parser is None:
            return
        conn = self.conn
        try:
            parser.feed_data(data)
            if self.head_fed >= 0:
                # a head still incomplete: httptools holds its last header until it ends
                self.head_fed += len(data)
                if self.head_fed > self.svc.limits.max_header_bytes:
                    raise _TooLarge("response header block too large")
        except httptools.HttpParserUpgrade as exc:
            if self.resp_started and not self.done:
                self._go_opaque(data[int(exc.args[0]):] if exc.args else b"")
            return
        except (httptools.HttpParserError, _TooLarge) as exc:
            if self.done or self.conn is None:
                if conn is not None:
                    conn.close()  # more than the response (or garbage): never reused
                return
            if self.resp_started:
                self._abort("upstream_error")
            else:
                self._attempt_failed("reset", "upstream_error",
                                     f"{self.ep.addr if self.ep else '?'} answered something "
                                     f"that is not HTTP/1.1 ({exc.__context__ or exc})",
                                     counted=True)
            return
        if self.retry_cause and not self.done:
            cause, self.retry_cause = self.retry_cause, ""
            self._attempt_failed(cause, "upstream_error",
                                 f"{self.ep.addr if self.ep else '?'} answered "
                                 f"{self.rec.status}", counted=True, decided=True)

    def on_message_begin(self) -> None:
        if self.done:
            # a response after the one the request asked for: the connection is out of step
            raise _BadResponse("a response after the one the request asked for")
        self.resp_head = []
        self.resp_headers = []
        self.rsize = 0
        self.head_fed = 0

    def on_status(self, status: bytes) -> None:
        self.resp_head.append(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.rsize += len(name) + len(value) + 4
        if self.rsize > self.svc.limits.max_header_bytes:
            raise _TooLarge("response header block too large")
        self.resp_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_fed = -1
        if self.discard:
            return  # a response after the one dropped for a retry: that connection closes
        parser = self.rparser
        assert parser is not None
        status = parser.get_status_code()
        if status == 101 and not self.upgrade:
            # RFC 9110 15.2.2: a switch the client did not ask for (its connection would
            # become an opaque tunnel to this endpoint)
            raise _BadResponse("101 Switching Protocols to a request without Upgrade")
        if status > 599:
            raise _BadResponse(f"status {status} (RFC 9110 15: 100-599)")
        if 100 <= status < 200 and status != 101:
            self.informational = True
            if self.version == "1.1" and not self.resp_started:
                self.down.write(b"HTTP/1.1 %d %b\r\n\r\n" % (status, b"".join(self.resp_head)))
            return
        self.rec.status = status
        if status in (502, 503, 504) and self._retryable():
            # Asked now, not once the response is dropped: when the budget says no, this
            # response is the client's (the endpoint's own 503, not one of ours).
            verdict = self.svc.retry(self.plan, self.rec, "gateway-error", True)
            if verdict == "retry":
                self.discard = True
                self.retry_cause = "gateway-error"
                return
            if verdict == "budget":
                rec = self.rec
                self.down.front.stats.count("retry_budget_exhausted", rec.src, rec.dst,
                                            rec.route)
        self._commit(status)

    def _retryable(self) -> bool:
        """Whether a 502/503/504 may be retried by the route's policy (before the budget)."""
        policy = self.plan.retry
        return (self.buffered and self.rec.retries < policy.attempts
                and ("gateway-error" in policy.on or "5xx" in policy.on)
                and self.method in policy.methods)

    def _commit(self, status: int) -> None:
        """The response goes to the client: its head now."""
        front = self.down.front
        self.resp_started = True
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        if self.balancer is not None and self.token is not None:
            # the response's first byte feeds the endpoint's latency average (per request)
            self.balancer.on_connected(self.token, front.clock() - self.attempt_t0)
        parts = [b"HTTP/1.1 %d " % status, b"".join(self.resp_head), b"\r\n"]
        length = False
        chunked = False
        codings = b"chunked"
        for name, value in self.resp_headers:
            n = name.lower()
            if n in _HOP_RESPONSE:
                if n == b"transfer-encoding":
                    # the body ends with the connection unless chunked is the last coding
                    codings = _codings(self.resp_headers)
                    chunked = value.rsplit(b",", 1)[-1].strip(b" \t").lower() == b"chunked"
                continue
            if n == b"content-length":
                length = True
            parts += (name, b": ", value, b"\r\n")
        bodiless = self.method == "HEAD" or status in (204, 304)
        upgraded = status == 101 or (self.method == "CONNECT" and 200 <= status < 300)
        if upgraded:
            parts.append(b"connection: upgrade\r\n")
            for name, value in self.resp_headers:
                if name.lower() == b"upgrade":
                    parts += (b"upgrade: ", value, b"\r\n")
        elif not bodiless and not length:
            if self.version == "1.1":
                self.chunk_out = True
                parts += (b"transfer-encoding: ", codings, b"\r\n")
            else:
                self.close_after = True
            self.resp_close_delimited = not chunked
        if self.down.closing or not self.req_complete:
            self.close_after = True
        if self.upgrade and not upgraded:
            # The endpoint declined the upgrade: HTTP/1.1 goes on, unless the client sent the
            # new protocol's bytes already (they are not HTTP/1.1 requests).
            if self.early:
                self.close_after = True
            else:
                self.down.resume("upgrade")
        if self.close_after and not upgraded:
            parts.append(b"connection: close\r\n")
        elif self.version == "1.0" and not upgraded:
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self.down.write(b"".join(parts))
        if bodiless:
            # reusable unless the endpoint said it closes (or is HTTP/1.0 without keep-alive)
            parser = self.rparser
            self._response_complete(reuse=parser is not None and parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if self.discard or self.done or not self.resp_started:
            return
        self.rec.bytes_out += len(body)
        self.down.write(_chunk(body) if self.chunk_out else body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if self.discard or self.done or not self.resp_started:
            return
        parser = self.rparser
        self._response_complete(reuse=parser is not None and parser.should_keep_alive())

    def _response_complete(self, reuse: bool) -> None:
        if self.chunk_out:
            self.down.write(b"0\r\n\r\n")
        ok = self.rec.status < 500
        ep = self.ep
        if ep is not None and self.outlier is not None:
            if ok:
                self.outlier.success(ep.addr)
            elif self.outlier.failure(ep.addr, http=True):
                log.warning("%s ejected after %d consecutive 5xx/resets", ep.addr,
                            self.outlier.config.consecutive_5xx)
        self._end_attempt(ok)
        self._release(reuse and self.req_complete and not self.upgrade)
        self._finish("ok")

    def upstream_lost(self, exc: Exception | None) -> None:
        """The endpoint's connection closed while this exchange used it."""
        self.conn = None
        if self.done:
            return
        if self.opaque:
            self._end_attempt(True)
            self._finish("ok")
            self.down.close()
            return
        if self.resp_started:
            if self.resp_close_delimited:
                self._end_attempt(True)
                self._response_complete(reuse=False)
                return
            self._end_attempt(False)
            self._abort("reset")
            return
        self._attempt_failed("reset", "reset",
                             f"{self.ep.addr if self.ep else '?'} closed the connection "
                             "before it answered", counted=True)

    def _try_timed_out(self) -> None:
        self.try_timer = None
        if self.done or self.resp_started:
            return
        self._attempt_failed("gateway-error", "per_try_timeout",
                             f"{self.ep.addr if self.ep else '?'} did not answer within "
                             f"{self.plan.timeouts.per_try}s (timeouts.perTry)", counted=True)

    def _timed_out(self, outcome: str) -> None:
        self.timer = None
        if self.done:
            return
        if self.resp_started:
            self._end_attempt(False)
            self._abort(outcome)
            return
        self._end_attempt(False)
        self._release(False)
        self._fail(outcome, f"no response within {self.plan.timeouts.request}s "
                   "(timeouts.request)")

    # -- endings ----------------------------------------------------------------------------

    def _go_opaque(self, rest: bytes) -> None:
        """An upgrade or CONNECT was accepted: bytes flow unparsed both ways from here."""
        self.opaque = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if rest:
            self.down.write(rest)
        self.down.go_opaque(self)

    def opaque_data(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None and conn.transport is not None:
            conn.transport.write(data)

    def _fail(self, outcome: str, detail: object) -> None:
        """Answer the client ourselves (no endpoint's response reached it)."""
        if self.done:
            return
        extra: tuple[tuple[str, str], ...] = ()
        if outcome == "denied":
            status = 403
            text = getattr(detail, "reason", str(detail))
        elif isinstance(detail, Refusal):
            status = detail.status or _STATUS.get(outcome, 502)
            text, extra = detail.detail, detail.headers
        else:
            status = _STATUS.get(outcome, 502)
            text = str(detail)
        self.rec.status = status
        close = self.close_after or not self.req_complete or self.down.closing
        self.close_after = close
        self.down.write(error_response(status, outcome, text, close, extra))
        self._finish(outcome)

    def _abort(self, outcome: str) -> None:
        """The response was cut off after it started: the client must see a broken stream."""
        self._release(False)
        self.close_after = True
        self._finish(outcome)
        self.down.abort()

    def cancel(self, outcome: str) -> None:
        """The client went away."""
        if self.done:
            return
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        self._end_attempt(False)
        self._release(False)
        self._finish(outcome)

    def _finish(self, outcome: str) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        rec = self.rec
        rec.outcome = outcome
        front = self.down.front
        rec.t_end = front.clock()
        front.tracer.finish(rec)
        front.finisher.finish(rec)
        self.body.clear()
        self.down.exchange_done(self)
