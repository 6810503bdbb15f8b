"""What systemd-resolved is told in "resolved" DNS mode, and what we take from it: pure.

With systemd-resolved the helper makes the TUN a DNS link: resolved sends the
names under the link's domains to our DNS address on the TUN, and everything
else to the laptop's own servers as before.  :func:`link_domains` decides
those domains from the session's :class:`~telepresence.daemon.dnsrules.NameRules`,
so that every name :func:`~telepresence.daemon.dnsrules.route_query` could
send to the cluster reaches us, and no other:

* routing-only domains (resolved's ``~domain``): the cluster domain (FQDNs),
  ``svc`` (``svc.ns.svc``) and every mapped namespace (``svc.ns``; with all
  namespaces mapped, the live ones, followed as they come and go);
* search domains: the search namespaces (``connect --namespace``, then
  local-only intercepts), in order, so that resolved tries a single-label
  ``svc`` as ``svc.<ns>``.  A search domain routes too, so it is not repeated
  among the routing ones.

resolved takes at most :data:`MAX_LINK_DOMAINS` domains per link (and the
helper refuses more): the cluster domain, ``svc`` and the search domains are
kept first, then namespaces in name order; those left out are returned so the
caller can say so.  Names in them still resolve by their FQDN.

:func:`resolved_upstreams` and :func:`laptop_search_domains` read the other
way: resolved's own resolv.conf (``/run/systemd/resolve/resolv.conf``) lists
its upstream servers and search domains, ours among them once applied.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from telepresence.daemon.dnsrules import NameRules

__all__ = [
    "MAX_LINK_DOMAINS",
    "SVC",
    "LinkDomains",
    "laptop_search_domains",
    "link_domains",
    "resolved_upstreams",
    "split_applied",
]

#: resolved's limit of domains per link (LINK_SEARCH_DOMAINS_MAX); the helper refuses
#: a longer list rather than have resolved cut it somewhere we did not choose.
MAX_LINK_DOMAINS = 256
#: The pseudo-TLD of ``<svc>.<ns>.svc`` (dnsrules rule 7).
SVC = "svc"

_LOOPBACK = IPv4Network("127.0.0.0/8")


@dataclass(frozen=True)
class LinkDomains:
    """``routing``: routing-only domains; ``search``: search domains, in search order;
    ``left_out``: namespaces beyond the cap, in name order.  Lower case, no dots at
    either end, no domain twice across ``routing`` and ``search``."""

    routing: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    left_out: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        """Domains on the link (``left_out`` are not)."""
        return len(self.routing) + len(self.search)


def link_domains(rules: NameRules, *, limit: int = MAX_LINK_DOMAINS) -> LinkDomains:
    """The TUN link's domains for ``rules``; deterministic for equal rules.

    ``rules`` is normalised already (lower case, no dots at the ends).  The
    cluster domain, ``svc`` and the search namespaces come first, within
    ``limit`` in that order; namespaces fill what is left, in name order.
    """
    searched = list(dict.fromkeys(rules.search_namespaces))
    # A search domain routes as well: a namespace on the search path needs no ~entry.
    first = [d for d in dict.fromkeys([rules.cluster_domain, SVC]) if d not in searched]
    namespaces = sorted(rules.effective_namespaces.difference(searched, first))
    kept_first = first[:limit]
    search = searched[: max(0, limit - len(kept_first))]
    room = max(0, limit - len(kept_first) - len(search))
    return LinkDomains(
        routing=(*kept_first, *namespaces[:room]),
        search=tuple(search),
        left_out=(*first[limit:], *searched[len(search) :], *namespaces[room:]),
    )


def split_applied(applied: Iterable[str]) -> LinkDomains:
    """The helper's answer (resolved's ``~domain`` for routing-only, ``domain`` for
    search) as a :class:`LinkDomains`, for status."""
    routing: list[str] = []
    search: list[str] = []
    for entry in applied:
        if entry.startswith("~"):
            routing.append(entry[1:])
        else:
            search.append(entry)
    return LinkDomains(routing=tuple(routing), search=tuple(search))


def resolved_upstreams(nameservers: Iterable[str], *, dns_address: IPv4Address | None) -> list[str]:
    """The servers to forward to in "resolved" mode: resolved's upstreams as its
    resolv.conf lists them, in order, without our own DNS address (resolved lists
    it once the link is configured) and without any 127.0.0.0/8 address: the stub
    at 127.0.0.53 would route a name under our domains straight back to us."""
    result: list[str] = []
    for text in nameservers:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if not isinstance(address, IPv4Address) or address in _LOOPBACK:
            continue
        if address == dns_address or str(address) in result:
            continue
        result.append(str(address))
    return result


def laptop_search_domains(listed: Iterable[str], *, ours: Iterable[str]) -> tuple[str, ...]:
    """The laptop's own search domains from resolved's resolv.conf, which lists our
    link's search domains (``ours``) among them once applied: those are taken out,
    or a namespace we put on the search path would count as a laptop domain and
    its names go upstream (dnsrules rule 6).  Routing-only domains are never listed
    there, so a laptop domain that is also a mapped namespace stays the laptop's,
    as in "redirect" mode."""
    own = {d.strip(".").lower() for d in ours}
    return tuple(d for d in dict.fromkeys(listed) if d.strip(".").lower() not in own)
