"""Balancers: pure and deterministic, no sockets."""

from __future__ import annotations

import pytest

from meshnode.balance import Balancer, pick
from meshnode.balance.round_robin import RoundRobin
from meshnode.model import Endpoint, HostPort

pytestmark = pytest.mark.timeout(10)


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
