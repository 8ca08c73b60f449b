"""etcd v3 request messages (aetcd.rpc) as the registry's transactions use them: comparisons,
puts, deletes and reads, and the chunking that keeps a transaction under etcd's operation
limit. Builds messages only; the session (etcd_session.py) sends them.
"""

from __future__ import annotations

from typing import Any, TypeVar

from aetcd import rpc

_RESULT = {"==": rpc.Compare.EQUAL, "!=": rpc.Compare.NOT_EQUAL, "<": rpc.Compare.LESS,
           ">": rpc.Compare.GREATER}


def cmp(key: bytes, target: str, value: int, op: str = "==",
         end: bytes | None = None) -> Any:
    """Compare a key's (or every key in [key, end)'s) create or mod revision. On an empty
    range etcd compares against zero, so create == 0 means "none of these keys exists"."""
    c = rpc.Compare(key=key, result=_RESULT[op])
    if target == "create":
        c.target, c.create_revision = rpc.Compare.CREATE, value
    else:
        c.target, c.mod_revision = rpc.Compare.MOD, value
    if end is not None:
        c.range_end = end
    return c


def put(key: bytes, value: bytes, lease: int = 0) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def delete(key: bytes, end: bytes | None = None) -> Any:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key,
                                                                      range_end=end or b""))


def get(key: bytes, end: bytes | None = None) -> Any:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, range_end=end or b""))


T = TypeVar("T")


def chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]

