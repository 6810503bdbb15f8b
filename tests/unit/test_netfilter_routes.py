"""Parsing `ip -j route` output and rendering `ip -batch` input (no kernel needed)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, ip_network
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
