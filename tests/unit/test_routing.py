"""The route package's service table (meshnode.route.table): updates in, routing decisions
(a), (b), (c) out, as the proxy worker and `meshnode explain` both get them."""

from __future__ import annotations

import subprocess
import sys
from ipaddress import IPv4Address

import pytest

from meshnode.model import (
    Add,
    BalancerConfig,
    DoesNotExist,
    Endpoint,
    HostPort,
    OrigDstAddr,
    OutlierConfig,
    Remove,
    Reset,
    ServiceSpec,
)
from meshnode.route import NoEndpoint, Passthrough, ServiceTable, ToEndpoint, ToService

pytestmark = pytest.mark.timeout(10)

VIP = IPv4Address("127.240.0.7")


def ep(text: str) -> Endpoint:
    return Endpoint(HostPort.parse(text))


def dst(text: str) -> OrigDstAddr:
    hp = HostPort.parse(text)
    return OrigDstAddr(hp.ip, hp.port)


def spec(port: int | None = 80, name: str = "web", vip: IPv4Address = VIP) -> ServiceSpec:
    # Round robin: these tests read the attempt order (the default, p2c-ewma, is random).
    return ServiceSpec.build(name, 7, vip, port, lb=BalancerConfig("round-robin"))


def attempts(route: object) -> list[str]:
    assert isinstance(route, ToService), route
    return [str(e.addr) for e in route.attempts]


def table_with(*updates: object) -> ServiceTable:
    t = ServiceTable()
    for u in updates:
        t.apply(u)  # type: ignore[arg-type]
    return t


def test_vip_on_service_port_reaches_every_endpoint_in_turn() -> None:
    t = table_with(Reset(spec(80), (ep("10.0.0.1:8080"), ep("10.0.0.2:9090"))))
    assert attempts(t.route(dst("127.240.0.7:80"))) == ["10.0.0.1:8080", "10.0.0.2:9090"]
    assert attempts(t.route(dst("127.240.0.7:80"))) == ["10.0.0.2:9090", "10.0.0.1:8080"]
    r = t.route(dst("127.240.0.7:80"))
    assert isinstance(r, ToService) and r.service == "web"


def test_vip_on_another_port_reaches_endpoints_on_that_port() -> None:
    t = table_with(Reset(spec(None), (ep("10.0.0.1:8080"), ep("10.0.0.2:8080"),
                                      ep("10.0.0.3:9090"))))
    assert attempts(t.route(dst("127.240.0.7:8080"))) == ["10.0.0.1:8080", "10.0.0.2:8080"]
    assert attempts(t.route(dst("127.240.0.7:9090"))) == ["10.0.0.3:9090"]
    # Each candidate set keeps its own turn.
    assert attempts(t.route(dst("127.240.0.7:8080"))) == ["10.0.0.2:8080", "10.0.0.1:8080"]
    # A service port that is set but not the one dialled falls back to the port rule.
    t2 = table_with(Reset(spec(80), (ep("10.0.0.1:8080"), ep("10.0.0.3:9090"))))
    assert attempts(t2.route(dst("127.240.0.7:9090"))) == ["10.0.0.3:9090"]


def test_vip_without_candidates_is_no_endpoint() -> None:
    t = table_with(Reset(spec(None), (ep("10.0.0.1:8080"),)))
    assert t.route(dst("127.240.0.7:1234")) == NoEndpoint("web",
                                                          "web has no endpoint on port 1234")
    t = table_with(Reset(spec(80), ()))
    assert t.route(dst("127.240.0.7:80")) == NoEndpoint("web", "web has no endpoints")


def test_endpoint_address_routes_to_that_endpoint_only() -> None:
    t = table_with(Reset(spec(80), (ep("10.0.0.1:8080"), ep("10.0.0.2:8080"))))
    for _ in range(3):
        r = t.route(dst("10.0.0.2:8080"))  # an OrigDstAddr finds a HostPort-keyed endpoint
        assert isinstance(r, ToService) and r.service == "web"
        assert attempts(r) == ["10.0.0.2:8080"]


def test_anything_else_passes_through() -> None:
    t = table_with(Reset(spec(80), (ep("10.0.0.1:8080"),)))
    d = dst("10.0.0.9:8080")
    assert t.route(d) == Passthrough(d)
    assert isinstance(t.route(dst("10.0.0.1:8081")), Passthrough)


def test_add_and_remove() -> None:
    t = table_with(Reset(spec(80), (ep("10.0.0.1:80"),)))
    t.apply(Add("web", (ep("10.0.0.2:80"), ep("10.0.0.1:80"))))  # re-adding is harmless
    assert [str(e.addr) for e in t.endpoints("web")] == ["10.0.0.1:80", "10.0.0.2:80"]
    assert isinstance(t.route(dst("10.0.0.2:80")), ToService)
    t.apply(Remove("web", (ep("10.0.0.1:80"),)))
    assert attempts(t.route(dst("127.240.0.7:80"))) == ["10.0.0.2:80"]
    assert isinstance(t.route(dst("10.0.0.1:80")), Passthrough)
    t.apply(Remove("web", (ep("10.0.0.2:80"),)))
    assert t.route(dst("127.240.0.7:80")) == NoEndpoint("web", "web has no endpoints")


def test_updates_for_unknown_services_are_ignored() -> None:
    t = ServiceTable()
    t.apply(Add("nope", (ep("10.0.0.1:80"),)))
    t.apply(Remove("nope", (ep("10.0.0.1:80"),)))
    t.apply(DoesNotExist("nope"))
    assert t.services() == []
    assert isinstance(t.route(dst("10.0.0.1:80")), Passthrough)


def test_does_not_exist_forgets_vip_and_endpoints() -> None:
    t = table_with(Reset(spec(80), (ep("10.0.0.1:80"),)), DoesNotExist("web"))
    assert isinstance(t.route(dst("127.240.0.7:80")), Passthrough)
    assert isinstance(t.route(dst("10.0.0.1:80")), Passthrough)
    assert t.services() == []


def test_reset_replaces_endpoints_and_vip() -> None:
    t = table_with(Reset(spec(80), (ep("10.0.0.1:80"), ep("10.0.0.2:80"))))
    new_vip = IPv4Address("127.240.0.8")
    t.apply(Reset(spec(80, vip=new_vip), (ep("10.0.0.3:80"),)))
    assert isinstance(t.route(dst("127.240.0.7:80")), Passthrough)
    assert isinstance(t.route(dst("10.0.0.1:80")), Passthrough)
    assert attempts(t.route(dst("127.240.0.8:80"))) == ["10.0.0.3:80"]


def test_shared_endpoint_address_survives_one_claimant_leaving() -> None:
    shared = ep("10.0.0.1:80")
    t = table_with(Reset(spec(80, "a", IPv4Address("127.240.0.1")), (shared,)),
                   Reset(spec(80, "b", IPv4Address("127.240.0.2")), (shared,)))
    r = t.route(dst("10.0.0.1:80"))
    assert isinstance(r, ToService) and r.service == "a"
    t.apply(DoesNotExist("a"))
    r = t.route(dst("10.0.0.1:80"))
    assert isinstance(r, ToService) and r.service == "b"


# Balancers, load records and ejection inside the table.


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_load_state_survives_add_remove_and_reset_with_the_same_lb() -> None:
    clock = FakeClock()
    t = ServiceTable(clock=clock)
    a, b = ep("10.0.0.1:80"), ep("10.0.0.2:80")
    t.apply(Reset(spec(80), (a, b)))
    r = t.route(dst("127.240.0.7:80"))
    assert isinstance(r, ToService)
    tok = r.balancer.on_start(a)
    r.balancer.on_connected(tok, 0.005)
    t.apply(Add("web", (ep("10.0.0.3:80"),)))
    t.apply(Remove("web", (b,)))
    t.apply(Reset(spec(80), (a, ep("10.0.0.3:80"))))
    r2 = t.route(dst("127.240.0.7:80"))
    assert isinstance(r2, ToService) and r2.balancer is r.balancer  # same lb: same balancer
    report = t.endpoint_report("web")
    assert report["10.0.0.1:80"]["active"] == 1 and report["10.0.0.1:80"]["ewma_ms"] == 5.0
    assert report["10.0.0.1:80"]["connections"] == 1 and "10.0.0.2:80" not in report
    r.balancer.on_done(tok)
    assert t.endpoint_report("web")["10.0.0.1:80"]["active"] == 0


def test_a_new_lb_rebuilds_the_balancer_but_keeps_the_loads() -> None:
    t = ServiceTable(clock=FakeClock())
    a = ep("10.0.0.1:80")
    t.apply(Reset(spec(80), (a, ep("10.0.0.2:80"))))
    r = t.route(dst("127.240.0.7:80"))
    assert isinstance(r, ToService)
    r.balancer.on_connected(r.balancer.on_start(a), 0.002)
    t.apply(Reset(ServiceSpec.build("web", 7, VIP, 80, lb=BalancerConfig("ring-hash")),
                  (a, ep("10.0.0.2:80"))))
    r2 = t.route(dst("127.240.0.7:80"), ("10.1.2.3", 40000))
    assert isinstance(r2, ToService) and r2.balancer is not r.balancer
    assert [t.route(dst("127.240.0.7:80"), ("10.1.2.3", 40000)).attempts[0]  # type: ignore[union-attr]
            for _ in range(5)] == [r2.attempts[0]] * 5
    # keyed by the client's address (not its port): clients spread, each one sticks
    firsts = {t.route(dst("127.240.0.7:80"), (f"10.1.2.{i}", 40000 + i))  # type: ignore[union-attr]
              .attempts[0] for i in range(1, 60)}
    assert len(firsts) == 2
    assert t.endpoint_report("web")["10.0.0.1:80"]["ewma_ms"] == 2.0


def test_ejected_endpoints_are_left_out_until_they_return() -> None:
    clock = FakeClock()
    t = ServiceTable(clock=clock)
    a, b = ep("10.0.0.1:80"), ep("10.0.0.2:80")
    t.apply(Reset(ServiceSpec.build("web", 7, VIP, 80, lb=BalancerConfig("round-robin"),
                              outlier=OutlierConfig(consecutive_failures=1,
                                                    base_ejection=5.0)), (a, b)))
    r = t.route(dst("127.240.0.7:80"))
    assert isinstance(r, ToService) and r.outlier.failure(b.addr)
    assert {attempts(t.route(dst("127.240.0.7:80")))[0] for _ in range(4)} == {"10.0.0.1:80"}
    assert t.endpoint_report("web")["10.0.0.2:80"]["ejected_for"] == 5.0
    # The endpoint's own address still reaches it (rule b): the client asked for exactly it.
    assert attempts(t.route(dst("10.0.0.2:80"))) == ["10.0.0.2:80"]
    clock.now += 5.0
    assert {attempts(t.route(dst("127.240.0.7:80")))[0] for _ in range(4)} == {
        "10.0.0.1:80", "10.0.0.2:80"}


def test_the_route_type_names_the_rule() -> None:
    t = table_with(Reset(spec(80), (ep("10.0.0.1:8080"),)))
    # (a) is balanced, (b) is that endpoint alone; the worker serves both as a ToService
    assert type(t.route(dst("127.240.0.7:80"))) is ToService
    b = t.route(dst("10.0.0.1:8080"))
    assert type(b) is ToEndpoint and isinstance(b, ToService)
    assert attempts(b) == ["10.0.0.1:8080"]


def test_ejections_replayed_from_the_workers_leave_those_endpoints_out() -> None:
    clock = FakeClock()
    t = ServiceTable(clock=clock)
    a, b, c = ep("10.0.0.1:80"), ep("10.0.0.2:80"), ep("10.0.0.3:80")
    t.apply(Reset(spec(80), (a, b, c)))
    # an address the table does not know, and a zero (not ejected), are ignored
    t.hold_ejections("web", {b.addr: 30.0, c.addr: 0.0, HostPort.parse("10.9.9.9:80"): 5.0})
    t.hold_ejections("nope", {a.addr: 30.0})
    assert sorted(attempts(t.route(dst("127.240.0.7:80")))) == ["10.0.0.1:80", "10.0.0.3:80"]
    assert t.endpoint_report("web")["10.0.0.2:80"]["ejected_for"] == 30.0
    assert attempts(t.route(dst("10.0.0.2:80"))) == ["10.0.0.2:80"]  # (b): ejected or not
    # every candidate ejected: all of them are used anyway (a connect may work, a refusal not)
    t.hold_ejections("web", {a.addr: 10.0, c.addr: 10.0})
    assert sorted(attempts(t.route(dst("127.240.0.7:80")))) == [
        "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
    clock.now += 10.0  # a and c are back, b is still out
    assert sorted(attempts(t.route(dst("127.240.0.7:80")))) == ["10.0.0.1:80", "10.0.0.3:80"]


def test_the_route_package_loads_no_process_package() -> None:
    """Worker and agent both import it: it must pull in neither's code (nor the CLI, which
    import-linter cannot see: cli/ sits outside the package directory)."""
    code = ("import sys, meshnode.route; print('\\n'.join(sorted(m for m in sys.modules "
            "if m.startswith(('meshnode.', 'uvloop', 'bcc', 'pyroute2')))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=30).stdout.split()
    assert "meshnode.route.table" in loaded and "meshnode.route.kernel" in loaded
    banned = ("meshnode.agent", "meshnode.proxy", "meshnode.capture", "meshnode.bpf",
              "meshnode.host", "meshnode.discovery", "meshnode.cli", "uvloop", "bcc", "pyroute2")
    assert [m for m in loaded if m.split(".")[0] in banned or m.startswith(banned)] == []
