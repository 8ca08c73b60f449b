"""Session ticket keys shared by every worker of a host, so a ticket one worker issued resumes
on any other (they all accept from the one inbound listener) and on the next worker after a
restart.

OpenSSL keeps the keys that encrypt TLS 1.3 session tickets in the SSL_CTX, made at random per
context, and the ssl module has no API to set them: measured, a ticket from one context is
refused by another, so with N workers only ~1/N of reconnections would resume. Every worker of
a host reads the same node key, so each derives the same keys from it (domain-separated
SHA-256) and installs them with SSL_CTX_set_tlsext_ticket_keys (SSL_CTX_ctrl, through ctypes).

The SSL_CTX pointer is the first field after the object header of CPython's SSLContext; it is
checked against what the context reports (options, verify mode) before anything is written,
and any mismatch or missing symbol leaves the context's own keys in place (each worker then
resumes only its own tickets; logged once).

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import ctypes
import hashlib
import ssl

__all__ = ["derive_keys", "share_ticket_keys"]

_GET_KEYS, _SET_KEYS = 58, 59  # SSL_CTRL_GET/SET_TLSEXT_TICKET_KEYS
_KEYS_LEN = 80  # key name 16, HMAC key 32, AES key 32
_VERIFY_REQUIRED = 0x03  # SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT
_LABEL = b"meshnode tls ticket keys v1\0"


def derive_keys(secret: bytes) -> bytes:
    """The 80 bytes of ticket keys for a host whose node credential file is `secret`."""
    seed = hashlib.sha256(_LABEL + secret).digest()
    name = hashlib.sha256(seed + b"\x01").digest()[:16]
    return name + hashlib.sha256(seed + b"\x02").digest() + hashlib.sha256(seed + b"\x03").digest()


def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]  # resolves libssl's symbols
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
    lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
    return lib


def share_ticket_keys(ctx: ssl.SSLContext, secret: bytes) -> bool:
    """Install the keys derived from `secret` in server context `ctx` (CERT_REQUIRED, as
    proxy/tls.py makes it); False when this Python/OpenSSL does not let us (nothing written)."""
    try:
        lib = _lib()
        ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not ptr or lib.SSL_CTX_get_options(ptr) != int(ctx.options) \
                or lib.SSL_CTX_get_verify_mode(ptr) != _VERIFY_REQUIRED:
            return False
        current = ctypes.create_string_buffer(_KEYS_LEN)
        if lib.SSL_CTX_ctrl(ptr, _GET_KEYS, _KEYS_LEN, current) != 1:
            return False
        keys = ctypes.create_string_buffer(derive_keys(secret), _KEYS_LEN)
        return bool(lib.SSL_CTX_ctrl(ptr, _SET_KEYS, _KEYS_LEN, keys) == 1)
    except (OSError, AttributeError, ValueError, TypeError):
        return False
