"""Integration tier: root, real BPF, real iptables. Each test gets its own "host" (see
tests/harness.py): a network namespace with only `lo`, and an agent instance of its own."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Host

BACKENDS = ["ebpf", "iptables"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath) or "e2e" in str(item.fspath):
            item.add_marker(pytest.mark.root)


@pytest.fixture(autouse=True)
def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("integration tests need root (run: sudo ./setup.sh test)")


@pytest.fixture
def make_host(tmp_path: Path) -> Iterator[Callable[..., Host]]:
    hosts: list[Host] = []

    def make(backend: str, **kw: Any) -> Host:
        h = Host(tmp_path / f"h{len(hosts)}", backend, **kw)
        hosts.append(h)
        return h

    try:
        yield make
    finally:
        for h in hosts:
            h.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


