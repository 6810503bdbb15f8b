"""Parsing `ip -j route` output and rendering `ip -batch` input (no kernel needed)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, ip_network
from pathlib import Path
from typing import Any

import pytest

from telepresence.netfilter.routes import parse_routes, render_route_batch
from telepresence.netfilter.tun import validate_tun_name

# Trimmed from the devcluster laptop namespace, plus a WireGuard-style policy table.
IPV4_ROUTES: list[dict[str, Any]] = [
    {"dst": "default", "gateway": "192.168.1.1", "dev": "wlan0", "flags": []},
    {"dst": "192.0.2.1", "gateway": "198.51.100.1", "dev": "eth0", "flags": []},
    {"dst": "198.51.100.0/30", "dev": "eth0", "protocol": "kernel", "scope": "link"},
    {"dst": "10.8.0.0/16", "dev": "wg0", "table": "51820"},
    {"type": "local", "dst": "127.0.0.0/8", "dev": "lo", "table": "local"},
    {"type": "broadcast", "dst": "198.51.100.3", "dev": "eth0", "table": "local"},
    {"type": "unreachable", "dst": "10.9.0.0/16", "flags": []},
    {"type": "blackhole", "dst": "10.10.0.0/16", "flags": []},
]


def test_unicast_routes_of_every_table_but_local() -> None:
    assert parse_routes(IPV4_ROUTES, family=4) == [
        (ip_network("0.0.0.0/0"), "wlan0"),
        (ip_network("192.0.2.1/32"), "eth0"),
        (ip_network("198.51.100.0/30"), "eth0"),
        (ip_network("10.8.0.0/16"), "wg0"),
    ]


def test_ipv6_default_and_routes() -> None:
    routes = [
        {"dst": "default", "dev": "wg0"},
        {"dst": "fe80::/64", "dev": "eth0"},
        {"type": "multicast", "dst": "ff00::/8", "dev": "eth0", "table": "local"},
    ]
    assert parse_routes(routes, family=6) == [
        (ip_network("::/0"), "wg0"),
        (ip_network("fe80::/64"), "eth0"),
    ]


def test_route_batch() -> None:
    nets = [IPv4Network("10.96.0.0/16"), IPv4Network("203.0.113.2/32")]
    src = IPv4Address("198.18.255.254")
    assert render_route_batch("add", device="tel0", networks=nets, source=src) == (
        "route add 10.96.0.0/16 dev tel0 src 198.18.255.254\n"
        "route add 203.0.113.2/32 dev tel0 src 198.18.255.254\n"
    )
    assert render_route_batch("del", device="tel0", networks=nets[:1], source=src) == (
        "route del 10.96.0.0/16 dev tel0\n"
    )
    with pytest.raises(ValueError):
        render_route_batch("flush", device="tel0", networks=nets, source=src)


@pytest.mark.parametrize("name", ["tel0", "tp_e2e-0", "a.b", "x" * 15])
def test_valid_tun_names(name: str) -> None:
    assert validate_tun_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 16, "a/b", "a b", "a:0", ".", "..", "-x"])
def test_invalid_tun_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid TUN device name"):
        validate_tun_name(name)


def test_default_gateways_in_every_table_and_of_the_vpn_pair() -> None:
    from telepresence.netfilter.routes import parse_gateways

    routes = [
        {"dst": "default", "gateway": "192.168.1.1", "dev": "wlan0"},
        {"dst": "default", "gateway": "10.0.0.1", "dev": "eth0", "table": "100"},
        {"dst": "0.0.0.0/1", "gateway": "10.8.0.1", "dev": "tun0"},
        {"dst": "default", "nexthops": [{"gateway": "172.16.0.1"}, {"gateway": "fe80::1"}]},
        {"dst": "192.168.1.0/24", "dev": "wlan0"},
    ]
    assert parse_gateways(routes) == [
        IPv4Address(a) for a in ("192.168.1.1", "10.0.0.1", "10.8.0.1", "172.16.0.1")
    ]


def test_rule_marks() -> None:
    from telepresence.netfilter.routes import parse_rule_marks

    rules = [
        {"priority": 0, "src": "all", "table": "local"},
        {"priority": 32764, "not": None, "fwmark": "0xca6c", "table": "51820"},
        {"priority": 5270, "fwmark": "0x80000", "fwmask": "0xff0000", "table": "52"},
    ]
    assert parse_rule_marks(rules) == [(0xCA6C, 0xFFFFFFFF), (0x80000, 0xFF0000)]


def test_ip_is_found_by_absolute_path_only(tmp_path: Path) -> None:
    import os

    from telepresence.netfilter.routes import IP_CANDIDATES, IpError, find_ip

    assert IP_CANDIDATES == ("/usr/sbin/ip", "/sbin/ip")
    fake = tmp_path / "ip"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o777)
    with pytest.raises(IpError, match="install it"):
        find_ip([str(tmp_path / "missing"), str(fake)])  # not root's, or world-writable
    if os.path.exists("/usr/sbin/ip") or os.path.exists("/sbin/ip"):
        assert find_ip() in IP_CANDIDATES
