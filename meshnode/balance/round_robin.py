"""Round robin: each new connection starts at the next candidate; the others follow in turn.

Pure and deterministic (no clock, no RNG): the n-th call starts at index n mod len(candidates).
Ignores weights and load (use random or p2c-ewma for those); it still keeps the service's load
records up to date through `LoadFeedback`, for the stats and the locality wrapper.
Imports nothing of meshnode's but the model and its siblings.
"""

from __future__ import annotations

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

    __slots__ = ("_turn",)

    def __init__(self, start: int = 0, loads: Loads | None = None) -> None:
        # A standalone round robin (tests, tools) gets private load records on a frozen clock:
        # balancers own no clock, and round robin never reads the estimates anyway.
        super().__init__(loads if loads is not None else Loads(_frozen_clock))
        self._turn = start

    def order(self, candidates: Sequence[Endpoint], key: int = 0) -> Sequence[Endpoint]:
        n = len(candidates)
        if n <= 1:
            return candidates
        i = self._turn % n
        # Store the reduced index + 1, so the counter stays small however long the worker runs.
        # When the candidate set shrinks or grows the rotation carries on from the same place.
        self._turn = i + 1
        return rotated(candidates, i)
