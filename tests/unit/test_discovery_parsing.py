"""Discovery's pure parts: resolv.conf, the dry-run probe's error, object fields, and the
choice between sources."""

from __future__ import annotations

from ipaddress import ip_network
from typing import Any

import pytest

from telepresence.k8s.api import Changed, Listed
from telepresence.manager.discovery import (
    ClusterState,
    DnsConfig,
    PodSource,
    ServiceSource,
    Table,
    choose_pod_source,
    choose_service_source,
    cluster_domain,
    dns_config,
    node_pod_cidrs,
    parse_resolv_conf,
    parse_service_range_error,
    pod_ips,
    service_cidr_networks,
    service_cluster_ips,
)
from telepresence.tunnel.messages import ClusterInfo

Obj = dict[str, Any]

POD_RESOLV_CONF = """\
# written by the kubelet
search ambassador.svc.cluster.local svc.cluster.local cluster.local
nameserver 10.96.0.10
options ndots:5
"""


# --- resolv.conf ------------------------------------------------------------------------------


def test_a_kubelet_resolv_conf() -> None:
    resolv = parse_resolv_conf(POD_RESOLV_CONF)
    assert resolv.nameservers == ("10.96.0.10",)
    assert resolv.search == ("ambassador.svc.cluster.local", "svc.cluster.local", "cluster.local")
    assert resolv.options == ("ndots:5",)
    assert dns_config(resolv, namespace="ambassador") == DnsConfig(
        cluster_domain="cluster.local", dns_server_ip="10.96.0.10"
    )


def test_comments_several_nameservers_and_the_last_search_line_wins() -> None:
    resolv = parse_resolv_conf(
        "; old style comment\n"
        "search a.example\n"
        "nameserver 10.0.0.10  # primary\n"
        "nameserver fd00::10\n"
        "\n"
        "domain corp.example.\n"
        "search ns.svc.k8s.example svc.k8s.example k8s.example\n"
    )
    assert resolv.nameservers == ("10.0.0.10", "fd00::10")
    assert resolv.search == ("ns.svc.k8s.example", "svc.k8s.example", "k8s.example")
    assert dns_config(resolv).dns_server_ip == "10.0.0.10"


@pytest.mark.parametrize(
    ("search", "namespace", "domain"),
    [
        (
            ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"],
            None,
            "cluster.local",
        ),
        (["ns.svc.corp.internal", "svc.corp.internal", "corp.internal"], "ns", "corp.internal"),
        # A namespace named "svc" must not fool it into "svc.cluster.local".
        (["svc.svc.cluster.local", "svc.cluster.local", "cluster.local"], None, "cluster.local"),
        (["svc.svc.cluster.local", "svc.cluster.local", "cluster.local"], "svc", "cluster.local"),
        # The node's own search domains follow the kubelet's.
        (["x.svc.k8s.local", "svc.k8s.local", "k8s.local", "ec2.internal"], "x", "k8s.local"),
        (["SVC.Cluster.Local."], None, "cluster.local"),
        ([], None, "cluster.local"),
        (["corp.example"], None, "cluster.local"),
    ],
)
def test_the_cluster_domain_comes_from_the_search_list(
    search: list[str], namespace: str | None, domain: str
) -> None:
    assert cluster_domain(search, namespace=namespace) == domain


def test_no_nameserver_means_no_dns_server_ip() -> None:
    assert dns_config(parse_resolv_conf("search svc.cluster.local\n")).dns_server_ip == ""


# --- the dry-run probe's error ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "cidrs"),
    [
        # Kubernetes 1.36 (what devcluster's API server answers).
        (
            'The Service "probe" is invalid: spec.clusterIPs: Invalid value: ["1.1.1.1"]: '
            "failed to allocate IP 1.1.1.1: the provided IP (1.1.1.1) is not in the valid "
            "range. The range of valid IPs is 10.96.0.0/16",
            ["10.96.0.0/16"],
        ),
        # Older servers.
        (
            'Service "tp-probe" is invalid: spec.clusterIPs: Invalid value: []string{"1.1.1.1"}: '
            "failed to allocated ip:1.1.1.1 with error:provided IP is not in the valid range. "
            "The range of valid IPs is 10.100.0.0/16",
            ["10.100.0.0/16"],
        ),
        (
            'spec.clusterIPs: Invalid value: []string{"2001:db8::fe"}: failed to allocate IP '
            "2001:db8::fe: the provided IP (2001:db8::fe) is not in the valid range. The range "
            "of valid IPs is fd00:10:96::/112",
            ["fd00:10:96::/112"],
        ),
        # Newer servers no longer print the range.
        (
            'The Service "probe" is invalid: spec.clusterIPs: Invalid value: ["1.1.1.1"]: '
            "failed to allocate IP 1.1.1.1: the provided IP (1.1.1.1) is not in the valid range",
            [],
        ),
        (
            'spec.clusterIPs[0]: Invalid value: "2001:db8::fe": IPv6 is not configured on this '
            "cluster",
            [],
        ),
        ("", []),
    ],
)
def test_the_service_range_in_the_probes_error(message: str, cidrs: list[str]) -> None:
    assert [str(n) for n in parse_service_range_error(message)] == cidrs


# --- fields of objects ------------------------------------------------------------------------


def test_fields_of_objects() -> None:
    assert service_cidr_networks({"spec": {"cidrs": ["10.96.0.0/16", "fd00::/108"]}}) == [
        ip_network("10.96.0.0/16"),
        ip_network("fd00::/108"),
    ]
    assert service_cluster_ips({"spec": {"clusterIP": "None", "clusterIPs": ["None"]}}) == []
    assert service_cluster_ips({"spec": {"type": "ExternalName", "externalName": "x.test"}}) == []
    assert service_cluster_ips({"spec": {"clusterIP": "10.96.0.1"}}) == [ip_network("10.96.0.1")]
    assert node_pod_cidrs({"spec": {"podCIDR": "10.244.1.0/24"}}) == [ip_network("10.244.1.0/24")]
    assert node_pod_cidrs({"spec": {}}) == []
    assert pod_ips({"spec": {}, "status": {"podIPs": [{"ip": "10.244.0.7"}]}}) == [
        ip_network("10.244.0.7")
    ]
    assert pod_ips({"spec": {}, "status": {}}) == []  # not scheduled yet
    host_network_pod = {"spec": {"hostNetwork": True}, "status": {"podIP": "192.0.2.1"}}
    assert pod_ips(host_network_pod) == []


# --- choosing and combining sources -----------------------------------------------------------


def test_the_best_available_source_wins() -> None:
    cidr = [ip_network("10.96.0.0/16")]
    probed = [ip_network("10.100.0.0/16")]
    assert choose_service_source(service_cidrs=cidr, probed=probed) is ServiceSource.SERVICE_CIDRS
    assert choose_service_source(service_cidrs=[], probed=probed) is ServiceSource.PROBE
    assert choose_service_source(service_cidrs=[], probed=[]) is ServiceSource.CLUSTER_IPS
    assert choose_pod_source(node_cidrs=[ip_network("10.244.0.0/24")]) is PodSource.NODE_CIDRS
    assert choose_pod_source(node_cidrs=[]) is PodSource.POD_IPS


DNS = DnsConfig(cluster_domain="cluster.local", dns_server_ip="10.96.0.10")


def named(name: str, spec: Obj, status: Obj | None = None, namespace: str = "") -> Obj:
    meta = {"name": name, "namespace": namespace} if namespace else {"name": name}
    return {"metadata": meta, "spec": spec, "status": status or {}}


def test_service_cidrs_and_node_cidrs_make_the_cluster_info() -> None:
    state = ClusterState(
        dns=DNS, service_source=ServiceSource.SERVICE_CIDRS, pod_source=PodSource.NODE_CIDRS
    )
    assert not state.ready
    state.service_cidrs.apply(
        Listed(items=(named("kubernetes", {"cidrs": ["10.96.0.0/16"]}),), resource_version="1")
    )
    assert not state.ready  # nodes not listed yet: no half answer
    state.nodes.apply(
        Listed(
            items=(
                named("n1", {"podCIDRs": ["10.244.0.0/24"]}),
                named("n2", {"podCIDRs": ["10.244.1.0/24"]}),
            ),
            resource_version="2",
        )
    )
    assert state.ready
    assert state.info() == ClusterInfo(
        service_subnets=("10.96.0.0/16",),
        pod_subnets=("10.244.0.0/23",),  # adjacent node ranges collapse
        cluster_domain="cluster.local",
        dns_server_ip="10.96.0.10",
    )
    state.nodes.apply(Changed("DELETED", named("n2", {})))
    state.service_cidrs.apply(Changed("ADDED", named("extra", {"cidrs": ["10.97.0.0/16"]})))
    info = state.info()
    assert info.pod_subnets == ("10.244.0.0/24",)
    assert info.service_subnets == ("10.96.0.0/15",)


def test_the_probe_result_is_used_as_is() -> None:
    state = ClusterState(
        dns=DNS,
        service_source=ServiceSource.PROBE,
        pod_source=PodSource.NODE_CIDRS,
        probed=[ip_network("10.100.0.0/16")],
    )
    state.nodes.apply(Listed(items=(), resource_version="1"))
    assert state.ready
    assert state.info().service_subnets == ("10.100.0.0/16",)
    assert state.info().pod_subnets == ()


def test_without_cidrs_observed_addresses_are_covered() -> None:
    state = ClusterState(
        dns=DNS, service_source=ServiceSource.CLUSTER_IPS, pod_source=PodSource.POD_IPS
    )
    state.cluster_ips.apply(
        Listed(
            items=(
                named("kubernetes", {"clusterIP": "10.96.0.1"}, namespace="default"),
                named("kube-dns", {"clusterIP": "10.96.0.10"}, namespace="kube-system"),
                named("headless", {"clusterIP": "None"}, namespace="default"),
            ),
            resource_version="1",
        )
    )
    state.pods.apply(
        Listed(
            items=(
                named("a", {}, {"podIP": "10.244.0.5"}, namespace="default"),
                named("b", {}, {"podIP": "10.244.3.9"}, namespace="default"),
                named("node-agent", {"hostNetwork": True}, {"podIP": "192.0.2.1"}, "kube-system"),
            ),
            resource_version="1",
        )
    )
    info = state.info()
    assert info.service_subnets == ("10.96.0.0/28",)
    assert info.pod_subnets == ("10.244.0.0/22",)
    # Same name in two namespaces: two rows, not one.
    state.cluster_ips.apply(
        Changed("ADDED", named("kube-dns", {"clusterIP": "10.96.9.9"}, namespace="x"))
    )
    assert state.info().service_subnets == ("10.96.0.0/20",)


def test_a_relist_replaces_everything_seen_before() -> None:
    table = Table(node_pod_cidrs)
    table.apply(Listed(items=(named("old", {"podCIDR": "10.1.0.0/24"}),), resource_version="1"))
    table.apply(Changed("ADDED", named("gone", {"podCIDR": "10.2.0.0/24"})))
    table.apply(Listed(items=(named("new", {"podCIDR": "10.3.0.0/24"}),), resource_version="9"))
    assert table.networks() == [ip_network("10.3.0.0/24")]
    table.apply(Changed("MODIFIED", named("new", {"podCIDR": "10.4.0.0/24"})))
    assert table.networks() == [ip_network("10.4.0.0/24")]
