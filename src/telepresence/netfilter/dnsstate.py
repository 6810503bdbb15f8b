"""The helper's DNS changes: the port-53 redirect, or systemd-resolved's settings of its TUN.

The DNS half of :class:`.state.NetworkState`, which owns the rest (the TUN, routes, the
nft table) and calls in here at Setup, for the DNS requests, for Status and at teardown.
What is decided is :mod:`.dnspolicy`; this module reads the files, asks the bus and
applies, journaling first as everywhere in the helper.

In DNS mode "redirect" the redirect lives in the nft table (its ``dns_servers`` set), so
nothing here needs a journal entry of its own.  In mode "resolved" the link's settings
live in resolved: they are journaled (:class:`.journal.ResolvedLinkEntry`) before the
first call, and reverted before anything else at teardown.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from telepresence.netfilter import nftables, routes
from telepresence.netfilter.dnspolicy import (
    DnsMode,
    choose_dns_mode,
    choose_nameservers,
    link_domains,
)
from telepresence.netfilter.journal import Journal, LinkEntry, ResolvedLinkEntry, describe
from telepresence.netfilter.nftables import Nft
from telepresence.netfilter.policy import Refused
from telepresence.netfilter.protocol import LinkDomainsDone, NameserversDone, SetLinkDomains
from telepresence.netfilter.resolvconf import read_hosts_sources, read_resolv_conf
from telepresence.netfilter.resolved import (
    LinkDomain,
    ResolvedError,
    ResolvedLinks,
    render_domains,
)

__all__ = ["DnsApplied", "HelperDns", "undo_resolved_link"]

log = logging.getLogger("telepresence.netfilter.helper")


@dataclass
class DnsApplied:
    """What is applied for DNS now, so teardown and Status need not ask."""

    mode: DnsMode
    #: Redirected now (mode "redirect"): the plan's at first, then following resolv.conf.
    nameservers: list[IPv4Address] = field(default_factory=list)
    #: Journaled resolved settings (mode "resolved"), until reverted.
    link: ResolvedLinkEntry | None = None
    #: The link's domains as last set (mode "resolved").
    domains: list[LinkDomain] = field(default_factory=list)


class HelperDns:
    """Reads resolv.conf and nsswitch.conf, talks to resolved, and keeps the journal
    right for what it changes."""

    def __init__(
        self,
        *,
        nft: Nft,
        journal: Journal,
        resolved: ResolvedLinks,
        resolv_conf: Path,
        nsswitch_conf: Path,
    ) -> None:
        self._nft = nft
        self._journal = journal
        self._resolved = resolved
        self._resolv_conf = resolv_conf
        self._nsswitch_conf = nsswitch_conf

    # Setup -----------------------------------------------------------------------

    def choose(self) -> tuple[DnsMode, list[IPv4Address]]:
        """At Setup: the mode, and the nameservers to redirect (none in "resolved")."""
        conf = read_resolv_conf(self._resolv_conf)
        mode = choose_dns_mode(
            nameservers=conf.nameservers,
            hosts_sources=read_hosts_sources(self._nsswitch_conf),
            resolved_running=self._resolved.running,
        )
        return mode, conf.ipv4_nameservers() if mode == "redirect" else []

    def configure_link(self, dns: DnsApplied, *, link: LinkEntry, address: IPv4Address) -> None:
        """Mode "resolved": ``address`` as the link's DNS server, no domains yet (nothing
        is sent to us before SetLinkDomains), no default route."""
        entry = ResolvedLinkEntry(name=link.name, ifindex=link.ifindex)
        self._journal.record(entry)
        dns.link = entry
        self._resolved.configure_link(link.ifindex, dns=address)
        log.info("systemd-resolved sends %s's domains to %s (none yet)", link.name, address)

    # Requests --------------------------------------------------------------------

    def refresh(self, dns: DnsApplied, *, table: str) -> NameserversDone:
        """Moves the DNS redirect to the nameservers resolv.conf lists now.

        One nft transaction (flush and refill of the set), so at no moment is
        an old server still hooked next to a new one or none hooked at all.
        The journal needs no new entry: the set lives in the table it already
        records, and deleting the table (teardown, ``--cleanup``, or the kernel
        when the helper dies) removes whatever the set holds.  In mode "resolved"
        nothing is redirected, whatever the file says: an empty answer.
        """
        if dns.mode == "resolved":
            return NameserversDone(nameservers=[])
        read = read_resolv_conf(self._resolv_conf).ipv4_nameservers()
        choice = choose_nameservers(current=dns.nameservers, read=read)
        if choice.kept:
            log.warning("%s", choice.kept)
        changed = choice.changed_from(dns.nameservers)
        if changed:
            self._nft.run(nftables.render_nameservers(table=table, nameservers=choice.nameservers))
            log.info(
                "DNS redirect moved from %s to %s",
                ", ".join(map(str, dns.nameservers)) or "none",
                ", ".join(map(str, choice.nameservers)) or "none",
            )
            dns.nameservers = list(choice.nameservers)
        return NameserversDone(
            nameservers=[str(n) for n in dns.nameservers], changed=changed, kept=choice.kept
        )

    def set_domains(self, dns: DnsApplied, request: SetLinkDomains) -> LinkDomainsDone:
        """Mode "resolved": the TUN link's domains become exactly the request's, checked;
        on our link only (the request cannot name another, or a global setting)."""
        if dns.mode != "resolved" or dns.link is None:
            raise Refused(
                "SetLinkDomains: DNS mode is redirect (the laptop's nameservers are "
                "redirected, systemd-resolved is not used), so there is no link to set "
                "domains on"
            )
        domains = link_domains(routing=request.routing, search=request.search)
        self._resolved.set_domains(dns.link.ifindex, domains)
        dns.domains = domains
        shown = render_domains(domains)
        log.info("domains of %s: %s", dns.link.name, " ".join(shown) or "none")
        return LinkDomainsDone(domains=shown)

    def status_domains(self, dns: DnsApplied) -> list[str]:
        """The link's domains as resolved reports them; none when it cannot say."""
        if dns.link is None:
            return []
        try:
            return render_domains(self._resolved.link_domains(dns.link.ifindex))
        except ResolvedError as e:
            log.warning("cannot read %s's domains back: %s", dns.link.name, e)
            return []

    # Teardown --------------------------------------------------------------------

    def revert(self, dns: DnsApplied) -> str | None:
        """Drops resolved's settings of the link; what failed, or None."""
        if dns.link is None:
            return None
        try:
            self._resolved.revert_link(dns.link.ifindex)
        except Exception as e:
            return f"{describe(dns.link)}: {e}"
        self._journal.forget(dns.link)
        dns.link = None
        return None

    def link_deleted(self, dns: DnsApplied, failure: str | None) -> None:
        """The TUN is gone, and resolved's settings of it with it: a failed revert
        (``failure``) has nothing left to undo."""
        if dns.link is not None:
            log.warning("%s; gone with the link", failure)
            self._journal.forget(dns.link)
            dns.link = None


def undo_resolved_link(entry: ResolvedLinkEntry, resolved: ResolvedLinks) -> bool:
    """A dead helper's resolved settings: reverted while its link (that name *and* index)
    exists; False when there is nothing to revert."""
    link = routes.get_link(entry.name)
    if link is None or link.ifindex != entry.ifindex:
        return False
    return resolved.revert_link(entry.ifindex)
