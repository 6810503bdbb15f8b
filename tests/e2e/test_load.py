"""Bounded under load, end to end on devcluster: 200 concurrent flows (50 of them busy the
whole time) with none failing, and 200 downloads whose readers stall holding the daemon
under its documented memory bound (docs/architecture.md, "Memory") while a download
beside them still completes; afterwards the daemon has let go of every socket.

The full-size figures (1,000 flows, the connection rate, the soak) come from
bench/load_bench.py, which drives the same client (bench/loadclient.py)."""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.contenders import find_pids
from bench.load_bench import (
    CLIENT,
    ECHO_PORTS,
    PROCESSES,
    Sampler,
    daemon_bound,
    echo_manifest,
)
from devcluster.fixtures import http_app_manifest
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.test_outbound import baseline, connect, laptop_state, quit_

__all__ = ["baseline"]  # the module-scoped fixture, shared with test_outbound

NS = "tp-load"
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def targets(cluster: Cluster) -> Iterator[tuple[str, str]]:
    """An echo service on four ports and the HTTP test app: their ClusterIPs."""
    cluster.kubectl("create", "namespace", NS, check=False)
    cluster.apply(echo_manifest(NS, replicas=1))
    cluster.apply(http_app_manifest(name="bulk", namespace=NS))
    for name in ("echo", "bulk"):
        cluster.rollout(name, NS)
    yield (
        cluster.get("service", "echo", "-n", NS)["spec"]["clusterIP"],
        cluster.get("service", "bulk", "-n", NS)["spec"]["clusterIP"],
    )
    # Gone before the next module starts: test_manager_versions compares the whole cluster
    # before and after a connect, and a namespace still terminating would differ.
    cluster.kubectl("delete", "namespace", NS, "--timeout=180s", check=False, timeout=240)


@pytest.fixture(scope="module")
def client_script() -> Iterator[str]:
    """The load client where the laptop's user can read it."""
    with tempfile.TemporaryDirectory(prefix="tp-load-") as folder:
        Path(folder).chmod(0o755)
        path = Path(folder) / "loadclient.py"
        path.write_text(CLIENT.read_text())
        path.chmod(0o644)
        yield str(path)


@pytest.fixture
def sampled(cluster: Cluster, baseline: dict[str, str]) -> Iterator[Sampler]:
    """Connected, with the daemon's memory and descriptors sampled all along."""
    connect(cluster)
    pids = find_pids({"daemon": PROCESSES["daemon"]})
    assert pids, "no daemon process"
    sampler = Sampler(pids)
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    try:
        yield sampler
    finally:
        sampler.stop.set()
        thread.join()
        quit_(cluster)
    assert laptop_state(cluster) == baseline


def run_client(cluster: Cluster, script: str, *args: str) -> dict[str, Any]:
    out = cluster.laptop(cluster.harness_python, script, *args, timeout=300).stdout
    results = [json.loads(line)["result"] for line in out.splitlines() if '"result"' in line]
    assert len(results) == 1, out
    result: dict[str, Any] = results[0]
    return result


def test_200_flows_none_fails_and_stalled_readers_stay_within_the_bound(
    cluster: Cluster, targets: tuple[str, str], client_script: str, sampled: Sampler
) -> None:
    echo_ip, bulk_ip = targets
    fds_before = sampled.take().fds["daemon"]

    hold = run_client(
        cluster, client_script, "hold", echo_ip, ",".join(map(str, ECHO_PORTS)), "150", "50", "5"
    )
    assert hold["errors"] == 0, hold["examples"]
    assert hold["opened"] == 200
    assert hold["echoes per s"] > 0

    # Each stalled download would send a GiB; without flow control and the window budget
    # the daemon would buffer it (2 MiB per flow with the old fixed windows: 400 MB).
    stall = run_client(cluster, client_script, "stall", bulk_ip, "8080", "200", str(32 * MIB), "1")
    assert stall["errors"] == 0, stall["examples"]
    assert stall["stalled"] == 200
    peak = max(s.rss["daemon"] for s in sampled.samples)
    assert 0 < peak <= daemon_bound(streams=201), f"daemon RSS peaked at {peak / MIB:.0f} MiB"

    # Everything the flows held is let go: the daemon's descriptors return to where they
    # were (its sockets close as the tunnel's resets and FINs arrive).
    wait_for(
        lambda: sampled.take().fds["daemon"] <= fds_before + 2,
        timeout=30,
        what=f"the daemon's descriptors to return to {fds_before}",
    )
