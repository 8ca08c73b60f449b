"""A Route's `tcp` split in the real worker (tests/unit/test_worker.py's rig: the worker as a
subprocess in explicit-listener mode, its updates over the control socketpair): each TCP
connection goes to the backend of its turn, a subset of the service's endpoints by label or
another service, counted under the service it went to; a Route without `tcp` leaves the
connections as they were."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address

from meshnode.model import BalancerConfig, Endpoint, HostPort, OutlierConfig, Reset, ServiceSpec
from meshnode.policy.traffic import Backend as RouteBackend
from meshnode.policy.traffic import RouteRule, RouteSpec, TcpRoute
from meshnode.wire import Traffic, update_message
from tests.unit.test_worker import (
    VIP,
    Backend,
    Worker,
    ask_name,
    assert_refused,
    start,
    wait_for,
    zero_active,
)

__all__ = ["start"]  # the fixture, used by name


def labelled(w: Worker, name: str, vip: str, *eps: tuple[Backend, str]) -> None:
    """Service `name` (VIP:80, round robin) with these endpoints, each labelled version=V."""
    spec = ServiceSpec.build(name, 1 if name == "web" else 2, IPv4Address(vip), 80,
                             lb=BalancerConfig("round-robin"), outlier=OutlierConfig())
    w.send(update_message(Reset(spec, tuple(
        Endpoint(HostPort.parse(b.addr), labels=(("version", v),) if v else ())
        for b, v in eps))))
    w.sync()


def test_connections_split_by_weight_over_subsets_and_services(
        start: Callable[..., Worker]) -> None:
    v1, v2, nxt = Backend("v1"), Backend("v2"), Backend("next")
    w = start(f"{VIP}:80")
    labelled(w, "web", VIP, (v1, "v1"), (v2, "v2"))
    labelled(w, "web-next", "127.240.0.11", (nxt, ""))
    # no Route yet: round robin over both endpoints of web
    assert [ask_name(w) for _ in range(4)] == [b"v1", b"v2", b"v1", b"v2"]
    # a Route with HTTP rules only: TCP connections go on as before
    w.send(Traffic({"web": RouteSpec(service="web", rules=(RouteRule("http-only"),))}))
    w.sync()
    assert [ask_name(w) for _ in range(2)] == [b"v1", b"v2"]
    w.send(Traffic({"web": RouteSpec(service="web", tcp=TcpRoute((
        RouteBackend("web", {"version": "v1"}, weight=2),
        RouteBackend("web", {"version": "v2"}, weight=1),
        RouteBackend("web-next", weight=1))))}))
    w.sync()
    got = Counter(ask_name(w) for _ in range(40))
    assert got == {b"v1": 20, b"v2": 10, b"next": 10}
    wait_for(zero_active(w), what="connections to close")
    services = w.stats()["services"]
    # a connection is counted under the service it went to
    assert services["web-next"]["connections"] == 10
    assert services["web"]["connections"] == 6 + 30


def test_a_subset_with_no_endpoint_refuses_the_connection(start: Callable[..., Worker]) -> None:
    v1 = Backend("v1")
    w = start(f"{VIP}:80")
    labelled(w, "web", VIP, (v1, "v1"))
    w.send(Traffic({"web": RouteSpec(service="web", tcp=TcpRoute((
        RouteBackend("web", {"version": "v3"}),)))}))
    w.sync()
    assert_refused(w)
    wait_for(lambda: w.stats()["services"]["web"]["failures"] == {"no_endpoint": 1},
             what="the refusal counted")
