"""e2e tier: several hosts as network namespaces, one etcd cluster, real capture."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root (run: sudo ./setup.sh test)")
