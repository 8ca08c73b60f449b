"""`for_service`: a service's balancing spec, and this worker's node and zone, to a balancer.

The one place that maps `BalancerConfig.algorithm` (model.LB_ALGORITHMS) to a class, so the
routing table never names an algorithm. Clock and RNG are passed in (the worker passes the
monotonic clock and a `random.Random`; tests pass fakes and seeds).

Imports nothing of meshnode's but the model and its siblings.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from meshnode.balance import Balancer
from meshnode.balance.load import Loads
from meshnode.balance.locality import Locality
from meshnode.balance.p2c import PeakEwmaP2C
from meshnode.balance.random import WeightedRandom
from meshnode.balance.ring_hash import RingHash
from meshnode.balance.round_robin import RoundRobin
from meshnode.model import BalancerConfig, ServiceSpec

__all__ = ["algorithm", "for_service"]


def algorithm(config: BalancerConfig, loads: Loads, rng: random.Random) -> Callable[[], Balancer]:
    """A maker of the bare algorithm (without locality), sharing `loads`."""
    name = config.algorithm
    if name == "p2c-ewma":
        return lambda: PeakEwmaP2C(loads, rng)
    if name == "round-robin":
        return lambda: RoundRobin(loads=loads)
    if name == "random":
        return lambda: WeightedRandom(loads, rng)
    if name == "ring-hash":
        return lambda: RingHash(loads)
    raise ValueError(f"unknown balancing algorithm {name!r}")  # BalancerConfig validated it


def for_service(spec: ServiceSpec, node: str, zone: str, clock: Callable[[], float],
                rng: random.Random, loads: Loads | None = None) -> Balancer:
    """The balancer for one candidate set of `spec`. Pass the service's `loads` so all its
    balancers (one per port set) share one view of each endpoint's load; its node and zone
    must be this worker's."""
    if loads is None:
        loads = Loads(clock, node, zone)
    make = algorithm(spec.lb, loads, rng)
    if spec.lb.locality and (loads.node or loads.zone):
        return Locality(loads, make)
    return make()
