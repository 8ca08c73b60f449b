"""Slot tables for the kernel path: a balancer turned into an array the connect hook indexes.

The hook cannot run a balancer; it picks a slot of a table (bpf/mn_connect.c). So the table
carries the policy: each endpoint fills slots in proportion to its weight, and
- `weighted` orders them as smooth weighted round robin would pick them, so the hook's
  rotating cursor spreads one endpoint's turns evenly over a round, and a round of the table is
  exactly the configured weights (a random pick gets them only on average);
- `ring` places slot i at point i/N of the consistent-hash ring (balance/ring_hash.py's points),
  so the endpoint owning that arc owns the slot: when an endpoint joins or leaves, only the
  slots on its arcs move, and a client hashed to a slot keeps its endpoint otherwise.

Pure. Imports nothing of meshnode's but the model and its siblings.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from functools import reduce
from math import gcd

from meshnode.balance.ring_hash import VNODES, points
from meshnode.model import Endpoint, HostPort

__all__ = ["ring", "weighted"]


def weighted(endpoints: Sequence[Endpoint], max_slots: int) -> tuple[HostPort, ...]:
    """At most `max_slots` slots (weights reduced by their common divisor, and scaled down
    when they still need more; every endpoint keeps one slot at least, and only the first
    `max_slots` endpoints by address get one when there are more)."""
    eps = sorted(endpoints, key=lambda e: (e.addr.ip, e.addr.port))[:max_slots]
    if not eps:
        return ()
    weights = [max(e.weight, 1) for e in eps]
    div = reduce(gcd, weights)
    weights = [w // div for w in weights]
    total = sum(weights)
    if total > max_slots:
        weights = _scaled(weights, max_slots)
        total = sum(weights)
    # smooth weighted round robin (nginx's): each turn every endpoint gains its weight, the
    # largest current value is picked and pays the total back
    current = [0] * len(eps)
    out: list[HostPort] = []
    for _ in range(total):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(eps)), key=current.__getitem__)
        current[best] -= total
        out.append(eps[best].addr)
    return tuple(out)


def _scaled(weights: list[int], max_slots: int) -> list[int]:
    """Weights scaled to sum to at most `max_slots` (largest remainders get the slots the
    floors leave), none below 1."""
    total = sum(weights)
    exact = [w * max_slots / total for w in weights]
    scaled = [max(1, int(x)) for x in exact]
    spare = max_slots - sum(scaled)
    for i in sorted(range(len(exact)), key=lambda i: int(exact[i]) - exact[i])[:max(spare, 0)]:
        scaled[i] += 1
    while sum(scaled) > max_slots:  # the floors of 1 can overshoot: trim the largest
        i = max(range(len(scaled)), key=scaled.__getitem__)
        scaled[i] -= 1
    return scaled


def ring(endpoints: Sequence[Endpoint], slots: int) -> tuple[HostPort, ...]:
    """`slots` slots; slot i belongs to the owner of the first ring point at or after
    i * 2^64 / slots."""
    if not endpoints:
        return ()
    placed: list[tuple[int, HostPort]] = []
    for e in endpoints:
        placed.extend((h, e.addr) for h in points(e.addr, max(e.weight, 1) * VNODES))
    placed.sort(key=lambda p: p[0])
    hashes = [h for h, _ in placed]
    step = (1 << 64) // slots
    out: list[HostPort] = []
    for i in range(slots):
        pos = bisect_left(hashes, i * step)
        out.append(placed[pos % len(placed)][1])
    return tuple(out)
