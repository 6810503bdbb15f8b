"""Which domains systemd-resolved sends to us, and what we take from its resolv.conf."""

from __future__ import annotations

from ipaddress import IPv4Address

from hypothesis import given
from hypothesis import strategies as st

from telepresence.daemon.dnsrules import NameRules, Route, route_query
from telepresence.daemon.linkdomains import (
    MAX_LINK_DOMAINS,
    LinkDomains,
    laptop_search_domains,
    link_domains,
    resolved_upstreams,
    split_applied,
)

DNS_ADDRESS = IPv4Address("198.18.255.253")


def test_mapped_namespaces_route_after_the_cluster_domain_and_svc() -> None:
    rules = NameRules(mapped_namespaces=frozenset({"web", "Dev", "api"}))
    assert link_domains(rules) == LinkDomains(
        routing=("cluster.local", "svc", "api", "dev", "web"), search=()
    )


def test_all_namespaces_mapped_means_the_live_ones() -> None:
    rules = NameRules(
        all_namespaces=True,
        mapped_namespaces=frozenset({"ignored"}),
        live_namespaces=frozenset({"kube-system", "default"}),
        cluster_domain="Corp.Example.",
    )
    assert link_domains(rules).routing == ("corp.example", "svc", "default", "kube-system")


def test_search_namespaces_are_search_domains_in_order_and_not_repeated() -> None:
    rules = NameRules(
        mapped_namespaces=frozenset({"b", "c", "z"}),
        search_namespaces=("z", "a", "z"),
    )
    domains = link_domains(rules)
    assert domains.search == ("z", "a")
    # A search domain routes too: it is not listed again as routing-only.
    assert domains.routing == ("cluster.local", "svc", "b", "c")


def test_a_namespace_named_svc_appears_once() -> None:
    rules = NameRules(mapped_namespaces=frozenset({"svc", "x"}))
    assert link_domains(rules).routing == ("cluster.local", "svc", "x")
    rules = NameRules(search_namespaces=("svc",))
    assert link_domains(rules) == LinkDomains(routing=("cluster.local",), search=("svc",))


def test_the_cap_keeps_cluster_domain_svc_and_search_first() -> None:
    namespaces = frozenset(f"ns-{i:03}" for i in range(300))
    rules = NameRules(mapped_namespaces=namespaces, search_namespaces=("zz-dev", "aa-dev"))
    domains = link_domains(rules)
    assert domains.count == MAX_LINK_DOMAINS
    assert domains.routing[:2] == ("cluster.local", "svc")
    assert domains.search == ("zz-dev", "aa-dev")
    kept = domains.routing[2:]
    assert kept == tuple(sorted(namespaces))[: MAX_LINK_DOMAINS - 4]
    assert domains.left_out == tuple(sorted(namespaces))[MAX_LINK_DOMAINS - 4 :]
    assert set(kept).isdisjoint(domains.left_out)


def test_a_tiny_cap_still_orders_cluster_domain_svc_search() -> None:
    rules = NameRules(mapped_namespaces=frozenset({"m"}), search_namespaces=("s1", "s2"))
    assert link_domains(rules, limit=3) == LinkDomains(
        routing=("cluster.local", "svc"), search=("s1",), left_out=("s2", "m")
    )
    assert link_domains(rules, limit=1) == LinkDomains(
        routing=("cluster.local",), search=(), left_out=("svc", "s1", "s2", "m")
    )


_label = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)


@given(
    mapped=st.frozensets(_label, max_size=40),
    live=st.frozensets(_label, max_size=40),
    search=st.lists(_label, max_size=5),
    all_namespaces=st.booleans(),
    limit=st.integers(min_value=0, max_value=60),
)
def test_pure_deterministic_and_within_the_cap(
    mapped: frozenset[str],
    live: frozenset[str],
    search: list[str],
    all_namespaces: bool,
    limit: int,
) -> None:
    rules = NameRules(
        mapped_namespaces=mapped,
        live_namespaces=live,
        all_namespaces=all_namespaces,
        search_namespaces=tuple(search),
    )
    domains = link_domains(rules, limit=limit)
    assert domains == link_domains(rules, limit=limit)
    on_link = [*domains.routing, *domains.search]
    assert len(on_link) == len(set(on_link)) == domains.count <= limit
    assert all(d == d.lower() for d in on_link)
    # Nothing is lost: each wanted domain is on the link or said to be left out.
    wanted = {"cluster.local", "svc", *rules.effective_namespaces}
    assert wanted == set(on_link) | set(domains.left_out)
    assert set(on_link).isdisjoint(domains.left_out)
    assert len(domains.left_out) == len(set(domains.left_out))
    if limit >= 2 + len(rules.search_namespaces):
        assert domains.search == rules.search_namespaces


@given(
    mapped=st.frozensets(_label, min_size=1, max_size=10),
    search=st.lists(_label, max_size=3),
    service=_label,
)
def test_every_short_name_the_rules_send_to_the_cluster_is_under_a_link_domain(
    mapped: frozenset[str], search: list[str], service: str
) -> None:
    """What dnsrules would answer from the cluster must reach us through resolved:
    ``svc.ns`` and ``svc.ns.svc`` for each namespace, and the FQDNs."""
    rules = NameRules(mapped_namespaces=mapped, search_namespaces=tuple(search))
    domains = link_domains(rules)
    on_link = {*domains.routing, *domains.search}
    for ns in rules.effective_namespaces:
        for name in (f"{service}.{ns}", f"{service}.{ns}.svc", f"{service}.{ns}.svc.cluster.local"):
            route: Route = route_query(name, 1, rules)
            if route.names:
                assert any(name == d or name.endswith("." + d) for d in on_link), name


def test_resolved_upstreams_leave_out_our_address_and_loopback() -> None:
    listed = ["192.168.1.1", "127.0.0.53", str(DNS_ADDRESS), "127.0.0.1", "10.0.0.2", "192.168.1.1"]
    assert resolved_upstreams(listed, dns_address=DNS_ADDRESS) == ["192.168.1.1", "10.0.0.2"]
    assert resolved_upstreams(["2001:db8::1", "nonsense"], dns_address=DNS_ADDRESS) == []
    assert resolved_upstreams([str(DNS_ADDRESS)], dns_address=None) == [str(DNS_ADDRESS)]


def test_our_search_domains_are_not_the_laptops() -> None:
    listed = ["home.example", "dev", "Office.Example", "intercepted"]
    ours = ["dev", "intercepted."]
    assert laptop_search_domains(listed, ours=ours) == ("home.example", "Office.Example")
    assert laptop_search_domains(listed, ours=[]) == tuple(listed)


def test_the_helpers_answer_splits_into_routing_and_search() -> None:
    applied = ["~cluster.local", "~svc", "dev", "~web"]
    assert split_applied(applied) == LinkDomains(
        routing=("cluster.local", "svc", "web"), search=("dev",)
    )
