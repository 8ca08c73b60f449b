"""The fault drill in CI (issue 13, item 7): a short run of tests/drill on both capture backends,
one test per phase asserting its target. A backend's drill runs once, the first time one of its
phases is asserted (about two minutes); its other phases read the same run. A failure prints
the backend's whole table, so one red test shows every phase's figures.

Shorter than `make drill`: 4 s of load after each fault, etcd down for 8 s instead of 30, and an
agent drain time of 20 s (still longer than the upgrade window, which the streams must outlive).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.drill import drill
from tests.etcd_cluster import etcd_available

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

PLAN = drill.Plan(phase_seconds=4.0, outage_seconds=8.0, drain_grace=20.0)


@pytest.fixture(scope="module")
def drill_rows(tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Callable[[str], list[drill.Row]]]:
    """The drill's rows for a backend, run on first use (inside a test, after the root check)."""
    runs: dict[str, list[drill.Row] | Exception] = {}
    names = [n for n in drill.NAMES if etcd_available() or n not in drill.ETCD_PHASES]

    def rows(backend: str) -> list[drill.Row]:
        if backend not in runs:
            tmp: Path = tmp_path_factory.mktemp(f"drill-{backend}")
            try:
                runs[backend] = drill.run([backend], names, PLAN, tmp,
                                          log=lambda s: print(s, file=sys.stderr))
            except Exception as exc:  # every phase of the backend reports it, not only the first
                runs[backend] = exc
        got = runs[backend]
        if isinstance(got, Exception):
            raise AssertionError(f"the {backend} drill did not run: {got!r}") from got
        return got

    yield rows


@pytest.mark.parametrize("phase", drill.NAMES)
def test_drill_target(drill_rows: Callable[[str], list[drill.Row]], backend: str,
                      phase: str) -> None:
    if phase in drill.ETCD_PHASES and not etcd_available():
        pytest.skip("etcd is not installed (sudo ./setup.sh test installs it)")
    spec = next(p for p in drill.PHASES if p.name == phase)
    if backend not in spec.backends:
        pytest.skip(f"{phase} drills the kernel path, which the {backend} backend does not have")
    rows = drill_rows(backend)
    row = next(r for r in rows if r.phase == phase)
    assert row.met, (f"{backend} {phase}: target '{row.target}' NOT MET ({row.note})\n\n"
                     + drill.table_text(rows))
