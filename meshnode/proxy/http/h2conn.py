"""HTTP/2 connections with the h2 library (sans-IO: the asyncio transports are ours): the
settings both sides of the proxy use, a connection class that keeps streams alive after a
GOAWAY, and `H2Upstream`, one client-side connection to an endpoint carrying many requests.

Settings (both sides):
  - MAX_CONCURRENT_STREAMS 100 (what clients may open on one connection; also the most the
    proxy opens on one endpoint connection, or fewer when the endpoint says so). RFC 9113 6.5.2
    asks for at least 100 so as not to limit parallelism; the bound keeps one connection's work
    in proportion (each stream may hold a flow-control window of data and an endpoint stream)
    and is the yardstick of the rapid-reset guard (h2.py).
  - Flow-control windows larger than the protocol's 64 KiB default, so one stream can fill a
    path with more than 64 KiB in flight. Data is acknowledged (WINDOW_UPDATE) only once the
    other side took it, so what the proxy holds is bounded by the windows it advertised:
    clients get 1 MiB per stream and 4 MiB per connection (a client's request bodies held at
    most 4 MiB); endpoints get 256 KiB per stream and 100 x 256 KiB per connection, so a client
    that stops reading holds at most its streams' 256 KiB and never stalls the other streams
    sharing the endpoint connection (the connection window covers every stream's).
  - MAX_HEADER_LIST_SIZE = the service's limits.maxHeaderBytes, enforced by the HPACK decoder
    (hpack counts each decoded header as it goes, so an HPACK bomb fails at the limit, not
    after inflating); the dynamic table stays at 4 KiB; h2 buffers at most 64 CONTINUATION
    frames of a header block.

Frame sizes: a frame longer than SETTINGS_MAX_FRAME_SIZE (16 KiB) is a connection error as soon
as its header arrives (h2 itself waits for the whole frame first: _PromptFrameBuffer).

Graceful GOAWAY: h2 moves the whole connection to CLOSED when it sends or receives GOAWAY, so
streams the GOAWAY lets finish (RFC 9113 6.8) would fail (python-hyper/h2#1181).
`GracefulConnection` receives a GOAWAY without closing (the handler stops opening streams and
retries those above the last stream id), and `goaway_frame` makes the frame the proxy sends
when it drains, written after h2's pending bytes without touching h2's state.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes, Settings
from hyperframe.frame import Frame, GoAwayFrame

from meshnode.proxy.http.h2pool import H2Pool

__all__ = ["CLIENT_CONFIG", "SERVER_CONFIG", "GracefulConnection", "H2Upstream", "Headers",
           "StreamOwner", "goaway_frame", "pump", "say_goaway", "start"]

log = logging.getLogger("meshnode.proxy.http")

Headers = list[tuple[bytes, bytes]]

MAX_STREAMS = 100
CLIENT_STREAM_WINDOW = 1 << 20
CLIENT_CONN_WINDOW = 4 << 20
UPSTREAM_STREAM_WINDOW = 256 << 10
UPSTREAM_CONN_WINDOW = UPSTREAM_STREAM_WINDOW * MAX_STREAMS
# Bytes queued to a peer that does not read, past which it is cut off: data is flow controlled
# and stops at the transport's high-water mark, so only control frames (PING and SETTINGS
# acknowledgements) could pile up beyond that.
MAX_WRITE_BUFFER = 4 << 20
# An endpoint connection whose stream ids (odd, up to 2^31-1) are nearly used up takes no more.
_LAST_STREAM_ID = (1 << 31) - 1 - 2 * MAX_STREAMS
_DEFAULT_WINDOW = 65_535

# Inbound headers are validated (pseudo-headers, connection-specific fields, case); what is
# sent was validated on the way in, or made here, so it is not checked twice.
SERVER_CONFIG = H2Configuration(client_side=False, header_encoding=None,
                                validate_inbound_headers=True,
                                validate_outbound_headers=False,
                                normalize_outbound_headers=False)
CLIENT_CONFIG = H2Configuration(client_side=True, header_encoding=None,
                                validate_inbound_headers=True,
                                validate_outbound_headers=False,
                                normalize_outbound_headers=False)


class _PromptFrameBuffer(FrameBuffer):
    """h2's FrameBuffer checks a frame's length against SETTINGS_MAX_FRAME_SIZE only once the
    whole frame is in: a peer announcing a 16 MB frame is buffered up to 16 MB first, and an
    endpoint answering HTTP/1.1 (its first 9 bytes read as a 4.7 MB frame header) leaves its
    streams waiting for the rest. Checked here as soon as the frame header is in."""

    def __next__(self) -> Frame:
        data = self._data
        if len(data) >= 9:
            length = int.from_bytes(data[:3], "big")
            if length > self.max_frame_size:
                self._validate_frame_length(length)  # raises FrameTooLargeError
        return super().__next__()


class GracefulConnection(H2Connection):
    """H2Connection that stays open when a GOAWAY arrives (see the module docstring), and
    refuses an oversized frame as soon as its header is in (_PromptFrameBuffer)."""

    def __init__(self, config: H2Configuration) -> None:
        super().__init__(config)
        self.incoming_buffer = _PromptFrameBuffer(server=not config.client_side)

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Any]]:
        event = ConnectionTerminated()
        try:
            event.error_code = ErrorCodes(frame.error_code)
        except ValueError:
            event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


def start(conn: H2Connection, client: bool, stream_window: int, conn_window: int,
          max_header_bytes: int) -> None:
    """Our SETTINGS and the connection window, as the first frames of a connection."""
    values = {SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
              SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
              SettingCodes.MAX_HEADER_LIST_SIZE: max_header_bytes}
    if client:
        values[SettingCodes.ENABLE_PUSH] = 0
    # Set before initiate_connection, these are in force at once (h2 applies later changes
    # only when the peer acknowledges them); the decoder's limit likewise.
    conn.local_settings = Settings(client=client, initial_values=values)
    conn.decoder.max_header_list_size = max_header_bytes
    conn.initiate_connection()
    conn.increment_flow_control_window(conn_window - _DEFAULT_WINDOW)


def say_goaway(conn: H2Connection, code: int = 0, debug: bytes | None = None) -> None:
    """Queue a GOAWAY that ends the connection, unless h2 queued one already."""
    if conn.state_machine.state is not ConnectionState.CLOSED:
        conn.close_connection(code, debug)


def goaway_frame(last_stream_id: int, code: int = 0, debug: bytes = b"") -> bytes:
    return GoAwayFrame(stream_id=0, last_stream_id=last_stream_id, error_code=code,
                       additional_data=debug).serialize()


def pump(conn: H2Connection, stream_id: int, out: deque[bytes]) -> int:
    """Send what `out` holds on a stream as DATA frames, as far as the flow-control windows
    and the frame size allow; how many bytes went."""
    sent = 0
    while out:
        window = conn.local_flow_control_window(stream_id)
        if window <= 0:
            break
        frame = conn.max_outbound_frame_size
        if window > frame:
            window = frame
        chunk = out[0]
        n = len(chunk)
        if n > window:
            conn.send_data(stream_id, chunk[:window])
            out[0] = chunk[window:]
            sent += window
        else:
            conn.send_data(stream_id, chunk)
            out.popleft()
            sent += n
    return sent


class StreamOwner(Protocol):
    """What carries a request on an endpoint connection (h2_exchange.H2Exchange): the connection
    reports its stream's events to it."""

    def up_response(self, headers: Headers, ended: bool) -> None: ...

    def up_data(self, data: bytes, flow: int) -> None: ...

    def up_trailers(self, headers: Headers) -> None: ...

    def up_end(self) -> None: ...

    def up_reset(self, code: int) -> None: ...

    def up_refused(self) -> None: ...

    def up_lost(self, garbage: bool, detail: str) -> None: ...

    def up_writable(self) -> None: ...


class H2Upstream(asyncio.Protocol):
    """One HTTP/2 connection to an endpoint: streams opened by requests (`open`), its events
    dispatched to each stream's owner. Pooled in an H2Pool under `key`."""

    __slots__ = ("clock", "closed", "dirty", "error", "h2", "identity", "idle_limit", "idle_since",
                 "key", "lost", "max_header", "paused", "pool", "retired", "streams",
                 "transport")

    def __init__(self, pool: H2Pool[Any], key: tuple[Any, str], clock: Callable[[], float],
                 max_header_bytes: int) -> None:
        self.pool = pool
        self.key = key
        self.clock = clock
        self.h2 = GracefulConnection(CLIENT_CONFIG)
        self.streams: dict[int, StreamOwner] = {}
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.lost = False
        self.retired = False  # no new streams (GOAWAY, ids used up, broken)
        self.error = ""  # how the endpoint broke the protocol
        self.dirty = False
        self.paused = False  # the endpoint does not read: request data waits
        self.idle_since = clock()
        self.idle_limit = 300.0  # the service's http.timeouts.idle, set when dialed
        self.identity = ""
        self.max_header = max_header_bytes

    # -- what requests use -----------------------------------------------------------------

    def capacity(self) -> int:
        """Streams this connection can open now."""
        if self.closed or self.retired:
            return 0
        limit = self.h2.remote_settings.max_concurrent_streams
        if limit > MAX_STREAMS:
            limit = MAX_STREAMS
        return limit - len(self.streams)

    def active(self) -> int:
        return len(self.streams)

    def open(self, owner: StreamOwner, headers: Headers, end: bool) -> int:
        """A new stream carrying `headers` (END_STREAM when `end`); its id. Raises h2's
        ProtocolError when the connection cannot take it (the caller retries elsewhere)."""
        h = self.h2
        sid = h.get_next_available_stream_id()
        h.send_headers(sid, headers, end_stream=end)
        self.streams[sid] = owner
        if sid >= _LAST_STREAM_ID:
            self.pool.retire(self)
        self.pool.writes.mark(self)
        return sid

    def release(self, sid: int) -> None:
        """A stream that ended both ways."""
        if self.streams.pop(sid, None) is not None:
            self._stream_gone()

    def reset(self, sid: int, code: int) -> None:
        """Abandon a stream (RST_STREAM)."""
        self.streams.pop(sid, None)
        if not self.closed:
            with contextlib.suppress(ProtocolError):  # closed already
                self.h2.reset_stream(sid, code)
            self.pool.writes.mark(self)
        self._stream_gone()

    def ack(self, sid: int, n: int) -> None:
        """`n` bytes of the endpoint's DATA on `sid` were passed on: it may send more."""
        if self.closed or n <= 0:
            return
        try:
            self.h2.acknowledge_received_data(n, sid)
        except ProtocolError:
            return
        self.pool.writes.mark(self)

    def _stream_gone(self) -> None:
        self.pool.stream_done(self)
        if self.retired and not self.streams:
            self.close()

    # -- transport events -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        start(self.h2, True, UPSTREAM_STREAM_WINDOW, UPSTREAM_CONN_WINDOW, self.max_header)
        self.flush()

    def data_received(self, data: bytes) -> None:
        h = self.h2
        try:
            events = h.receive_data(data)
        except ProtocolError as exc:
            self._broken(f"{self.key[0]} answered something that is not valid HTTP/2 ({exc})")
            return
        streams = self.streams
        for ev in events:
            if isinstance(ev, DataReceived):
                owner = streams.get(ev.stream_id)
                if owner is not None:
                    owner.up_data(ev.data, ev.flow_controlled_length)
                else:
                    h.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, ResponseReceived):
                owner = streams.get(ev.stream_id)
                if owner is not None:
                    owner.up_response(ev.headers, ev.stream_ended is not None)
            elif isinstance(ev, StreamEnded):
                owner = streams.get(ev.stream_id)
                if owner is not None:
                    owner.up_end()
            elif isinstance(ev, TrailersReceived):
                owner = streams.get(ev.stream_id)
                if owner is not None:
                    owner.up_trailers(ev.headers)
            elif isinstance(ev, WindowUpdated):
                self._writable(ev.stream_id)
            elif isinstance(ev, StreamReset):
                owner = streams.pop(ev.stream_id, None)
                if owner is not None:
                    self._stream_gone()
                    owner.up_reset(ev.error_code)
            elif isinstance(ev, RemoteSettingsChanged):
                changed = ev.changed_settings
                if SettingCodes.INITIAL_WINDOW_SIZE in changed:
                    self._writable(0)
                if SettingCodes.MAX_CONCURRENT_STREAMS in changed:
                    self.pool.stream_done(self)  # more room, maybe: wake a waiting request
            elif isinstance(ev, ConnectionTerminated):
                self._goaway(ev)
        self.pool.writes.mark(self)

    def _writable(self, sid: int) -> None:
        if self.paused:
            return
        if sid:
            owner = self.streams.get(sid)
            if owner is not None:
                owner.up_writable()
        else:
            for owner in list(self.streams.values()):
                owner.up_writable()

    def _goaway(self, ev: ConnectionTerminated) -> None:
        """The endpoint takes no new streams; those above its last stream id were never
        processed: their requests go elsewhere (refused-stream)."""
        last = ev.last_stream_id or 0
        log.debug("%s sent GOAWAY (%s, last stream %d)", self.key[0], ev.error_code, last)
        self.pool.retire(self)
        for sid in [s for s in self.streams if s > last]:
            self.streams.pop(sid).up_refused()
        if not self.streams:
            self.close()

    def _broken(self, detail: str) -> None:
        """The endpoint broke the protocol: h2 queued GOAWAY; every stream fails."""
        self.retired = True
        self.error = detail
        owners = list(self.streams.values())
        self.streams.clear()
        self.flush()
        self.close()
        for owner in owners:
            owner.up_lost(True, detail)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = self.closed = True
        self.pool.discard(self)
        owners = list(self.streams.values())
        self.streams.clear()
        detail = f"{self.key[0]} closed the connection" + (f" ({exc})" if exc else "")
        for owner in owners:
            owner.up_lost(False, detail)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._writable(0)

    def flush(self) -> None:
        data = self.h2.data_to_send()
        t = self.transport
        if not data or t is None or t.is_closing():
            return
        t.write(data)
        if self.paused and t.get_write_buffer_size() > MAX_WRITE_BUFFER:
            log.warning("%s does not read what the proxy sends: connection closed",
                        self.key[0])
            t.abort()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        t = self.transport
        if t is None:
            return
        say_goaway(self.h2)
        self.flush()
        t.close()
