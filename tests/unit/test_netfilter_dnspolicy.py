"""The helper's DNS choices (pure): which mode, and which link domains it accepts."""

from __future__ import annotations

import pytest

from telepresence.netfilter.dnspolicy import (
    MAX_LINK_DOMAINS,
    choose_dns_mode,
    link_domains,
    lookups_use_resolved,
)
from telepresence.netfilter.policy import Refused
from telepresence.netfilter.resolved import LinkDomain, render_domains

FEDORA = ["files", "myhostname", "resolve", "[!UNAVAIL=return]", "dns"]
PLAIN = ["files", "dns"]


@pytest.mark.parametrize(
    ("nameservers", "hosts", "uses"),
    [
        (["127.0.0.53"], PLAIN, True),  # Ubuntu: the stub
        (["127.0.0.54"], PLAIN, True),  # the proxy stub
        (["192.168.1.1", "127.0.0.53"], PLAIN, True),  # anywhere among the nameservers
        (["192.168.1.1"], FEDORA, True),  # Fedora: nss-resolve, whatever resolv.conf says
        (["192.168.1.1"], PLAIN, False),
        (["127.0.0.1"], PLAIN, False),  # dnsmasq, unbound: not resolved
        ([], ["files", "mdns4_minimal", "[NOTFOUND=return]", "dns"], False),
        ([], ["files", "resolved"], False),  # a word, not a prefix
    ],
)
def test_lookups_use_resolved(nameservers: list[str], hosts: list[str], uses: bool) -> None:
    assert lookups_use_resolved(nameservers=nameservers, hosts_sources=hosts) is uses


def test_resolved_mode_needs_resolved_running_and_asks_only_when_it_matters() -> None:
    asked: list[bool] = []

    def running(answer: bool) -> bool:
        asked.append(answer)
        return answer

    def mode(nameservers: list[str], hosts: list[str], answer: bool) -> str:
        return choose_dns_mode(
            nameservers=nameservers, hosts_sources=hosts, resolved_running=lambda: running(answer)
        )

    assert mode(["127.0.0.53"], PLAIN, True) == "resolved"
    assert mode(["192.168.1.1"], FEDORA, True) == "resolved"
    # A stub with nothing behind it (a container, a stopped resolved): redirected as before.
    assert mode(["127.0.0.53"], PLAIN, False) == "redirect"
    assert len(asked) == 3
    assert mode(["192.168.1.1"], PLAIN, True) == "redirect"
    assert len(asked) == 3  # no bus round trip when the files say resolved is not used


def test_domains_are_normalised_deduplicated_and_marked() -> None:
    domains = link_domains(
        routing=["Cluster.Local.", "svc", "cluster.local", "ns1.svc.cluster.local", "_tcp.x-y"],
        search=["ns1.svc.cluster.local", "SVC.cluster.local"],
    )
    assert domains == [
        LinkDomain("cluster.local", True),
        LinkDomain("svc", True),
        LinkDomain("_tcp.x-y", True),
        LinkDomain("ns1.svc.cluster.local", False),  # named both ways: a search domain routes
        LinkDomain("svc.cluster.local", False),
    ]
    assert render_domains(domains) == [
        "~cluster.local",
        "~svc",
        "~_tcp.x-y",
        "ns1.svc.cluster.local",
        "svc.cluster.local",
    ]
    assert link_domains(routing=[], search=[]) == []


@pytest.mark.parametrize(
    ("routing", "search", "message"),
    [
        (["."], [], "the root"),
        ([""], [], "the root"),
        ([], ["."], r"search domain '\.'"),
        (["~cluster.local"], [], "no '~'"),
        (["~."], [], "no '~'"),
        ([], ["~svc"], "no '~'"),
        (["a..b"], [], "not a DNS name"),
        ([".svc"], [], "not a DNS name"),
        (["svc.."], [], "not a DNS name"),
        (["a b"], [], "not a DNS name"),
        (["a/b"], [], "not a DNS name"),
        (["caf\u00e9.local"], [], "not a DNS name"),
        (["\u212a8s.local"], [], "not a DNS name"),  # KELVIN SIGN, which lower() makes a "k"
        (["x" * 64 + ".local"], [], "not a DNS name"),
        ([".".join(["abcdefghi"] * 26)], [], "not a DNS name"),  # 259 characters
        (["x\nroute 0.0.0.0/0"], [], "not a DNS name"),
    ],
)
def test_refused_domains_say_why_in_one_line(
    routing: list[str], search: list[str], message: str
) -> None:
    with pytest.raises(Refused, match=message) as info:
        link_domains(routing=routing, search=search)
    assert "\n" not in str(info.value)


def test_the_longest_names_pass() -> None:
    label63 = "a" * 63
    name = ".".join([label63, label63, label63, "b" * 61])  # 253 characters
    assert link_domains(routing=[name + "."], search=[]) == [LinkDomain(name, True)]


def test_at_most_256_domains_after_duplicates_are_gone() -> None:
    many = [f"ns{i}.svc.cluster.local" for i in range(MAX_LINK_DOMAINS)]
    assert len(link_domains(routing=many + many, search=many[:10])) == MAX_LINK_DOMAINS
    with pytest.raises(Refused, match="257 link domains: systemd-resolved takes at most 256"):
        link_domains(routing=many, search=["one.more"])
