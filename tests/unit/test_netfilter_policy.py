"""What the root helper refuses, table-driven (pure: no root, no kernel)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network
from typing import Any

import pytest

from telepresence.netfilter import policy
from telepresence.netfilter.policy import Refused, host_refusal, plan_setup
from telepresence.netfilter.protocol import Setup
from telepresence.netfilter.routes import LaptopNetwork

GATEWAY = IPv4Address("192.168.1.1")
NETWORK = LaptopNetwork(
    routes=[
        (ip_network("0.0.0.0/0"), "wlan0"),
        (ip_network("192.168.1.0/24"), "wlan0"),
        (ip_network("10.8.0.0/16"), "wg0"),
        (ip_network("10.96.0.0/16"), "tel0"),  # our own, from an earlier UpdateSubnets
    ],
    gateways=[GATEWAY],
    rule_marks=[(0xCA6C, 0xFFFFFFFF)],  # wg-quick's
)
NAMESERVERS = [IPv4Address("198.51.100.53")]


def setup(**changes: Any) -> Setup:
    fields: dict[str, Any] = {
        "subnets": ["10.96.0.0/16", "10.244.0.0/16"],
        "api_server_ips": ["192.0.2.1"],
        "dns_redirect_port": 1053,
        "proxy_port": 1234,
    }
    fields.update(changes)
    return Setup(**fields)


def plan(request: Setup, network: LaptopNetwork = NETWORK) -> policy.Plan:
    return plan_setup(request, network=network, nameservers=NAMESERVERS)


def test_the_helper_chooses_names_address_mark_and_nameservers() -> None:
    p = plan(setup())
    assert (p.tun_name, p.tun_address) == ("tel0", IPv4Address("198.18.255.254"))
    assert (p.table.name, p.table.mark) == ("telepresence", policy.MARK)
    assert p.table.dns_servers == NAMESERVERS
    assert (p.table.dns_port, p.table.proxy_port) == (1053, 1234)
    assert p.routed(p.requested) == [IPv4Network("10.96.0.0/16"), IPv4Network("10.244.0.0/16")]


def test_in_resolved_mode_the_table_redirects_tcp_to_the_link_dns_address() -> None:
    p = plan_setup(setup(), network=NETWORK, nameservers=[], link_dns=policy.LINK_DNS_ADDRESS)
    assert p.table.link_dns == IPv4Address("198.18.255.253") and p.table.dns_servers == []
    # Next to the TUN's own address, and never the same.
    assert p.tun_address != policy.LINK_DNS_ADDRESS
    assert IPv4Network("198.18.0.0/15").supernet_of(IPv4Network(policy.LINK_DNS_ADDRESS))
    assert plan(setup()).table.link_dns is None  # redirect mode


def test_never_proxy_only_narrows() -> None:
    p = plan(setup(subnets=["10.96.0.0/30"], never_proxy=["10.96.0.2/32"]))
    assert p.routed(p.requested) == [IPv4Network("10.96.0.0/31"), IPv4Network("10.96.0.3/32")]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"subnets": ["0.0.0.0/0"]}, "default route"),
        ({"subnets": ["0.0.0.0/1", "128.0.0.0/1"]}, "wider than /8"),
        ({"subnets": ["128.0.0.0/1"]}, "wider than /8"),
        ({"subnets": ["192.168.0.0/16"]}, "covers 192.168.1.1, the laptop's default gateway"),
        ({"subnets": ["192.168.1.1/32"]}, "default gateway"),
        ({"subnets": ["127.0.0.0/8"]}, r"overlaps 127\.0\.0\.0/8 \(loopback\)"),
        ({"subnets": ["127.0.0.53/32"]}, "loopback"),
        ({"subnets": ["169.254.0.0/16"]}, "link-local"),
        ({"subnets": ["169.254.169.254/32"]}, "link-local"),
        ({"subnets": ["224.0.0.0/8"]}, "multicast"),
        ({"subnets": ["255.255.255.255/32"]}, "broadcast"),
        ({"subnets": ["0.0.0.0/8"]}, "this network"),
        ({"subnets": ["192.0.2.0/24"]}, "API server's address 192.0.2.1"),
        ({"subnets": ["10.96.0.0/16"], "api_server_ips": ["10.96.0.1"]}, "API server"),
        ({"subnets": ["10.8.0.0/15"]}, "10.8.0.0/15 overlaps route 10.8.0.0/16 on device wg0"),
        (
            {"subnets": ["10.8.0.0/15"], "allow_conflicting_subnets": ["10.9.0.0/16"]},
            "overlaps route 10.8.0.0/16",
        ),
        ({"allow_conflicting_subnets": ["0.0.0.0/0"]}, "refusing to allow conflicts"),
        ({"allow_conflicting_subnets": ["::/0"]}, "refusing to allow conflicts"),
        ({"allow_conflicting_subnets": ["127.0.0.0/8"]}, "loopback"),
        ({"subnets": ["10.96.0.5/16"]}, "host bits set"),
        ({"subnets": ["fd00::/8"]}, "IPv6"),
        ({"subnets": ["nonsense"]}, "invalid subnet"),
        ({"never_proxy": ["10.0.0.1/8"]}, "host bits set"),
        ({"api_server_ips": ["example.com"]}, "invalid API server address"),
        ({"proxy_port": 0}, "invalid proxy port"),
        ({"proxy_port": 22}, "invalid proxy port"),
        ({"dns_redirect_port": 70000}, "invalid DNS redirect port"),
    ],
)
def test_refused_setups_say_why_in_one_line(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(Refused, match=message) as info:
        plan(setup(**changes))
    assert "\n" not in str(info.value)


def test_a_conflict_is_allowed_only_inside_a_listed_cidr() -> None:
    p = plan(setup(subnets=["10.8.0.0/15"], allow_conflicting_subnets=["10.8.0.0/16"]))
    assert p.routed(p.requested) == [IPv4Network("10.8.0.0/15")]
    with pytest.raises(Refused, match=r"192\.168\.1\.0/24"):
        p.check_conflicts([IPv4Network("192.168.1.0/25")], NETWORK.routes)


def test_a_listed_conflict_never_allows_the_gateway() -> None:
    with pytest.raises(Refused, match="default gateway"):
        plan(setup(subnets=["192.168.1.0/24"], allow_conflicting_subnets=["192.168.1.0/24"]))


def test_a_mark_that_an_ip_rule_selects_is_refused() -> None:
    policy.check_mark_unused(NETWORK.rule_marks)
    with pytest.raises(Refused, match="matches telepresence's socket mark"):
        policy.check_mark_unused([(policy.MARK, 0xFFFF)])
    with pytest.raises(Refused):
        plan(setup(), LaptopNetwork(routes=[], gateways=[], rule_marks=[(0, 0)]))


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("203.0.113.2", None),
        ("192.0.2.1", "API server"),
        ("10.96.7.7", "never proxied"),
        ("10.244.0.9", None),
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("192.168.1.1", "default gateway"),
        ("10.8.0.5", "overlaps route 10.8.0.0/16"),
        ("2001:db8::1", "IPv6"),
        ("198.18.255.254", "the network helper's own address"),
        ("198.18.255.253", "the network helper's own address"),
    ],
)
def test_host_routes_skip_what_must_not_be_routed(address: str, reason: str | None) -> None:
    p = plan(setup(never_proxy=["10.96.7.0/24"]))
    found = host_refusal(ip_address(address), p, gateways=[GATEWAY], existing=NETWORK.routes)
    if reason is None:
        assert found is None
    else:
        assert found is not None and reason in found and found.startswith(address)


@pytest.mark.parametrize("mark", [policy.MARK])
def test_the_mark_avoids_common_tools_masks(mark: int) -> None:
    for mask in (0xC000, 0xFFFF0000, 0xFF0000, 0x0F00):
        assert mark & mask == 0
    assert mark != 0xCA6C


def test_later_requests_parse_subnets_and_addresses_as_setup_does() -> None:
    # UpdateSubnets and the host route requests use the same two functions as Setup.
    assert policy.parse_ipv4_subnets(["10.96.0.0/12", "10.244.0.5"]) == [
        IPv4Network("10.96.0.0/12"),
        IPv4Network("10.244.0.5/32"),
    ]
    with pytest.raises(Refused, match=r"subnet fd00::/64 is IPv6, .* leave it out"):
        policy.parse_ipv4_subnets(["10.96.0.0/12", "fd00::/64"])
    with pytest.raises(Refused, match="subnets: invalid subnet 'x'"):
        policy.parse_ipv4_subnets(["x"])
    assert policy.parse_addresses(["10.0.0.1", "fd00::1"], what="host address") == [
        ip_address("10.0.0.1"),
        ip_address("fd00::1"),
    ]
    with pytest.raises(Refused, match="invalid host address 'x': expected an IP address"):
        policy.parse_addresses(["10.0.0.1", "x"], what="host address")
