"""Least-request power of two choices over peak-EWMA latency (after linkerd2-proxy's
`linkerd/pool/p2c` and tower's `PeakEwma` load).

For each connection: draw two distinct candidates at random, and pick the one with the lower
load, where load = (in-flight + 1) * peak-EWMA connect latency (`EndpointLoad.load`). Two
random choices instead of the global minimum: O(1) per pick, and many workers with slightly
stale views do not all herd onto the same "best" endpoint, while the worse of any two is still
avoided, which is what bounds the worst queue (Mitzenmacher's power of two choices).

Weights shape the draw: the two are sampled in proportion to weight, and the comparison is on
unweighted load. With equal loads (an idle service) traffic is then weight-proportional; under
load, a busy or slow endpoint loses comparisons whatever its weight. (Dividing the load by the
weight instead would send everything to the heaviest endpoint of an idle service.)

Failover after the pick walks the candidates from it (`attempts.rotated`): no sort per
connection, and a failed pick's connection moves to its successor for that connection only.

Pure: clock (through `Loads`) and RNG injected. Imports nothing of meshnode's but the model
and its siblings.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from meshnode.balance.attempts import rotated
from meshnode.balance.load import EndpointLoad, LoadFeedback, Loads
from meshnode.balance.weighted import WeightedSampler
from meshnode.model import Endpoint

__all__ = ["PeakEwmaP2C"]


class PeakEwmaP2C(LoadFeedback):
    __slots__ = ("_for", "_records", "_rng", "_sampler")

    def __init__(self, loads: Loads, rng: random.Random) -> None:
        super().__init__(loads)
        self._rng = rng
        self._sampler = WeightedSampler()
        # The candidates' load records by index, cached per candidate set (identity, as in
        # WeightedSampler): a pick then reads two list slots instead of hashing two addresses.
        # A new endpoint set always comes as a new tuple, so a record replaced by
        # `Loads.retain` is never read through a stale cache.
        self._for: Sequence[Endpoint] | None = None
        self._records: list[EndpointLoad] = []

    def order(self, candidates: Sequence[Endpoint], key: int = 0) -> Sequence[Endpoint]:
        if len(candidates) <= 1:
            return candidates
        if candidates is not self._for:
            self._records = [self.loads.get(ep) for ep in candidates]
            self._for = candidates
        rng, sampler, records = self._rng, self._sampler, self._records
        i = sampler.sample(candidates, rng)
        j = sampler.sample_other(candidates, rng, i)
        now = self.loads.clock()
        # Ties go to the first draw, which keeps an idle service's traffic weight-proportional.
        if records[j].load(now) < records[i].load(now):
            i = j
        return rotated(candidates, i)
