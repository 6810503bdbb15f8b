"""Versions on a shared manager: a client never downgrades a newer manager and keeps working
with it, clients of two compatible versions share one manager at the same time, and
`telepresence manager uninstall` leaves nothing of what connect installed.

An "other version" is this code with its reported version and protocol range overridden
(TELEPRESENCE_TEST_VERSION / TELEPRESENCE_TEST_PROTOCOL); the image stays the real one.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.e2e.cluster import POOL_CLIENT, Cluster, wait_for
from tests.e2e.test_outbound import connect, curl, quit_

NS = "ambassador"
NEWER = {"TELEPRESENCE_TEST_VERSION": "0.2.0", "TELEPRESENCE_TEST_PROTOCOL": "1-4"}
VENV_PYTHON = "/opt/telepresence-dev/venv/bin/python"

# A second client of another version, at the tunnel level: it joins the manager as its own
# session and asks cluster DNS through it, then waits for a line on stdin before leaving.
SECOND_CLIENT = (
    POOL_CLIENT
    + r"""
import dns.message, dns.rdatatype

async def main():
    access = kubeconfig.load()
    async with KubeApi(access) as api, aiohttp.ClientSession() as http:
        pool = await open_pool(api, http, access, "second-client")
        answer = await pool.dns_lookup("kubernetes.default.svc.cluster.local.",
                                       dns.rdatatype.A)
        reply = dns.message.from_wire(answer.message)
        print(json.dumps({"version": pool.version, "protocol": pool.agreed_protocol,
                          "manager": pool.manager_version,
                          "answer": [r.to_text() for s in reply.answer for r in s]}),
              flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await pool.close()

asyncio.run(main())
"""
)


def _as_laptop(cluster: Cluster, env: dict[str, str], *cmd: str, **kw: object) -> str:
    pairs = [f"{k}={v}" for k, v in env.items()]
    return cluster.laptop("env", *pairs, *cmd, **kw).stdout  # type: ignore[arg-type]


def _deployment(cluster: Cluster) -> dict[str, object]:
    result: dict[str, object] = cluster.get("deployment/traffic-manager", "-n", NS)
    return result


def _objects(cluster: Cluster) -> set[str]:
    """Every object of every listable kind, namespaced and cluster-scoped, by kind/ns/name."""
    kinds = cluster.kubectl("api-resources", "--verbs=list", "-o", "name").stdout.split()
    skip = {"events", "events.events.k8s.io", "leases.coordination.k8s.io"}
    kinds = [k for k in kinds if k not in skip]
    out = cluster.kubectl(
        "get",
        ",".join(kinds),
        "-A",
        "--ignore-not-found",
        "-o",
        "jsonpath={range .items[*]}{.kind}/{.metadata.namespace}/{.metadata.name}{'\\n'}{end}",
        timeout=120,
    ).stdout
    # Pods, ReplicaSets and EndpointSlices of workloads come and go on their own; the
    # manager's own are covered by its Deployment and namespace.
    volatile = ("Pod/", "ReplicaSet/", "EndpointSlice/", "Event/", "Lease/")
    return {line for line in out.splitlines() if line and not line.startswith(volatile)}


@pytest.fixture
def newer_manager(cluster: Cluster) -> Iterator[Cluster]:
    """A manager of version 0.2.0 (protocol 1-4), installed by a client of that version."""
    quit_(cluster)
    _as_laptop(cluster, NEWER, "telepresence", "manager", "upgrade", timeout=180)
    assert _deployment(cluster)["metadata"]["annotations"]["telepresence-py/version"] == "0.2.0"  # type: ignore[index]
    yield cluster
    quit_(cluster)
    # Leave the next tests a manager of this client's version.
    cluster.laptop("telepresence", "manager", "uninstall", timeout=180)


def test_an_older_client_uses_a_newer_manager_without_downgrading_it(
    newer_manager: Cluster,
) -> None:
    cluster = newer_manager
    # The spec's generation, not the resourceVersion: the rollout that installed the newer
    # manager still updates the Deployment's status (the old pod leaves after it drains).
    before = _deployment(cluster)["metadata"]["generation"]  # type: ignore[index]
    out = connect(cluster)
    assert "Using Traffic Manager 0.2.0 (newer than this client 0.1.0)" in out.stdout + out.stderr
    status = cluster.laptop("telepresence", "status").stdout
    assert "0.2.0 (newer than this client 0.1.0; compatible)" in status
    assert curl(cluster, "http://verylargejavaservice.default:8080/").returncode == 0
    assert _deployment(cluster)["metadata"]["generation"] == before  # type: ignore[index]
    # Asking for an upgrade from the older client leaves the newer manager alone too.
    quit_(cluster)
    up = cluster.laptop("telepresence", "manager", "upgrade", timeout=120)
    assert "newer than this client" in up.stdout + up.stderr
    assert _deployment(cluster)["metadata"]["generation"] == before  # type: ignore[index]


def test_two_clients_of_different_versions_share_the_manager_at_once(
    newer_manager: Cluster,
) -> None:
    cluster = newer_manager
    connect(cluster)  # this client, 0.1.0 (protocol 1-3)
    pairs = [f"{k}={v}" for k, v in NEWER.items()]
    second = subprocess.Popen(
        [
            "python3",
            "-m",
            "devcluster.cli",
            "laptop",
            "--",
            "env",
            *pairs,
            VENV_PYTHON,
            "-c",
            SECOND_CLIENT,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert second.stdout is not None and second.stdin is not None
        joined = json.loads(second.stdout.readline() or "{}")
        assert joined.get("version") == "0.2.0", second.stderr.read() if second.stderr else ""
        assert joined["manager"] == "0.2.0"
        assert joined["protocol"] == 4  # the highest both speak
        assert joined["answer"] == ["10.96.0.1"]
        # Meanwhile the first client, on protocol 3, works through the same manager.
        assert curl(cluster, "http://verylargejavaservice.default:8080/").returncode == 0
        status = json.loads(cluster.laptop("telepresence", "status", "-o", "json").stdout)
        assert status["user_daemon"]["tunnel_protocol"] == 3
        second.stdin.write("\n")
        second.stdin.flush()
        assert second.wait(timeout=30) == 0
    finally:
        if second.poll() is None:
            second.kill()


def test_uninstall_leaves_nothing_that_connect_installed(cluster: Cluster) -> None:
    quit_(cluster)
    cluster.laptop("telepresence", "manager", "uninstall", timeout=180)
    wait_for(
        lambda: cluster.kubectl("get", "namespace", NS, check=False).returncode != 0,
        timeout=120,
        what="no manager namespace to start from",
    )
    before = _objects(cluster)
    connect(cluster)
    quit_(cluster)
    assert _objects(cluster) != before  # connect installed something
    out = cluster.laptop("telepresence", "manager", "uninstall", timeout=180).stdout
    assert "Traffic Manager uninstalled" in out
    assert "Deleted configmap/traffic-manager-code-" in out  # the default manager's code
    started = time.monotonic()
    wait_for(
        lambda: _objects(cluster) == before,
        timeout=120,
        what="the cluster to hold exactly what it held before connect",
    )
    assert time.monotonic() - started < 120
    again = cluster.laptop("telepresence", "manager", "uninstall", timeout=60).stdout
    assert "Nothing to remove" in again
