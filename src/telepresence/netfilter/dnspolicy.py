"""What the helper decides about the laptop's DNS: the mode, the nameservers, the domains.

Two ways to bring the laptop's lookups to the daemon (``dns_mode``):

- **redirect**: port 53 of the nameservers in /etc/resolv.conf is redirected with nft.
  Right where glibc (or anything else) sends plain DNS to those servers.
- **resolved**: systemd-resolved is given our TUN as a link with its own DNS server and
  the domains the daemon names (:func:`link_domains`).  Needed where lookups go to
  resolved: glibc's nss-resolve asks it over varlink and sends no port-53 packet
  (Fedora), and the 127.0.0.53 stub would be redirected as a whole, every name of the
  laptop with it (Ubuntu).

Pure functions; the helper reads the files and asks the bus, and passes what it found.
Every refusal is a :class:`.policy.Refused` with one line; see docs/security.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Literal

from telepresence.netfilter.policy import Refused
from telepresence.netfilter.resolved import LinkDomain

__all__ = [
    "MAX_LINK_DOMAINS",
    "RESOLVED_STUBS",
    "DnsMode",
    "NameserverChoice",
    "choose_dns_mode",
    "choose_nameservers",
    "link_domains",
    "lookups_use_resolved",
]

DnsMode = Literal["redirect", "resolved"]

#: systemd-resolved's stub listeners: 127.0.0.53 (with search domains, what
#: stub-resolv.conf lists) and 127.0.0.54 (the "proxy" stub).
RESOLVED_STUBS = ("127.0.0.53", "127.0.0.54")
#: resolved refuses more domains per link (LINK_SEARCH_DOMAINS_MAX in systemd).
MAX_LINK_DOMAINS = 256
#: RFC 1035 sizes; ``_`` is allowed too, as in SRV owner names and some cluster domains.
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")
_MAX_NAME = 253
_SHOWN = 60


def lookups_use_resolved(*, nameservers: Sequence[str], hosts_sources: Sequence[str]) -> bool:
    """Whether the laptop's lookups go to systemd-resolved: resolv.conf points at one of
    its stubs, or nsswitch.conf's ``hosts:`` asks it directly (``resolve``)."""
    return any(n in RESOLVED_STUBS for n in nameservers) or "resolve" in hosts_sources


def choose_dns_mode(
    *,
    nameservers: Sequence[str],
    hosts_sources: Sequence[str],
    resolved_running: Callable[[], bool],
) -> DnsMode:
    """ "resolved" only when lookups go to resolved *and* it runs (asked only then: a bus
    round trip); anything else keeps the port-53 redirect, as without resolved.  A stub
    address without resolved behind it (a container, a stopped service) is redirected
    like any other nameserver."""
    uses = lookups_use_resolved(nameservers=nameservers, hosts_sources=hosts_sources)
    return "resolved" if uses and resolved_running() else "redirect"


def _domain(value: str, *, what: str) -> str:
    shown = value if len(value) <= _SHOWN else value[:_SHOWN] + "…"
    if "~" in value:
        raise Refused(f"{what} domain {shown!r}: no '~' (the helper marks routing domains itself)")
    name = value[:-1] if value.endswith(".") else value
    if not name:
        raise Refused(f"{what} domain {shown!r}: the root would send every name to the cluster")
    if len(name) > _MAX_NAME or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise Refused(
            f"{what} domain {shown!r} is not a DNS name: labels of 1-63 letters, digits, "
            f"'-' or '_', at most {_MAX_NAME} characters in all"
        )
    return name.lower()


def link_domains(*, routing: Iterable[str], search: Iterable[str]) -> list[LinkDomain]:
    """The TUN link's domains for a SetLinkDomains: checked, lower-cased, without the
    trailing dot, each once (a search domain routes too, so one named both ways is a
    search domain); routing-only ones first, each list in the order given.

    Refused: anything but a DNS name, the root (every name would go to the cluster), a
    ``~``, more than :data:`MAX_LINK_DOMAINS` in all.
    """
    searched = list(dict.fromkeys(_domain(d, what="search") for d in search))
    routed = list(dict.fromkeys(_domain(d, what="routing") for d in routing))
    domains = [LinkDomain(d, True) for d in routed if d not in searched]
    domains += [LinkDomain(d, False) for d in searched]
    if len(domains) > MAX_LINK_DOMAINS:
        raise Refused(
            f"{len(domains)} link domains: systemd-resolved takes at most {MAX_LINK_DOMAINS}"
        )
    return domains


@dataclass(frozen=True, kw_only=True)
class NameserverChoice:
    """What to redirect after a re-read of resolv.conf.  ``kept``: why the previous
    list stayed (empty when the file's list was taken)."""

    nameservers: list[IPv4Address]
    kept: str = ""

    def changed_from(self, current: Sequence[IPv4Address]) -> bool:
        return list(self.nameservers) != list(current)


def choose_nameservers(
    *, current: Sequence[IPv4Address], read: Sequence[IPv4Address]
) -> NameserverChoice:
    """The nameservers to redirect, given those redirected now and those just read.

    A file with no usable (IPv4) nameserver keeps the current list: while the
    network changes, NetworkManager may write an empty or IPv6-only file for a
    moment, and dropping the redirect then would send the laptop's lookups past
    the daemon (cluster names stop resolving) for no gain.  Before any good list
    (``current`` empty) there is nothing to keep.
    """
    if read or not current:
        return NameserverChoice(nameservers=list(read))
    return NameserverChoice(
        nameservers=list(current),
        kept="resolv.conf lists no IPv4 nameserver; still redirecting "
        + ", ".join(map(str, current)),
    )
