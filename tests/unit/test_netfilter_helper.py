"""The helper's request validation and routing policy (pure: no root, no kernel)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, ip_network
from typing import Any

import pytest

from telepresence.netfilter.helper import SetupError, plan_setup
from telepresence.netfilter.protocol import Setup

LAPTOP_ROUTES = [
    (ip_network("0.0.0.0/0"), "wlan0"),
    (ip_network("192.168.1.0/24"), "wlan0"),
    (ip_network("10.8.0.0/16"), "wg0"),
    (ip_network("10.96.0.0/16"), "tel0"),  # our own, from an earlier UpdateSubnets
]


def setup(**changes: Any) -> Setup:
    fields: dict[str, Any] = {
        "subnets": ["10.96.0.0/16", "10.244.0.0/16"],
        "dns_nameservers": ["198.51.100.53"],
        "api_server_ips": ["10.96.0.1"],
        "dns_redirect_port": 1053,
        "proxy_port": 1234,
        "mark": 0x7E1E,
    }
    fields.update(changes)
    return Setup(**fields)


def test_a_good_setup_is_planned() -> None:
    plan = plan_setup(setup())
    assert plan.tun_name == "tel0" and plan.tun_address == IPv4Address("198.18.255.254")
    assert plan.table.dns_servers == [IPv4Address("198.51.100.53")]
    assert (plan.table.dns_port, plan.table.proxy_port, plan.table.mark) == (1053, 1234, 0x7E1E)


def test_the_api_server_never_proxy_and_loopback_are_never_routed() -> None:
    plan = plan_setup(setup(subnets=["10.96.0.0/30", "127.0.0.0/8"], never_proxy=["10.96.0.2/32"]))
    routed = plan.routed(plan.requested)
    assert IPv4Network("10.96.0.1/32") not in routed and IPv4Network("10.96.0.2/32") not in routed
    assert routed == [IPv4Network("10.96.0.0/32"), IPv4Network("10.96.0.3/32")]


def test_a_conflict_names_the_fix_and_our_own_routes_do_not_count() -> None:
    plan = plan_setup(setup(subnets=["10.96.0.0/16", "10.8.0.0/15"]))
    with pytest.raises(SetupError) as info:
        plan.check_conflicts(plan.routed(plan.requested), LAPTOP_ROUTES)
    message = str(info.value)
    assert "10.8.0.0/15 overlaps route 10.8.0.0/16 on device wg0" in message
    assert "--never-proxy 10.8.0.0/16" in message and "\n" not in message
    plan.check_conflicts([IPv4Network("10.96.0.0/16")], LAPTOP_ROUTES)


def test_conflicts_can_be_allowed_wholesale_or_per_subnet() -> None:
    nets = [IPv4Network("10.8.0.0/15"), IPv4Network("192.168.1.0/24")]
    plan_setup(setup(allow_conflicting=True)).check_conflicts(nets, LAPTOP_ROUTES)
    partly = plan_setup(setup(allow_conflicting_subnets=["10.8.0.0/16"]))
    with pytest.raises(SetupError, match=r"192\.168\.1\.0/24"):
        partly.check_conflicts(nets, LAPTOP_ROUTES)
    partly.check_conflicts(nets[:1], LAPTOP_ROUTES)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"subnets": ["10.96.0.5/16"]}, "host bits set"),
        ({"subnets": ["fd00::/8"]}, "IPv6"),
        ({"subnets": ["nonsense"]}, "invalid subnet"),
        ({"dns_nameservers": ["example.com"]}, "invalid DNS nameserver"),
        ({"api_server_ips": ["::1"]}, "IPv6"),
        ({"tun_address": "10.0.0.0/8"}, "invalid TUN address"),
        ({"mark": 0}, "invalid mark"),
        ({"mark": 2**32}, "invalid mark"),
        ({"proxy_port": 0}, "invalid proxy port"),
        ({"dns_redirect_port": 70000}, "invalid DNS redirect port"),
        ({"tun_name": "x" * 16}, "invalid TUN device name"),
        ({"nft_table": "a;b"}, "invalid nftables table name"),
        ({"never_proxy": ["10.0.0.1/8"]}, "host bits set"),
    ],
)
def test_bad_input_is_one_line_that_says_what_is_wrong(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(SetupError, match=message) as info:
        plan_setup(setup(**changes))
    assert "\n" not in str(info.value)
