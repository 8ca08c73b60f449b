"""Locality: prefer endpoints on this node, then in this zone, then the rest, and spill over to
the next tier when the preferred one is empty or overloaded.

A wrapper around one inner balancer per tier (so a round-robin turn or a ring is per tier).
The candidates it sees have already lost their ejected endpoints (`outlier.py`), so "no
healthy local endpoint" is simply an empty tier.

The spill rule. A tier t is overloaded, relative to the endpoints of every later tier R, when

    (inflight(t) / n(t) + 1)  >  SPILL_RATIO * (inflight(R) / n(R) + 1)

with inflight the tier's open connections and attempts through this worker and n its
candidates. The "+ 1" counts the connection being placed and makes idle tiers compare as
equal (1 vs 1) instead of 0/0. With SPILL_RATIO = 2 and idle remote endpoints, local endpoints
keep receiving connections until each has two in flight; in general the local tier runs about
twice as deep (plus one) as the rest before spilling, and under sustained load the traffic
settles where that holds with equality. The trade: a local connection saves a network
hop (well under a millisecond inside a zone), while one more queued connection on a busy
endpoint costs a whole service time, usually more. The overloaded tier's endpoints remain as
failover after the tier that was chosen.

Approximation: tier in-flight sums are kept per service (O(1) to read, `Loads.tier_inflight`)
while n counts this candidate set, so a service whose ports have different endpoint sets
compares service-wide in-flight. That is exact for the common single-set service.

Pure. Imports nothing of meshnode's but the model and its siblings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from meshnode.balance.attempts import chained
from meshnode.balance.load import TIERS, LoadFeedback, Loads
from meshnode.model import Endpoint

if TYPE_CHECKING:
    from meshnode.balance import Balancer

__all__ = ["SPILL_RATIO", "Locality"]

SPILL_RATIO = 2.0


class Locality(LoadFeedback):
    __slots__ = ("_for", "_inner", "_only", "_others", "_tiers")

    def __init__(self, loads: Loads, make_inner: Callable[[], Balancer]) -> None:
        super().__init__(loads)
        self._inner = [make_inner() for _ in range(TIERS)]
        self._for: Sequence[Endpoint] | None = None
        self._tiers: list[tuple[Endpoint, ...]] = [()] * TIERS
        self._others: list[tuple[Endpoint, ...]] = [()] * TIERS
        self._only = -1  # the one tier holding every candidate, if there is one

    def _partition(self, candidates: Sequence[Endpoint]) -> None:
        # Cached by identity: the routing table hands the same tuple until something changes.
        loads = self.loads
        tiers: list[list[Endpoint]] = [[] for _ in range(TIERS)]
        for ep in candidates:
            tiers[loads.get(ep).tier].append(ep)
        self._tiers = [tuple(t) for t in tiers]
        self._others = [tuple(ep for u in range(TIERS) if u != t for ep in self._tiers[u])
                        for t in range(TIERS)]
        filled = [t for t in range(TIERS) if self._tiers[t]]
        self._only = filled[0] if len(filled) == 1 else -1
        self._for = candidates

    def order(self, candidates: Sequence[Endpoint], key: int = 0) -> Sequence[Endpoint]:
        if candidates is not self._for:
            self._partition(candidates)
        if self._only >= 0:
            # One tier (every endpoint on this node, say): nothing to prefer or spill to.
            return self._inner[self._only].order(candidates, key)
        tiers = self._tiers
        chosen = self._choose(tiers)
        if chosen < 0:
            return candidates  # empty
        return chained(self._inner[chosen].order(tiers[chosen], key), self._others[chosen])

    def _choose(self, tiers: list[tuple[Endpoint, ...]]) -> int:
        inflight = self.loads.tier_inflight
        for t in range(TIERS):
            n = len(tiers[t])
            if not n:
                continue
            rest_n = rest_inflight = 0
            for u in range(t + 1, TIERS):
                if tiers[u]:
                    rest_n += len(tiers[u])
                    rest_inflight += inflight[u]
            if not rest_n:
                return t  # the last non-empty tier takes everything
            if inflight[t] / n + 1 <= SPILL_RATIO * (rest_inflight / rest_n + 1):
                return t
        return -1

    def inner(self, tier: int) -> Balancer:
        return self._inner[tier]
