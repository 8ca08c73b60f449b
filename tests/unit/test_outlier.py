"""Passive outlier ejection: consecutive failures, growing ejection times, the max-share rule,
and the candidate filter. A fake clock drives time; nothing sleeps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.balance.outlier import OutlierDetector
from meshnode.model import Endpoint, HostPort, OutlierConfig

pytestmark = pytest.mark.timeout(30)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def eps(n: int) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(HostPort.parse(f"10.0.0.{i + 1}:80")) for i in range(n))


def detector(n: int, **cfg: float) -> tuple[OutlierDetector, FakeClock, tuple[Endpoint, ...]]:
    clock = FakeClock()
    config = OutlierConfig(**{"consecutive_failures": 3, "base_ejection": 10.0,
                              "max_ejection": 25.0, "max_ejected_share": 0.5, **cfg})
    d = OutlierDetector(config, clock)
    c = eps(n)
    d.retain(c)
    return d, clock, c


def fail(d: OutlierDetector, ep: Endpoint, times: int) -> list[bool]:
    return [d.failure(ep.addr) for _ in range(times)]


def test_ejects_at_the_threshold_and_returns_after_the_time() -> None:
    d, clock, c = detector(4)
    assert fail(d, c[0], 3) == [False, False, True]
    assert d.ejected_for(c[0].addr) == 10.0
    assert list(d.filter(c)) == list(c[1:])
    clock.now += 9.9
    assert list(d.filter(c)) == list(c[1:])
    clock.now += 0.1
    assert d.filter(c) is c  # back, and the common path hands the input through untouched
    assert d.ejected_for(c[0].addr) == 0.0


def test_ejection_time_grows_with_each_ejection_up_to_the_cap() -> None:
    d, clock, c = detector(4)
    durations = []
    for _ in range(4):
        assert fail(d, c[0], 3)[-1]  # the count restarts after each return
        durations.append(d.ejected_for(c[0].addr))
        clock.now += durations[-1]
    assert durations == [10.0, 20.0, 25.0, 25.0]


def test_a_success_resets_the_count() -> None:
    d, _, c = detector(4)
    fail(d, c[0], 2)
    d.success(c[0].addr)
    assert fail(d, c[0], 2) == [False, False]
    assert d.failure(c[0].addr) is True


def test_never_more_than_the_max_share_is_ejected() -> None:
    d, clock, c = detector(5, max_ejected_share=0.5)  # floor(2.5) = 2
    assert d.max_ejected() == 2
    assert fail(d, c[0], 3)[-1] and fail(d, c[1], 3)[-1]
    assert fail(d, c[2], 5) == [False] * 5  # over quota: stays in, keeps counting
    assert d.ejected() == [c[0].addr, c[1].addr]
    clock.now += 10.0  # the first two return: room again
    assert d.failure(c[2].addr) is True
    assert d.ejected() == [c[2].addr]


@pytest.mark.parametrize(("n", "share", "expect"),
                         [(1, 1.0, 0), (1, 0.5, 0), (2, 0.5, 1), (3, 0.5, 1), (4, 0.5, 2),
                          (10, 0.1, 1), (9, 0.1, 0), (30, 0.1, 3), (3, 1.0, 3), (5, 0.0, 0)])
def test_max_ejected_rounds_down_and_spares_a_lone_endpoint(n: int, share: float,
                                                            expect: int) -> None:
    d, _, c = detector(n, max_ejected_share=share)
    assert d.max_ejected() == expect
    assert any(fail(d, c[0], 3)) is (expect > 0)


def test_when_every_candidate_is_ejected_all_are_used() -> None:
    d, _, c = detector(2, max_ejected_share=1.0)
    fail(d, c[0], 3)
    fail(d, c[1], 3)
    assert len(d.ejected()) == 2
    assert d.filter(c) is c
    assert d.failure(c[0].addr) is False  # tried anyway: no double ejection


def test_filter_results_are_cached_until_the_ejected_set_changes() -> None:
    d, _, c = detector(4)
    fail(d, c[0], 3)
    first = d.filter(c)
    assert d.filter(c) is first  # balancers' per-set caches stay valid
    fail(d, c[1], 3)
    second = d.filter(c)
    assert second is not first and list(second) == list(c[2:])


def test_removed_endpoints_are_forgotten() -> None:
    d, _, c = detector(4)
    fail(d, c[0], 3)
    d.retain(c[1:])
    assert d.ejected() == [] and d.filter(c[1:]) == c[1:]
    d.retain(c)
    assert fail(d, c[0], 2) == [False, False]  # a fresh count on return


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.floats(0.0, 1.0),
       st.lists(st.tuples(st.integers(0, 7), st.sampled_from(["fail", "ok", "tick"])),
                max_size=120))
def test_invariants_under_any_history(n: int, share: float,
                                      events: list[tuple[int, str]]) -> None:
    d, clock, c = detector(n, consecutive_failures=2, max_ejected_share=share)
    for i, what in events:
        ep = c[i % n]
        if what == "fail":
            d.failure(ep.addr)
        elif what == "ok":
            d.success(ep.addr)
        else:
            clock.now += 3.0
        ejected = d.ejected()
        assert len(ejected) <= d.max_ejected()
        assert n > 1 or not ejected
        assert all(0 < d.ejected_for(a) <= 25.0 for a in ejected)
        kept = d.filter(c)
        assert kept and set(kept) <= set(c)
        assert len(kept) == n - len(ejected) or list(kept) == list(c)
