"""IPv4/UDP packet parsing and building for the TUN."""

from __future__ import annotations

from ipaddress import IPv4Address

from hypothesis import given, settings
from hypothesis import strategies as st

from telepresence.daemon.packets import Datagram, build, checksum, parse

addresses = st.integers(min_value=1, max_value=2**32 - 2).map(IPv4Address)
ports = st.integers(min_value=1, max_value=65535)


@settings(max_examples=200)
@given(addresses, ports, addresses, ports, st.binary(max_size=1500))
def test_build_then_parse_round_trips_with_a_valid_header_checksum(
    src: IPv4Address, sport: int, dst: IPv4Address, dport: int, payload: bytes
) -> None:
    d = Datagram(src, sport, dst, dport, payload)
    packet = build(d, ident=7)
    assert parse(packet) == d
    assert checksum(packet[:20]) == 0  # a valid IPv4 header sums to zero
    assert packet[26:28] == b"\0\0"  # no UDP checksum, which IPv4 allows


def test_a_known_packet() -> None:
    d = Datagram(IPv4Address("10.0.0.1"), 5353, IPv4Address("10.96.0.10"), 53, b"hi")
    packet = build(d)
    assert packet[:4] == bytes.fromhex("4500001e")
    assert packet[9] == 17
    assert packet[20:24] == bytes.fromhex("14e90035")


def test_non_udp_fragments_and_garbage_are_ignored() -> None:
    d = build(Datagram(IPv4Address("10.0.0.1"), 1, IPv4Address("10.0.0.2"), 2, b"x"))
    tcp = d[:9] + bytes([6]) + d[10:]
    assert parse(tcp) is None
    fragment = d[:6] + bytes([0x20, 0]) + d[8:]
    assert parse(fragment) is None
    assert parse(b"\x60" + d[1:]) is None  # IPv6 version nibble
    assert parse(d[:25]) is None
    assert parse(b"") is None
