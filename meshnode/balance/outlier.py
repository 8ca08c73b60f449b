"""Passive outlier ejection: endpoints whose connects keep failing sit out for a while.

Per service (one `OutlierDetector`), from the connector's own results, no probes:
- `consecutive_failures` failed connects in a row to an endpoint eject it; any successful
  connect resets its count.
- An ejection lasts `base_ejection * k` seconds, k being how many times this endpoint has been
  ejected (this one included), capped at `max_ejection`: a flapping endpoint sits out longer
  each time. k is kept for as long as the endpoint stays in the service (Envoy instead lets it
  decay; ours resets when the endpoint is removed and registered again).
- At most floor(`max_ejected_share` * endpoints) are ejected at once, and a service with one
  endpoint never ejects it: ejection protects healthy endpoints from wasted attempts, it must
  never take a whole service down because of a bad network moment. An endpoint that reaches
  the threshold while the quota is full stays in, and is ejected at its next failure if room
  has been made.
- An ejected endpoint returns by itself when its time is up, with a fresh count.

`filter()` leaves ejected endpoints out of a candidate set before balancing; if that would
leave nothing, every candidate is used (a connect that may fail beats certain refusal). When
nothing is ejected it returns its input untouched, without reading the clock: the common case
costs one truth test per connection. Filtered sets are cached until the ejected set changes,
so balancers that cache per candidate set (ring hash, locality, weights) keep their caches.

Pure: the clock is injected. Imports nothing of meshnode's but the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from meshnode.model import Endpoint, HostPort, OutlierConfig

__all__ = ["OutlierDetector"]


class _Record:
    __slots__ = ("consecutive", "consecutive_5xx", "ejections")

    def __init__(self) -> None:
        self.consecutive = 0
        self.consecutive_5xx = 0
        self.ejections = 0


class OutlierDetector:
    __slots__ = ("_cache", "_clock", "_ejected", "_next_expiry", "_records", "_size", "config")

    def __init__(self, config: OutlierConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self._clock = clock
        self._records: dict[HostPort, _Record] = {}  # endpoints that failed at least once
        self._ejected: dict[HostPort, float] = {}  # address -> when it returns
        self._next_expiry = math.inf
        self._size = 0
        # id(candidates) -> (candidates, filtered); the stored input guards against id reuse.
        self._cache: dict[int, tuple[Sequence[Endpoint], Sequence[Endpoint]]] = {}

    # -- discovery ---------------------------------------------------------------------------

    def retain(self, endpoints: Iterable[Endpoint]) -> None:
        """The service's endpoint set is now `endpoints`: forget the others."""
        present = {ep.addr for ep in endpoints}
        self._size = len(present)
        self._records = {a: r for a, r in self._records.items() if a in present}
        ejected = {a: t for a, t in self._ejected.items() if a in present}
        if len(ejected) != len(self._ejected):
            self._set_ejected(ejected)
        self._cache.clear()

    # -- feedback ----------------------------------------------------------------------------

    def success(self, addr: HostPort) -> None:
        if not self._records:
            return  # no endpoint ever failed: nothing to reset (the common case, per connect)
        rec = self._records.get(addr)
        if rec is not None:
            rec.consecutive = rec.consecutive_5xx = 0

    def failure(self, addr: HostPort, http: bool = False) -> bool:
        """Count a failed connect (`http`: a 5xx answer or a reset request, counted against
        `consecutive_5xx`); True when this failure ejected the endpoint."""
        cfg = self.config
        if http and not cfg.consecutive_5xx:
            return False
        rec = self._records.get(addr)
        if rec is None:
            rec = self._records[addr] = _Record()
        now = self._clock()
        self._expire(now)
        if addr in self._ejected:
            return False  # tried anyway (everything was ejected): already sitting out
        if http:
            rec.consecutive_5xx += 1
            reached = rec.consecutive_5xx >= cfg.consecutive_5xx
        else:
            rec.consecutive += 1
            reached = rec.consecutive >= cfg.consecutive_failures
        if not reached or len(self._ejected) >= self.max_ejected():
            return False
        rec.consecutive = rec.consecutive_5xx = 0
        rec.ejections += 1
        duration = min(cfg.base_ejection * rec.ejections, cfg.max_ejection)
        self._set_ejected({**self._ejected, addr: now + duration})
        return True

    def hold(self, ejected_for: dict[HostPort, float]) -> None:
        """Eject each address for its seconds from now, as another detector reported them (the
        agent's `explain` replays the workers' ejections). No threshold or quota applies: the
        reporting detector applied them already."""
        now = self._clock()
        self._set_ejected({**self._ejected, **{a: now + s for a, s in ejected_for.items()}})

    def max_ejected(self) -> int:
        """How many endpoints may be ejected at once (round down; never a lone endpoint)."""
        if self._size <= 1:
            return 0
        # The epsilon absorbs float error (0.1 * 30 is 3.0000000000000004, 0.7 * 10 is 7.0...).
        return min(self._size, int(self.config.max_ejected_share * self._size + 1e-9))

    # -- queries -----------------------------------------------------------------------------

    def filter(self, candidates: Sequence[Endpoint]) -> Sequence[Endpoint]:
        """`candidates` without the ejected endpoints (all of them if none would remain)."""
        if not self._ejected:
            return candidates
        if self._clock() >= self._next_expiry:
            self._expire(self._clock())
            if not self._ejected:
                return candidates
        hit = self._cache.get(id(candidates))
        if hit is not None and hit[0] is candidates:
            return hit[1]
        ejected = self._ejected
        kept = tuple(ep for ep in candidates if ep.addr not in ejected)
        result = kept if kept else candidates
        self._cache[id(candidates)] = (candidates, result)
        return result

    def ejected_for(self, addr: HostPort) -> float:
        """Seconds until `addr` returns; 0 when it is not ejected."""
        until = self._ejected.get(addr)
        if until is None:
            return 0.0
        return max(0.0, until - self._clock())

    def ejected(self) -> list[HostPort]:
        self._expire(self._clock())
        return sorted(self._ejected)

    # -- internals ---------------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        if now < self._next_expiry:
            return
        self._set_ejected({a: t for a, t in self._ejected.items() if t > now})

    def _set_ejected(self, ejected: dict[HostPort, float]) -> None:
        for addr in self._ejected.keys() - ejected.keys():
            rec = self._records.get(addr)
            if rec is not None:
                rec.consecutive = rec.consecutive_5xx = 0  # back with a clean slate
        self._ejected = ejected
        self._next_expiry = min(ejected.values(), default=math.inf)
        self._cache.clear()  # filtered sets are stale
