"""Weight-proportional sampling of a candidate index, shared by the random and P2C balancers.

When every candidate has the same weight (the common case) a pick is one `randrange`. Otherwise
the cumulative weights are computed once per candidate set and a pick is a binary search:
O(log n). The cache is keyed by the identity of the candidate sequence: the routing table hands
the same tuple for as long as the endpoint set (and the ejected set) does not change, so the
prefix sums are rebuilt on updates only.

Pure: the RNG is passed in. Imports nothing of meshnode's but the model.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate

from meshnode.model import Endpoint

__all__ = ["WeightedSampler"]


class WeightedSampler:
    __slots__ = ("_for", "_prefix", "_total")

    def __init__(self) -> None:
        self._for: Sequence[Endpoint] | None = None
        self._prefix: list[int] | None = None  # None: all weights equal
        self._total = 0

    def _prepare(self, candidates: Sequence[Endpoint]) -> None:
        self._for = candidates
        weights = [max(ep.weight, 0) for ep in candidates]
        total = sum(weights)
        if total == 0 or all(w == weights[0] for w in weights):
            # All equal (or all zero, which we treat as all equal rather than refuse service).
            self._prefix = None
        else:
            self._prefix = list(accumulate(weights))
        self._total = total

    def sample(self, candidates: Sequence[Endpoint], rng: random.Random) -> int:
        """An index into `candidates`, with probability proportional to its weight."""
        if candidates is not self._for:
            self._prepare(candidates)
        prefix = self._prefix
        if prefix is None:
            return rng.randrange(len(candidates))
        return bisect_right(prefix, rng.randrange(self._total))

    def sample_other(self, candidates: Sequence[Endpoint], rng: random.Random,
                     first: int) -> int:
        """A second index, distinct from `first`, again weight-proportional (n >= 2)."""
        if candidates is not self._for:
            self._prepare(candidates)
        n = len(candidates)
        if self._prefix is None:
            j = rng.randrange(n - 1)
            return j + 1 if j >= first else j
        # Rejection sampling: a few redraws unless one weight dwarfs the rest; after those,
        # a uniform pick among the others keeps the pick O(1) in the worst case.
        for _ in range(4):
            j = self.sample(candidates, rng)
            if j != first:
                return j
        j = rng.randrange(n - 1)
        return j + 1 if j >= first else j
