"""Load balancing: given one connection's candidate endpoints, the order to try them in, and
the feedback (connect latency, connection lifetime, failures) that load-aware choices need.

Owns the `Balancer` interface the proxy's connector consumes. Algorithms live in sibling modules
named by mechanism: `round_robin.py`, `random.py`, `p2c.py` (over `ewma.py`), `ring_hash.py`,
with `weighted.py` (weight-proportional sampling), `locality.py` (node, then zone, then the
rest), `load.py` (per-endpoint in-flight and latency shared by a service's balancers),
`outlier.py` (passive ejection), `attempts.py` (allocation-free attempt orders) and
`factory.py` (`for_service`: a service's spec to its balancer).

Balancers are pure: no I/O, no sockets, no asyncio, no clock or RNG of their own (an algorithm
that needs one takes it in its constructor, so tests inject fakes). They must not import anything
of meshnode's but `meshnode.model` and each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from meshnode.balance.load import EndpointLoad
from meshnode.model import Endpoint

__all__ = ["Balancer", "EndpointLoad", "pick"]


class Balancer(Protocol):
    """Orders the candidates for one new connection, and learns from how attempts went.

    One instance per candidate set (the routing table keeps one per service and port), so an
    algorithm may keep state between calls: round robin's turn, a ring-hash ring. Per-endpoint
    load (in-flight, peak-EWMA latency) lives in a `Loads` shared by all balancers of a service,
    so it survives endpoint changes and a change of algorithm.

    Feedback, for every attempt the connector makes:
        token = b.on_start(ep)            the attempt starts: ep's in-flight + 1
        b.on_connected(token, latency)    it connected after `latency` seconds
        b.on_failed(token, elapsed)       or it failed (refused, timed out) after `elapsed`
        b.on_done(token)                  the connection (or failed attempt) is over: - 1
    The token is the endpoint's load record, so the calls after `on_start` are attribute
    updates with no lookup, and stay harmless if the endpoint was removed meanwhile.
    """

    def order(self, candidates: Sequence[Endpoint], key: int = 0) -> Sequence[Endpoint]:
        """Every candidate, in the order to attempt them: the first is the pick, the rest are
        the fallbacks tried when a connect fails or times out.

        `key` identifies the connection for hash-based algorithms (ring hash: the client IP);
        others ignore it. An empty candidate list gives an empty order. The result may be a
        view over `candidates`: iterate it, do not keep it past the connection.
        """
        ...

    def on_start(self, ep: Endpoint) -> EndpointLoad: ...

    def on_connected(self, token: EndpointLoad, latency: float) -> None: ...

    def on_failed(self, token: EndpointLoad, elapsed: float) -> None: ...

    def on_done(self, token: EndpointLoad) -> None: ...


def pick(balancer: Balancer, candidates: Sequence[Endpoint], key: int = 0) -> Endpoint | None:
    """The balancer's first choice, or None when there is nothing to pick from."""
    attempts = balancer.order(candidates, key)
    return attempts[0] if attempts else None
