"""Per-endpoint load, shared by all balancers of one service: in-flight connections, peak-EWMA
connect latency, and counters for the stats report.

`Loads` owns one `EndpointLoad` per endpoint address. The connector's feedback goes through a
balancer (`LoadFeedback`, the base of every algorithm here) into these records; P2C and the
locality wrapper read them. Records are keyed by address, so an endpoint that stays across
Add/Remove/Reset (or a change of algorithm) keeps its estimate; a removed endpoint's record is
dropped, and a connection still holding it as a token updates a detached record harmlessly.

Locality tiers (0: this node, 1: this zone, 2: elsewhere) are assigned here when a record is
made, and `Loads` keeps the in-flight sum per tier, so the locality wrapper's overload test is
O(1) instead of a sum over the tier's endpoints on every connection.

Pure: the clock is injected. Imports nothing of meshnode's but the model and ewma.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from meshnode.balance.ewma import DEFAULT_RTT, FAILURE_RTT, PeakEwma
from meshnode.model import Endpoint, HostPort

__all__ = ["TIERS", "EndpointLoad", "LoadFeedback", "Loads", "tier_of"]

TIERS = 3  # this node, this zone, the rest


def tier_of(ep: Endpoint, node: str, zone: str) -> int:
    """0 when `ep` runs on `node`, 1 when in `zone`, else 2 (an empty name matches nothing)."""
    if node and ep.node == node:
        return 0
    if zone and ep.zone == zone:
        return 1
    return 2


class EndpointLoad:
    """One endpoint's load record; also the feedback token of a connection to it."""

    __slots__ = ("connections", "endpoint", "ewma", "failures", "inflight", "owner", "tier")

    def __init__(self, endpoint: Endpoint, ewma: PeakEwma, tier: int, owner: Loads) -> None:
        self.endpoint = endpoint
        self.ewma = ewma
        self.tier = tier
        self.owner = owner
        self.inflight = 0  # attempts and open connections through this worker
        self.connections = 0  # successful connects (cumulative)
        self.failures = 0  # failed connect attempts (cumulative)

    def load(self, now: float) -> float:
        """The P2C load: (in-flight + 1) * peak-EWMA latency. The +1 counts the connection
        being placed, so an idle endpoint's load is its latency and not zero for everyone."""
        return (self.inflight + 1) * self.ewma.cost(now)


class Loads:
    """The records of one service's endpoints, and the in-flight sum of each locality tier."""

    __slots__ = ("_clock", "_records", "node", "tier_inflight", "zone")

    def __init__(self, clock: Callable[[], float], node: str = "", zone: str = "") -> None:
        self._clock = clock
        self.node = node
        self.zone = zone
        self._records: dict[HostPort, EndpointLoad] = {}
        self.tier_inflight = [0] * TIERS

    def clock(self) -> float:
        return self._clock()

    def get(self, ep: Endpoint) -> EndpointLoad:
        rec = self._records.get(ep.addr)
        if rec is None:
            rec = self._records[ep.addr] = EndpointLoad(
                ep, PeakEwma(self._clock(), self._seed()), tier_of(ep, self.node, self.zone),
                self)
        return rec

    def find(self, addr: HostPort) -> EndpointLoad | None:
        return self._records.get(addr)

    def _seed(self) -> float:
        # A newcomer starts at its peers' mean estimate (see ewma.DEFAULT_RTT for why).
        if not self._records:
            return DEFAULT_RTT
        now = self._clock()
        return sum(r.ewma.peek(now) for r in self._records.values()) / len(self._records)

    def retain(self, endpoints: Iterable[Endpoint]) -> None:
        """The service's endpoint set changed: keep the records of those that stay (taking
        their new weight, node and zone), create records for newcomers, drop the rest."""
        keep: dict[HostPort, EndpointLoad] = {}
        fresh = []
        for ep in endpoints:
            rec = self._records.get(ep.addr)
            if rec is None:
                fresh.append(ep)
                continue
            rec.endpoint = ep
            tier = tier_of(ep, self.node, self.zone)
            if tier != rec.tier:  # moved between tiers (re-registered elsewhere): move its sum
                self.tier_inflight[rec.tier] -= rec.inflight
                self.tier_inflight[tier] += rec.inflight
                rec.tier = tier
            keep[ep.addr] = rec
        for rec in self._records.values():
            if rec.endpoint.addr not in keep:
                # Its connections still end later (on_done on a detached record): take its
                # in-flight out of the tier sums now, and detach it so that does not count.
                self.tier_inflight[rec.tier] -= rec.inflight
                rec.owner = _DETACHED
        self._records = keep
        for ep in fresh:
            self.get(ep)

    def records(self) -> Iterable[EndpointLoad]:
        return self._records.values()


class _Detached(Loads):
    """Owner of records whose endpoint went away: their tier sums are nobody's."""

    __slots__ = ()


_DETACHED = _Detached(lambda: 0.0)


class LoadFeedback:
    """The feedback half of the `Balancer` interface, shared by every algorithm: it updates
    the service's `Loads` (every algorithm keeps them, since the stats report them and the
    locality wrapper reads them, even when the algorithm itself ignores load)."""

    __slots__ = ("loads",)

    def __init__(self, loads: Loads) -> None:
        self.loads = loads

    def on_start(self, ep: Endpoint) -> EndpointLoad:
        rec = self.loads.get(ep)
        rec.inflight += 1
        rec.owner.tier_inflight[rec.tier] += 1
        return rec

    def on_connected(self, token: EndpointLoad, latency: float) -> None:
        token.connections += 1
        token.ewma.observe(latency, token.owner.clock())

    def on_failed(self, token: EndpointLoad, elapsed: float) -> None:
        token.failures += 1
        token.ewma.observe(max(elapsed, FAILURE_RTT), token.owner.clock())

    def on_done(self, token: EndpointLoad) -> None:
        token.inflight -= 1
        token.owner.tier_inflight[token.tier] -= 1
