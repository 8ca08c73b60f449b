"""The tunnel's preamble: what a client says inside a fresh mTLS connection to a host's inbound
listener before any application byte, and the one reply it gets.

Frame: a 2-byte big-endian length, then that many bytes of JSON (msgspec). Client → server one
`Preamble`; server → client one `Answer`; after an `ok` answer the connection carries the
application's bytes unchanged in both directions (half-close is a TCP FIN on the raw socket).
A refused connection gets an `Answer` with `ok` false and a `reason` from REFUSALS, then a FIN.

    {"v":1,"target":"10.0.0.7:8080","service":"web","software":"0.14.0"}
    {"ok":true}   |   {"ok":false,"reason":"denied"}

`v` is this format's version: a server refuses a preamble it cannot read ("bad_preamble")
rather than guess. Unknown fields are ignored, so a newer client may add some.

Pure, shared by the worker's two sides (proxy/tunnel.py, proxy/inbound.py): imports nothing
of meshnode's.
"""

from __future__ import annotations

import struct

import msgspec

__all__ = ["MAX_FRAME", "REFUSALS", "VERSION", "Answer", "FrameError", "Preamble",
           "decode_answer", "decode_preamble", "encode_frame", "frame_length"]

VERSION = 1
MAX_FRAME = 4096  # a preamble is ~100 bytes: anything longer is not one
_LEN = struct.Struct(">H")
HEADER = _LEN.size

# Why an inbound listener refuses a tunnel (the Answer's reason; also the counters' label).
REFUSALS = frozenset({
    "bad_preamble",  # not a frame of this format, or a version it does not speak
    "not_local",  # the target is not an endpoint of this host (never an open relay)
    "wrong_service",  # the target is an endpoint, of another service than named
    "denied",  # authorization refused the source identity
    "unreachable",  # the local endpoint did not answer (refused, timeout, ...)
    "draining",  # the worker is stopping
})


class FrameError(ValueError):
    """Bytes that are not a frame of this format."""


class Preamble(msgspec.Struct, frozen=True, omit_defaults=False):
    target: str  # "ip:port" of the endpoint on the server's host
    service: str  # the destination service, as the client routed it
    v: int = VERSION
    software: str = ""
    # HTTP requests, each authorized by the client's proxy as it routes them; False: bytes
    # relayed as they are (authorized here as an opaque connection)
    requests: bool = False


class Answer(msgspec.Struct, frozen=True, omit_defaults=True):
    ok: bool
    reason: str = ""


_ENC = msgspec.json.Encoder()
_PREAMBLE = msgspec.json.Decoder(Preamble)
_ANSWER = msgspec.json.Decoder(Answer)


def encode_frame(msg: Preamble | Answer) -> bytes:
    body = _ENC.encode(msg)
    return _LEN.pack(len(body)) + body


def frame_length(head: bytes | bytearray | memoryview) -> int:
    """The body length a frame header announces; FrameError when it cannot be one."""
    (n,) = _LEN.unpack_from(head)
    if not 0 < n <= MAX_FRAME:
        raise FrameError(f"frame length {n} out of range")
    return int(n)


def decode_preamble(body: bytes | bytearray | memoryview) -> Preamble:
    try:
        msg = _PREAMBLE.decode(body)
    except (msgspec.DecodeError, ValueError, TypeError) as exc:
        raise FrameError(f"not a preamble: {exc}") from None
    if msg.v != VERSION:
        raise FrameError(f"preamble version {msg.v}, this side speaks {VERSION}")
    return msg


def decode_answer(body: bytes | bytearray | memoryview) -> Answer:
    try:
        return _ANSWER.decode(body)
    except (msgspec.DecodeError, ValueError, TypeError) as exc:
        raise FrameError(f"not an answer: {exc}") from None
