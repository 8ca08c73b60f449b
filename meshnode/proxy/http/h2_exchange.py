"""One HTTP/2 stream through the proxy: `H2Exchange` is one stream of a client connection
(h2.H2Downstream makes one per stream it opens); it picks an endpoint per request (the
service's balancer, fresh per request: the streams of one client connection spread over the
endpoints), takes a stream on a pooled HTTP/2 connection to it (h2conn.H2Upstream in
h2pool.H2Pool: many requests share one connection), and relays both ways: headers
(pseudo-headers included, `traceparent` and `tracestate` set by the proxy), DATA with flow
control, trailers, END_STREAM, RST_STREAM. Both directions stream at once (gRPC bidi). Flow
control is end to end: a DATA frame is acknowledged to its sender only once the other side
took it, so a slow reader slows its writer, and the proxy holds at most the windows it
advertised (h2conn.py has the figures).

Retries: a request whose body the proxy still holds (up to `http.bufferBytes`) and whose
response has not started is tried again on another endpoint for the route's retry conditions:
connect failure, reset before the response, REFUSED_STREAM or a GOAWAY that left the stream
unprocessed, 502/503/504, and for gRPC a trailers-only response whose grpc-status is in
`retry.grpcCodes` (UNAVAILABLE) — within the service's retry budget (exchange.py). A retry the
budget refuses is counted, and the endpoint's own response goes to the client. Errors the
proxy answers itself: HTTP/2 with a status (exchange.ERROR_STATUS) and `x-meshnode-error:
<reason>`; gRPC calls with a trailers-only response whose grpc-status says why
(grpc_status.local_status: UNAVAILABLE, DEADLINE_EXCEEDED, PERMISSION_DENIED...) and
grpc-message the detail. The request timeout is the route's, or the call's grpc-timeout when
shorter; once a gRPC response started, a timeout ends it with DEADLINE_EXCEEDED trailers, an
HTTP/2 response is reset.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from hpack import NeverIndexedHeaderTuple

from meshnode.proxy.http.attempt import begin_attempt
from meshnode.proxy.http.dial import DialError
from meshnode.proxy.http.exchange import (
    ERROR_STATUS,
    RequestRecord,
    RoutePlan,
    ServiceHttp,
    backoff,
)
from meshnode.proxy.http.grpc_status import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    grpc_timeout,
    is_grpc,
    is_server_error,
    local_status,
    message,
    status_of_http,
    status_of_reset,
    trailers_only,
)
from meshnode.proxy.http.h2conn import H2Upstream, Headers, pump
from meshnode.proxy.http.pool import PoolFull
from meshnode.proxy.http.steer import (
    Refusal,
    dialled_port,
    grpc_code,
    header_map,
    peer_ip,
    steer,
)
from meshnode.route.table import ToService

if TYPE_CHECKING:
    from meshnode.balance import Balancer, EndpointLoad
    from meshnode.balance.outlier import OutlierDetector
    from meshnode.model import Endpoint
    from meshnode.proxy.http.h2 import H2Downstream

__all__ = ["H2Exchange"]

log = logging.getLogger("meshnode.proxy.http")

_NO_ERROR = int(ErrorCodes.NO_ERROR)
_INTERNAL = int(ErrorCodes.INTERNAL_ERROR)
_REFUSED = int(ErrorCodes.REFUSED_STREAM)
_CANCEL = int(ErrorCodes.CANCEL)
_CALM = int(ErrorCodes.ENHANCE_YOUR_CALM)


def _reset_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"0x{code:x}"


class H2Exchange:
    """One stream of a client connection: its request, its attempts, its response."""

    __slots__ = (
        "acked",
        "attempt_t0",
        "balancer",
        "buffered",
        "committed",
        "conn",
        "connecting",
        "done",
        "down",
        "end_outcome",
        "ended_down",
        "ep",
        "grpc",
        "headers",
        "held",
        "out_down",
        "out_up",
        "outlier",
        "plan",
        "pos",
        "rec",
        "received",
        "req_complete",
        "resp_ended",
        "route",
        "sid",
        "steer",
        "svc",
        "timeout",
        "timer",
        "token",
        "trailers_down",
        "trailers_up",
        "tried",
        "try_timer",
        "up_ended",
        "up_open",
        "up_sid",
        "up_unacked",
    )

    def __init__(self, down: H2Downstream, sid: int, headers: Headers, ended: bool) -> None:
        self.down = down
        self.sid = sid
        front = down.front
        method = path = authority = b""
        tp = ts = ctype = deadline = None
        fwd: Headers = []
        for h in headers:
            n = h[0]
            if n == b":method":
                method = h[1]
            elif n == b":path":
                path = h[1]
            elif n == b":authority":
                authority = h[1]
            elif n == b"traceparent":
                tp = h[1]
                continue
            elif n == b"tracestate":
                ts = h[1]
                continue
            elif n == b"content-type":
                ctype = h[1]
            elif n == b"grpc-timeout":
                deadline = h[1]
            fwd.append(h)
        self.grpc = down.mode == "grpc" or is_grpc(ctype)
        now = front.clock()
        self.rec = rec = RequestRecord(now, time.time(), down.info.src, down.service,
                                       "grpc" if self.grpc else "h2", method.decode("latin-1"),
                                       path.decode("latin-1"), authority.decode("latin-1"))
        self.steer = st = steer(front, down.gateway, down.service, rec,
                                lambda: header_map(headers), peer_ip(down))
        self.svc: ServiceHttp = st.svc
        self.plan: RoutePlan = st.plan
        traceparent = front.tracer.start(rec, tp.decode("latin-1") if tp else None,
                                         ts.decode("latin-1") if ts else None)
        # A value unique per request: never into the HPACK table, where it would only evict
        # the fields that repeat (and cost an insertion per request).
        fwd.append(NeverIndexedHeaderTuple(b"traceparent", traceparent.encode("latin-1")))
        if rec.tracestate:
            fwd.append((b"tracestate", rec.tracestate.encode("latin-1")))
        self.headers = fwd
        timeout = self.plan.timeouts.request
        if deadline is not None and self.grpc:
            limit = grpc_timeout(deadline)
            if limit is not None and (timeout is None or limit < timeout):
                timeout = -limit  # negative: the call's own deadline (said in the error)
        self.timeout = timeout
        # the request side
        self.req_complete = ended
        self.trailers_up: Headers | None = None
        self.held: list[bytes] = []  # the body so far, while it fits http.bufferBytes
        self.buffered = True  # the whole body is held: the request can be retried
        self.out_up: deque[bytes] = deque()  # body to send to the current attempt
        self.received = 0  # body bytes from the client
        self.acked = 0  # body bytes acknowledged to the client (passed on)
        self.pos = 0  # body bytes sent in the current attempt
        # the attempt
        self.conn: H2Upstream | None = None
        self.up_sid = 0
        self.up_open = False  # the stream is the conn's (neither ended both ways nor reset)
        self.up_ended = False  # END_STREAM sent to the endpoint
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
        # the response side
        self.committed = False  # response headers went to the client: no retry any more
        self.resp_ended = False  # the response is complete (END_STREAM from its source)
        self.trailers_down: Headers | None = None
        self.out_down: deque[bytes] = deque()
        self.up_unacked = 0  # endpoint DATA bytes held, not acknowledged yet
        self.ended_down = False  # END_STREAM (or RST_STREAM) sent to the client
        self.end_outcome = "ok"
        self.done = False

    # -- the request side ------------------------------------------------------------------

    def start(self) -> None:
        st = self.steer
        if st.refusal is not None:
            self._fail(st.refusal.outcome, st.refusal.detail, st.refusal)
            return
        loop = self.down.front.loop
        if self.timeout:
            self.timer = loop.call_later(abs(self.timeout), self._timed_out)
        self.svc.budget.deposit()
        if self.req_complete:
            self._mirror()
        if st.delay:  # fault injection: held, then sent (the request timeout runs meanwhile)
            self.try_timer = loop.call_later(st.delay, self._attempt)
            return
        self._attempt()

    def _mirror(self) -> None:
        st = self.steer
        if st.mirror is not None and st.refusal is None:
            down, rec = self.down, self.rec
            down.front.mirror.send(st.mirror, rec.src, rec.method, rec.path, self.headers,
                                   b"".join(self.held) if self.buffered else None,
                                   "grpc" if self.grpc else "h2",
                                   dialled_port(down))

    def client_data(self, data: bytes, flow: int) -> None:
        n = len(data)
        down = self.down
        if flow > n:
            down.ack(self.sid, flow - n)  # padding: nothing to pass on
        if not n or self.done:
            if n:
                down.ack(self.sid, n)
            return
        self.received += n
        self.rec.bytes_in += n
        limit = self.svc.limits.max_body_bytes
        if limit and self.received > limit:
            self._too_large(limit)
            return
        if self.buffered:
            if self.received > self.svc.http.buffer_bytes:
                self.buffered = False  # too large to hold for a retry
                self.held = []
            else:
                self.held.append(data)
        self.out_up.append(data)
        self.pump_up()

    def client_trailers(self, headers: Headers) -> None:
        self.trailers_up = headers
        self.client_end()

    def client_end(self) -> None:
        if not self.req_complete:
            self.req_complete = True
            self._mirror()
            self.pump_up()

    def client_reset(self, code: int) -> None:
        """The client reset the stream: so is the endpoint's."""
        if self.done:
            return
        if self.grpc and self.rec.grpc_status is None:
            self.rec.grpc_status = CANCELLED
        self._end_attempt(True)  # not the endpoint's doing
        self._drop_attempt(code)
        self.ended_down = True
        self._finish("client_gone")

    def cancel(self, outcome: str) -> None:
        """The client connection is gone (or cut off)."""
        if self.done:
            return
        if self.grpc and self.rec.grpc_status is None:
            self.rec.grpc_status = CANCELLED
        self._end_attempt(True)
        self._drop_attempt(_CANCEL)
        self.ended_down = True
        self._finish(outcome)

    def pump_up(self) -> None:
        """Send the request body (then END_STREAM or trailers) as the endpoint's windows
        allow; what went is acknowledged to the client."""
        conn = self.conn
        if conn is None or not self.up_open or self.up_ended or conn.paused:
            return
        h = conn.h2
        sid = self.up_sid
        try:
            if self.out_up:
                sent = pump(h, sid, self.out_up)
                if sent:
                    conn.pool.writes.mark(conn)
                    self.pos += sent
                    if self.pos > self.acked:
                        self.down.ack(self.sid, self.pos - self.acked)
                        self.acked = self.pos
            if not self.out_up and self.req_complete:
                if self.trailers_up:
                    h.send_headers(sid, self.trailers_up, end_stream=True)
                else:
                    h.end_stream(sid)
                self.up_ended = True
                conn.pool.writes.mark(conn)
        except ProtocolError:
            pass  # the stream was reset meanwhile: its event says so

    def _too_large(self, limit: int) -> None:
        detail = f"the request body is larger than {limit} bytes (limits.maxBodyBytes)"
        if self.committed:
            self._end_attempt(False)
            self._abort("body_too_large", _CANCEL)
            return
        self._end_attempt(False)
        self._drop_attempt(_CANCEL)
        self._fail("body_too_large", detail)

    # -- attempts -----------------------------------------------------------------------------

    def _attempt(self) -> None:
        key = begin_attempt(self)
        if key is None:
            return
        front = self.down.front
        assert self.ep is not None
        conn = front.h2pool.ready(key)
        if conn is not None:
            self._open(conn)
        else:
            self.connecting = front.loop.create_task(self._connect(self.ep, key))

    async def _connect(self, ep: Endpoint, key: tuple[Any, str]) -> None:
        front = self.down.front
        limits = self.svc.limits
        src, service = self.down.info.src, self.rec.dst
        try:
            conn = await front.h2pool.get(key, lambda: front.dial_h2(ep, src, service, key),
                                          limits.max_connections, limits.max_pending)
        except PoolFull as exc:
            self.connecting = None
            self._retry_or_fail("circuit_open", "circuit_open", str(exc), counted=False)
            return
        except DialError as exc:
            self.connecting = None
            if self.outlier is not None and self.outlier.failure(ep.addr):
                log.warning("%s ejected after %d consecutive connect failures", ep.addr,
                            self.outlier.config.consecutive_failures)
            self._retry_or_fail("connect-failure", exc.reason, str(exc), counted=False)
            return
        self.connecting = None
        if not self.done:
            self._open(conn)

    def _open(self, conn: H2Upstream) -> None:
        """The request's stream on `conn`: headers now, the body as windows allow."""
        end = self.req_complete and not self.out_up and not self.trailers_up
        try:
            sid = conn.open(self, self.headers, end)
        except ProtocolError as exc:
            # the endpoint lowered its stream limit, or the connection is ending
            conn.pool.retire(conn)
            self._retry_or_fail("refused-stream", "reset",
                                f"{conn.key[0]} cannot take another stream ({exc})",
                                counted=False)
            return
        self.conn = conn
        self.up_sid = sid
        self.up_open = True
        self.up_ended = end
        # the endpoint's latency is its response's, from here: a dial (or a wait for a
        # stream) is not its doing, and would keep a new endpoint's estimate high for long
        self.attempt_t0 = self.down.front.clock()
        if not self.rec.src_identity and conn.identity:
            self.rec.src_identity = conn.identity
        if not end:
            self.pump_up()

    def _end_attempt(self, ok: bool) -> None:
        """Feedback for the endpoint of the attempt that ends (once per attempt)."""
        ep, balancer, token = self.ep, self.balancer, self.token
        self.token = None
        if ep is None or token is None:
            return
        self.svc.done(ep.addr)
        if balancer is not None:
            if not ok:
                balancer.on_failed(token, self.down.front.clock() - self.attempt_t0)
            balancer.on_done(token)

    def _drop_attempt(self, code: int) -> None:
        """Abandon the attempt's stream (RST_STREAM `code` when it is still open), giving the
        connection back every byte of its window this exchange held."""
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        conn, self.conn = self.conn, None
        if conn is not None:
            sid = self.up_sid
            if self.up_open:
                self.up_open = False
                conn.reset(sid, code)
            if self.up_unacked:
                conn.ack(sid, self.up_unacked)
                self.up_unacked = 0
        self.out_down.clear()

    def _retry_or_fail(self, cause: str, outcome: str, detail: str, counted: bool,
                       grpc_status: int | None = None) -> None:
        """The attempt got no usable response: retry elsewhere, or answer the client."""
        self._end_attempt(False)
        self._drop_attempt(_CANCEL)
        if self.done:
            return
        if counted:
            self._outlier_failure()
        verdict = self.svc.retry(self.plan, self.rec, cause, self.buffered and not self.committed,
                                 grpc_status)
        if verdict == "retry":
            self._retry()
            return
        if verdict == "budget":
            self._budget_exhausted()
        self._fail(outcome, detail)

    def _retry(self) -> None:
        """Start over on another endpoint, after the backoff: the held body again."""
        rec = self.rec
        rec.retries += 1
        self.out_up = deque(self.held)
        self.pos = 0
        self.up_ended = False
        delay = backoff(self.plan.retry, rec.retries)
        if delay:
            self.down.front.loop.call_later(delay, self._retry_now)
        else:
            self._attempt()

    def _retry_now(self) -> None:
        if not self.done:
            self._attempt()

    def _budget_exhausted(self) -> None:
        rec = self.rec
        self.down.front.stats.count("retry_budget_exhausted", rec.src, rec.dst, rec.route)

    def _outlier_failure(self) -> None:
        ep, outlier = self.ep, self.outlier
        if ep is not None and outlier is not None and outlier.failure(ep.addr, http=True):
            log.warning("%s ejected after %d consecutive 5xx/resets", ep.addr,
                        outlier.config.consecutive_5xx)

    def _try_timed_out(self) -> None:
        self.try_timer = None
        if self.done or self.committed:
            return
        self._retry_or_fail("gateway-error", "per_try_timeout",
                            f"{self.ep.addr if self.ep else '?'} did not answer within "
                            f"{self.plan.timeouts.per_try}s (timeouts.perTry)", counted=True)

    def _timed_out(self) -> None:
        self.timer = None
        if self.done:
            return
        timeout = self.timeout or 0.0
        detail = (f"no response within {-timeout:g}s (the call's grpc-timeout)" if timeout < 0
                  else f"no response within {timeout:g}s (timeouts.request)")
        self._end_attempt(False)
        if not self.committed:
            self._drop_attempt(_CANCEL)
            self._fail("timeout", detail)
        elif self.grpc:
            # The client gets DEADLINE_EXCEEDED, as its own deadline would tell it.
            self._drop_attempt(_CANCEL)
            self.rec.grpc_status = DEADLINE_EXCEEDED
            self.trailers_down = [(b"grpc-status", b"%d" % DEADLINE_EXCEEDED),
                                  (b"grpc-message", message(detail)),
                                  (b"x-meshnode-error", b"timeout")]
            self.resp_ended = True
            self.end_outcome = "timeout"
            self.pump_down()
        else:
            self._abort("timeout", _CANCEL)

    # -- the response side (H2Upstream calls these) ------------------------------------------

    def up_response(self, headers: Headers, ended: bool) -> None:
        if self.done:
            return
        status = 0
        gs: int | None = None
        for n, v in headers:
            if n == b":status":
                status = int(v)
            elif n == b"grpc-status":
                gs = int(v) if v.isdigit() else 2
        rec = self.rec
        rec.status = status
        if self.grpc and (ended or status != 200):
            rec.grpc_status = gs if gs is not None else status_of_http(status)
        cause = ""
        if self.grpc and ended and rec.grpc_status:
            cause = "unavailable"  # a trailers-only failure: retry.grpcCodes decides
        elif status in (502, 503, 504):
            cause = "gateway-error"
        if cause and self.buffered:
            verdict = self.svc.retry(self.plan, rec, cause, True, rec.grpc_status)
            if verdict == "retry":
                self._end_attempt(False)
                self._drop_attempt(_CANCEL)
                self._outlier_failure()
                rec.grpc_status = None
                self._retry()
                return
            if verdict == "budget":
                self._budget_exhausted()
        self._commit(headers, ended)

    def _commit(self, headers: Headers, ended: bool) -> None:
        """The endpoint's response goes to the client: its headers now."""
        self.committed = True
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        if self.balancer is not None and self.token is not None:
            # the response's headers feed the endpoint's latency average (per request)
            self.balancer.on_connected(self.token, self.down.front.clock() - self.attempt_t0)
        down = self.down
        try:
            down.h2.send_headers(self.sid, headers, end_stream=ended)
        except ProtocolError:
            return  # the client reset the stream: its event finishes the exchange
        down.mark()
        if ended:
            self.ended_down = True
            self.resp_ended = True
            self._upstream_done()
            self._response_sent()

    def up_data(self, data: bytes, flow: int) -> None:
        n = len(data)
        conn = self.conn
        if conn is not None and flow > n:
            conn.ack(self.up_sid, flow - n)
        if self.done or not self.committed or self.resp_ended:
            if conn is not None:
                conn.ack(self.up_sid, n)
            return
        if n:
            self.rec.bytes_out += n
            self.up_unacked += n
            self.out_down.append(data)
            self.pump_down()

    def up_trailers(self, headers: Headers) -> None:
        if self.done:
            return
        if self.grpc:
            for n, v in headers:
                if n == b"grpc-status":
                    self.rec.grpc_status = int(v) if v.isdigit() else 2
        self.trailers_down = headers

    def up_end(self) -> None:
        if self.done or self.resp_ended or not self.committed:
            return
        self.resp_ended = True
        if self.grpc and self.rec.grpc_status is None:
            self.rec.grpc_status = status_of_http(self.rec.status)  # ended without one
        self._upstream_done()
        self.pump_down()

    def up_reset(self, code: int) -> None:
        self.up_open = False
        if self.done:
            return
        addr = self.ep.addr if self.ep else "?"
        if not self.committed:
            refused = code == _REFUSED
            self._retry_or_fail("refused-stream" if refused else "reset", "reset",
                                f"{addr} reset the stream ({_reset_name(code)}) before it "
                                "answered", counted=not refused)
            return
        if self.resp_ended:
            return  # complete already; what is left is delivering it
        self._end_attempt(False)
        self._outlier_failure()
        self._abort("reset", code)

    def up_refused(self) -> None:
        """The endpoint's GOAWAY says this stream was not processed."""
        self.up_open = False
        if self.done:
            return
        if self.committed:
            self._end_attempt(False)
            self._abort("reset", _REFUSED)
            return
        self._retry_or_fail("refused-stream", "reset",
                            f"{self.ep.addr if self.ep else '?'} went away (GOAWAY) before "
                            "taking the request", counted=False)

    def up_lost(self, garbage: bool, detail: str) -> None:
        self.up_open = False
        if self.done or self.resp_ended:
            return
        outcome = "upstream_error" if garbage else "reset"
        if not self.committed:
            self._retry_or_fail("reset", outcome, detail, counted=True)
            return
        self._end_attempt(False)
        self._outlier_failure()
        self._abort(outcome, _INTERNAL)

    def up_writable(self) -> None:
        self.pump_up()

    def pump_down(self) -> None:
        """Send the response body (then END_STREAM or trailers) as the client's windows
        allow; what went is acknowledged to the endpoint."""
        if self.ended_down:
            return
        down = self.down
        if down.paused or down.closed:
            return
        h = down.h2
        sid = self.sid
        try:
            if self.out_down:
                sent = pump(h, sid, self.out_down)
                if sent:
                    down.mark()
                    conn = self.conn
                    if conn is not None and self.up_unacked:
                        acked = sent if sent < self.up_unacked else self.up_unacked
                        self.up_unacked -= acked
                        conn.ack(self.up_sid, acked)
            if not self.out_down and self.resp_ended:
                if self.trailers_down:
                    h.send_headers(sid, self.trailers_down, end_stream=True)
                else:
                    h.end_stream(sid)
                down.mark()
                self.ended_down = True
                self._response_sent()
        except ProtocolError:
            pass  # the client reset the stream: its event finishes the exchange

    def _upstream_done(self) -> None:
        """The endpoint's response is complete: its feedback, its stream back."""
        rec = self.rec
        ok = rec.status < 500 and not (self.grpc and is_server_error(rec.grpc_status))
        ep, outlier = self.ep, self.outlier
        if ep is not None and outlier is not None:
            if ok:
                outlier.success(ep.addr)
            elif outlier.failure(ep.addr, http=True):
                log.warning("%s ejected after %d consecutive 5xx/resets", ep.addr,
                            outlier.config.consecutive_5xx)
        self._end_attempt(ok)
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        conn = self.conn
        if conn is not None and self.up_open:
            self.up_open = False
            if self.up_ended:
                conn.release(self.up_sid)
            else:
                conn.reset(self.up_sid, _CANCEL)  # answered before the whole request

    # -- endings ------------------------------------------------------------------------------

    def _fail(self, outcome: str, detail: str, refusal: Refusal | None = None) -> None:
        """Answer the client ourselves (no endpoint's response reached it); `refusal`: a
        traffic rule's answer (its status, gRPC status and headers)."""
        if self.done:
            return
        rec = self.rec
        down = self.down
        self.committed = True
        self.resp_ended = True
        self.end_outcome = outcome
        try:
            extra = [(n.encode("ascii"), v.encode("ascii"))
                     for n, v in (refusal.headers if refusal is not None else ())]
            if self.grpc:
                code = local_status(outcome) if refusal is None else \
                    grpc_code(refusal, local_status, status_of_http)
                rec.status = 200
                rec.grpc_status = code
                down.h2.send_headers(self.sid, trailers_only(code, detail, outcome) + extra,
                                     end_stream=True)
                self.ended_down = True
            else:
                status = (refusal.status if refusal is not None else None) or \
                    ERROR_STATUS.get(outcome, 502)
                rec.status = status
                body = (detail + "\n").encode("utf-8", "replace")
                head = [(b":status", b"%d" % status),
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", b"%d" % len(body)),
                        (b"x-meshnode-error", outcome.encode("ascii", "replace")), *extra]
                bodiless = rec.method == "HEAD"
                down.h2.send_headers(self.sid, head, end_stream=bodiless)
                if bodiless:
                    self.ended_down = True
                else:
                    self.out_down.append(body)
        except ProtocolError:
            self.ended_down = True  # the stream is gone
        down.mark()
        if self.ended_down:
            self._response_sent()
        else:
            self.pump_down()

    def _abort(self, outcome: str, code: int) -> None:
        """The response was cut off after it started: the client's stream is reset with the
        endpoint's code (or the proxy's)."""
        if self.grpc and self.rec.grpc_status in (None, 0):
            self.rec.grpc_status = status_of_reset(code)
        self._drop_attempt(_CANCEL)
        if not self.ended_down:
            self.ended_down = True
            self.down.reset(self.sid, code)
        self._finish(outcome)

    def _response_sent(self) -> None:
        """END_STREAM went to the client."""
        if not self.req_complete:
            # RFC 9113 8.1: a complete response may ask the client to stop sending
            self.down.reset(self.sid, _NO_ERROR)
        if self.conn is not None and self.up_open:
            self._upstream_done()
        self._finish(self.end_outcome)

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
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        rec = self.rec
        rec.outcome = outcome
        down = self.down
        front = down.front
        rec.t_end = front.clock()
        front.tracer.finish(rec)
        front.finisher.finish(rec)
        if self.received > self.acked:
            down.ack(self.sid, self.received - self.acked)
            self.acked = self.received
        self.held = []
        self.out_up.clear()
        down.exchange_done(self)
