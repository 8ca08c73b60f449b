"""Ring hash (consistent hashing): the same key (the client IP) goes to the same endpoint, and
when an endpoint joins or leaves only about 1/N of the keys move.

Each endpoint owns `weight * VNODES` points on a 64-bit ring, placed by hashing its address;
a key is hashed onto the ring and served by the owner of the next point clockwise (a binary
search: O(log points)). Points depend only on the endpoint's own address and weight, so adding
or removing one endpoint moves only the keys that land on its arcs; a weighted endpoint owns
proportionally more arcs.

The ring is built once per candidate set (cached by identity; the routing table hands the same
tuple until the endpoint or ejected set changes) and each endpoint's points are kept, so a
rebuild after an ejection is a merge, not rehashing everything. Failover walks the candidates
from the owner, like round robin.

Hashes are blake2b and splitmix64, never Python's `hash()`: that is salted per process, and
every worker (and every host) must agree on where a key goes.

Pure. Imports nothing of meshnode's but the model and its siblings.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Sequence

from meshnode.balance.attempts import rotated
from meshnode.balance.load import LoadFeedback, Loads
from meshnode.model import Endpoint, HostPort

__all__ = ["MAX_POINTS", "VNODES", "RingHash", "mix64", "points"]

# Points per unit of weight. A node's share of the ring varies by about 1/sqrt(points) (~8%
# here, ketama's classic 160); more points cost memory and build time, not lookup time.
VNODES = 160
# Ring size cap: very large weights are scaled down to stay under it (only when the sum of
# weights * VNODES would exceed it, so ordinary rings never change scale on an update).
MAX_POINTS = 1 << 17

_MASK = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64's finaliser: spreads nearby keys (consecutive client IPs) over the ring."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def points(addr: HostPort, count: int) -> list[int]:
    """An endpoint's `count` places on the ring (the kernel path's ring slots use them too)."""
    base = str(addr).encode()
    return [int.from_bytes(hashlib.blake2b(base + b"#%d" % i, digest_size=8).digest(), "big")
            for i in range(count)]


class RingHash(LoadFeedback):
    __slots__ = ("_for", "_hashes", "_owners", "_points", "vnodes")

    def __init__(self, loads: Loads, vnodes: int = VNODES) -> None:
        super().__init__(loads)
        self.vnodes = vnodes
        self._for: Sequence[Endpoint] | None = None
        self._hashes: list[int] = []
        self._owners: list[int] = []  # candidate index owning the point at the same position
        self._points: dict[tuple[HostPort, int], list[int]] = {}

    def _build(self, candidates: Sequence[Endpoint]) -> None:
        total = sum(max(ep.weight, 1) for ep in candidates)
        per_unit = max(1, min(self.vnodes, MAX_POINTS // max(total, 1)))
        cache: dict[tuple[HostPort, int], list[int]] = {}
        ring: list[tuple[int, int]] = []
        for index, ep in enumerate(candidates):
            count = max(ep.weight, 1) * per_unit
            pkey = (ep.addr, count)
            pts = self._points.get(pkey)
            if pts is None:
                pts = points(ep.addr, count)
            cache[pkey] = pts
            ring.extend((h, index) for h in pts)
        ring.sort()
        self._points = cache  # points of endpoints no longer present are forgotten
        self._hashes = [h for h, _ in ring]
        self._owners = [i for _, i in ring]
        self._for = candidates

    def order(self, candidates: Sequence[Endpoint], key: int = 0) -> Sequence[Endpoint]:
        if len(candidates) <= 1:
            return candidates
        if candidates is not self._for:
            self._build(candidates)
        pos = bisect_left(self._hashes, mix64(key))
        if pos == len(self._hashes):
            pos = 0  # past the last point: wrap to the first
        return rotated(candidates, self._owners[pos])
