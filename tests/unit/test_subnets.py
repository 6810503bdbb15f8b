"""Table and property tests for subnet arithmetic."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telepresence.netfilter.subnets import (
    Conflict,
    IPAddress,
    IPNetwork,
    cover_addresses,
    find_conflicts,
    parse_cidr_list,
    routed_subnets,
)


def nets(*texts: str) -> list[IPNetwork]:
    return [ip_network(t) for t in texts]


def ips(*texts: str) -> list[IPAddress]:
    return [ip_address(t) for t in texts]


# --- routed_subnets ---------------------------------------------------------

ROUTED_CASES = [
    pytest.param(
        dict(service_cidrs=nets("10.96.0.0/12"), pod_cidrs=nets("10.244.0.0/16")),
        nets("10.96.0.0/12", "10.244.0.0/16"),
        id="service-and-pod",
    ),
    pytest.param(
        dict(service_cidrs=nets("10.244.0.0/16"), pod_cidrs=nets("10.96.0.0/12")),
        nets("10.96.0.0/12", "10.244.0.0/16"),
        id="sorted",
    ),
    pytest.param(
        dict(
            service_cidrs=nets("10.0.0.0/25", "10.0.0.0/25"),
            pod_cidrs=nets("10.0.0.128/25", "10.0.0.64/26"),
        ),
        nets("10.0.0.0/24"),
        id="adjacent-and-duplicates-collapse",
    ),
    pytest.param(
        dict(
            service_cidrs=nets("10.96.0.0/12"),
            pod_cidrs=nets("10.244.0.0/16"),
            also_proxy=nets("192.168.5.0/24", "10.100.0.0/16"),
        ),
        nets("10.96.0.0/12", "10.244.0.0/16", "192.168.5.0/24"),
        id="also-proxy-inside-and-outside",
    ),
    pytest.param(
        dict(
            service_cidrs=nets("10.0.0.0/24"),
            pod_cidrs=[],
            never_proxy=nets("10.0.0.0/26"),
        ),
        nets("10.0.0.64/26", "10.0.0.128/25"),
        id="never-proxy-splits",
    ),
    pytest.param(
        dict(
            service_cidrs=nets("10.0.0.0/24"),
            pod_cidrs=[],
            never_proxy=nets("10.0.0.0/8"),
        ),
        [],
        id="never-proxy-covers-all",
    ),
    pytest.param(
        dict(
            service_cidrs=nets("10.0.0.0/30"),
            pod_cidrs=[],
            api_server_ips=ips("10.0.0.1"),
        ),
        nets("10.0.0.0/32", "10.0.0.2/31"),
        id="api-server-hole",
    ),
    pytest.param(
        dict(
            service_cidrs=nets("10.96.0.0/12"),
            pod_cidrs=[],
            api_server_ips=ips("192.168.49.2", "fd00::1"),
        ),
        nets("10.96.0.0/12"),
        id="api-server-outside-is-noop",
    ),
    pytest.param(
        dict(
            service_cidrs=[],
            pod_cidrs=[],
            also_proxy=nets("0.0.0.0/0"),
            api_server_ips=ips("128.0.0.1"),
        ),
        nets(
            "0.0.0.0/2",
            "64.0.0.0/3",
            "96.0.0.0/4",
            "112.0.0.0/5",
            "120.0.0.0/6",
            "124.0.0.0/7",
            "126.0.0.0/8",
            "128.0.0.0/32",
            "128.0.0.2/31",
            "128.0.0.4/30",
            "128.0.0.8/29",
            "128.0.0.16/28",
            "128.0.0.32/27",
            "128.0.0.64/26",
            "128.0.0.128/25",
            "128.0.1.0/24",
            "128.0.2.0/23",
            "128.0.4.0/22",
            "128.0.8.0/21",
            "128.0.16.0/20",
            "128.0.32.0/19",
            "128.0.64.0/18",
            "128.0.128.0/17",
            "128.1.0.0/16",
            "128.2.0.0/15",
            "128.4.0.0/14",
            "128.8.0.0/13",
            "128.16.0.0/12",
            "128.32.0.0/11",
            "128.64.0.0/10",
            "128.128.0.0/9",
            "129.0.0.0/8",
            "130.0.0.0/7",
            "132.0.0.0/6",
            "136.0.0.0/5",
            "144.0.0.0/4",
            "160.0.0.0/3",
            "192.0.0.0/2",
        ),
        id="everything-minus-loopback-and-api-server",
    ),
    pytest.param(
        dict(service_cidrs=[], pod_cidrs=nets("127.0.0.0/8", "::1/128")),
        [],
        id="loopback-never-routed",
    ),
    pytest.param(
        dict(service_cidrs=nets("fd00:10:96::/112"), pod_cidrs=[], also_proxy=nets("::/126")),
        nets("::/128", "::2/127", "fd00:10:96::/112"),
        id="ipv6-loopback-hole",
    ),
    pytest.param(
        dict(
            service_cidrs=nets("fd00:10:96::/112"),
            pod_cidrs=nets("10.244.0.0/16"),
            api_server_ips=ips("fd00:10:96::1"),
        ),
        nets(
            "10.244.0.0/16",
            "fd00:10:96::/128",
            *(f"fd00:10:96::{1 << i:x}/{128 - i}" for i in range(1, 16)),
        ),
        id="ipv6-api-server-hole-and-v4-first",
    ),
    pytest.param(
        dict(
            service_cidrs=nets("10.0.0.0/24"),
            pod_cidrs=[],
            never_proxy=nets("fd00::/8"),
        ),
        nets("10.0.0.0/24"),
        id="other-family-never-proxy-is-noop",
    ),
    pytest.param(dict(service_cidrs=[], pod_cidrs=[]), [], id="empty"),
]


@pytest.mark.parametrize(("kwargs", "expected"), ROUTED_CASES)
def test_routed_subnets_table(kwargs: dict[str, object], expected: list[IPNetwork]) -> None:
    assert routed_subnets(**kwargs) == expected  # type: ignore[arg-type]


def test_routed_subnets_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        routed_subnets([], [])  # type: ignore[call-arg]


# Small universes make random networks overlap often and let us enumerate
# every address: one ordinary IPv4 block, the start of loopback, one ordinary
# IPv6 block and the block around ::1.
_UNIVERSES: list[IPNetwork] = nets("10.0.0.0/24", "127.0.0.0/24", "fd00::/120", "::/120")
_EVERY_ADDRESS: list[IPAddress] = [a for u in _UNIVERSES for a in u]
_LOOPBACK = nets("127.0.0.0/8", "::1/128")


@st.composite
def _network(draw: st.DrawFn) -> IPNetwork:
    universe = draw(st.sampled_from(_UNIVERSES))
    prefix = draw(st.integers(universe.prefixlen, universe.max_prefixlen))
    offset = draw(st.integers(0, universe.num_addresses - 1))
    addr = int(universe.network_address) + offset
    return type(universe)((addr, prefix), strict=False)


_NETS = st.lists(_network(), max_size=4)
_ADDRS = st.lists(
    st.sampled_from(_UNIVERSES).flatmap(
        lambda u: st.integers(0, u.num_addresses - 1).map(lambda i: u.network_address + i)
    ),
    max_size=3,
)
_PROPS = settings(max_examples=60, deadline=None)


def _covered(addr: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    return any(addr in n for n in networks if n.version == addr.version)


@_PROPS
@given(service=_NETS, pod=_NETS, also=_NETS, never=_NETS, api=_ADDRS)
def test_routed_subnets_is_exact_set_difference(
    service: list[IPNetwork],
    pod: list[IPNetwork],
    also: list[IPNetwork],
    never: list[IPNetwork],
    api: list[IPAddress],
) -> None:
    result = routed_subnets(
        service_cidrs=service,
        pod_cidrs=pod,
        also_proxy=also,
        never_proxy=never,
        api_server_ips=api,
    )
    union = [*service, *pod, *also]
    removed = [*never, *(ip_network(a) for a in api), *_LOOPBACK]
    for addr in _EVERY_ADDRESS:
        wanted = _covered(addr, union) and not _covered(addr, removed)
        assert _covered(addr, result) == wanted, addr
    # Minimal (nothing left to collapse), disjoint and sorted.
    assert routed_subnets(service_cidrs=result, pod_cidrs=[]) == result
    for a, b in itertools.pairwise(result):
        assert (a.version, a.network_address) < (b.version, b.network_address)
        if a.version == b.version:
            assert not a.overlaps(b)


@pytest.mark.timeout(60)
def test_thousands_of_holes_are_subtracted_quickly() -> None:
    # Found by review of the helper fuzzer's target: every hole was tried against every
    # piece, so 4096 never-proxy addresses in a /8 (a Setup within the 64 KiB request
    # limit) kept the root helper busy for minutes. Now a second or two.
    holes = [IPv4Network((0x0A000000 + i * 4093, 32)) for i in range(4096)]
    result = routed_subnets(service_cidrs=nets("10.0.0.0/8"), pod_cidrs=[], never_proxy=holes)
    assert sum(n.num_addresses for n in result) == 2**24 - len(holes)
    for hole in holes[::256]:
        assert not any(hole.overlaps(n) for n in result)


# --- cover_addresses --------------------------------------------------------

COVER_CASES = [
    pytest.param([], {}, [], id="nothing"),
    pytest.param(ips("10.96.0.1"), {}, nets("10.96.0.1/32"), id="single"),
    pytest.param(ips("10.96.0.1", "10.96.0.1"), {}, nets("10.96.0.1/32"), id="duplicate"),
    pytest.param(ips("10.96.0.1", "10.96.0.10"), {}, nets("10.96.0.0/28"), id="same-block"),
    pytest.param(ips("10.244.2.7", "10.244.1.5"), {}, nets("10.244.0.0/22"), id="pods"),
    pytest.param(ips("10.96.0.0", "10.96.255.255"), {}, nets("10.96.0.0/16"), id="whole-group"),
    pytest.param(
        ips("10.97.0.1", "10.96.0.1"),
        {},
        nets("10.96.0.1/32", "10.97.0.1/32"),
        id="two-groups-never-merged",
    ),
    pytest.param(
        ips("10.97.0.1", "10.96.0.1"),
        {"v4_group_prefix": 8},
        nets("10.96.0.0/15"),
        id="wider-groups",
    ),
    pytest.param(
        ips("fd00::1", "fd00::2", "10.0.0.1"),
        {},
        nets("10.0.0.1/32", "fd00::/126"),
        id="mixed-families",
    ),
    pytest.param(ips("::5"), {}, nets("::5/128"), id="small-ipv6-stays-ipv6"),
    pytest.param(
        ips("fd00::1", "fd00:0:0:1::1"),
        {},
        nets("fd00::1/128", "fd00:0:0:1::1/128"),
        id="ipv6-groups-are-64",
    ),
    pytest.param(
        ips("fd00::1", "fd00:0:0:1::1"),
        {"v6_group_prefix": 48},
        nets("fd00::/63"),
        id="ipv6-wider-groups",
    ),
]


@pytest.mark.parametrize(("addrs", "kwargs", "expected"), COVER_CASES)
def test_cover_addresses_table(
    addrs: list[IPAddress], kwargs: dict[str, int], expected: list[IPNetwork]
) -> None:
    assert cover_addresses(addrs, **kwargs) == expected


@pytest.mark.parametrize("kwargs", [{"v4_group_prefix": 33}, {"v6_group_prefix": -1}])
def test_cover_addresses_rejects_bad_prefix(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="group_prefix"):
        cover_addresses([], **kwargs)


_ANY_V4 = st.integers(0, 2**32 - 1).map(IPv4Address)
# Clustered addresses, so that groups hold several of them.
_CLUSTERED_V4 = st.integers(0, 3).flatmap(
    lambda hi: st.integers(0, 2**17 - 1).map(lambda lo: IPv4Address((10 << 24) + (hi << 22) + lo))
)
_ANY_V6 = st.integers(0, 2**128 - 1).map(IPv6Address)
_COVER_ADDRS = st.lists(st.one_of(_ANY_V4, _CLUSTERED_V4, _ANY_V6), max_size=12)


@_PROPS
@given(addrs=_COVER_ADDRS, v4=st.integers(8, 32), v6=st.integers(32, 128))
def test_cover_addresses_properties(addrs: list[IPAddress], v4: int, v6: int) -> None:
    result = cover_addresses(addrs, v4_group_prefix=v4, v6_group_prefix=v6)
    # Every observed address is covered.
    for addr in addrs:
        assert _covered(addr, result)
    for net in result:
        inside = [a for a in addrs if a.version == net.version and a in net]
        # Never broader than one group, and never claims a block for nothing.
        assert net.prefixlen >= (v4 if net.version == 4 else v6)
        assert inside
        # Smallest: either a host route or both halves hold an observed address.
        if net.prefixlen < net.max_prefixlen:
            low, high = net.subnets()
            assert any(a in low for a in inside) and any(a in high for a in inside)
    # Disjoint and sorted.
    for a, b in itertools.pairwise(result):
        assert (a.version, a.network_address) < (b.version, b.network_address)
        if a.version == b.version:
            assert not a.overlaps(b)


# --- find_conflicts ---------------------------------------------------------

ROUTES = [
    (ip_network("0.0.0.0/0"), "en0"),
    (ip_network("0.0.0.0/1"), "utun4"),
    (ip_network("128.0.0.0/1"), "utun4"),
    (ip_network("::/0"), "en0"),
    (ip_network("127.0.0.0/8"), "lo0"),
    (ip_network("169.254.0.0/16"), "en0"),
    (ip_network("224.0.0.0/4"), "en0"),
    (ip_network("255.255.255.255/32"), "en0"),
    (ip_network("fe80::/64"), "en0"),
    (ip_network("ff00::/8"), "en0"),
    (ip_network("192.168.1.0/24"), "en0"),
    (ip_network("10.96.0.0/12"), "tel0"),
]


@pytest.mark.parametrize(
    ("subnets", "extra_routes", "expected"),
    [
        pytest.param(nets("10.96.0.0/12"), [], [], id="only-ignorable-routes"),
        pytest.param(
            nets(
                "0.0.0.0/1", "169.254.0.0/16", "192.0.0.0/8", "224.0.0.0/3", "fe80::/10", "ff00::/8"
            ),
            [],
            [("192.0.0.0/8", "192.168.1.0/24", "en0")],
            id="default-loopback-linklocal-multicast-ignored",
        ),
        pytest.param(
            nets("10.96.0.0/12"),
            [(ip_network("10.100.0.0/16"), "en0")],
            [("10.96.0.0/12", "10.100.0.0/16", "en0")],
            id="laptop-route-more-specific",
        ),
        pytest.param(
            nets("10.96.0.0/12"),
            [(ip_network("10.0.0.0/8"), "utun3")],
            [("10.96.0.0/12", "10.0.0.0/8", "utun3")],
            id="laptop-route-less-specific",
        ),
        pytest.param(
            nets("10.96.0.0/12"),
            [(ip_network("10.96.0.0/12"), "docker0")],
            [("10.96.0.0/12", "10.96.0.0/12", "docker0")],
            id="identical",
        ),
        pytest.param(
            nets("10.96.0.0/12"),
            [(ip_network("10.112.0.0/12"), "en0"), (ip_network("fd00::/8"), "en0")],
            [],
            id="adjacent-and-other-family",
        ),
        pytest.param(
            nets("fd00:10:96::/112", "10.244.0.0/16"),
            [
                (ip_network("fd00::/8"), "utun3"),
                (ip_network("10.244.3.0/24"), "br-1"),
                (ip_network("10.244.3.0/24"), "br-0"),
                (ip_network("10.244.0.0/24"), "br-2"),
            ],
            [
                ("10.244.0.0/16", "10.244.0.0/24", "br-2"),
                ("10.244.0.0/16", "10.244.3.0/24", "br-0"),
                ("10.244.0.0/16", "10.244.3.0/24", "br-1"),
                ("fd00:10:96::/112", "fd00::/8", "utun3"),
            ],
            id="several-sorted",
        ),
    ],
)
def test_find_conflicts_table(
    subnets: list[IPNetwork],
    extra_routes: list[tuple[IPNetwork, str]],
    expected: list[tuple[str, str, str]],
) -> None:
    got = find_conflicts(subnets, [*ROUTES, *extra_routes], own_device="tel0")
    assert [(str(c.subnet), str(c.route), c.device) for c in got] == expected


def test_find_conflicts_own_device_only_when_given() -> None:
    routes = [(ip_network("10.96.0.0/12"), "tel0")]
    assert find_conflicts(nets("10.96.0.0/12"), routes, own_device="tel0") == []
    assert len(find_conflicts(nets("10.96.0.0/12"), routes)) == 1


@pytest.mark.parametrize(
    ("subnet", "route", "fragments"),
    [
        pytest.param(
            "10.96.0.0/12",
            "10.100.0.0/16",
            [
                "cluster subnet 10.96.0.0/12",
                "route 10.100.0.0/16",
                "device en0",
                "laptop's route wins",
                "--never-proxy 10.100.0.0/16",
                "--allow-conflicting-subnets 10.100.0.0/16",
            ],
            id="laptop-wins",
        ),
        pytest.param(
            "10.96.0.0/12",
            "10.0.0.0/8",
            [
                "route 10.0.0.0/8",
                "ours wins",
                "no longer be reachable via en0",
                "--never-proxy 10.96.0.0/12",
                "--allow-conflicting-subnets 10.96.0.0/12",
            ],
            id="ours-wins",
        ),
        pytest.param("10.96.0.0/12", "10.96.0.0/12", ["route metrics"], id="tie"),
    ],
)
def test_conflict_message(subnet: str, route: str, fragments: list[str]) -> None:
    conflict = Conflict(subnet=ip_network(subnet), route=ip_network(route), device="en0")
    message = conflict.message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


# --- parse_cidr_list --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.0/8,192.168.1.5", nets("10.0.0.0/8", "192.168.1.5/32")),
        (" 10.0.0.0/8 , fd00::/8 ", nets("10.0.0.0/8", "fd00::/8")),
        ("fd00::1", nets("fd00::1/128")),
        ("192.168.1.5/32", nets("192.168.1.5/32")),
        ("0.0.0.0/0", nets("0.0.0.0/0")),
        ("10.0.0.0/8,10.0.0.0/8", nets("10.0.0.0/8", "10.0.0.0/8")),
        ("", []),
        ("   ", []),
    ],
)
def test_parse_cidr_list(text: str, expected: list[IPNetwork]) -> None:
    assert parse_cidr_list(text) == expected


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("10.0.0.0/8,foo", ["'foo'", "expected an IP address", "or a CIDR"]),
        ("10.0.0.5/8", ["'10.0.0.5/8'", "host bits", "did you mean 10.0.0.0/8"]),
        ("10.0.0.0/33", ["'10.0.0.0/33'", "expected"]),
        ("1.2.3.4/8/9", ["'1.2.3.4/8/9'", "expected"]),
        ("10.0.0.0/8,,fd00::/8", ["empty subnet", "separated by commas"]),
        ("10.0.0.0/8,", ["empty subnet"]),
        ("fe80::1%en0", ["'fe80::1%en0'", "zone"]),
        ("10.0.0.0/8 192.168.0.0/16", ["'10.0.0.0/8 192.168.0.0/16'", "expected"]),
        ("01.2.3.4", ["'01.2.3.4'", "expected"]),
    ],
)
def test_parse_cidr_list_errors(text: str, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        parse_cidr_list(text)
    for fragment in fragments:
        assert fragment in str(info.value)


@_PROPS
@given(st.lists(_network(), min_size=1, max_size=5))
def test_parse_cidr_list_round_trips(networks: list[IPNetwork]) -> None:
    assert parse_cidr_list(",".join(map(str, networks))) == networks
    assert parse_cidr_list(",".join(str(n.network_address) for n in networks)) == [
        ip_network(n.network_address) for n in networks
    ]


def test_types_exported() -> None:
    assert isinstance(parse_cidr_list("10.0.0.0/8")[0], IPv4Network)
    assert isinstance(parse_cidr_list("::/0")[0], IPv6Network)
