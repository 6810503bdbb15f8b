"""`telepresence status --flows`, end to end on devcluster from the laptop: a download
through the tunnel shows up while it runs, its received bytes growing, and leaves when it
ends; a connection to a closed port of a service shows up as a refused dial."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from devcluster.fixtures import http_app_manifest
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.test_outbound import baseline, connect, curl, laptop_state, quit_

__all__ = ["baseline"]  # the module-scoped fixture, shared with test_outbound

NAMESPACE = "tp-flows"
NAME = f"download.{NAMESPACE}"
#: 64 MiB at 2 MiB/s (curl's --limit-rate): about 32 s, long enough to be seen growing.
SIZE = 64 * 1024 * 1024
RATE = "2M"


@pytest.fixture(scope="module")
def service_ip(cluster: Cluster) -> Iterator[str]:
    """The HTTP test app as `download` in a namespace of its own: its ClusterIP."""
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    cluster.apply(http_app_manifest(name="download", namespace=NAMESPACE))
    cluster.rollout("download", NAMESPACE)
    yield cluster.get("service", "download", "-n", NAMESPACE)["spec"]["clusterIP"]
    cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


@pytest.fixture
def connected(cluster: Cluster, baseline: dict[str, str], service_ip: str) -> Iterator[Cluster]:
    connect(cluster)
    yield cluster
    quit_(cluster)
    assert laptop_state(cluster) == baseline


def flows_json(c: Cluster) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        c.laptop("telepresence", "status", "--flows", "-o", "json").stdout
    )
    return data


def test_a_running_download_shows_its_received_bytes_growing(
    connected: Cluster, service_ip: str
) -> None:
    c = connected
    destination = f"{service_ip}:8080"
    # `devcluster laptop` execs the command, so this process is curl itself.
    download = subprocess.Popen(
        [sys.executable, "-m", "devcluster.cli", "laptop", "--",
         "curl", "-sS", "--max-time", "120", "--limit-rate", RATE,
         "-o", "/dev/null", "-w", "%{size_download}", f"http://{NAME}:8080/bytes/{SIZE}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def the_flow() -> dict[str, Any] | None:
            flow: dict[str, Any]
            for flow in flows_json(c)["flows"]:
                if flow["destination"] == destination and flow["received"] > 0:
                    return flow
            return None

        first = wait_for(the_flow, timeout=30, what=f"a flow to {destination} receiving bytes")
        assert first["protocol"] == "tcp" and first["state"] == "open"
        assert first["name"] == NAME  # what curl looked up, from the cluster's DNS answer
        assert first["sent"] > 0  # the request
        assert first["link"].startswith("tunnel-")
        assert first["received"] < SIZE, "the download must still be running"

        def grown_flow() -> dict[str, Any] | None:
            flow = the_flow()
            return flow if flow is not None and flow["received"] > first["received"] else None

        grown = wait_for(grown_flow, timeout=30, what="the received bytes to grow")
        assert grown["age"] > first["age"]
        assert grown["sent"] == first["sent"]  # nothing more was asked

        text = c.laptop("telepresence", "status", "--flows").stdout
        assert "User Daemon: Running" in text
        assert "PROTOCOL  DESTINATION" in text
        (line,) = [x for x in text.splitlines() if f"{destination} ({NAME})" in x]
        assert line.split()[0] == "tcp" and line.split()[-1] == "open"

        out, err = download.communicate(timeout=150)
        assert download.returncode == 0, err
        assert out.strip() == str(SIZE)
        wait_for(
            lambda: all(f["destination"] != destination for f in flows_json(c)["flows"]),
            timeout=15,
            what="the flow to leave when the download ended",
        )
    finally:
        if download.poll() is None:
            download.kill()
            download.wait(timeout=30)


def test_a_closed_port_of_a_pod_shows_as_a_refused_dial(
    connected: Cluster, service_ip: str
) -> None:
    """The pod's kernel answers a closed port with a reset: the manager's dial is refused.
    (A ClusterIP's undefined port is rejected by kube-proxy instead: a failed dial.)"""
    c = connected
    (pod,) = c.ready_pods(NAMESPACE, "app=download")
    destination = f"{pod['status']['podIP']}:9999"
    out = curl(c, f"http://{destination}/")
    assert out.returncode in (7, 56), out.stderr  # refused or reset, as the program sees it

    def refused() -> dict[str, Any] | None:
        error: dict[str, Any]
        for error in flows_json(c)["errors"]:
            if error["kind"] == "refused" and error["destination"] == destination:
                return error
        return None

    error = wait_for(refused, timeout=15, what=f"a refused dial to {destination}")
    assert error["protocol"] == "tcp"
    assert error["message"] == "connection refused"
    assert error["name"] == ""  # dialled by address: no name was looked up
    assert error["count"] >= 1 and error["age"] >= 0 and error["time"].endswith("+00:00")
    assert all(f["destination"] != destination for f in flows_json(c)["flows"])

    text = c.laptop("telepresence", "status", "--flows").stdout
    (line,) = [x for x in text.splitlines() if f"tcp {destination}" in x]
    assert " refused " in line and "connection refused" in line
