"""HTTP/2 and gRPC through the proxy: each stream of a client connection is a request, routed,
balanced, retried, timed out, counted and traced on its own.

`H2Downstream` (this module) is the client's connection (h2, server side). Each stream it
opens becomes an `H2Exchange` (h2_exchange.py: the request's attempts on pooled HTTP/2
connections to endpoints, the relay both ways with end-to-end flow control, retries, and
the errors the proxy answers itself).

What is forwarded is what h2 parsed and validated (RFC 9113 8.2-8.3: pseudo-headers, field
names and values, connection-specific fields), re-encoded; a client breaking the protocol gets
the error the RFC names (GOAWAY PROTOCOL_ERROR for a malformed request: h2 makes every
malformed request a connection error, which 5.4.1 allows), an HPACK bomb fails at
MAX_HEADER_LIST_SIZE with GOAWAY ENHANCE_YOUR_CALM, and an endpoint that answers something that
is not HTTP/2 fails its streams (502, or a retry). Rapid reset (CVE-2023-44487): a client
that cancels, within a second, more streams the proxy already started work on than
MAX_CONCURRENT_STREAMS gets GOAWAY ENHANCE_YOUR_CALM and is closed.

Drain: `goaway()` sends GOAWAY (NO_ERROR, the last stream taken); streams up to it finish,
later ones are refused (REFUSED_STREAM: the client retries them elsewhere), and the connection
closes when its last stream ends.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes

from meshnode.proxy.http.exchange import DEFAULT_ROUTE
from meshnode.proxy.http.h2_exchange import (
    _CALM,
    _INTERNAL,
    _REFUSED,
    H2Exchange,
    _reset_name,
)
from meshnode.proxy.http.h2conn import (
    CLIENT_CONN_WINDOW,
    CLIENT_STREAM_WINDOW,
    MAX_STREAMS,
    MAX_WRITE_BUFFER,
    SERVER_CONFIG,
    GracefulConnection,
    goaway_frame,
    say_goaway,
    start,
)

if TYPE_CHECKING:
    from meshnode.model import OrigDstAddr
    from meshnode.proxy.http.front import HttpFront
    from meshnode.proxy.telemetry import ConnInfo

__all__ = ["H2Downstream"]

log = logging.getLogger("meshnode.proxy.http")

# Client resets of started streams per second past which a connection is an attack.
MAX_RESETS_PER_SECOND = MAX_STREAMS


CUT_LINGER = 1.0  # seconds a cut-off client's input is still read (and dropped) before closing


class H2Downstream(asyncio.Protocol):
    """A client's HTTP/2 connection (h2, server side). `mode` is the port's protocol: "h2"
    (http2, or HTTP/2 detected on an auto port) or "grpc" (every stream is a gRPC call; on h2
    ports a stream is one when its content-type is application/grpc)."""

    def __init__(self, front: HttpFront, info: ConnInfo, service: str, dst: OrigDstAddr,
                 mode: str) -> None:
        self.front = front
        self.info = info
        self.service = service
        self.dst = dst
        self.gateway = ""  # the Gateway's name when it accepted this connection (by host)
        self.mode = mode
        self.h2 = GracefulConnection(SERVER_CONFIG)
        self.streams: dict[int, H2Exchange] = {}
        self.transport: asyncio.Transport | None = None
        self.closing = False  # drain or the client's GOAWAY: close when the streams end
        self.closed = False
        self.goaway_sent = False
        self.last_stream = 0  # the last stream our GOAWAY lets finish
        self.paused = False  # the client does not read: response data waits
        self.dirty = False
        self.last_active = front.clock()
        self.bytes_in = 0
        self.bytes_out = 0
        self._reset_t = 0.0
        self._resets = 0

    # -- transport events ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        limit = self.front.table.policy(self.service).http.limits.max_header_bytes
        start(self.h2, False, CLIENT_STREAM_WINDOW, CLIENT_CONN_WINDOW, limit)
        self.front.opened(self)
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self.closed:  # cut off and lingering (`_cut`): what the client still sends is dropped
            return
        self.last_active = self.front.clock()
        self.bytes_in += len(data)
        h = self.h2
        try:
            events = h.receive_data(data)
        except ProtocolError as exc:
            self._broken(exc)
            return
        streams = self.streams
        for ev in events:
            if self.closed:
                return
            if isinstance(ev, DataReceived):
                ex = streams.get(ev.stream_id)
                if ex is not None:
                    ex.client_data(ev.data, ev.flow_controlled_length)
                else:
                    self.ack(ev.stream_id, ev.flow_controlled_length)
            elif isinstance(ev, RequestReceived):
                self._request(ev)
            elif isinstance(ev, StreamEnded):
                ex = streams.get(ev.stream_id)
                if ex is not None:
                    ex.client_end()
            elif isinstance(ev, WindowUpdated):
                self._writable(ev.stream_id)
            elif isinstance(ev, StreamReset):
                ex = streams.get(ev.stream_id)
                if ex is not None:
                    started = not ex.ended_down
                    ex.client_reset(ev.error_code)
                    if started and self._rapid_reset():
                        return
            elif isinstance(ev, TrailersReceived):
                ex = streams.get(ev.stream_id)
                if ex is not None:
                    ex.client_trailers(ev.headers)
            elif isinstance(ev, RemoteSettingsChanged):
                if SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                    self._writable(0)
            elif isinstance(ev, ConnectionTerminated):
                self.closing = True
        if self.closing and not streams:
            self.close()
        else:
            self.mark()

    def _request(self, ev: RequestReceived) -> None:
        sid = ev.stream_id
        if self.goaway_sent and sid > self.last_stream:
            self.reset(sid, _REFUSED)  # after our GOAWAY: the client retries it elsewhere
            return
        try:
            ex = H2Exchange(self, sid, ev.headers, ev.stream_ended is not None)
        except Exception:
            log.exception("HTTP/2 request setup failed")
            self.reset(sid, _INTERNAL)
            return
        self.streams[sid] = ex
        ex.start()

    def _writable(self, sid: int) -> None:
        if sid:
            ex = self.streams.get(sid)
            if ex is not None:
                ex.pump_down()
        else:
            for ex in list(self.streams.values()):
                ex.pump_down()

    def _rapid_reset(self) -> bool:
        """Count a client reset of a stream the proxy was working on; True when this
        connection is cut off for resetting too many (CVE-2023-44487)."""
        now = self.front.clock()
        if now - self._reset_t >= 1.0:
            self._reset_t = now
            self._resets = 0
        self._resets += 1
        if self._resets <= MAX_RESETS_PER_SECOND:
            return False
        self._calm(f"more than {MAX_RESETS_PER_SECOND} streams reset within a second")
        return True

    def _calm(self, why: str) -> None:
        log.warning("HTTP/2 client %s of %s: %s: GOAWAY ENHANCE_YOUR_CALM", self.info.src,
                    self.service, why)
        say_goaway(self.h2, _CALM, why.encode("ascii"))
        self._cut("abuse")

    def _broken(self, exc: ProtocolError) -> None:
        """The client broke the protocol: h2 queued GOAWAY with the error's code."""
        code = int(getattr(exc, "error_code", ErrorCodes.PROTOCOL_ERROR))
        reason = "abuse" if code == _CALM else "protocol_error"
        log.info("HTTP/2 client %s of %s: %s (GOAWAY %s)", self.info.src, self.service, exc,
                 _reset_name(code))
        self._cut(reason)

    def _cut(self, reason: str) -> None:
        """Send what h2 queued (its GOAWAY), fail every stream, close."""
        self.front.stats.count("request_failures", self.info.src, self.service, DEFAULT_ROUTE,
                               reason)
        self.flush()
        self.closed = True
        for ex in list(self.streams.values()):
            ex.cancel(reason)
        t = self.transport
        if t is None:
            return
        if not t.can_write_eof():
            t.close()
            return
        # A lingering close, as nginx's: the GOAWAY, then a FIN, then what the client still
        # sends is read and dropped for a moment. Closing at once with its input unread makes
        # the kernel answer with a reset, which can discard the GOAWAY not yet sent.
        t.write_eof()
        asyncio.get_running_loop().call_later(CUT_LINGER, t.abort)

    def eof_received(self) -> bool | None:
        # HTTP/2 has no half-close at the TCP level: responses in flight still go out.
        if self.streams:
            self.closing = True
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for ex in list(self.streams.values()):
            ex.cancel("client_gone")
        self.streams.clear()
        self.front.closed(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._writable(0)

    # -- what exchanges use ----------------------------------------------------------------------

    def mark(self) -> None:
        self.front.h2pool.writes.mark(self)

    def ack(self, sid: int, n: int) -> None:
        """`n` bytes of the client's DATA on `sid` were passed on (or dropped)."""
        if self.closed or n <= 0:
            return
        try:
            self.h2.acknowledge_received_data(n, sid)
        except ProtocolError:
            return
        self.mark()

    def reset(self, sid: int, code: int) -> None:
        if self.closed:
            return
        try:
            self.h2.reset_stream(sid, code)
        except ProtocolError:
            return
        self.mark()

    def exchange_done(self, ex: H2Exchange) -> None:
        self.streams.pop(ex.sid, None)
        self.last_active = self.front.clock()
        if self.closing and not self.streams:
            self.close()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        t = self.transport
        if not data or t is None or t.is_closing():
            return
        self.bytes_out += len(data)
        t.write(data)
        if self.paused and t.get_write_buffer_size() > MAX_WRITE_BUFFER:
            log.warning("HTTP/2 client %s of %s does not read: connection closed",
                        self.info.src, self.service)
            t.abort()

    # -- life -------------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self.streams

    def goaway(self) -> None:
        """Drain: no new streams (GOAWAY NO_ERROR); close once the last one ends."""
        self.closing = True
        if self.closed or self.goaway_sent:
            return
        self.goaway_sent = True
        self.last_stream = self.h2.highest_inbound_stream_id
        self.flush()
        t = self.transport
        if t is not None and not t.is_closing():
            frame = goaway_frame(self.last_stream)
            self.bytes_out += len(frame)
            t.write(frame)
        if not self.streams:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        say_goaway(self.h2)
        self.flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()  # after what is buffered is written

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
