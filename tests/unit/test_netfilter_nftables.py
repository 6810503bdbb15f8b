"""Rendering of the helper's nftables table and set updates (no kernel needed)."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Network

import pytest

from telepresence.netfilter.nftables import (
    TableConfig,
    render_create,
    render_delete,
    render_dns_redirects,
    render_nameservers,
    render_set_update,
    validate_table_name,
)

#: What every redirect rule says before its port: the connection is marked, then redirected.
REDIRECT = "ct mark set ct mark or 0x00007e1e redirect to"
CONFIG = TableConfig(
    name="telepresence",
    mark=0x7E1E,
    proxy_port=1234,
    dns_port=1053,
    dns_servers=[IPv4Address("198.51.100.53")],
    routed=[IPv4Network("10.96.0.0/16"), IPv4Network("10.244.0.0/16")],
)


def test_table_is_created_owned_and_failing_if_it_exists() -> None:
    text = render_create(CONFIG)
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0] == "create table ip telepresence { flags owner; }"
    # The block repeats the flag: without it, the kernel would be asked to clear it.
    assert lines[1:3] == ["table ip telepresence {", "flags owner"]


def test_marked_packets_return_before_any_redirect() -> None:
    text = render_create(CONFIG)
    for chain in ("dns", "proxy"):
        body = text.split(f"chain {chain} {{", 1)[1].split("}", 1)[0]
        rules = [line.strip() for line in body.splitlines() if line.strip()]
        assert rules[0] == "type nat hook output priority -100; policy accept;"
        assert rules[1] == "meta mark 0x00007e1e return"


def test_dns_to_the_nameservers_is_redirected_over_udp_and_tcp() -> None:
    text = render_create(CONFIG)
    assert "elements = { 198.51.100.53 }" in text
    assert f"ip daddr @dns_servers udp dport 53 {REDIRECT} :1053" in text
    assert f"ip daddr @dns_servers tcp dport 53 {REDIRECT} :1053" in text


def _rules(text: str, chain: str) -> list[str]:
    body = text.split(f"chain {chain} {{", 1)[1].split("\n\t}", 1)[0]
    return [line.strip() for line in body.splitlines() if line.strip()]


def test_redirected_queries_and_their_answers_have_a_conntrack_zone_of_their_own() -> None:
    """Set before conntrack (raw priority) on both directions: the query to a nameserver
    and the daemon's answer from 127.0.0.1; the daemon's own marked queries stay out."""
    assert _rules(render_create(CONFIG), "dns_zone") == [
        "type filter hook output priority -300; policy accept;",
        "meta mark 0x00007e1e return",
        "ip daddr @dns_servers meta l4proto { tcp, udp } th dport 53 ct zone set 4212",
        "ip saddr 127.0.0.1 meta l4proto { tcp, udp } th sport 1053 ct zone set 4212",
    ]
    assert _rules(render_create(RESOLVED_MODE), "dns_zone")[-1] == (
        "ip daddr 198.18.255.253 tcp dport 53 ct zone set 4212"
    )


def test_every_redirect_marks_its_connection_for_teardown() -> None:
    text = render_create(RESOLVED_MODE)
    redirects = [r for c in ("dns", "proxy") for r in _rules(text, c) if "redirect" in r]
    assert len(redirects) == 5  # udp and tcp to the set, tcp to the link address, proxy x2
    assert all("ct mark set ct mark or 0x00007e1e redirect to" in r for r in redirects)


def test_only_tcp_to_routed_addresses_goes_to_the_proxy() -> None:
    text = render_create(CONFIG)
    assert "elements = { 10.96.0.0/16, 10.244.0.0/16 }" in text
    assert f"ip daddr @routed meta l4proto tcp {REDIRECT} :1234" in text
    assert f"ip daddr @hosts meta l4proto tcp {REDIRECT} :1234" in text
    assert "udp" not in text.split("chain proxy", 1)[1]


def test_no_nameservers_yet_still_makes_an_empty_set_for_later_changes() -> None:
    text = render_create(
        TableConfig(name="t", mark=1, proxy_port=1, dns_port=2, dns_servers=[], routed=[])
    )
    # The chain exists with an empty set (matching nothing), so a nameserver that
    # appears in resolv.conf later is one element update, not a new chain.
    assert "set dns_servers {" in text and "chain dns {" in text
    assert "elements" not in text


def test_a_changed_nameserver_set_is_one_flush_and_add() -> None:
    old = [IPv4Address("198.51.100.53"), IPv4Address("198.51.100.54")]
    new = [IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2")]
    before = render_create(
        TableConfig(name="telepresence", mark=1, proxy_port=1, dns_port=2, dns_servers=old,
                    routed=[])
    )  # fmt: skip
    assert "elements = { 198.51.100.53, 198.51.100.54 }" in before
    text = render_nameservers(table="telepresence", nameservers=new)
    assert text == (
        "flush set ip telepresence dns_servers\n"
        "add element ip telepresence dns_servers { 192.0.2.1, 192.0.2.2 }\n"
    )
    # One transaction (one string for Nft.run): afterwards the set holds the new
    # servers and nothing else, whatever it held before.
    assert all(str(a) not in text for a in old)
    assert render_nameservers(table="telepresence", nameservers=[]) == (
        "flush set ip telepresence dns_servers\n"
    )
    with pytest.raises(ValueError):
        render_nameservers(table="bad name", nameservers=new)


def test_set_update_is_one_transaction_removing_first() -> None:
    text = render_set_update(
        table="telepresence",
        set_name="routed",
        add=[IPv4Network("10.97.0.0/16")],
        remove=[IPv4Network("10.244.0.0/16"), IPv4Network("10.245.0.0/16")],
    )
    assert text == (
        "delete element ip telepresence routed { 10.244.0.0/16, 10.245.0.0/16 }\n"
        "add element ip telepresence routed { 10.97.0.0/16 }\n"
    )
    assert render_set_update(table="t", set_name="hosts", add=[], remove=[]) == ""


def test_delete_and_status_lines() -> None:
    assert render_delete("telepresence") == "delete table ip telepresence\n"
    assert render_dns_redirects(CONFIG) == ["198.51.100.53:53 -> 127.0.0.1:1053 (udp+tcp)"]


RESOLVED_MODE = dataclasses.replace(CONFIG, dns_servers=[], link_dns=IPv4Address("198.18.255.253"))


def test_resolved_mode_sends_tcp_to_the_link_dns_address_to_the_daemon() -> None:
    """resolved's UDP goes to the TUN (the route), its TCP fallback to the daemon's
    TCP server; the nameserver set stays empty."""
    text = render_create(RESOLVED_MODE)
    body = text.split("chain dns {", 1)[1].split("}", 1)[0]
    rules = [line.strip() for line in body.splitlines() if line.strip()]
    assert rules[1] == "meta mark 0x00007e1e return"
    assert rules[-1] == f"ip daddr 198.18.255.253 tcp dport 53 {REDIRECT} :1053"
    assert "198.18.255.253 udp" not in text
    assert "elements" not in text.split("set dns_servers {", 1)[1].split("}", 1)[0]
    assert "198.18.255.253" not in render_create(CONFIG)
    assert render_dns_redirects(RESOLVED_MODE) == ["198.18.255.253:53 -> 127.0.0.1:1053 (tcp)"]


@pytest.mark.parametrize("name", ["", "1abc", "a b", "a;flush ruleset", "x" * 33, "tél"])
def test_table_names_cannot_inject_commands(name: str) -> None:
    with pytest.raises(ValueError, match="invalid nftables table name"):
        validate_table_name(name)
    with pytest.raises(ValueError):
        render_delete(name)
