"""devcluster, started once per test run (and stopped at the end if this run started it),
with the product installed for its laptop user by scripts/install-laptop.sh."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cluster import Cluster

REPO = Path(__file__).resolve().parents[2]


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
    # The plain laptop unless a test switches (tests/e2e/test_laptop_flavours.py).
    c.devcluster("up", "--sample-app", "--laptop-dns", "plain")
    # The product, installed for the laptop user as the README says (devcluster does not).
    subprocess.run(["bash", str(REPO / "scripts" / "install-laptop.sh")], check=True, timeout=900)
    # Start from a laptop with no session, whatever an earlier run left connected.
    c.laptop("telepresence", "quit", timeout=120)
    yield c
    if not was_up and os.environ.get("DEVCLUSTER_KEEP") != "1":
        c.devcluster("down", check=False)
