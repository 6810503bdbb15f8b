"""The direct transport, end to end on devcluster's real node: with the node's NodePorts
closed to the laptop (a cloud cluster from outside its network) the session runs on
port-forward and says why; with them open (a kind node from its host) new flows go
straight to the manager's pod over mutual TLS; the port admits nobody without the
session's credentials; and when the direct path breaks, new flows take port-forward at
once."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from devcluster.fixtures import http_app_manifest
from devcluster.images.http import pattern_bytes
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.test_outbound import baseline, connect, curl, laptop_state, quit_

__all__ = ["baseline"]  # the module-scoped fixture, shared with test_outbound

NAMESPACE = "tp-direct"
NAME = f"bulk.{NAMESPACE}"
NODE_IP = "192.0.2.1"
SIZE = 256 * 1024 * 1024


@pytest.fixture(scope="module")
def bulk(cluster: Cluster) -> Iterator[str]:
    """The HTTP test app as `bulk` in a namespace of its own: its ClusterIP."""
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    cluster.apply(http_app_manifest(name="bulk", namespace=NAMESPACE))
    cluster.rollout("bulk", NAMESPACE)
    yield cluster.get("service", "bulk", "-n", NAMESPACE)["spec"]["clusterIP"]
    cluster.kubectl("delete", "namespace", NAMESPACE, "--timeout=180s", check=False, timeout=200)


def nodeports(c: Cluster, state: str) -> None:
    assert c.devcluster("nodeports", state).stdout.strip() == state


@pytest.fixture
def session(cluster: Cluster, baseline: dict[str, str], bulk: str) -> Iterator[Cluster]:
    yield cluster
    quit_(cluster)
    nodeports(cluster, "closed")
    assert laptop_state(cluster) == baseline


def transport(c: Cluster) -> str:
    status = json.loads(c.laptop("telepresence", "status", "-o", "json").stdout)
    shown: str = status["user_daemon"]["transport"]
    return shown


def node_port(c: Cluster) -> int:
    service = c.get("service", "traffic-manager-direct", "-n", "ambassador")
    port: int = service["spec"]["ports"][0]["nodePort"]
    return port


def download_checksum(c: Cluster) -> None:
    out = c.laptop(
        "sh", "-c", f"curl -sS --max-time 120 http://{NAME}:8080/bytes/{SIZE} | sha256sum",
        timeout=150,
    ).stdout  # fmt: skip
    assert out.split()[0] == hashlib.sha256(pattern_bytes(SIZE)).hexdigest()


def test_with_nodeports_closed_the_session_runs_on_port_forward(session: Cluster) -> None:
    c = session
    nodeports(c, "closed")
    connect(c)
    # The first attempt fails at once (the node rejects it), and status says where.
    shown = wait_for(
        lambda: (t := transport(c)).startswith(f"port-forward (direct: {NODE_IP}:") and t,
        timeout=30,
        what="status naming the unreachable NodePort",
    )
    assert str(node_port(c)) in shown
    page = curl(c, "verylargejavaservice.default:8080")
    assert page.returncode == 0, page.stderr
    text = c.laptop("telepresence", "status").stdout
    assert "Transport         : port-forward (direct: " in text


def test_with_nodeports_open_flows_go_straight_to_the_manager(session: Cluster) -> None:
    c = session
    nodeports(c, "open")
    connect(c)
    expected = f"direct ({NODE_IP}:{node_port(c)}, NodePort on the manager's node)"
    wait_for(lambda: transport(c) == expected, timeout=30, what=expected)
    # A flow held open shows which link carries it.
    holder = subprocess.Popen(
        [sys.executable, "-m", "devcluster.cli", "laptop", "--",
         "curl", "-sS", "--max-time", "60", "--limit-rate", "1M", "-o", "/dev/null",
         f"http://{NAME}:8080/bytes/{32 * 1024 * 1024}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:

        def flow_link() -> str | None:
            data: dict[str, Any] = json.loads(
                c.laptop("telepresence", "status", "--flows", "-o", "json").stdout
            )
            links = [f["link"] for f in data["flows"] if f["received"] > 0]
            return links[0] if links else None

        link = wait_for(flow_link, timeout=30, what="the held flow")
        assert link.startswith("direct-")
    finally:
        holder.kill()
        holder.wait(timeout=30)
    download_checksum(c)
    # The daemon's TLS connections go to the NodePort, and the port-forwards stay beside
    # them, ready for a fallback.
    sockets = c.laptop("ss", "-Htn", "state", "established", "dst", NODE_IP, root=True).stdout
    peers = [line.split()[-1] for line in sockets.splitlines()]
    assert peers.count(f"{NODE_IP}:{node_port(c)}") == 2
    assert peers.count(f"{NODE_IP}:6443") >= 4


PROBE = """
import socket, ssl, sys
host, port = sys.argv[1], int(sys.argv[2])
plain = socket.create_connection((host, port), timeout=5)
plain.sendall(b"\\xfeTPX\\x00\\x01" + bytes(4))  # a tunnel preface, in the clear
plain.settimeout(10)
try:
    print("plain:", "closed" if plain.recv(100) == b"" else "answered")
except ConnectionResetError:
    print("plain:", "closed")
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
try:
    with ctx.wrap_socket(socket.create_connection((host, port), timeout=5),
                         server_hostname="anything.direct.telepresence.invalid") as tls:
        tls.settimeout(10)
        print("tls:", repr(tls.recv(100)))
except (ssl.SSLError, OSError) as e:
    print("tls refused:", type(e).__name__)
"""


def test_the_direct_port_admits_no_one_without_the_sessions_credentials(
    session: Cluster,
) -> None:
    c = session
    nodeports(c, "open")
    connect(c)
    wait_for(lambda: transport(c).startswith("direct ("), timeout=30, what="direct")
    # From the laptop, through the NodePort: a plain tunnel preface and a TLS client
    # without credentials, while a session's credentials are registered.
    out = c.laptop(c.harness_python, "-c", PROBE, NODE_IP, str(node_port(c))).stdout
    assert "plain: closed" in out
    assert "tls refused:" in out
    # From a pod, to the manager's pod IP: the same.
    (pod,) = c.ready_pods("ambassador", "app=traffic-manager")
    out = c.pod(c.harness_python, "-c", PROBE, pod["status"]["podIP"], "8083").stdout
    assert "plain: closed" in out
    assert "tls refused:" in out
    # Still one session, and its links unharmed.
    assert transport(c).startswith("direct (")


def test_when_the_direct_path_breaks_new_flows_take_port_forward(session: Cluster) -> None:
    c = session
    nodeports(c, "open")
    connect(c)
    wait_for(lambda: transport(c).startswith("direct ("), timeout=30, what="direct")
    # The path goes away: no new connections to the NodePort, and the open ones die.
    nodeports(c, "closed")
    c.laptop("ss", "-K", "-tn", "dst", NODE_IP, "dport", "=", str(node_port(c)), root=True)
    # At once, without waiting for the route to notice: the port-forward links serve.
    page = curl(c, "verylargejavaservice.default:8080")
    assert page.returncode == 0, page.stderr
    wait_for(
        lambda: transport(c).startswith("port-forward (direct: "),
        timeout=30,
        what="status showing the fallback",
    )
    download_checksum(c)
    # And back once the path is there again (the route retries with a growing pause).
    nodeports(c, "open")
    wait_for(lambda: transport(c).startswith("direct ("), timeout=60, what="direct again")
    status = json.loads(c.laptop("telepresence", "status", "-o", "json").stdout)
    assert status["user_daemon"]["reconnects"] == 0  # the session never broke


def _bench_rows(out: str) -> dict[str, list[str]]:
    return {
        name: line.split()[-5:]
        for line in out.splitlines()
        for name in ("telepresence", "kubectl port-forward")
        if line.startswith(name + " ") or line.startswith(name + "\t")
    }


@pytest.mark.parametrize("state", ["closed", "open"])
def test_bench_measures_the_transport_in_use_beside_kubectl(session: Cluster, state: str) -> None:
    c = session
    nodeports(c, state)
    connect(c)
    want = "direct (" if state == "open" else "port-forward ("
    wait_for(lambda: transport(c).startswith(want), timeout=30, what=want)
    out = c.laptop("telepresence", "bench", "--seconds", "1", "--port-forward", timeout=240).stdout
    assert f"Transport: {want}" in out
    rows = _bench_rows(out)
    assert set(rows) == {"telepresence", "kubectl port-forward"}, out
    for up, down, p50, _, p99 in rows.values():
        assert float(up) > 0 and float(down) > 0
        assert 0 < float(p50) <= float(p99)
