"""Who can use the traffic manager, and what it will dial: the tunnel is reachable only
through port-forward, and the manager refuses its own loopback and link-local addresses
(cloud metadata) unless the config file allows them."""

from __future__ import annotations

import json
import os
import pwd
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.test_outbound import connect, curl, quit_

NS = "ambassador"
CONFIG = Path("/home/tpuser/.config/telepresence/config.yml")


def _manager_pod(cluster: Cluster) -> dict[str, object]:
    pods = cluster.ready_pods(NS, "app=traffic-manager")
    assert len(pods) == 1, pods
    return pods[0]


@pytest.fixture
def metadata_proxied(cluster: Cluster) -> Iterator[Cluster]:
    """Connected with the metadata address routed to the cluster, as a VPN-style
    --also-proxy would; the config file restored afterwards."""
    saved = CONFIG.read_bytes() if CONFIG.exists() else None
    yield cluster
    quit_(cluster)
    if saved is None:
        CONFIG.unlink(missing_ok=True)
    else:
        CONFIG.write_bytes(saved)
    # The next connect installs the manager again, with the default dial policy.
    cluster.kubectl("delete", "deployment", "traffic-manager", "-n", NS, "--wait=true")


def _write_config(text: str) -> None:
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text(text)
    user = pwd.getpwnam("tpuser")
    for p in (CONFIG.parent.parent, CONFIG.parent, CONFIG):
        os.chown(p, user.pw_uid, user.pw_gid)


def test_the_tunnel_is_reachable_through_port_forward_only(cluster: Cluster) -> None:
    connect(cluster)
    try:
        pod = _manager_pod(cluster)
        ip = pod["status"]["podIP"]  # type: ignore[index]
        # From the pod network: the tunnel port refuses, the health port says only "ok".
        refused = cluster.pod("curl", "-sS", "-m", "3", f"http://{ip}:8081/", check=False)
        assert refused.returncode == 7, refused.stderr  # connection refused
        assert cluster.pod("curl", "-sf", "-m", "3", f"http://{ip}:8082/readyz").stdout == "ok\n"
        other = cluster.pod(
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-m",
            "3",
            f"http://{ip}:8082/",
            check=False,
        )
        assert other.stdout == "404"
        assert not cluster.get("services", "-n", NS)["items"]
        # Through the API server's port-forward, the session works.
        assert curl(cluster, "http://verylargejavaservice.default:8080/").returncode == 0
    finally:
        quit_(cluster)


def test_metadata_is_refused_at_once_unless_allowed(metadata_proxied: Cluster) -> None:
    cluster = metadata_proxied
    metadata = str(cluster.settings.addresses.metadata_ip)
    # A pod reaches the stand-in metadata server: the address is live in the cluster.
    assert cluster.pod("curl", "-sf", "-m", "3", f"http://{metadata}/").returncode == 0

    connect(cluster, "--also-proxy", f"{metadata}/32")
    started = time.monotonic()
    refused = curl(cluster, f"http://{metadata}/")
    assert refused.returncode in (7, 52, 56), refused  # reset, not a timeout
    assert time.monotonic() - started < 3
    log = cluster.laptop("sh", "-c", "cat ~/.cache/telepresence/logs/*.log").stdout
    assert f"TCP {metadata}:80" in log and "dial policy" in log
    quit_(cluster)

    _write_config(f"manager:\n  dialAllow: [{metadata}/32]\n")
    connect(cluster, "--also-proxy", f"{metadata}/32")
    out = wait_for(
        lambda: curl(cluster, f"http://{metadata}/").stdout,
        timeout=30,
        what="the allowed metadata address to answer through the tunnel",
    )
    assert out.strip() == cluster.settings.addresses.external_name


def test_a_user_without_port_forward_rights_is_told_which_permission(cluster: Cluster) -> None:
    """Everything a session needs but `create pods/portforward` on the manager's pods."""
    connect(cluster)  # the manager is installed, by the admin here
    quit_(cluster)
    sa_ns = "tp-noforward"
    cluster.kubectl("create", "namespace", sa_ns, check=False)
    cluster.kubectl("create", "serviceaccount", "dev", "-n", sa_ns, check=False)
    cluster.kubectl(
        "create",
        "clusterrole",
        "tp-noforward-reader",
        "--verb=get,list,watch",
        "--resource=pods,deployments.apps,namespaces,services",
        check=False,
    )
    cluster.kubectl(
        "create",
        "clusterrolebinding",
        "tp-noforward-reader",
        "--clusterrole=tp-noforward-reader",
        f"--serviceaccount={sa_ns}:dev",
        check=False,
    )
    token = cluster.kubectl("create", "token", "dev", "-n", sa_ns).stdout.strip()
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "noforward",
        "clusters": [
            {
                "name": "dc",
                "cluster": {"server": "https://192.0.2.1:6443", "insecure-skip-tls-verify": True},
            }
        ],
        "users": [{"name": "dev", "user": {"token": token}}],
        "contexts": [{"name": "noforward", "context": {"cluster": "dc", "user": "dev"}}],
    }
    cluster.laptop("sh", "-c", "cat > $HOME/noforward.kubeconfig", input=json.dumps(kubeconfig))
    out = cluster.laptop(
        "telepresence",
        "connect",
        "--kubeconfig",
        "/home/tpuser/noforward.kubeconfig",
        check=False,
        timeout=120,
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "pods/portforward" in lines[0] and NS in lines[0], lines[0]
    assert cluster.laptop("telepresence", "status").returncode == 0
    cluster.kubectl("delete", "clusterrolebinding,clusterrole", "tp-noforward-reader")
