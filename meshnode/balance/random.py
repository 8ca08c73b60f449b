"""Random: each connection picks a candidate at random, in proportion to its weight.

Stateless apart from the injected RNG (and the sampler's cached prefix sums), so it spreads
load evenly over many workers without coordination; failover walks on from the pick.
Imports nothing of meshnode's but the model and its siblings.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from meshnode.balance.attempts import rotated
from meshnode.balance.load import LoadFeedback, Loads
from meshnode.balance.weighted import WeightedSampler
from meshnode.model import Endpoint

__all__ = ["WeightedRandom"]


class WeightedRandom(LoadFeedback):
    __slots__ = ("_rng", "_sampler")

    def __init__(self, loads: Loads, rng: random.Random) -> None:
        super().__init__(loads)
        self._rng = rng
        self._sampler = WeightedSampler()

    def order(self, candidates: Sequence[Endpoint], key: int = 0) -> Sequence[Endpoint]:
        if len(candidates) <= 1:
            return candidates
        return rotated(candidates, self._sampler.sample(candidates, self._rng))
