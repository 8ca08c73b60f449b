"""Round robin: each new connection starts at the next candidate; the others follow in turn.

Pure and deterministic (no clock, no RNG): the n-th call starts at index n mod len(candidates).
With weights, the turn runs over the total weight instead, so an endpoint of weight 2 starts
two turns in a row for every one of a weight-1 peer. Ignores load (use p2c-ewma for that); it
still keeps the service's load records up to date through `LoadFeedback`, for the stats and
the locality wrapper.
Imports nothing of meshnode's but the model and its siblings.
"""

from __future__ import annotations

import itertools
from bisect import bisect_right
from collections.abc import Sequence

from meshnode.balance.attempts import rotated
from meshnode.balance.load import LoadFeedback, Loads
from meshnode.model import Endpoint

__all__ = ["RoundRobin"]


def _frozen_clock() -> float:
    return 0.0


class RoundRobin(LoadFeedback):
    """A turn counter. Failover walks the ring from the turn's endpoint onward, so a dead
    endpoint's share falls on its successor only for that connection, and the next connection
    still advances the turn."""

    __slots__ = ("_candidates", "_prefix", "_turn")

    def __init__(self, start: int = 0, loads: Loads | None = None) -> None:
        # A standalone round robin (tests, tools) gets private load records on a frozen clock:
        # balancers own no clock, and round robin never reads the estimates anyway.
        super().__init__(loads if loads is not None else Loads(_frozen_clock))
        self._turn = start
        # cumulative weights of the last candidate list seen (the routing table hands out the
        # same tuple until it changes), or None when every weight is 1: the plain rotation
        self._candidates: Sequence[Endpoint] | None = None
        self._prefix: list[int] | None = None

    def order(self, candidates: Sequence[Endpoint], key: int = 0) -> Sequence[Endpoint]:
        n = len(candidates)
        if n <= 1:
            return candidates
        if candidates is not self._candidates:
            self._candidates = candidates
            weights = [max(0, e.weight) for e in candidates]
            weighted = any(w != 1 for w in weights) and sum(weights) > 0
            self._prefix = list(itertools.accumulate(weights)) if weighted else None
        if self._prefix is not None:
            t = self._turn % self._prefix[-1]
            self._turn = t + 1
            return rotated(candidates, bisect_right(self._prefix, t))
        i = self._turn % n
        # Store the reduced index + 1, so the counter stays small however long the worker runs.
        # When the candidate set shrinks or grows the rotation carries on from the same place.
        self._turn = i + 1
        return rotated(candidates, i)
