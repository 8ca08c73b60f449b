"""Authorization: which callers may reach which services. (Interface fixed; the evaluation
is being written: today everything is allowed.)

`AuthzTable` is the compiled form of every `AuthorizationPolicy` resource plus the `Mesh`
resource's default; it travels to the workers whole (wire.Security) and `decide` is the one
function both the worker (where the destination is) and `meshnode explain` call.

Pure: imports nothing of meshnode's but the policy resources and errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from meshnode.policy.resources import Resource

__all__ = ["AuthzTable", "Decision", "compile_authz"]


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool  # what happens to the connection
    would_deny: bool = False  # a dry-run policy (or a dry-run default) would have denied it
    policy: str = ""  # the deciding AuthorizationPolicy's name; "" is the mesh default
    reason: str = ""  # one line, for the log, the access log and explain


class AuthzTable(msgspec.Struct, frozen=True):
    """Compiled authorization, as the workers evaluate it."""

    def decide(self, src_identity: str, dst_service: str, port: int) -> Decision:
        """`src_identity`: the caller's SPIFFE ID ("" when unauthenticated: plaintext from
        another host); `dst_service`/`port`: the destination service and the endpoint port."""
        return Decision(True, reason="allowed: mesh default ALLOW")


def compile_authz(resources: Mapping[tuple[str, str], Resource]) -> AuthzTable:
    return AuthzTable()
