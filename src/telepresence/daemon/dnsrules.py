"""Where does a DNS query go: the cluster or the laptop's own resolver?

While connected, every DNS query the laptop makes reaches our resolver first.
Most of them (``github.com``, ``printer.lan``, ``wpad``) must be passed on
untouched, so that the laptop's DNS keeps working exactly as before; only
names that can only mean something inside the cluster are sent there.  This
module holds that decision as one pure function, :func:`route_query`, so it
can be tested exhaustively without sockets.

Precedence (the first rule that matches decides)
-------------------------------------------------

Names are compared case-insensitively, with or without a trailing dot.
"Mapped namespaces" below means :attr:`NameRules.effective_namespaces`.

1. Not a name (empty, the root, an empty label as in ``a..b``): UPSTREAM.
2. Built-in never-cluster names: ``wpad`` and anything whose first label is
   ``wpad`` (proxy auto-discovery must never be answered by a cluster), and
   ``localhost`` / ``*.localhost`` (RFC 6761): UPSTREAM.
3. Names equal to or under one of :attr:`NameRules.never_cluster_suffixes`:
   UPSTREAM.  Explicit user configuration beats every rule below, even the
   cluster domain.
4. Reverse names (``in-addr.arpa`` / ``ip6.arpa``): a PTR query for a complete
   address inside one of the cluster subnets goes to the cluster (final);
   anything else in the reverse tree (partial names, other addresses, other
   query types such as SOA lookups for the zone) goes UPSTREAM.
5. Names equal to or under the cluster domain (``x.ns.svc.cluster.local``,
   ``pod-0.x.ns.svc.cluster.local``, ``_http._tcp.x.ns.svc.cluster.local``):
   CLUSTER, final.  This is checked before the laptop's search domains so that
   a laptop search domain such as ``local`` cannot hide ``cluster.local``.
6. Names equal to or under one of the laptop's own search domains
   (:attr:`NameRules.local_search_domains`): UPSTREAM, even when a namespace
   has the same name (search domain ``lan`` → ``printer.lan`` stays local).
7. ``<anything>.<ns>.svc`` with at least three labels and ``<ns>`` mapped:
   CLUSTER, final, rewritten to ``<anything>.<ns>.svc.<cluster domain>``.
   ``svc`` is not a public TLD, so nobody else can own these names.
8. Short namespace form: the last label is a mapped namespace ``<ns>``.
   Namespaces may be named like public TLDs (``dev``, ``app``, ``io``), and the
   set of TLDs keeps growing, so this form never claims a name for good: it is
   routed CLUSTER_THEN_UPSTREAM (the cluster answers if it has the name,
   otherwise the original query goes upstream untouched), and only for the
   three shapes the cluster can actually answer:

   * ``<svc>.<ns>`` (exactly two labels);
   * ``<pod>.<svc>.<ns>`` where ``<pod>`` looks like a StatefulSet pod,
     ``<name>-<ordinal>`` (``web-0.nginx.dev``);
   * ``_<port>._<proto>.<svc>.<ns>`` with ``<proto>`` one of ``_tcp``, ``_udp``,
     ``_sctp`` (SRV lookups).

   Every other name ending in a mapped namespace goes UPSTREAM without asking
   the cluster: ``www.example.dev``, ``_dmarc.example.dev``, ``a.b.c.dev``.
   With namespace ``dev`` mapped this gives: ``example.dev`` → cluster first,
   and the public answer when the cluster has no service ``example`` in
   ``dev``; ``www.example.dev`` → upstream.
9. Single-label names, when :attr:`NameRules.search_namespaces` is non-empty:
   CLUSTER_THEN_UPSTREAM, tried as ``<label>.<ns>.svc.<cluster domain>`` for
   each search namespace in order.  A bare ``printer`` that is not a service
   still resolves the way the laptop always resolved it.
10. Everything else: UPSTREAM.

The function only routes.  Rewriting answers back to the asked name,
synthesising AAAA for cluster names and caching are the resolver's business.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import dns.rdatatype

__all__ = [
    "DEFAULT_CLUSTER_DOMAIN",
    "Action",
    "NameRules",
    "Reason",
    "Route",
    "route_query",
    "search_path",
]

DEFAULT_CLUSTER_DOMAIN = "cluster.local"

# A Kubernetes namespace name is an RFC 1123 label.  We only reject what would
# break the label arithmetic below (dots, empties); the API server is the
# authority on the rest.
_BAD_NAMESPACE = re.compile(r"^$|\.")

# StatefulSet pod names are "<statefulset>-<ordinal>", ordinal without leading
# zeros.  Used to tell "web-0.nginx.dev" (a pod) from "www.example.dev".
_STATEFULSET_POD = re.compile(r"^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?-(?:0|[1-9][0-9]*)$")

_SRV_PROTOCOLS = frozenset({"_tcp", "_udp", "_sctp"})

_IPV4_REVERSE = ("in-addr", "arpa")
_IPV6_REVERSE = ("ip6", "arpa")


class Action(enum.Enum):
    """What the resolver should do with a query."""

    #: Ask the cluster for :attr:`Route.names` in order; its answer is final,
    #: including NXDOMAIN.
    CLUSTER = "cluster"
    #: Ask the cluster for :attr:`Route.names` in order; the first name the
    #: cluster has (NOERROR, even without records of the asked type) answers.
    #: If the cluster has none of them, forward the original query upstream.
    #: Resolvers should treat a cluster failure (timeout, SERVFAIL) the same
    #: way, so that the laptop's own names never depend on the cluster.
    CLUSTER_THEN_UPSTREAM = "cluster-then-upstream"
    #: Forward the original query, untouched, to the laptop's original resolver.
    UPSTREAM = "upstream"


class Reason(enum.Enum):
    """Which precedence rule decided; for logs, metrics and tests."""

    NOT_A_NAME = "not-a-name"
    WPAD = "wpad"
    LOCALHOST = "localhost"
    NEVER_CLUSTER_SUFFIX = "never-cluster-suffix"
    REVERSE_CLUSTER = "reverse-cluster"
    REVERSE_OTHER = "reverse-other"
    CLUSTER_DOMAIN = "cluster-domain"
    LOCAL_SEARCH_DOMAIN = "local-search-domain"
    SVC_PSEUDO_TLD = "svc-pseudo-tld"
    NAMESPACE_PSEUDO_TLD = "namespace-pseudo-tld"
    NAMESPACE_PSEUDO_TLD_OTHER = "namespace-pseudo-tld-other"
    SEARCH_NAMESPACE = "search-namespace"
    NO_MATCH = "no-match"


@dataclass(frozen=True, slots=True)
class Route:
    """The routing decision for one query.

    ``names`` are absolute (trailing dot), lower-case cluster names to try in
    order; empty exactly when ``action`` is UPSTREAM, because upstream always
    gets the original query untouched.
    """

    action: Action
    reason: Reason
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.action is Action.UPSTREAM) == bool(self.names):
            raise ValueError(f"{self.action.value} route with names {self.names!r}")


def _norm_domain(value: str) -> str:
    return value.strip().strip(".").lower()


@dataclass(frozen=True, slots=True)
class NameRules:
    """Everything :func:`route_query` needs to know, normalised on creation.

    Inputs may use any case and leading/trailing dots; they are stored lower
    case without dots at either end, so lookups are plain comparisons.
    """

    #: The cluster's DNS domain (kubelet ``clusterDomain``).
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
    #: Namespaces chosen with ``--mapped-namespaces``.
    mapped_namespaces: frozenset[str] = frozenset()
    #: True when no explicit list was given: every namespace the user can list
    #: is mapped, and ``live_namespaces`` holds that (changing) set.
    all_namespaces: bool = False
    #: The namespaces currently visible to the user; used when
    #: ``all_namespaces`` is set, ignored otherwise.
    live_namespaces: frozenset[str] = frozenset()
    #: Namespaces for single-label names, in search order (``connect
    #: --namespace``, local-only intercepts).  They count as mapped too: a
    #: namespace you search is a namespace you want to reach.
    search_namespaces: tuple[str, ...] = ()
    #: The laptop's own search domains, from before we touched its resolver.
    local_search_domains: tuple[str, ...] = ()
    #: Extra suffixes that must never be sent to the cluster.
    never_cluster_suffixes: tuple[str, ...] = ()
    _effective: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cluster_domain = _norm_domain(self.cluster_domain)
        if not cluster_domain or "" in cluster_domain.split("."):
            raise ValueError(f"invalid cluster domain {self.cluster_domain!r}")
        mapped = frozenset(_norm_namespaces(self.mapped_namespaces))
        live = frozenset(_norm_namespaces(self.live_namespaces))
        search = tuple(dict.fromkeys(_norm_namespaces(self.search_namespaces)))
        local = tuple(dict.fromkeys(d for d in map(_norm_domain, self.local_search_domains) if d))
        never = tuple(dict.fromkeys(d for d in map(_norm_domain, self.never_cluster_suffixes) if d))
        object.__setattr__(self, "cluster_domain", cluster_domain)
        object.__setattr__(self, "mapped_namespaces", mapped)
        object.__setattr__(self, "live_namespaces", live)
        object.__setattr__(self, "search_namespaces", search)
        object.__setattr__(self, "local_search_domains", local)
        object.__setattr__(self, "never_cluster_suffixes", never)
        object.__setattr__(
            self, "_effective", (live if self.all_namespaces else mapped) | frozenset(search)
        )

    @property
    def effective_namespaces(self) -> frozenset[str]:
        """Namespaces whose pseudo-TLD names are routed to the cluster."""
        return self._effective


def _norm_namespaces(names: Iterable[str]) -> list[str]:
    result = []
    for name in names:
        norm = _norm_domain(name)
        if _BAD_NAMESPACE.search(norm):
            raise ValueError(f"invalid namespace {name!r}: expected a single DNS label")
        result.append(norm)
    return result


def _is_under(name: str, domain: str) -> bool:
    return name == domain or name.endswith("." + domain)


def _reverse_address(labels: list[str]) -> IPv4Address | IPv6Address | None:
    """The address a complete reverse name stands for, None for partial names."""
    try:
        if tuple(labels[-2:]) == _IPV4_REVERSE and len(labels) == 6:
            return IPv4Address(".".join(reversed(labels[:4])))
        if tuple(labels[-2:]) == _IPV6_REVERSE and len(labels) == 34:
            nibbles = labels[:32]
            if not all(len(n) == 1 for n in nibbles):
                return None
            return IPv6Address(int("".join(reversed(nibbles)), 16))
    except ValueError:
        return None
    return None


def _cluster_names(
    prefix: str, *, namespaces: Iterable[str], cluster_domain: str
) -> tuple[str, ...]:
    return tuple(f"{prefix}.{ns}.svc.{cluster_domain}." for ns in namespaces)


def _is_short_form_shape(labels: list[str]) -> bool:
    """Whether ``labels`` (ending in a namespace) is a name the cluster can own."""
    if len(labels) == 2:
        return True
    if len(labels) == 3:
        return _STATEFULSET_POD.match(labels[0]) is not None
    if len(labels) == 4:
        return labels[0].startswith("_") and len(labels[0]) > 1 and labels[1] in _SRV_PROTOCOLS
    return False


def route_query(
    qname: str,
    qtype: int,
    rules: NameRules,
    *,
    cluster_subnets: Iterable[IPv4Network | IPv6Network] = (),
) -> Route:
    """Decide where the query ``qname``/``qtype`` goes; see the module docstring.

    ``cluster_subnets`` are the subnets routed to the cluster; only reverse
    lookups inside them are answered by the cluster.  ``qtype`` matters only
    for reverse names (the cluster answers PTR, nothing else there).
    """
    name = qname.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    labels = name.split(".")
    if not name or "" in labels:
        return Route(Action.UPSTREAM, Reason.NOT_A_NAME)

    if labels[0] == "wpad":
        return Route(Action.UPSTREAM, Reason.WPAD)
    if labels[-1] == "localhost":
        return Route(Action.UPSTREAM, Reason.LOCALHOST)
    if any(_is_under(name, sfx) for sfx in rules.never_cluster_suffixes):
        return Route(Action.UPSTREAM, Reason.NEVER_CLUSTER_SUFFIX)

    if tuple(labels[-2:]) in (_IPV4_REVERSE, _IPV6_REVERSE):
        addr = _reverse_address(labels)
        if (
            addr is not None
            and qtype == dns.rdatatype.PTR
            and any(addr in net for net in cluster_subnets if net.version == addr.version)
        ):
            return Route(Action.CLUSTER, Reason.REVERSE_CLUSTER, (name + ".",))
        return Route(Action.UPSTREAM, Reason.REVERSE_OTHER)

    if _is_under(name, rules.cluster_domain):
        return Route(Action.CLUSTER, Reason.CLUSTER_DOMAIN, (name + ".",))

    if any(_is_under(name, dom) for dom in rules.local_search_domains):
        return Route(Action.UPSTREAM, Reason.LOCAL_SEARCH_DOMAIN)

    namespaces = rules.effective_namespaces
    if len(labels) >= 3 and labels[-1] == "svc" and labels[-2] in namespaces:
        return Route(Action.CLUSTER, Reason.SVC_PSEUDO_TLD, (f"{name}.{rules.cluster_domain}.",))

    if len(labels) >= 2 and labels[-1] in namespaces:
        if not _is_short_form_shape(labels):
            return Route(Action.UPSTREAM, Reason.NAMESPACE_PSEUDO_TLD_OTHER)
        return Route(
            Action.CLUSTER_THEN_UPSTREAM,
            Reason.NAMESPACE_PSEUDO_TLD,
            _cluster_names(
                ".".join(labels[:-1]), namespaces=labels[-1:], cluster_domain=rules.cluster_domain
            ),
        )

    if len(labels) == 1 and rules.search_namespaces:
        return Route(
            Action.CLUSTER_THEN_UPSTREAM,
            Reason.SEARCH_NAMESPACE,
            _cluster_names(
                name, namespaces=rules.search_namespaces, cluster_domain=rules.cluster_domain
            ),
        )

    return Route(Action.UPSTREAM, Reason.NO_MATCH)


def search_path(rules: NameRules) -> list[str]:
    """The search list to install in the laptop's resolver while connected.

    ``<ns>.svc.<cluster domain>`` for each search namespace, in order, then the
    laptop's own search domains.  Cluster domains come first because the
    laptop should behave like a pod in those namespaces; that costs little,
    since a miss there is a quick final NXDOMAIN from the cluster (rule 5)
    after which the resolver moves on to the laptop's own domains, which are
    answered upstream exactly as before (rule 6).  No trailing dots, no
    duplicates.
    """
    cluster = [f"{ns}.svc.{rules.cluster_domain}" for ns in rules.search_namespaces]
    return list(dict.fromkeys([*cluster, *rules.local_search_domains]))
