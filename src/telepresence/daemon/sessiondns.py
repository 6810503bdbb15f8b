"""The session's DNS: the server, its upstreams, and how the laptop's resolver reaches it.

The network helper chooses how queries reach us (``SetupResult.dns_mode``):

* "redirect": nftables redirects port 53 of the nameservers in /etc/resolv.conf
  to the DNS server on 127.0.0.1.  We forward what is not the cluster's to exactly
  those nameservers, and follow /etc/resolv.conf: on a change the helper re-reads
  it and moves the redirect (``RefreshNameservers``), and we forward to what it
  redirects now.
* "resolved" (systemd-resolved runs): the TUN is a DNS link whose server is
  ``dns_address``; resolved sends the names under the link's domains there
  through the TUN, where :class:`~telepresence.daemon.udp.UdpRelay` answers them
  (:meth:`SessionDns.local_dns`), and falls back to TCP, which the helper
  redirects to the DNS server on 127.0.0.1.  The domains (:mod:`.linkdomains`)
  are sent right after Setup and again whenever they change (namespaces come and
  go, intercepts are made and left: :meth:`SessionDns.domains_changed`).  The
  upstreams are resolved's own servers, from its resolv.conf
  (:data:`RESOLVED_CONF`), followed with the same poller and no helper call:
  nothing is redirected in this mode.

A failure to set the domains at connect fails the connect; later ones are
logged, and the next change tries again (the helper undid the failed request,
so it still has what we last sent).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Literal, Protocol

from telepresence.daemon import resolvwatch
from telepresence.daemon.dns import ClusterAnswerHook, ClusterLookup, DnsObserver, DnsSettings
from telepresence.daemon.dnsrules import NameRules
from telepresence.daemon.dnsserver import DnsServer
from telepresence.daemon.linkdomains import (
    LinkDomains,
    laptop_search_domains,
    link_domains,
    resolved_upstreams,
    split_applied,
)
from telepresence.daemon.socketstock import SocketStock
from telepresence.daemon.udp import LocalDns
from telepresence.netfilter.client import HelperError, Nameservers, SetupResult
from telepresence.netfilter.resolvconf import RESOLV_CONF, ResolvConf, read_resolv_conf

__all__ = [
    "DNS_PORT",
    "REDIRECT_HOOK",
    "RESOLVED_CONF",
    "RESOLV_CONF",
    "DnsHelper",
    "SessionDns",
]

log = logging.getLogger("telepresence.session")

#: Where the laptop's nameservers listen (tests move it: fakes on loopback need no root).
DNS_PORT = 53
#: systemd-resolved's list of its upstream servers (not the 127.0.0.53 stub that
#: /etc/resolv.conf names); tests point it at a file of their own.
RESOLVED_CONF = Path("/run/systemd/resolve/resolv.conf")
#: How "redirect" mode hooks in, as `status` says it.
REDIRECT_HOOK = "nftables redirect of the laptop's nameservers (no file edited)"

DnsMode = Literal["redirect", "resolved"]
_DEFAULT_SETTINGS = DnsSettings()


class DnsHelper(Protocol):
    """What of the network helper the DNS wiring uses."""

    async def refresh_nameservers(self) -> Nameservers: ...

    async def set_link_domains(
        self, *, routing: Iterable[str], search: Iterable[str] = ()
    ) -> list[str]: ...


class SessionDns:
    """The DNS part of one session, from :meth:`start` to :meth:`close`.

    ``rules`` gives the session's current name rules (namespaces, search path);
    the other arguments are those of :class:`~telepresence.daemon.dnsserver.DnsServer`.
    """

    def __init__(
        self,
        *,
        rules: Callable[[], NameRules],
        cluster_subnets: Callable[[], Sequence[IPv4Network]],
        cluster_lookup: ClusterLookup,
        upstream_socket: Callable[[str], Awaitable[socket.socket]],
        on_cluster_answer: ClusterAnswerHook | None = None,
        observer: DnsObserver | None = None,
        settings: DnsSettings = _DEFAULT_SETTINGS,
    ) -> None:
        self._rules = rules
        self.settings = settings
        #: The helper's marked sockets, a few made ahead (:mod:`.socketstock`).
        self.sockets = SocketStock(upstream_socket)
        #: Built now (nothing bound): it listens from :meth:`start`.
        self.server = DnsServer(
            rules=rules,
            cluster_subnets=cluster_subnets,
            cluster_lookup=cluster_lookup,
            upstreams=(),
            upstream_socket=self.sockets.take,
            on_cluster_answer=on_cluster_answer,
            observer=observer,
            settings=settings,
        )
        self.helper: DnsHelper | None = None
        self.mode: DnsMode = "redirect"
        self.tun_name = ""
        self.dns_address: IPv4Address | None = None
        #: The file we follow, as last read: /etc/resolv.conf, or resolved's.
        self.resolv = ResolvConf()
        #: What the helper redirects ("redirect" mode; nothing in "resolved" mode).
        self.nameservers: list[str] = []
        #: Where names that are not the cluster's go, in order.
        self.upstreams: list[str] = []
        #: The link's domains last sent and accepted, and the helper's answer to it.
        self.sent: LinkDomains | None = None
        self.applied: list[str] = []
        #: Why the last update of the link's domains failed ("" once one succeeds).
        self.link_error = ""
        self._stamp: resolvwatch.Stamp | None = None
        self._changed = asyncio.Event()
        self._left_out: tuple[str, ...] = ()
        #: Every search domain put on the link this session: resolved's file may list
        #: one for a moment after it left the link (until the watch reads it again).
        self._searched: set[str] = set()

    @property
    def port(self) -> int:
        """The DNS server's port on 127.0.0.1 (UDP and TCP); 0 before :meth:`start`."""
        return self.server.port

    @property
    def local_search_domains(self) -> tuple[str, ...]:
        """The laptop's own search domains: never sent to the cluster (dnsrules rule 6)."""
        if self.mode == "redirect":
            return self.resolv.search
        return laptop_search_domains(self.resolv.search, ours=self._searched)

    # --- connect ---------------------------------------------------------------------

    async def start(self) -> int:
        """Reads /etc/resolv.conf (the helper's parser and file, so we agree on the
        nameservers) and starts the DNS server; returns its port, for the helper."""
        # The stamp first, so a change made while we read is seen by the watch.
        self._stamp = resolvwatch.read_stamp(RESOLV_CONF)
        self.resolv = read_resolv_conf(RESOLV_CONF)
        self.upstreams = list(self.resolv.nameservers)
        # The clients' `options timeout:` bounds how long a forwarded query may take.
        self.server.upstreams.set_servers(
            _servers(self.upstreams), client_timeout=self.resolv.timeout
        )
        return await self.server.start()

    def adopt(self, result: SetupResult, helper: DnsHelper) -> LocalDns | None:
        """Takes the helper's choice of mode.  Returns the DNS server the UDP relay
        must answer on the TUN ("resolved" mode), None in "redirect" mode."""
        self.helper = helper
        self.mode = result.dns_mode
        self.tun_name = result.tun_name
        if self.mode == "redirect":
            # Forward to exactly what the helper redirects (its reading of the file).
            self.nameservers = [str(n) for n in result.nameservers]
            self.upstreams = list(self.nameservers)
            self.server.upstreams.set_servers(_servers(self.upstreams))
            return None
        if result.dns_address is None:
            raise HelperError("the network helper chose systemd-resolved but no DNS address")
        self.dns_address = result.dns_address
        self.nameservers = []
        self._stamp = resolvwatch.read_stamp(RESOLVED_CONF)
        self._read_resolved_conf()
        return LocalDns(
            address=result.dns_address,
            answer=self._answer_udp,
            max_pending=self.settings.max_pending,
        )

    async def apply_link_domains(self) -> None:
        """Sends the link's domains now ("resolved" mode; nothing otherwise).  Raises
        :class:`HelperError` when the helper refuses them: at connect that is fatal."""
        if self.mode == "resolved":
            await self._update_link_domains()

    def background(self) -> list[tuple[str, Coroutine[Any, Any, None]]]:
        """The session's DNS tasks, (name, coroutine), for the session to run and cancel:
        the resolv.conf watch, and in "resolved" mode the link domains' follower."""
        if self.mode == "redirect":
            watch = resolvwatch.watch(
                RESOLV_CONF, on_change=self.follow_resolv_conf, initial=self._stamp
            )
            return [("resolv-conf", watch)]
        watch = resolvwatch.watch(
            RESOLVED_CONF, on_change=self.follow_resolved_conf, initial=self._stamp
        )
        return [("resolved-conf", watch), ("link-domains", self.follow_link_domains())]

    # --- during the session ----------------------------------------------------------

    def domains_changed(self) -> None:
        """Namespaces or the search path changed: the link's domains may have to follow.
        Cheap and synchronous; the follower task coalesces bursts of changes."""
        if self.mode == "resolved":
            self._changed.set()

    async def follow_link_domains(self, *, iterations: int | None = None) -> None:
        """Sends the link's domains after each change, until cancelled (or after
        ``iterations`` changes, for tests).  A failure is logged; since nothing is
        marked as sent, the next change sends the whole list again."""
        count = 0
        while iterations is None or count < iterations:
            await self._changed.wait()
            self._changed.clear()
            count += 1
            try:
                await self._update_link_domains()
            except HelperError as e:
                log.warning("telling systemd-resolved the cluster's domains failed: %s", e)
            except Exception:
                log.exception("updating the cluster's DNS domains failed")

    async def follow_resolv_conf(self) -> None:
        """/etc/resolv.conf changed ("redirect" mode): the helper re-reads it and moves
        the DNS redirect (it alone decides what is hooked), then the upstreams follow
        what it hooked.

        Search domains and ``options timeout:`` come from our own reading of the
        same file with the same parser.  A HelperError propagates, so the watch
        tries again at its next look.
        """
        assert self.helper is not None
        resolv = read_resolv_conf(RESOLV_CONF)
        result = await self.helper.refresh_nameservers()
        if result.kept:
            log.warning("%s", result.kept)
        self.resolv = resolv
        self.nameservers = [str(n) for n in result.nameservers]
        self.upstreams = list(self.nameservers)
        self.server.upstreams.set_servers(_servers(self.upstreams), client_timeout=resolv.timeout)
        if result.changed:
            log.info("resolv.conf changed: DNS now redirected from %s", ", ".join(self.nameservers))

    async def follow_resolved_conf(self) -> None:
        """resolved's resolv.conf changed ("resolved" mode; it changes when our own
        domains are applied, too): forward to its upstreams from now on."""
        if self._read_resolved_conf():
            log.info(
                "systemd-resolved's servers changed: forwarding to %s",
                ", ".join(self.upstreams) or "(none)",
            )

    # --- status and teardown ---------------------------------------------------------

    def status(self, *, cluster_domain: str) -> dict[str, Any]:
        common = {
            "mode": self.mode,
            "local_address": f"127.0.0.1:{self.port}",
            "nameservers": list(self.nameservers),
            "upstreams": list(self.upstreams),
            "cluster_domain": cluster_domain,
            "cluster_names": f"*.{cluster_domain}, <svc>.<namespace> for mapped namespaces",
        }
        if self.mode == "redirect":
            return {"hook": REDIRECT_HOOK, **common}
        applied = split_applied(self.applied)
        return {
            "hook": f"systemd-resolved, per-link DNS on {self.tun_name}",
            **common,
            "dns_address": str(self.dns_address) if self.dns_address else "",
            "routing_domains": list(applied.routing),
            "search_domains": list(applied.search),
            "domains_left_out": list(self._left_out),
            "link_error": self.link_error,
        }

    async def close(self) -> None:
        await self.server.close()
        await self.sockets.close()

    # --- inside ----------------------------------------------------------------------

    async def _update_link_domains(self) -> None:
        assert self.helper is not None
        wanted = link_domains(self._rules())
        if wanted.left_out != self._left_out:
            self._left_out = wanted.left_out
            if wanted.left_out:
                log.warning(
                    "systemd-resolved takes %d domains per link: %d namespaces left out "
                    "(their <svc>.<namespace> names do not resolve; FQDNs do): %s",
                    wanted.count,
                    len(wanted.left_out),
                    ", ".join(wanted.left_out),
                )
        if wanted == self.sent:
            return
        self._searched.update(wanted.search)
        try:
            self.applied = await self.helper.set_link_domains(
                routing=wanted.routing, search=wanted.search
            )
        except HelperError as e:
            self.link_error = str(e)
            raise
        self.sent = wanted
        self.link_error = ""
        log.info("systemd-resolved sends %s to us", ", ".join(self.applied) or "nothing")

    def _read_resolved_conf(self) -> bool:
        """Reads resolved's resolv.conf; True when the upstreams changed."""
        self.resolv = read_resolv_conf(RESOLVED_CONF)
        upstreams = resolved_upstreams(self.resolv.nameservers, dns_address=self.dns_address)
        changed = upstreams != self.upstreams
        self.upstreams = upstreams
        # No fallback to 127.0.0.1 here: with no upstream, a query gets SERVFAIL.
        self.server.upstreams.set_servers(
            [(n, DNS_PORT) for n in upstreams], client_timeout=self.resolv.timeout
        )
        return changed

    async def _answer_udp(self, wire: bytes) -> bytes | None:
        return await self.server.resolver.answer(wire, tcp=False)


def _servers(nameservers: Sequence[str]) -> list[tuple[str, int]]:
    """Port 53 of each; with none at all, 127.0.0.1 as glibc would use."""
    return [(n, DNS_PORT) for n in nameservers] or [("127.0.0.1", DNS_PORT)]
