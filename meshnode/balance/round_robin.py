"""Round robin: each new connection starts at the next candidate; the others follow in turn.

Pure and deterministic (no clock, no RNG): the n-th call starts at index n mod len(candidates).
Imports nothing of meshnode's but the model.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshnode.model import Endpoint

__all__ = ["RoundRobin"]


class RoundRobin:
    """A turn counter. Failover walks the ring from the turn's endpoint onward, so a dead
    endpoint's share falls on its successor only for that connection, and the next connection
    still advances the turn."""

    __slots__ = ("_turn",)

    def __init__(self, start: int = 0) -> None:
        self._turn = start

    def order(self, candidates: Sequence[Endpoint], key: int = 0) -> Sequence[Endpoint]:
        n = len(candidates)
        if n <= 1:
            return candidates
        i = self._turn % n
        # Store the reduced index + 1, so the counter stays small however long the worker runs.
        # When the candidate set shrinks or grows the rotation carries on from the same place.
        self._turn = i + 1
        if i == 0:
            return candidates
        return [*candidates[i:], *candidates[:i]]
