"""Load balancing: given one connection's candidate endpoints, the order to try them in.

Owns the `Balancer` interface the proxy's connector consumes. Algorithms live in sibling modules
named by mechanism (`round_robin.py`; later `p2c.py` with peak EWMA, `ring_hash.py`).

Balancers are pure: no I/O, no sockets, no clock or RNG of their own (an algorithm that needs one
takes it in its constructor, so tests inject fakes). They must not import anything of meshnode's
but `meshnode.model` and each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from meshnode.model import Endpoint

__all__ = ["Balancer", "pick"]


class Balancer(Protocol):
    """Orders the candidates for one new connection.

    One instance per candidate set (the routing table keeps one per service and port), so an
    algorithm may keep state between calls: round robin's turn, P2C's load estimates.
    """

    def order(self, candidates: Sequence[Endpoint], key: int = 0) -> Sequence[Endpoint]:
        """Every candidate, in the order to attempt them: the first is the pick, the rest are
        the fallbacks tried when a connect fails or times out.

        `key` identifies the connection for hash-based algorithms (ring hash, client affinity);
        others ignore it. An empty candidate list gives an empty order.
        """
        ...


def pick(balancer: Balancer, candidates: Sequence[Endpoint], key: int = 0) -> Endpoint | None:
    """The balancer's first choice, or None when there is nothing to pick from."""
    attempts = balancer.order(candidates, key)
    return attempts[0] if attempts else None
