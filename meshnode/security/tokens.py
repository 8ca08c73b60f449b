"""Join tokens: how a new host proves itself before it gets a node certificate.

A token is `mnj1.<id>.<secret>.<root fp>`: the id names it, the secret never leaves the CA
directory and the host it was given to (the request carries HMAC-SHA256(secret, CSR DER),
not the secret, so the registry never sees it), and the root fingerprint (16 hex digits of
the SHA-256 of a current root's DER) lets the joining host pin the bundle root before it
trusts anything the registry says. A token expires, may be bound to one node name, and is
single use: the first host that uses it owns it, and only a retry of that host's same CSR is
accepted again (a lost answer must not lock the host out).

Tokens are kept in `<ca dir>/tokens.json` (0600), never in the registry. Imports nothing of
meshnode's but errors and the state-file writer.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from meshnode.errors import TrustError, UsageError
from meshnode.host.statefile import write_json

PREFIX = "mnj1"
TOKEN_RE = re.compile(r"^mnj1\.([0-9a-f]{16})\.([0-9a-f]{64})\.([0-9a-f]{16})$")
MAX_TTL = 7 * 86_400.0  # a join token is short-lived by design
TOKEN_FIX = "create a new one on the CA host: meshnode ca token create --ttl 10m"


def parse(token: str) -> tuple[str, str, str]:
    """(id, secret, root fingerprint) of a join token; UsageError for anything else."""
    m = TOKEN_RE.fullmatch(token.strip())
    if m is None:
        raise UsageError("the join token is malformed (expected mnj1.<id>.<secret>.<root fp>)",
                         "copy it whole from `meshnode ca token create`")
    return m.group(1), m.group(2), m.group(3)


def mac(secret: str, csr_der: bytes) -> str:
    """The request's proof of the token: hex HMAC-SHA256 keyed by the secret over the CSR."""
    return hmac.new(secret.encode(), csr_der, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Token:
    id: str
    secret: str
    root_fp: str
    created: float
    expires: float
    node: str = ""  # bound to this node name (a glob), or any
    used_by: str = ""  # the node that used it
    used_csr: str = ""  # sha256 of the CSR it was used for
    used_at: float = 0.0

    def text(self) -> str:
        return f"{PREFIX}.{self.id}.{self.secret}.{self.root_fp}"

    def describe(self, now: float) -> dict[str, object]:
        """What `ca status` shows: never the secret."""
        return {"id": self.id, "node": self.node or "*", "expires": self.expires,
                "expires_in": round(self.expires - now), "used_by": self.used_by}


class TokenStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Token]:
        try:
            raw = json.loads(self.path.read_text())
            return {t["id"]: Token(**t) for t in raw.get("tokens", [])}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise TrustError(f"cannot read the join tokens {self.path}: {exc}",
                             f"fix or remove {self.path} (tokens not yet used are lost)"
                             ) from exc

    def _save(self, tokens: dict[str, Token], now: float) -> None:
        # expired tokens are dropped a day after: long enough to say "expired", not "unknown"
        keep = [asdict(t) for t in tokens.values() if t.expires > now - 86_400]
        write_json(self.path, {"format": 1, "tokens": keep})

    def create(self, ttl: float, root_fp: str, now: float, node: str = "") -> Token:
        if not 0 < ttl <= MAX_TTL:
            raise UsageError(f"a join token's TTL must be between 1 s and 7 days, not {ttl:g} s",
                             "use e.g. --ttl 10m")
        tokens = self.load()
        token = Token(secrets.token_hex(8), secrets.token_hex(32), root_fp, now, now + ttl, node)
        tokens[token.id] = token
        self._save(tokens, now)
        return token

    def check(self, token_id: str, proof: str, csr_der: bytes, node: str, now: float) -> Token:
        """The token, if it lets `node` join with this CSR; TrustError saying why not. Does
        not use it up: `redeem` does, once everything else about the request is checked."""
        token = self.load().get(token_id)
        if token is None:
            raise TrustError(f"unknown join token {token_id}", TOKEN_FIX)
        if now > token.expires:
            raise TrustError(f"join token {token_id} expired", TOKEN_FIX)
        if token.node and not fnmatch.fnmatchcase(node, token.node):
            raise TrustError(f"join token {token_id} is for node {token.node!r}, not {node!r}",
                             "use the token made for this host, or start it with that --node")
        if not hmac.compare_digest(mac(token.secret, csr_der), proof):
            raise TrustError(f"the proof of join token {token_id} is wrong",
                             "the token was mistyped, or the request was altered")
        digest = hashlib.sha256(csr_der).hexdigest()
        if token.used_by and (token.used_by != node or token.used_csr != digest):
            raise TrustError(f"join token {token_id} was already used by {token.used_by}",
                             TOKEN_FIX)
        return token

    def redeem(self, token: Token, node: str, csr_der: bytes, now: float) -> None:
        tokens = self.load()
        if token.id in tokens and not tokens[token.id].used_by:
            tokens[token.id] = replace(tokens[token.id], used_by=node, used_at=now,
                                       used_csr=hashlib.sha256(csr_der).hexdigest())
            self._save(tokens, now)

    def outstanding(self, now: float) -> list[Token]:
        """Tokens that can still be used."""
        return sorted((t for t in self.load().values() if not t.used_by and t.expires >= now),
                      key=lambda t: t.expires)
