"""Cluster names on laptops as they are: without systemd-resolved (plain), Ubuntu's
(resolv.conf names resolved's 127.0.0.53 stub) and Fedora's (glibc asks resolved over
varlink, no port-53 packet). A real systemd-resolved and dbus-daemon in the resolved
flavours; see docs/devcluster.md.

Every flavour: the seed's story, the FQDN, getent, dig and Python's getaddrinfo resolve
cluster names while connected; the laptop's own names before, during and after; and after
`quit`, and after kill -9 of every daemon and `quit`, `resolvectl status` and every file
are as before."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.test_outbound import (
    HELPER_PROCESS,
    TITLE,
    VENV_PYTHON,
    connect,
    curl,
    laptop_state,
    quit_,
)

FLAVOURS = ("plain", "resolved-stub", "resolved-nss")
SERVICE = "verylargejavaservice"
#: The plain laptop's nameserver, and resolved's upstream in the other flavours.
LAPTOP_RESOLVER = "198.51.100.53"


def _switch(cluster: Cluster, flavour: str) -> None:
    cluster.devcluster("laptop-dns", flavour)
    # One lookup first, so that resolved's "Current DNS Server" is already chosen when a
    # test takes its picture of the laptop.
    cluster.laptop("getent", "hosts", "www.example.test")


@pytest.fixture(scope="module", params=FLAVOURS)
def flavour(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    quit_(cluster)
    _switch(cluster, request.param)
    yield request.param
    quit_(cluster)
    _switch(cluster, "plain")


@pytest.fixture
def fedora(cluster: Cluster) -> Iterator[None]:
    quit_(cluster)
    was = cluster.devcluster("laptop-dns").stdout.strip()
    _switch(cluster, "resolved-nss")
    yield
    quit_(cluster)
    _switch(cluster, was)


@pytest.fixture(scope="module")
def svc_ip(cluster: Cluster) -> str:
    return str(cluster.get("service", SERVICE, "-n", "default")["spec"]["clusterIP"])


def _getent(cluster: Cluster, name: str) -> str | None:
    out = cluster.laptop("getent", "ahostsv4", name, check=False)
    return out.stdout.split()[0] if out.returncode == 0 and out.stdout else None


def _getaddrinfo(cluster: Cluster, name: str) -> str:
    code = f"import socket; print(socket.getaddrinfo({name!r}, 80, socket.AF_INET)[0][4][0])"
    return cluster.laptop(VENV_PYTHON, "-c", code).stdout.strip()


def _laptop_names_resolve(cluster: Cluster) -> None:
    """The laptop's own resolver's names, every way a program asks."""
    assert _getent(cluster, "www.example.test") == "198.51.100.2"
    assert _getaddrinfo(cluster, "www.example.test") == "198.51.100.2"
    assert cluster.laptop("dig", "+short", "www.example.test").stdout.strip() == "198.51.100.2"


def test_cluster_names_resolve_every_way_and_quit_restores_everything(
    cluster: Cluster, flavour: str, svc_ip: str
) -> None:
    before = laptop_state(cluster)
    _laptop_names_resolve(cluster)
    assert _getent(cluster, f"{SERVICE}.default") is None

    connect(cluster)
    status = json.loads(cluster.laptop("telepresence", "status", "-o", "json").stdout)
    dns = status["root_daemon"]["dns"]
    text = cluster.laptop("telepresence", "status").stdout
    if flavour == "plain":
        assert dns["mode"] == "redirect"
        assert dns["nameservers"] == [LAPTOP_RESOLVER]
    else:
        assert dns["mode"] == "resolved"
        assert "systemd-resolved" in text
        link = cluster.laptop("resolvectl", "status", "tel0").stdout
        assert "~cluster.local" in link and "~default" in link, link
        assert "-DefaultRoute" in link, link

    if flavour != "plain":
        # Non-cluster names never pass through us: none of their queries leaves by the TUN.
        cluster.laptop("nft", "-f", "-", root=True, input=_TUN_COUNTER)
        try:
            _laptop_names_resolve(cluster)
            assert _counted_packets(cluster) == 0
            assert _getent(cluster, f"{SERVICE}.default.svc.cluster.local") == svc_ip
            assert _counted_packets(cluster) > 0  # the counter counts
        finally:
            cluster.laptop("nft", "delete", "table", "inet", "tpcount", root=True, check=False)

    page = curl(cluster, f"{SERVICE}.default:8080")
    assert page.returncode == 0, page.stderr
    assert re.search(f"<title>{TITLE}</title>", page.stdout)
    for name in (
        f"{SERVICE}.default",
        f"{SERVICE}.default.svc",
        f"{SERVICE}.default.svc.cluster.local",
    ):
        assert _getent(cluster, name) == svc_ip, name
        assert _getaddrinfo(cluster, name) == svc_ip, name
        assert cluster.laptop("dig", "+short", name).stdout.strip() == svc_ip, name
        assert cluster.laptop("dig", "+short", "+tcp", name).stdout.strip() == svc_ip, name
    _laptop_names_resolve(cluster)

    quit_(cluster)
    assert laptop_state(cluster) == before
    _laptop_names_resolve(cluster)
    assert _getent(cluster, f"{SERVICE}.default") is None


@pytest.mark.parametrize("process", ["telepresence.daemon", HELPER_PROCESS, "every"])
def test_kill_9_then_quit_restores_resolved_and_every_file(
    cluster: Cluster, flavour: str, process: str
) -> None:
    before = laptop_state(cluster)
    connect(cluster)
    pattern = f"telepresence\\.daemon|{HELPER_PROCESS}" if process == "every" else process
    killed = cluster.laptop("pkill", "-9", "-f", pattern, root=True, check=False)
    assert killed.returncode == 0, f"no process matched {pattern}"
    quit_(cluster)
    wait_for(
        lambda: laptop_state(cluster) == before,
        timeout=30,
        what=f"the laptop ({flavour}) to be as before after kill -9 of {process} and quit",
    )
    _laptop_names_resolve(cluster)


_COUNTER = """
table inet tpcount {
    chain out {
        type filter hook output priority -400; policy accept;
        meta skuid != "systemd-resolve" udp dport 53 counter
        meta skuid != "systemd-resolve" tcp dport 53 counter
    }
}
"""


_TUN_COUNTER = """
table inet tpcount {
    chain out {
        type filter hook output priority -400; policy accept;
        oifname "tel0" udp dport 53 counter
        oifname "tel0" tcp dport 53 counter
    }
}
"""


def _counted_packets(cluster: Cluster) -> int:
    """Packets counted by the rules of the test's table `tpcount`."""
    out = cluster.laptop("nft", "-j", "list", "table", "inet", "tpcount", root=True).stdout
    rules = [i["rule"] for i in json.loads(out)["nftables"] if "rule" in i]
    return sum(e["counter"]["packets"] for r in rules for e in r["expr"] if "counter" in e)


def test_fedora_style_lookups_need_no_port_53_packet(
    cluster: Cluster, fedora: None, svc_ip: str
) -> None:
    """nss-resolve asks resolved over varlink: a port-53 redirect would never see these
    lookups, yet cluster names resolve, and no process but resolved sent a DNS packet."""
    connect(cluster, "--namespace", "default")
    cluster.laptop("nft", "-f", "-", root=True, input=_COUNTER)
    try:
        assert _getent(cluster, f"{SERVICE}.default") == svc_ip
        assert _getaddrinfo(cluster, f"{SERVICE}.default.svc.cluster.local") == svc_ip
        # A single label: resolved tries the link's search domain (connect --namespace).
        assert _getent(cluster, SERVICE) == svc_ip
        assert _counted_packets(cluster) == 0
        # The counter counts: a program asking a nameserver directly is seen.
        cluster.laptop("dig", "+short", "+tries=1", "+time=2", "www.example.test")
        assert _counted_packets(cluster) > 0
    finally:
        cluster.laptop("nft", "delete", "table", "inet", "tpcount", root=True, check=False)
