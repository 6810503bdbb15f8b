"""Manager rollouts nobody notices: a rollout restart, or a graceful delete of the only
manager pod, while a laptop opens a new connection every 100 ms and a 1 GiB download runs.

The manager drains on SIGTERM (docs/architecture.md, "Manager rollouts"): the laptop sends
new flows to the replacement once it is Ready, open ones finish on the stopping manager,
and until a replacement is Ready the stopping manager still serves new flows."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator

import pytest

from devcluster.fixtures import http_app_manifest
from devcluster.images.http import CHUNK, PATTERN
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.test_outbound import connect, quit_

NS = "tp-rollout"
SIZE = 1 << 30
MANAGER = ["-n", "ambassador"]

# Runs in the laptop: a fresh connection every 100 ms to the app by name (and by the pod IP
# given), until a line arrives on stdin; prints what it saw as JSON.
PROBE = r"""
import json, socket, sys, threading, time

host, port = sys.argv[1], int(sys.argv[2])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
results = []
print("started", flush=True)
while not stop.is_set():
    started = time.monotonic()
    error = ""
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.settimeout(5)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head = s.recv(64)
            if not head.startswith(b"HTTP/1.1 200"):
                error = f"bad answer {head[:30]!r}"
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    took = time.monotonic() - started
    results.append({"at": started, "took": took, "error": error})
    stop.wait(max(0.0, 0.1 - took))  # ten a second, and out at once when told
print(json.dumps(results), flush=True)
"""


def _expected_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for _ in range(size // CHUNK):
        digest.update(PATTERN)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def app(cluster: Cluster) -> Iterator[str]:
    # A namespace of that name still terminating from an earlier run would refuse the app.
    wait_for(
        lambda: (
            cluster.kubectl("get", "namespace", NS, check=False).returncode != 0
            or "Terminating" not in cluster.kubectl("get", "namespace", NS).stdout
        ),
        timeout=120,
        what=f"namespace {NS} not terminating",
    )
    cluster.kubectl("create", "namespace", NS, check=False)
    cluster.kubectl("apply", "-f", "-", input=http_app_manifest(name="web", namespace=NS))
    cluster.kubectl("rollout", "status", "-n", NS, "deployment/web", "--timeout=120s")
    yield f"web.{NS}"
    quit_(cluster)
    # Gone before the next module starts: test_manager_versions compares the whole cluster
    # before and after a connect, and a namespace still terminating would differ.
    cluster.kubectl("delete", "namespace", NS, "--timeout=180s", check=False, timeout=240)


def _manager_pods(cluster: Cluster) -> list[dict[str, object]]:
    listing = cluster.get("pods", *MANAGER, "-l", "app=traffic-manager")
    return list(listing["items"])  # type: ignore[index]


def _ready_managers(cluster: Cluster, count: int) -> bool:
    pods = _manager_pods(cluster)
    return len(pods) == count and all(
        any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in pod["status"].get("conditions", [])  # type: ignore[index, union-attr]
        )
        for pod in pods
    )


def _one_ready_manager(cluster: Cluster) -> bool:
    return _ready_managers(cluster, 1)


class Traffic:
    """The probe and the download, running in the laptop while the manager moves."""

    def __init__(self, cluster: Cluster, host: str) -> None:
        self.probe = subprocess.Popen(
            cluster.harness_argv("-c", PROBE, host, "8080"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.probe.stdout is not None
        assert self.probe.stdout.readline().strip() == "started"
        self.download = subprocess.Popen(
            [
                "python3", "-m", "devcluster.cli", "laptop", "--", "sh", "-c",
                f"curl -sS --max-time 300 http://{host}:8080/bytes/{SIZE} | sha256sum",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    def finish(self) -> tuple[list[dict[str, object]], str]:
        assert self.probe.stdin is not None
        self.probe.stdin.write("\n")
        self.probe.stdin.flush()
        out, err = self.probe.communicate(timeout=60)
        assert self.probe.returncode == 0, err
        results = json.loads(out.splitlines()[-1])
        downloaded, derr = self.download.communicate(timeout=300)
        assert self.download.returncode == 0, derr
        return results, downloaded.split()[0]


def _check(results: list[dict[str, object]], sha256: str) -> float:
    failed = [r for r in results if r["error"]]
    assert not failed, f"{len(failed)} of {len(results)} new connections failed: {failed[:3]}"
    assert sha256 == _expected_sha256(SIZE), "the 1 GiB download was cut or corrupted"
    return max(float(r["took"]) for r in results)  # type: ignore[arg-type]


def _restart_under_traffic(cluster: Cluster, app: str) -> tuple[set[str], float, int]:
    """`kubectl rollout restart` while the probe and the download run; returns the old
    pods, the slowest new connection and how many there were, all of them checked."""
    old = {p["metadata"]["name"] for p in _manager_pods(cluster)}  # type: ignore[index]
    traffic = Traffic(cluster, app)
    cluster.kubectl("rollout", "restart", *MANAGER, "deployment/traffic-manager")
    cluster.kubectl("rollout", "status", *MANAGER, "deployment/traffic-manager", "--timeout=180s")
    wait_for(
        lambda: not old & {p["metadata"]["name"] for p in _manager_pods(cluster)},  # type: ignore[index]
        timeout=120,
        what="the old manager pods to be gone",
    )
    results, sha256 = traffic.finish()
    return old, _check(results, sha256), len(results)


def test_a_rollout_restart_fails_no_connection_and_no_download(cluster: Cluster, app: str) -> None:
    connect(cluster)
    wait_for(lambda: _one_ready_manager(cluster), timeout=120, what="one ready manager")
    old, slowest, count = _restart_under_traffic(cluster, app)
    print(f"rollout restart: {count} new connections, slowest {slowest:.3f} s")
    status = json.loads(cluster.laptop("telepresence", "status", "-o", "json").stdout)
    assert status["user_daemon"]["manager_pod"] not in old


def test_deleting_the_only_manager_pod_fails_no_connection(cluster: Cluster, app: str) -> None:
    """One replica, a graceful delete: the replacement starts only now, and until it is
    Ready the stopping manager keeps serving new connections."""
    connect(cluster)
    wait_for(lambda: _one_ready_manager(cluster), timeout=120, what="one ready manager")
    (old,) = [p["metadata"]["name"] for p in _manager_pods(cluster)]  # type: ignore[index]
    traffic = Traffic(cluster, app)
    cluster.kubectl("delete", "pod", *MANAGER, str(old), "--wait=false")
    wait_for(
        lambda: (
            old not in {p["metadata"]["name"] for p in _manager_pods(cluster)}  # type: ignore[index]
            and _one_ready_manager(cluster)
        ),
        timeout=120,
        what="the replacement to serve and the old pod to be gone",
    )
    results, sha256 = traffic.finish()
    slowest = _check(results, sha256)
    print(f"graceful delete: {len(results)} new connections, slowest {slowest:.3f} s")


def test_a_rollout_restart_with_two_replicas_fails_no_connection(
    cluster: Cluster, app: str
) -> None:
    connect(cluster)
    cluster.kubectl("scale", *MANAGER, "deployment/traffic-manager", "--replicas=2")
    try:
        wait_for(lambda: _ready_managers(cluster, 2), timeout=120, what="two ready managers")
        _, slowest, count = _restart_under_traffic(cluster, app)
        print(f"two replicas: {count} new connections, slowest {slowest:.3f} s")
    finally:
        cluster.kubectl("scale", *MANAGER, "deployment/traffic-manager", "--replicas=1")
        wait_for(lambda: _one_ready_manager(cluster), timeout=120, what="one ready manager")
