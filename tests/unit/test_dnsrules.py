"""Table and property tests for the DNS routing decision."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network

import dns.rdatatype
import dns.reversename
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telepresence.daemon.dnsrules import (
    Action,
    NameRules,
    Reason,
    Route,
    route_query,
    search_path,
)

A = dns.rdatatype.A
AAAA = dns.rdatatype.AAAA
SRV = dns.rdatatype.SRV
PTR = dns.rdatatype.PTR
TXT = dns.rdatatype.TXT
SOA = dns.rdatatype.SOA

CLUSTER = Action.CLUSTER
FALLBACK = Action.CLUSTER_THEN_UPSTREAM
UPSTREAM = Action.UPSTREAM

SUBNETS = (
    IPv4Network("10.96.0.0/12"),
    IPv4Network("10.244.0.0/16"),
    IPv6Network("fd00:10:96::/112"),
)

RULES = {
    # The everyday setup: a few mapped namespaces (one named like a TLD, one
    # named like the laptop's search domain), two on the search path.
    "std": NameRules(
        mapped_namespaces=frozenset({"default", "dev", "lan", "team-a"}),
        search_namespaces=("team-a", "default"),
        local_search_domains=("lan", "corp.example.com"),
        never_cluster_suffixes=("internal.example.com",),
    ),
    "nosearch": NameRules(mapped_namespaces=frozenset({"default"})),
    "all": NameRules(
        all_namespaces=True,
        mapped_namespaces=frozenset({"ignored"}),
        live_namespaces=frozenset({"prod", "staging"}),
    ),
    "searchonly": NameRules(search_namespaces=("team-b",)),
    "svcns": NameRules(mapped_namespaces=frozenset({"svc"})),
    "customdomain": NameRules(cluster_domain="Corp.K8s.", mapped_namespaces=frozenset({"default"})),
    "localsearch": NameRules(
        mapped_namespaces=frozenset({"default"}), local_search_domains=("local",)
    ),
    "neverclusterdomain": NameRules(never_cluster_suffixes=("svc.cluster.local",)),
}


def _c(name: str) -> tuple[str, ...]:
    return (name,)


# (rules, qname, qtype, action, reason, names)
CASES = [
    # --- under the cluster domain: final cluster answer, mapped or not
    ("std", "web.default.svc.cluster.local", A, CLUSTER, Reason.CLUSTER_DOMAIN,
     _c("web.default.svc.cluster.local.")),
    ("std", "WEB.Default.SVC.Cluster.Local.", A, CLUSTER, Reason.CLUSTER_DOMAIN,
     _c("web.default.svc.cluster.local.")),
    ("std", "pod-0.web.default.svc.cluster.local", A, CLUSTER, Reason.CLUSTER_DOMAIN,
     _c("pod-0.web.default.svc.cluster.local.")),
    ("std", "_http._tcp.web.default.svc.cluster.local", SRV, CLUSTER, Reason.CLUSTER_DOMAIN,
     _c("_http._tcp.web.default.svc.cluster.local.")),
    ("std", "web.unmapped.svc.cluster.local", A, CLUSTER, Reason.CLUSTER_DOMAIN,
     _c("web.unmapped.svc.cluster.local.")),
    ("std", "cluster.local.", SOA, CLUSTER, Reason.CLUSTER_DOMAIN, _c("cluster.local.")),
    ("std", "mycluster.local", A, UPSTREAM, Reason.NO_MATCH, ()),
    ("std", "web.default.svc.cluster.local.evil.com", A, UPSTREAM, Reason.NO_MATCH, ()),
    # --- <...>.<ns>.svc: final cluster answer
    ("std", "web.default.svc", A, CLUSTER, Reason.SVC_PSEUDO_TLD,
     _c("web.default.svc.cluster.local.")),
    ("std", "pod-0.web.default.svc.", AAAA, CLUSTER, Reason.SVC_PSEUDO_TLD,
     _c("pod-0.web.default.svc.cluster.local.")),
    ("std", "_http._tcp.web.default.svc", SRV, CLUSTER, Reason.SVC_PSEUDO_TLD,
     _c("_http._tcp.web.default.svc.cluster.local.")),
    ("std", "web.dev.svc", A, CLUSTER, Reason.SVC_PSEUDO_TLD, _c("web.dev.svc.cluster.local.")),
    ("std", "web.unmapped.svc", A, UPSTREAM, Reason.NO_MATCH, ()),
    ("std", "default.svc", A, UPSTREAM, Reason.NO_MATCH, ()),
    # --- <svc>.<ns> short form: cluster, then upstream on NXDOMAIN
    ("std", "web.default", A, FALLBACK, Reason.NAMESPACE_PSEUDO_TLD,
     _c("web.default.svc.cluster.local.")),
    ("std", "Web.Team-A.", A, FALLBACK, Reason.NAMESPACE_PSEUDO_TLD,
     _c("web.team-a.svc.cluster.local.")),
    ("std", "web-0.web.default", A, FALLBACK, Reason.NAMESPACE_PSEUDO_TLD,
     _c("web-0.web.default.svc.cluster.local.")),
    ("std", "_http._tcp.web.default", SRV, FALLBACK, Reason.NAMESPACE_PSEUDO_TLD,
     _c("_http._tcp.web.default.svc.cluster.local.")),
    ("std", "_dns._udp.kube-dns.default", SRV, FALLBACK, Reason.NAMESPACE_PSEUDO_TLD,
     _c("_dns._udp.kube-dns.default.svc.cluster.local.")),
    ("std", "_http._quic.web.default", SRV, UPSTREAM, Reason.NAMESPACE_PSEUDO_TLD_OTHER, ()),
    ("std", "_._tcp.web.default", SRV, UPSTREAM, Reason.NAMESPACE_PSEUDO_TLD_OTHER, ()),
    ("std", "www.web.default", A, UPSTREAM, Reason.NAMESPACE_PSEUDO_TLD_OTHER, ()),
    ("std", "a.b.c.default", A, UPSTREAM, Reason.NAMESPACE_PSEUDO_TLD_OTHER, ()),
    ("std", "web.unmapped", A, UPSTREAM, Reason.NO_MATCH, ()),
    # --- namespace named like a public TLD ("dev")
    ("std", "svc.dev", A, FALLBACK, Reason.NAMESPACE_PSEUDO_TLD, _c("svc.dev.svc.cluster.local.")),
    ("std", "example.dev", A, FALLBACK, Reason.NAMESPACE_PSEUDO_TLD,
     _c("example.dev.svc.cluster.local.")),
    ("std", "www.example.dev", A, UPSTREAM, Reason.NAMESPACE_PSEUDO_TLD_OTHER, ()),
    ("std", "api.v2.example.dev", A, UPSTREAM, Reason.NAMESPACE_PSEUDO_TLD_OTHER, ()),
    ("std", "_dmarc.example.dev", TXT, UPSTREAM, Reason.NAMESPACE_PSEUDO_TLD_OTHER, ()),
    ("std", "_acme-challenge.example.dev", TXT, UPSTREAM,
     Reason.NAMESPACE_PSEUDO_TLD_OTHER, ()),
    ("std", "web-10.example.dev", A, FALLBACK, Reason.NAMESPACE_PSEUDO_TLD,
     _c("web-10.example.dev.svc.cluster.local.")),
    ("std", "web-01.example.dev", A, UPSTREAM, Reason.NAMESPACE_PSEUDO_TLD_OTHER, ()),
    ("std", "api-v2.example.dev", A, UPSTREAM, Reason.NAMESPACE_PSEUDO_TLD_OTHER, ()),
    ("std", "_https._tcp.example.dev", SRV, FALLBACK, Reason.NAMESPACE_PSEUDO_TLD,
     _c("_https._tcp.example.dev.svc.cluster.local.")),
    # --- single-label names: each search namespace in order, then upstream
    ("std", "web", A, FALLBACK, Reason.SEARCH_NAMESPACE,
     ("web.team-a.svc.cluster.local.", "web.default.svc.cluster.local.")),
    ("std", "WEB.", AAAA, FALLBACK, Reason.SEARCH_NAMESPACE,
     ("web.team-a.svc.cluster.local.", "web.default.svc.cluster.local.")),
    ("std", "default", A, FALLBACK, Reason.SEARCH_NAMESPACE,
     ("default.team-a.svc.cluster.local.", "default.default.svc.cluster.local.")),
    ("nosearch", "web", A, UPSTREAM, Reason.NO_MATCH, ()),
    ("nosearch", "web.default", A, FALLBACK, Reason.NAMESPACE_PSEUDO_TLD,
     _c("web.default.svc.cluster.local.")),
    # --- the laptop's own search domains win over namespaces
    ("std", "printer.lan", A, UPSTREAM, Reason.LOCAL_SEARCH_DOMAIN, ()),
    ("std", "lan", A, UPSTREAM, Reason.LOCAL_SEARCH_DOMAIN, ()),
    ("std", "web.default.lan", A, UPSTREAM, Reason.LOCAL_SEARCH_DOMAIN, ()),
    ("std", "web.lan.svc", A, CLUSTER, Reason.SVC_PSEUDO_TLD, _c("web.lan.svc.cluster.local.")),
    ("std", "build.corp.example.com", A, UPSTREAM, Reason.LOCAL_SEARCH_DOMAIN, ()),
    ("std", "corp.example.com", SOA, UPSTREAM, Reason.LOCAL_SEARCH_DOMAIN, ()),
    ("localsearch", "web.default.svc.cluster.local", A, CLUSTER, Reason.CLUSTER_DOMAIN,
     _c("web.default.svc.cluster.local.")),
    ("localsearch", "printer.local", A, UPSTREAM, Reason.LOCAL_SEARCH_DOMAIN, ()),
    # --- wpad and localhost never reach the cluster
    ("std", "wpad", A, UPSTREAM, Reason.WPAD, ()),
    ("std", "WPAD.", A, UPSTREAM, Reason.WPAD, ()),
    ("std", "wpad.lan", A, UPSTREAM, Reason.WPAD, ()),
    ("std", "wpad.default", A, UPSTREAM, Reason.WPAD, ()),
    ("std", "wpad.default.svc.cluster.local", A, UPSTREAM, Reason.WPAD, ()),
    ("std", "notwpad.default", A, FALLBACK, Reason.NAMESPACE_PSEUDO_TLD,
     _c("notwpad.default.svc.cluster.local.")),
    ("std", "localhost", A, UPSTREAM, Reason.LOCALHOST, ()),
    ("std", "web.localhost.", A, UPSTREAM, Reason.LOCALHOST, ()),
    # --- explicit never-cluster suffixes beat everything
    ("std", "db.internal.example.com", A, UPSTREAM, Reason.NEVER_CLUSTER_SUFFIX, ()),
    ("std", "internal.example.com", A, UPSTREAM, Reason.NEVER_CLUSTER_SUFFIX, ()),
    ("std", "xinternal.example.com", A, UPSTREAM, Reason.NO_MATCH, ()),
    ("neverclusterdomain", "web.default.svc.cluster.local", A, UPSTREAM,
     Reason.NEVER_CLUSTER_SUFFIX, ()),
    ("neverclusterdomain", "cluster.local", SOA, CLUSTER, Reason.CLUSTER_DOMAIN,
     _c("cluster.local.")),
    # --- ordinary internet names and non-names
    ("std", "github.com", A, UPSTREAM, Reason.NO_MATCH, ()),
    ("std", "www.github.com.", AAAA, UPSTREAM, Reason.NO_MATCH, ()),
    ("std", "", A, UPSTREAM, Reason.NOT_A_NAME, ()),
    ("std", ".", dns.rdatatype.NS, UPSTREAM, Reason.NOT_A_NAME, ()),
    ("std", "a..default", A, UPSTREAM, Reason.NOT_A_NAME, ()),
    ("std", "..", A, UPSTREAM, Reason.NOT_A_NAME, ()),
    # --- reverse lookups: PTR for complete addresses in cluster subnets only
    ("std", "1.0.96.10.in-addr.arpa", PTR, CLUSTER, Reason.REVERSE_CLUSTER,
     _c("1.0.96.10.in-addr.arpa.")),
    ("std", "7.3.244.10.IN-ADDR.ARPA.", PTR, CLUSTER, Reason.REVERSE_CLUSTER,
     _c("7.3.244.10.in-addr.arpa.")),
    ("std", "1.0.96.10.in-addr.arpa", A, UPSTREAM, Reason.REVERSE_OTHER, ()),
    ("std", "1.1.168.192.in-addr.arpa", PTR, UPSTREAM, Reason.REVERSE_OTHER, ()),
    ("std", "1.0.112.10.in-addr.arpa", PTR, UPSTREAM, Reason.REVERSE_OTHER, ()),
    ("std", "96.10.in-addr.arpa", PTR, UPSTREAM, Reason.REVERSE_OTHER, ()),
    ("std", "96.10.in-addr.arpa", SOA, UPSTREAM, Reason.REVERSE_OTHER, ()),
    ("std", "300.0.96.10.in-addr.arpa", PTR, UPSTREAM, Reason.REVERSE_OTHER, ()),
    ("std", "x.1.0.96.10.in-addr.arpa", PTR, UPSTREAM, Reason.REVERSE_OTHER, ()),
    ("std", "in-addr.arpa", SOA, UPSTREAM, Reason.REVERSE_OTHER, ()),
    ("std", dns.reversename.from_address("fd00:10:96::a").to_text(), PTR, CLUSTER,
     Reason.REVERSE_CLUSTER, _c(dns.reversename.from_address("fd00:10:96::a").to_text())),
    ("std", dns.reversename.from_address("fd00:10:97::a").to_text(), PTR, UPSTREAM,
     Reason.REVERSE_OTHER, ()),
    ("std", "ip6.arpa", SOA, UPSTREAM, Reason.REVERSE_OTHER, ()),
    # --- "all namespaces": the live set counts, the explicit list does not
    ("all", "web.prod", A, FALLBACK, Reason.NAMESPACE_PSEUDO_TLD,
     _c("web.prod.svc.cluster.local.")),
    ("all", "web.staging.svc", A, CLUSTER, Reason.SVC_PSEUDO_TLD,
     _c("web.staging.svc.cluster.local.")),
    ("all", "web.ignored", A, UPSTREAM, Reason.NO_MATCH, ()),
    # --- search namespaces count as mapped
    ("searchonly", "web.team-b", A, FALLBACK, Reason.NAMESPACE_PSEUDO_TLD,
     _c("web.team-b.svc.cluster.local.")),
    ("searchonly", "web", A, FALLBACK, Reason.SEARCH_NAMESPACE,
     _c("web.team-b.svc.cluster.local.")),
    # --- a namespace called "svc"
    ("svcns", "web.svc", A, FALLBACK, Reason.NAMESPACE_PSEUDO_TLD,
     _c("web.svc.svc.cluster.local.")),
    ("svcns", "web.svc.svc", A, CLUSTER, Reason.SVC_PSEUDO_TLD,
     _c("web.svc.svc.cluster.local.")),
    ("svcns", "web.other.svc", A, UPSTREAM, Reason.NAMESPACE_PSEUDO_TLD_OTHER, ()),
    # --- custom cluster domain
    ("customdomain", "web.default.svc.corp.k8s", A, CLUSTER, Reason.CLUSTER_DOMAIN,
     _c("web.default.svc.corp.k8s.")),
    ("customdomain", "web.default.svc", A, CLUSTER, Reason.SVC_PSEUDO_TLD,
     _c("web.default.svc.corp.k8s.")),
    ("customdomain", "web.default", A, FALLBACK, Reason.NAMESPACE_PSEUDO_TLD,
     _c("web.default.svc.corp.k8s.")),
    ("customdomain", "web.default.svc.cluster.local", A, UPSTREAM, Reason.NO_MATCH, ()),
]  # fmt: skip


@pytest.mark.parametrize(
    ("rules", "qname", "qtype", "action", "reason", "names"),
    CASES,
    ids=[f"{c[0]}:{c[1] or '<empty>'}:{dns.rdatatype.to_text(c[2])}" for c in CASES],
)
def test_route_query_table(
    rules: str,
    qname: str,
    qtype: int,
    action: Action,
    reason: Reason,
    names: tuple[str, ...],
) -> None:
    route = route_query(qname, qtype, RULES[rules], cluster_subnets=SUBNETS)
    assert route == Route(action, reason, names)


def test_table_is_large_and_has_negatives() -> None:
    assert len(CASES) >= 40
    assert sum(c[3] is UPSTREAM for c in CASES) >= 20


def test_reverse_without_subnets_goes_upstream() -> None:
    route = route_query("1.0.96.10.in-addr.arpa", PTR, RULES["std"])
    assert route == Route(UPSTREAM, Reason.REVERSE_OTHER)


def test_reverse_ignores_subnets_of_the_other_family() -> None:
    name = dns.reversename.from_address("::a").to_text()
    route = route_query(name, PTR, RULES["std"], cluster_subnets=[IPv4Network("0.0.0.0/0")])
    assert route.action is UPSTREAM


class TestNameRules:
    def test_normalises_everything(self) -> None:
        rules = NameRules(
            cluster_domain=".Cluster.Local.",
            mapped_namespaces=frozenset({"Dev."}),
            live_namespaces=frozenset({"PROD"}),
            search_namespaces=("B", "a", "b"),
            local_search_domains=("Lan.", "", "lan"),
            never_cluster_suffixes=(".Corp.",),
        )
        assert rules.cluster_domain == "cluster.local"
        assert rules.mapped_namespaces == frozenset({"dev"})
        assert rules.live_namespaces == frozenset({"prod"})
        assert rules.search_namespaces == ("b", "a")
        assert rules.local_search_domains == ("lan",)
        assert rules.never_cluster_suffixes == ("corp",)
        assert rules.effective_namespaces == frozenset({"dev", "a", "b"})

    def test_all_namespaces_uses_live_set(self) -> None:
        rules = NameRules(
            all_namespaces=True,
            mapped_namespaces=frozenset({"x"}),
            live_namespaces=frozenset({"y"}),
            search_namespaces=("z",),
        )
        assert rules.effective_namespaces == frozenset({"y", "z"})

    def test_equal_and_hashable(self) -> None:
        a = NameRules(mapped_namespaces=frozenset({"A"}))
        b = NameRules(mapped_namespaces=frozenset({"a"}))
        assert a == b
        assert hash(a) == hash(b)

    @pytest.mark.parametrize("bad", ["a.b", "", "..."])
    def test_rejects_dotted_or_empty_namespace(self, bad: str) -> None:
        with pytest.raises(ValueError, match="single DNS label"):
            NameRules(mapped_namespaces=frozenset({bad}))
        with pytest.raises(ValueError, match="single DNS label"):
            NameRules(search_namespaces=(bad,))

    @pytest.mark.parametrize("bad", ["", ".", "a..b"])
    def test_rejects_bad_cluster_domain(self, bad: str) -> None:
        with pytest.raises(ValueError, match="cluster domain"):
            NameRules(cluster_domain=bad)


class TestRoute:
    def test_upstream_has_no_names(self) -> None:
        with pytest.raises(ValueError):
            Route(UPSTREAM, Reason.NO_MATCH, ("x.",))

    @pytest.mark.parametrize("action", [CLUSTER, FALLBACK])
    def test_cluster_needs_names(self, action: Action) -> None:
        with pytest.raises(ValueError):
            Route(action, Reason.CLUSTER_DOMAIN)


class TestSearchPath:
    def test_cluster_namespaces_first_then_laptop_domains(self) -> None:
        assert search_path(RULES["std"]) == [
            "team-a.svc.cluster.local",
            "default.svc.cluster.local",
            "lan",
            "corp.example.com",
        ]

    def test_custom_domain_and_empty(self) -> None:
        assert search_path(RULES["customdomain"]) == []
        rules = NameRules(cluster_domain="k8s", search_namespaces=("a",))
        assert search_path(rules) == ["a.svc.k8s"]

    def test_no_duplicates(self) -> None:
        rules = NameRules(search_namespaces=("a",), local_search_domains=("a.svc.cluster.local",))
        assert search_path(rules) == ["a.svc.cluster.local"]


# --- properties -----------------------------------------------------------

_LABELS = st.sampled_from(
    [
        "web",
        "web-0",
        "_http",
        "_tcp",
        "svc",
        "default",
        "dev",
        "lan",
        "team-a",
        "cluster",
        "local",
        "wpad",
        "localhost",
        "example",
        "com",
        "in-addr",
        "arpa",
        "10",
        "96",
        "0",
        "1",
    ]
)
_NAMES = st.lists(_LABELS, min_size=1, max_size=6).map(".".join)
_QTYPES = st.sampled_from([A, AAAA, SRV, PTR, TXT])
_PROPS = settings(max_examples=150, deadline=None)


def _random_case(name: str) -> str:
    return "".join(c.upper() if i % 2 else c for i, c in enumerate(name))


@_PROPS
@given(name=_NAMES, qtype=_QTYPES, trailing=st.booleans())
def test_case_and_trailing_dot_do_not_matter(name: str, qtype: int, trailing: bool) -> None:
    rules = RULES["std"]
    variant = _random_case(name) + ("." if trailing else "")
    assert route_query(variant, qtype, rules, cluster_subnets=SUBNETS) == route_query(
        name, qtype, rules, cluster_subnets=SUBNETS
    )


@_PROPS
@given(name=_NAMES, qtype=_QTYPES, rules=st.sampled_from(sorted(RULES)))
def test_route_invariants(name: str, qtype: int, rules: str) -> None:
    r = RULES[rules]
    route = route_query(name, qtype, r, cluster_subnets=SUBNETS)
    labels = name.split(".")
    if route.action is UPSTREAM:
        assert route.names == ()
        return
    # Whatever goes to the cluster is an absolute lower-case cluster name.
    for qn in route.names:
        assert qn.endswith(".") and qn == qn.lower()
        # (the cluster domain itself included: it has an SOA and NS of its own)
        under = qn == r.cluster_domain + "." or qn.endswith("." + r.cluster_domain + ".")
        assert under or qn.endswith(".arpa.")
    # ... and never wpad, localhost, or a name under a laptop search domain
    # (unless it is under the cluster domain too).
    assert labels[0] != "wpad"
    assert labels[-1] != "localhost"
    under_cluster = name == r.cluster_domain or name.endswith("." + r.cluster_domain)
    if not under_cluster:
        for dom in r.local_search_domains:
            assert name != dom and not name.endswith("." + dom)
    # Only the fallback routes may carry more than one name, and only the
    # short forms fall back.
    if route.action is FALLBACK:
        assert route.reason in (Reason.NAMESPACE_PSEUDO_TLD, Reason.SEARCH_NAMESPACE)
    else:
        assert len(route.names) == 1


@_PROPS
@given(name=_NAMES, qtype=_QTYPES)
def test_names_not_ending_in_cluster_things_go_upstream(name: str, qtype: int) -> None:
    rules = RULES["nosearch"]
    last = name.split(".")[-1]
    if last not in {"default", "svc", "local", "arpa"}:
        assert route_query(name, qtype, rules, cluster_subnets=SUBNETS).action is UPSTREAM
