"""Controlling outbound connectivity, end to end on devcluster from the laptop: mapped
namespaces, local-only intercepts, external dependencies, UDP, headless services and pod
names, also/never-proxy, and the resolver's rules."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from devcluster.fixtures import deployment, http_app_manifest, to_yaml
from devcluster.images import HTTP_IMAGE, UDP_ECHO_IMAGE
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.test_outbound import baseline, connect, curl, laptop_state, quit_

__all__ = ["baseline"]  # the module-scoped fixture, shared with test_outbound

VENV_PYTHON = "/opt/telepresence-dev/venv/bin/python"
EXTERNAL = "203.0.113.2"

UDP_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
for attempt in range(5):
    s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
    try:
        print(s.recv(65535).decode())
        break
    except TimeoutError:
        continue
else:
    sys.exit(1)
"""


def resolves(c: Cluster, name: str) -> str | None:
    out = c.laptop("getent", "hosts", name, check=False)
    return out.stdout.split()[0] if out.returncode == 0 else None


def dig(c: Cluster, *args: str) -> str:
    return c.laptop("dig", "+time=2", "+tries=2", *args).stdout


@pytest.fixture(scope="module")
def workloads(cluster: Cluster) -> dict[str, str]:
    """Two namespaces with an `echo` service, a UDP echo, external-dependency services."""
    for ns in ("tp-alpha", "tp-beta", "tp-ext", "dev", "lan"):
        cluster.kubectl("create", "namespace", ns, check=False)
    for ns in ("tp-alpha", "tp-beta"):
        cluster.apply(http_app_manifest(name="echo", namespace=ns, replicas=1))
    cluster.apply(
        to_yaml(
            deployment(
                name="udpecho",
                namespace="tp-alpha",
                image=UDP_ECHO_IMAGE,
                port=9000,
                protocol="UDP",
                args=["--port", "9000"],
            )
        )
    )
    # `lan` has a service named like the laptop's LAN printer; the laptop's own search
    # domain `lan` must still win for printer.lan.
    cluster.apply(http_app_manifest(name="printer", namespace="lan"))
    cluster.apply(
        to_yaml(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "extname", "namespace": "tp-ext"},
                    "spec": {"type": "ExternalName", "externalName": "db.external.test"},
                },
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "extdb", "namespace": "tp-ext"},
                    "spec": {"clusterIP": "None", "ports": [{"port": 80, "name": "http"}]},
                },
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": "extdb-1",
                        "namespace": "tp-ext",
                        "labels": {"kubernetes.io/service-name": "extdb"},
                    },
                    "addressType": "IPv4",
                    "ports": [{"port": 80, "name": "http", "protocol": "TCP"}],
                    "endpoints": [{"addresses": [EXTERNAL]}],
                },
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "extip", "namespace": "tp-ext"},
                    "spec": {"ports": [{"port": 8080, "targetPort": 80, "name": "http"}]},
                },
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": "extip-1",
                        "namespace": "tp-ext",
                        "labels": {"kubernetes.io/service-name": "extip"},
                    },
                    "addressType": "IPv4",
                    "ports": [{"port": 80, "name": "http", "protocol": "TCP"}],
                    "endpoints": [{"addresses": [EXTERNAL]}],
                },
            ]
        )
    )
    for name, ns in (
        ("echo", "tp-alpha"),
        ("echo", "tp-beta"),
        ("udpecho", "tp-alpha"),
        ("printer", "lan"),
    ):
        cluster.rollout(name, ns)
    return {
        ns: cluster.get("service", "echo", "-n", ns)["spec"]["clusterIP"]
        for ns in ("tp-alpha", "tp-beta")
    }


@pytest.fixture
def session(
    cluster: Cluster, baseline: dict[str, str], workloads: dict[str, str]
) -> Iterator[Cluster]:
    """Connected with default flags; quit afterwards must restore the laptop exactly."""
    connect(cluster)
    yield cluster
    quit_(cluster)
    assert laptop_state(cluster) == baseline


# --- mapped namespaces ------------------------------------------------------------------


def test_mapped_namespaces_limit_the_short_names(
    cluster: Cluster, baseline: dict[str, str], workloads: dict[str, str]
) -> None:
    connect(cluster, "--mapped-namespaces", "tp-alpha")
    try:
        assert resolves(cluster, "echo.tp-alpha") == workloads["tp-alpha"]
        assert resolves(cluster, "echo.tp-beta") is None
        # Decided as Telepresence does: mapping limits `svc.ns` names only; fully qualified
        # cluster names and ClusterIPs of other namespaces keep working.
        assert resolves(cluster, "echo.tp-beta.svc.cluster.local") == workloads["tp-beta"]
        assert curl(cluster, f"http://{workloads['tp-beta']}:8080/").returncode == 0
        status = json.loads(cluster.laptop("telepresence", "status", "-o", "json").stdout)
        assert status["user_daemon"]["mapped_namespaces"] == ["tp-alpha"]
        assert "Mapped namespaces : tp-alpha" in cluster.laptop("telepresence", "status").stdout
    finally:
        quit_(cluster)
    assert laptop_state(cluster) == baseline


def test_all_namespaces_follow_creation_and_deletion_live(session: Cluster) -> None:
    c = session
    c.kubectl("delete", "namespace", "tp-late", "--wait=true", check=False, timeout=120)
    c.kubectl("create", "namespace", "tp-late")
    c.apply(http_app_manifest(name="late", namespace="tp-late"))
    ip = c.get("service", "late", "-n", "tp-late")["spec"]["clusterIP"]
    wait_for(
        lambda: resolves(c, "late.tp-late") == ip,
        timeout=30,
        what="a namespace created while connected to resolve",
    )
    c.kubectl("delete", "namespace", "tp-late", "--wait=false")
    wait_for(
        lambda: resolves(c, "late.tp-late") is None,
        timeout=60,
        what="a deleted namespace to stop resolving",
    )


# --- local-only intercepts and the search path --------------------------------------------


def test_local_only_intercepts_put_the_namespace_on_the_search_path(
    session: Cluster, workloads: dict[str, str]
) -> None:
    c = session
    # A plain connect puts no namespace on the search path.
    assert resolves(c, "echo") is None
    out = c.laptop("telepresence", "intercept", "first", "--namespace", "tp-alpha", "--local-only")
    assert out.stdout == ""
    assert resolves(c, "echo") == workloads["tp-alpha"]
    assert curl(c, "echo:8080").returncode == 0
    c.laptop("telepresence", "intercept", "second", "--namespace", "tp-alpha", "--local-only")
    assert "first: local-only intercept" in c.laptop("telepresence", "list").stdout
    assert "Intercepts        : 2 total" in c.laptop("telepresence", "status").stdout
    assert c.laptop("telepresence", "leave", "first").stdout == ""
    # Still on the path: another local-only intercept uses the namespace.
    assert resolves(c, "echo") == workloads["tp-alpha"]
    c.laptop("telepresence", "leave", "second")
    assert resolves(c, "echo") is None
    # A single label the cluster does not have goes upstream untouched: the LAN host works.
    c.laptop("telepresence", "intercept", "third", "--namespace", "tp-alpha", "--local-only")
    assert resolves(c, "web") == "198.51.100.2"
    c.laptop("telepresence", "leave", "third")
    bad = c.laptop("telepresence", "leave", "nope", check=False)
    assert bad.returncode != 0 and "telepresence list" in bad.stderr


def test_connect_namespace_puts_it_on_the_search_path_from_the_start(
    cluster: Cluster, baseline: dict[str, str], workloads: dict[str, str]
) -> None:
    connect(cluster, "--namespace", "tp-beta")
    try:
        assert resolves(cluster, "echo") == workloads["tp-beta"]
        assert curl(cluster, "echo:8080").returncode == 0
    finally:
        quit_(cluster)
    assert laptop_state(cluster) == baseline


# --- external dependencies ---------------------------------------------------------------


def test_external_name_and_selector_less_services_reach_the_outside_host(
    session: Cluster,
) -> None:
    c = session
    assert c.laptop("curl", "-s", "-m", "3", f"http://{EXTERNAL}/", check=False).returncode != 0
    for name in ("extname.tp-ext", "extdb.tp-ext"):
        assert resolves(c, name) == EXTERNAL
        out = curl(c, f"http://{name}/")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "db.external.test"
    status = json.loads(c.laptop("telepresence", "status", "-o", "json").stdout)
    assert status["root_daemon"]["host_routes"] == [EXTERNAL]
    # A selector-less Service with a ClusterIP works through its ClusterIP.
    out = curl(c, "http://extip.tp-ext:8080/")
    assert out.returncode == 0 and out.stdout.strip() == "db.external.test"
    # Only addresses from cluster answers are routed, never the laptop resolver's.
    assert resolves(c, "www.example.test") == "198.51.100.2"
    status = json.loads(c.laptop("telepresence", "status", "-o", "json").stdout)
    assert "198.51.100.2" not in status["root_daemon"]["host_routes"]


# --- UDP ---------------------------------------------------------------------------------


def test_udp_to_cluster_ips_pod_ips_and_cluster_dns(session: Cluster) -> None:
    c = session
    svc_ip = c.get("service", "udpecho", "-n", "tp-alpha")["spec"]["clusterIP"]
    pod = c.ready_pods("tp-alpha", "app=udpecho")[0]
    for target in (svc_ip, pod["status"]["podIP"]):
        out = c.laptop(VENV_PYTHON, "-c", UDP_CLIENT, target, "9000", f"ping {target}")
        assert out.stdout.strip() == f"ping {target}"
    # Cluster DNS queried directly at its ClusterIP, over UDP through the TUN.
    answer = c.laptop(
        "dig", "+short", "+notcp", "@10.96.0.10", "verylargejavaservice.default.svc.cluster.local"
    ).stdout.strip()
    assert answer == c.get("service", "verylargejavaservice", "-n", "default")["spec"]["clusterIP"]


def test_idle_udp_flows_expire(session: Cluster) -> None:
    c = session
    svc_ip = c.get("service", "udpecho", "-n", "tp-alpha")["spec"]["clusterIP"]
    c.laptop(VENV_PYTHON, "-c", UDP_CLIENT, svc_ip, "9000", "x")
    # The relay's flows are visible in the manager's connections: wait for them to drain.
    status = json.loads(c.laptop("telepresence", "status", "-o", "json").stdout)
    assert status["user_daemon"]["udp_flows"] >= 1
    wait_for(
        lambda: (
            json.loads(c.laptop("telepresence", "status", "-o", "json").stdout)["user_daemon"][
                "udp_flows"
            ]
            == 0
        ),
        timeout=90,
        what="idle UDP flows to expire",
        interval=1,
    )


# --- headless services, StatefulSet pod names, SRV ---------------------------------------


def test_headless_40_pods_statefulset_names_and_srv(session: Cluster) -> None:
    c = session
    ns = "tp-headless"
    c.kubectl("create", "namespace", ns, check=False)
    labels = {"app": "many"}
    c.apply(
        to_yaml(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "many", "namespace": ns},
                    "spec": {
                        "clusterIP": "None",
                        "selector": labels,
                        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    },
                },
                {
                    "apiVersion": "apps/v1",
                    "kind": "StatefulSet",
                    "metadata": {"name": "many", "namespace": ns},
                    "spec": {
                        "serviceName": "many",
                        "replicas": 40,
                        "podManagementPolicy": "Parallel",
                        "selector": {"matchLabels": labels},
                        "template": {
                            "metadata": {"labels": labels},
                            "spec": {
                                "containers": [
                                    {
                                        "name": "http",
                                        "image": HTTP_IMAGE,
                                        "args": ["--port", "8080"],
                                        "ports": [{"name": "http", "containerPort": 8080}],
                                    }
                                ]
                            },
                        },
                    },
                },
            ]
        )
    )
    wait_for(
        lambda: len(c.ready_pods(ns, "app=many")) == 40,
        timeout=300,
        what="40 ready pods",
        interval=1,
    )
    ips = sorted(p["status"]["podIP"] for p in c.ready_pods(ns, "app=many"))

    def complete() -> list[str] | None:
        found = sorted(dig(c, "+short", f"many.{ns}").split())
        return found if found == ips else None

    wait_for(complete, timeout=60, what="all 40 addresses in the answer")
    # Too big for 512 bytes: glibc gets it complete over TCP after a truncated UDP answer.
    getent = c.laptop("getent", "ahosts", f"many.{ns}").stdout
    assert sorted({line.split()[0] for line in getent.splitlines()}) == ips
    truncated = dig(c, "+noedns", "+ignore", f"many.{ns}")
    assert re.search(r"flags:[^;]*\btc\b", truncated), truncated
    pod0 = c.get("pod", "many-0", "-n", ns)["status"]["podIP"]
    assert resolves(c, f"many-0.many.{ns}") == pod0
    assert curl(c, f"http://many-0.many.{ns}:8080/").stdout.strip() == "many-0"
    srv = dig(c, "+short", "SRV", f"_http._tcp.many.{ns}")
    assert len(srv.splitlines()) == 40 and " 8080 " in srv
    c.kubectl("delete", "namespace", ns, "--wait=false")


# --- also-proxy, never-proxy, conflicts ----------------------------------------------------


def test_never_proxy_keeps_a_subnet_local_and_also_proxy_adds_one(
    cluster: Cluster, baseline: dict[str, str], workloads: dict[str, str]
) -> None:
    pod_ip = cluster.ready_pods("tp-alpha", "app=echo")[0]["status"]["podIP"]
    connect(cluster, "--never-proxy", "10.244.0.0/24", "--also-proxy", "203.0.113.0/30")
    try:
        assert curl(cluster, f"http://{workloads['tp-alpha']}:8080/").returncode == 0
        started = time.monotonic()
        assert curl(cluster, f"http://{pod_ip}:8080/").returncode != 0
        assert time.monotonic() - started < 5
        out = curl(cluster, f"http://{EXTERNAL}/")
        assert out.returncode == 0 and out.stdout.strip() == "db.external.test"
    finally:
        quit_(cluster)
    assert laptop_state(cluster) == baseline


def test_also_proxy_covering_the_api_server_does_not_break_the_connection(
    cluster: Cluster, baseline: dict[str, str], workloads: dict[str, str]
) -> None:
    connect(cluster, "--also-proxy", "192.0.2.0/24")
    try:
        status = json.loads(cluster.laptop("telepresence", "status", "-o", "json").stdout)
        assert status["user_daemon"]["status"] == "Connected"
        assert cluster.laptop("kubectl", "get", "--raw", "/readyz").stdout.strip() == "ok"
        assert curl(cluster, "http://echo.tp-alpha:8080/").returncode == 0
        routes = cluster.laptop("ip", "route", "get", "192.0.2.1").stdout
        assert "dev eth0" in routes
    finally:
        quit_(cluster)
    assert laptop_state(cluster) == baseline


def test_a_conflicting_subnet_is_refused_unless_allowed(
    cluster: Cluster, baseline: dict[str, str], workloads: dict[str, str]
) -> None:
    out = cluster.laptop(
        "telepresence", "connect", "--also-proxy", "198.51.100.0/24", check=False, timeout=120
    )
    assert out.returncode != 0
    assert "--allow-conflicting-subnets" in out.stderr or "--never-proxy" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert laptop_state(cluster) == baseline
    connect(
        cluster, "--also-proxy", "198.51.100.0/24", "--allow-conflicting-subnets", "198.51.100.0/24"
    )
    try:
        status = json.loads(cluster.laptop("telepresence", "status", "-o", "json").stdout)
        assert status["user_daemon"]["status"] == "Connected"
        assert resolves(cluster, "www.example.test") == "198.51.100.2"
    finally:
        quit_(cluster)
    assert laptop_state(cluster) == baseline


def test_bad_flags_fail_with_one_line_and_leave_nothing(
    cluster: Cluster, baseline: dict[str, str]
) -> None:
    for flags in (["--also-proxy", "10.0.0.300/8"], ["--mapped-namespaces", "Bad_NS"]):
        out = cluster.laptop("telepresence", "connect", *flags, check=False, timeout=60)
        assert out.returncode != 0
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert laptop_state(cluster) == baseline


# --- resolver rules ----------------------------------------------------------------------


def test_resolver_rules(session: Cluster, workloads: dict[str, str]) -> None:
    c = session
    name = "echo.tp-alpha"
    # AAAA of an IPv4-only cluster name: NOERROR with no answer.
    aaaa = dig(c, "AAAA", name)
    assert "status: NOERROR" in aaaa and "ANSWER: 0" in aaaa
    # wpad never goes to the cluster, even for a mapped namespace.
    assert "status: NXDOMAIN" in dig(c, "wpad.tp-alpha")
    # Names under the laptop's own search domain stay local, though namespace `lan` exists
    # with a service `printer`.
    assert resolves(c, "printer.lan") == "198.51.100.2"
    # A namespace named like a TLD does not break that TLD: `example.dev` is answered
    # upstream because the cluster has no service `example` in `dev`.
    assert resolves(c, "example.dev") == "198.51.100.2"
    assert "status: NXDOMAIN" in dig(c, "www.example.dev")
    # And other names keep resolving through the laptop's resolver.
    assert resolves(c, "www.example.test") == "198.51.100.2"


def test_nsswitch_mdns_before_dns_gets_a_warning_with_the_fix(
    cluster: Cluster, baseline: dict[str, str]
) -> None:
    """Run connect with an nsswitch.conf (in a private mount namespace) where mDNS stops
    *.local names before DNS."""
    script = (
        "set -e; d=$(mktemp -d); "
        "printf 'hosts: files mdns4_minimal [NOTFOUND=return] dns\\n' > $d/nsswitch.conf; "
        "mount --bind $d/nsswitch.conf /etc/nsswitch.conf; "
        "setpriv --reuid=tpuser --regid=tpuser --init-groups "
        "env HOME=/home/tpuser KUBECONFIG=/home/tpuser/.kube/config "
        "PATH=/home/tpuser/.local/bin:/usr/bin:/bin:/usr/sbin:/sbin telepresence connect"
    )
    out = subprocess.run(
        [
            VENV_PYTHON,
            "-m",
            "devcluster.cli",
            "laptop",
            "--root",
            "--",
            "unshare",
            "--mount",
            "sh",
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    try:
        assert out.returncode == 0, out.stderr
        assert "mdns4_minimal" in out.stderr and "put `dns` before" in out.stderr
    finally:
        quit_(cluster)
    assert laptop_state(cluster) == baseline
