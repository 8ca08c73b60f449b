"""Balancers: pure and deterministic, no sockets. Clocks are fakes and RNGs seeded, so every
distribution below is the same on every run; tolerances allow for sampling noise only."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.balance import Balancer, pick
from meshnode.balance.attempts import chained, rotated
from meshnode.balance.ewma import DECAY, DEFAULT_RTT, FAILURE_RTT, PeakEwma
from meshnode.balance.factory import for_service
from meshnode.balance.load import Loads
from meshnode.balance.locality import SPILL_RATIO, Locality
from meshnode.balance.outlier import OutlierDetector
from meshnode.balance.p2c import PeakEwmaP2C
from meshnode.balance.random import WeightedRandom
from meshnode.balance.ring_hash import RingHash
from meshnode.balance.round_robin import RoundRobin
from meshnode.model import BalancerConfig, Endpoint, HostPort, OutlierConfig, ServiceSpec

pytestmark = pytest.mark.timeout(30)

VIP_ = IPv4Address("127.240.0.9")


def eps(*ports: int) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(HostPort.parse(f"127.0.0.1:{p}")) for p in ports)


def ports(order: object) -> list[int]:
    return [e.addr.port for e in order]  # type: ignore[attr-defined]


def test_round_robin_starts_each_connection_at_the_next_endpoint() -> None:
    rr: Balancer = RoundRobin()
    c = eps(1, 2, 3)
    assert [ports(rr.order(c)) for _ in range(4)] == [
        [1, 2, 3], [2, 3, 1], [3, 1, 2], [1, 2, 3]]


def test_round_robin_empty_and_single() -> None:
    rr = RoundRobin()
    assert list(rr.order(())) == []
    assert ports(rr.order(eps(7))) == [7]
    assert pick(rr, ()) is None


def test_round_robin_keeps_turning_when_the_set_changes() -> None:
    rr = RoundRobin()
    assert ports(rr.order(eps(1, 2, 3))) == [1, 2, 3]
    assert ports(rr.order(eps(1, 2, 3))) == [2, 3, 1]
    # One endpoint went away: the turn (now 2) wraps onto the smaller set.
    assert ports(rr.order(eps(1, 3))) == [1, 3]
    assert ports(rr.order(eps(1, 3))) == [3, 1]
    assert ports(rr.order(eps(1, 3, 4))) == [4, 1, 3]


def test_round_robin_is_deterministic_from_its_start() -> None:
    a, b = RoundRobin(start=5), RoundRobin(start=5)
    c = eps(1, 2, 3, 4)
    assert [ports(a.order(c)) for _ in range(6)] == [ports(b.order(c)) for _ in range(6)]
    assert ports(RoundRobin(start=5).order(c)) == [2, 3, 4, 1]


def test_pick_is_the_first_of_the_order() -> None:
    rr = RoundRobin()
    c = eps(1, 2)
    picks = [pick(rr, c) for _ in range(3)]
    assert [p.addr.port for p in picks if p is not None] == [1, 2, 1]


def test_balancer_leaves_its_input_alone() -> None:
    c = eps(1, 2, 3)
    rr = RoundRobin(start=1)
    rr.order(c)
    assert ports(c) == [1, 2, 3]




PICKS = 6000


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def wep(port: int, weight: int = 1, node: str = "", zone: str = "") -> Endpoint:
    return Endpoint(HostPort.parse(f"10.0.0.1:{port}"), node, zone, weight)


def shares(b: Balancer, c: Sequence[Endpoint], n: int = PICKS,
           key: object = None) -> dict[int, float]:
    keys = random.Random(99)
    got = Counter(
        b.order(c, keys.getrandbits(32) if key == "random" else 0)[0].addr.port
        for _ in range(n))
    return {p: got[p] / n for p in sorted({e.addr.port for e in c})}


def close(actual: float, expected: float, rel: float = 0.1) -> bool:
    return abs(actual - expected) <= rel * expected


# -- attempt views --------------------------------------------------------------------------


@given(st.lists(st.integers(1, 65535), min_size=1, max_size=20, unique=True), st.data())
def test_rotated_and_chained_behave_like_lists(ps: list[int], data: st.DataObject) -> None:
    c = eps(*ps)
    start = data.draw(st.integers(0, len(c) - 1))
    r = rotated(c, start)
    expect = [*c[start:], *c[:start]]
    assert list(r) == expect and len(r) == len(c)
    assert [r[i] for i in range(len(c))] == expect and r[-1] == expect[-1]
    cut = data.draw(st.integers(0, len(c)))
    ch = chained(c[:cut], c[cut:])
    assert list(ch) == list(c) and [ch[i] for i in range(len(c))] == list(c)
    for view, want in ((r, expect), (ch, list(c))):
        assert list(view[1:]) == want[1:] and view[-len(want)] == want[0]
        with pytest.raises(IndexError):
            view[len(want)]
        with pytest.raises(IndexError):
            view[-len(want) - 1]


def test_rotation_from_zero_is_the_input_itself() -> None:
    c = eps(1, 2)
    assert rotated(c, 0) is c


# -- every algorithm: a permutation of the candidates ---------------------------------------


def all_balancers(clock: FakeClock, seed: int = 1) -> list[Balancer]:
    loads = Loads(clock)
    rng = random.Random(seed)
    return [RoundRobin(loads=loads), WeightedRandom(loads, rng), PeakEwmaP2C(loads, rng),
            RingHash(loads, vnodes=16)]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 65535), st.integers(1, 5)), min_size=0, max_size=12,
                unique_by=lambda t: t[0]), st.integers(0, 2**32 - 1))
def test_every_order_is_a_permutation(spec: list[tuple[int, int]], key: int) -> None:
    c = tuple(wep(p, w) for p, w in spec)
    for b in all_balancers(FakeClock()):
        for _ in range(3):
            order = list(b.order(c, key))
            assert sorted(order) == sorted(c)


# -- random ---------------------------------------------------------------------------------


def test_random_is_uniform() -> None:
    got = shares(WeightedRandom(Loads(FakeClock()), random.Random(1)), eps(1, 2, 3, 4))
    assert all(close(s, 0.25) for s in got.values()), got


def test_random_follows_weights() -> None:
    c = (wep(1, 1), wep(2, 2), wep(3, 5))
    got = shares(WeightedRandom(Loads(FakeClock()), random.Random(2)), c)
    assert close(got[1], 1 / 8, 0.15) and close(got[2], 2 / 8) and close(got[3], 5 / 8), got


def test_random_is_deterministic_for_a_seed() -> None:
    c = eps(1, 2, 3)
    a = WeightedRandom(Loads(FakeClock()), random.Random(5))
    b = WeightedRandom(Loads(FakeClock()), random.Random(5))
    assert [ports(a.order(c)) for _ in range(20)] == [ports(b.order(c)) for _ in range(20)]


# -- peak EWMA ------------------------------------------------------------------------------


def test_peak_ewma_jumps_to_a_peak_and_decays_with_its_time_constant() -> None:
    e = PeakEwma(now=0.0, initial=0.001)
    e.observe(0.050, now=1.0)
    assert e.cost(1.0) == 0.050  # a worse sample replaces the estimate at once
    # Nothing observed for one time constant: e^-1 of the peak is left.
    assert math.isclose(e.peek(1.0 + DECAY), 0.050 / math.e)
    assert math.isclose(e.cost(1.0 + DECAY), 0.050 / math.e)


def test_peak_ewma_blends_lower_samples_by_elapsed_time() -> None:
    e = PeakEwma(now=0.0, initial=0.100)
    e.observe(0.010, now=0.0)  # no time passed: a lower sample is worth nothing yet
    assert e.peek(0.0) == 0.100
    e.observe(0.010, now=DECAY * 10)  # a long quiet: the new sample is nearly everything
    assert e.peek(DECAY * 10) < 0.0105


def test_new_endpoints_start_at_their_peers_mean() -> None:
    clock = FakeClock()
    loads = Loads(clock)
    assert loads.get(wep(1)).ewma.peek(clock.now) == DEFAULT_RTT
    loads.get(wep(1)).ewma.observe(0.004, clock.now)
    assert loads.get(wep(2)).ewma.peek(clock.now) == 0.004  # like its one peer
    loads.get(wep(2)).ewma.observe(0.010, clock.now)
    assert math.isclose(loads.get(wep(3)).ewma.peek(clock.now), 0.007)


def test_feedback_tracks_in_flight_and_failures() -> None:
    clock = FakeClock()
    b = PeakEwmaP2C(Loads(clock), random.Random(1))
    t1, t2 = b.on_start(wep(1)), b.on_start(wep(1))
    assert t1 is t2 and t1.inflight == 2
    b.on_connected(t1, 0.002)
    b.on_failed(t2, 0.0001)
    b.on_done(t2)
    assert (t1.inflight, t1.connections, t1.failures) == (1, 1, 1)
    assert t1.ewma.peek(clock.now) == FAILURE_RTT  # a fast refusal counts as slow
    b.on_done(t1)
    assert t1.inflight == 0 and b.loads.tier_inflight == [0, 0, 0]


def test_loads_survive_endpoint_changes_and_detach_the_removed() -> None:
    clock = FakeClock()
    loads = Loads(clock)
    b = RoundRobin(loads=loads)
    keep = b.on_start(wep(1))
    gone = b.on_start(wep(2))
    keep.ewma.observe(0.02, clock.now)
    loads.retain((wep(1), wep(3)))
    assert loads.get(wep(1)) is keep and keep.ewma.peek(clock.now) == 0.02
    assert loads.find(wep(2).addr) is None
    b.on_done(gone)  # a connection outliving its endpoint: harmless, and not counted
    assert loads.tier_inflight == [0, 0, 1]


# -- P2C ------------------------------------------------------------------------------------


def test_p2c_idle_is_uniform_and_weighted() -> None:
    got = shares(PeakEwmaP2C(Loads(FakeClock()), random.Random(3)), eps(1, 2, 3))
    assert all(close(s, 1 / 3) for s in got.values()), got
    c = (wep(1, 1), wep(2, 3))
    got = shares(PeakEwmaP2C(Loads(FakeClock()), random.Random(4)), c)
    assert close(got[1], 0.25) and close(got[2], 0.75), got


def test_p2c_avoids_high_latency() -> None:
    clock = FakeClock()
    loads = Loads(clock)
    c = eps(1, 2, 3)
    for ep, rtt in zip(c, (0.001, 0.001, 0.050), strict=True):
        loads.get(ep).ewma.observe(rtt, clock.now)
    got = shares(PeakEwmaP2C(loads, random.Random(5)), c)
    # The slow one loses every comparison: it is picked only if it could be drawn twice.
    assert got[3] == 0.0 and close(got[1], 0.5) and close(got[2], 0.5), got


def test_p2c_avoids_many_in_flight_and_recovers_when_they_finish() -> None:
    clock = FakeClock()
    b = PeakEwmaP2C(Loads(clock), random.Random(6))
    c = eps(1, 2, 3)
    busy = [b.on_start(c[0]) for _ in range(10)]
    got = shares(b, c, n=3000)
    assert got[1] < 0.05, got
    for t in busy:
        b.on_done(t)
    got = shares(b, c, n=3000)
    assert close(got[1], 1 / 3, 0.15), got


def test_p2c_spreads_a_simulated_load_away_from_the_slow_endpoint() -> None:
    # A closed-loop simulation: 16 connections in flight at all times; each holds its endpoint
    # for that endpoint's service time (3rd: 10x slower). P2C should send it far less than 1/3.
    clock = FakeClock()
    b = PeakEwmaP2C(Loads(clock), random.Random(7))
    c = eps(1, 2, 3)
    service = {1: 0.001, 2: 0.001, 3: 0.010}
    running: list[tuple[float, object]] = []
    got: Counter[int] = Counter()
    for _ in range(2000):
        while len(running) >= 16:
            running.sort(key=lambda r: r[0])
            end, tok = running.pop(0)
            clock.now = max(clock.now, end)
            b.on_done(tok)  # type: ignore[arg-type]
        ep = b.order(c)[0]
        tok = b.on_start(ep)
        b.on_connected(tok, 0.0002)
        got[ep.addr.port] += 1
        running.append((clock.now + service[ep.addr.port], tok))
    assert got[3] / 2000 < 0.2, got


# -- ring hash ------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_ring_hash_same_key_same_endpoint(key: int) -> None:
    c = eps(*range(1, 8))
    a, b = RingHash(Loads(FakeClock())), RingHash(Loads(FakeClock()))
    first = a.order(c, key)[0]
    assert a.order(c, key)[0] == first == b.order(c, key)[0]  # another worker agrees


def test_ring_hash_spreads_keys_evenly_and_by_weight() -> None:
    got = shares(RingHash(Loads(FakeClock())), eps(1, 2, 3, 4), key="random")
    assert all(close(s, 0.25, 0.2) for s in got.values()), got
    got = shares(RingHash(Loads(FakeClock())), (wep(1, 1), wep(2, 3)), key="random")
    assert close(got[1], 0.25, 0.2) and close(got[2], 0.75, 0.1), got


def test_ring_hash_moves_about_one_nth_of_keys_when_an_endpoint_joins_or_leaves() -> None:
    keys = random.Random(8).sample(range(2**32), 5000)
    ring = RingHash(Loads(FakeClock()))
    ten = eps(*range(1, 11))
    before = {k: ring.order(ten, k)[0] for k in keys}
    eleven = (*ten, *eps(11))
    after = {k: ring.order(eleven, k)[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert close(len(moved) / len(keys), 1 / 11, 0.25), len(moved)
    assert all(after[k].addr.port == 11 for k in moved)  # only onto the newcomer
    nine = ten[1:]
    left = {k: ring.order(nine, k)[0] for k in keys}
    assert all(left[k] == before[k] for k in keys if before[k].addr.port != 1)


# -- locality -------------------------------------------------------------------------------


def local_service(clock: FakeClock) -> tuple[Loads, Balancer, tuple[Endpoint, ...]]:
    loads = Loads(clock, node="n1", zone="z1")
    spec = ServiceSpec.build("web", 1, VIP_, 80, lb=BalancerConfig("round-robin"))
    b = for_service(spec, "n1", "z1", clock, random.Random(1), loads)
    c = (wep(1, node="n1", zone="z1"), wep(2, node="n2", zone="z1"),
         wep(3, node="n3", zone="z2"), wep(4, node="n4", zone="z2"))
    return loads, b, c


def test_locality_keeps_traffic_on_this_node_then_zone() -> None:
    clock = FakeClock()
    _, b, c = local_service(clock)
    assert isinstance(b, Locality)
    assert {ports(b.order(c))[0] for _ in range(100)} == {1}
    assert ports(b.order(c)) == [1, 2, 3, 4]  # failover: zone, then the rest
    assert {ports(b.order(c[1:]))[0] for _ in range(100)} == {2}
    assert {ports(b.order(c[2:]))[0] for _ in range(100)} == {3, 4}


def test_locality_spills_over_when_local_endpoints_are_ejected() -> None:
    clock = FakeClock()
    _, b, c = local_service(clock)
    out = OutlierDetector(OutlierConfig(consecutive_failures=1, base_ejection=10.0), clock)
    out.retain(c)
    assert out.failure(c[0].addr)
    assert {b.order(out.filter(c))[0].addr.port for _ in range(100)} == {2}
    assert out.failure(c[1].addr)
    assert Counter(b.order(out.filter(c))[0].addr.port for _ in range(100)) == {3: 50, 4: 50}
    clock.now += 10.0  # both back: local again
    assert b.order(out.filter(c))[0].addr.port == 1


def test_locality_spills_over_when_the_local_tier_is_overloaded() -> None:
    clock = FakeClock()
    _, b, c = local_service(clock)
    # Remote tiers idle: the local endpoint takes connections while (inflight + 1) stays
    # within SPILL_RATIO times theirs (0 + 1), i.e. until it has two in flight; the next one
    # spills to the zone.
    held = []
    for _ in range(int(SPILL_RATIO)):
        ep = b.order(c)[0]
        assert ep.addr.port == 1
        held.append(b.on_start(ep))
    assert b.order(c)[0].addr.port != 1
    picks: Counter[int] = Counter()
    for _ in range(200):  # a sustained burst: local stays within ratio of the rest
        ep = b.order(c)[0]
        picks[ep.addr.port] += 1
        held.append(b.on_start(ep))
    assert all(picks[p] > 0 for p in (1, 2)), picks
    for t in held:
        b.on_done(t)
    assert b.order(c)[0].addr.port == 1


def test_factory_builds_each_algorithm() -> None:
    clock = FakeClock()
    kinds = {"p2c-ewma": PeakEwmaP2C, "round-robin": RoundRobin, "random": WeightedRandom,
             "ring-hash": RingHash}
    for name, cls in kinds.items():
        plain = ServiceSpec.build("web", 1, VIP_, 80, lb=BalancerConfig(name, locality=False))
        assert isinstance(for_service(plain, "n1", "z1", clock, random.Random()), cls)
        local = ServiceSpec.build("web", 1, VIP_, 80, lb=BalancerConfig(name))
        b = for_service(local, "n1", "z1", clock, random.Random())
        assert isinstance(b, Locality) and isinstance(b.inner(0), cls)
        # A worker that does not know where it runs has nothing to prefer.
        assert isinstance(for_service(local, "", "", clock, random.Random()), cls)




def test_round_robin_honours_weights() -> None:
    from meshnode.balance.round_robin import RoundRobin
    from meshnode.model import Endpoint, HostPort

    eps = tuple(Endpoint(HostPort.parse(f"127.0.0.1:{p}"), weight=w)
                for p, w in ((1, 1), (2, 3), (3, 0)))
    rr = RoundRobin()
    picks = [rr.order(eps)[0].addr.port for _ in range(40)]
    assert picks.count(1) == 10 and picks.count(2) == 30 and 3 not in picks
