"""Attempt orders as views: the first pick then the failover sequence, without copying the
candidates on every connection.

A balancer's `order()` runs once per accepted connection and the connector usually tries only
the first entry, so building a fresh n-element list each time would be wasted work. `rotated`
and `chained` return O(1)-sized views instead (or the input itself when no reordering is
needed); indexing and iteration are computed on the fly.

Imports nothing of meshnode's but the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

from meshnode.model import Endpoint

__all__ = ["chained", "rotated"]


class _View(Sequence[Endpoint]):
    """A computed sequence: subclasses give `__len__`, `_at(i)` for 0 <= i < len and
    `__iter__`; indexing rules (negative indexes, bounds, slices) live here once."""

    __slots__ = ()

    def _at(self, i: int) -> Endpoint:
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> Endpoint: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[Endpoint]: ...

    def __getitem__(self, i: int | slice) -> Endpoint | Sequence[Endpoint]:
        if isinstance(i, slice):
            return list(self)[i]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return self._at(i)


class _Rotation(_View):
    """`base[start:] + base[:start]`, computed on access."""

    __slots__ = ("_base", "_start")

    def __init__(self, base: Sequence[Endpoint], start: int) -> None:
        self._base = base
        self._start = start

    def __len__(self) -> int:
        return len(self._base)

    def _at(self, i: int) -> Endpoint:
        return self._base[(self._start + i) % len(self._base)]

    def __iter__(self) -> Iterator[Endpoint]:
        base, start = self._base, self._start
        yield from base[start:]
        yield from base[:start]

    def __repr__(self) -> str:
        return f"rotated({list(self)!r})"


class _Chain(_View):
    """`first + rest`, computed on access."""

    __slots__ = ("_first", "_rest")

    def __init__(self, first: Sequence[Endpoint], rest: Sequence[Endpoint]) -> None:
        self._first = first
        self._rest = rest

    def __len__(self) -> int:
        return len(self._first) + len(self._rest)

    def _at(self, i: int) -> Endpoint:
        n1 = len(self._first)
        return self._first[i] if i < n1 else self._rest[i - n1]

    def __iter__(self) -> Iterator[Endpoint]:
        yield from self._first
        yield from self._rest

    def __repr__(self) -> str:
        return f"chained({list(self)!r})"


def rotated(candidates: Sequence[Endpoint], start: int) -> Sequence[Endpoint]:
    """Start at `candidates[start]` and walk the ring: failover falls on the successors."""
    return candidates if start == 0 else _Rotation(candidates, start)


def chained(first: Sequence[Endpoint], rest: Sequence[Endpoint]) -> Sequence[Endpoint]:
    """`first`, then `rest` (locality: the chosen tier, then the others as failover)."""
    if not rest:
        return first
    if not first:
        return rest
    return _Chain(first, rest)
