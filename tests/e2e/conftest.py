"""devcluster, started once per test run (and stopped at the end if this run started it)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.e2e.cluster import Cluster


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests need root (network namespaces): run them as root")
    c = Cluster()
    was_up = c.devcluster("status", check=False).returncode == 0
    c.devcluster("up", "--sample-app")
    # Start from a laptop with no session, whatever an earlier run left connected.
    c.laptop("telepresence", "quit", timeout=120)
    yield c
    if not was_up and os.environ.get("DEVCLUSTER_KEEP") != "1":
        c.devcluster("down", check=False)
