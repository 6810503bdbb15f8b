"""The helper's changes to the laptop's network: applied one request at a time, undone at the end.

Every change is written to the journal before it is made and undone by
:meth:`NetworkState.teardown`, each undo in its own try.  Every request is
checked completely (:mod:`.policy`, against the laptop as it is now) before
the first change, so a refused request changes nothing; a request that fails
midway is rolled back.  Routes and the nft sets that follow them are
:mod:`.routestate`; DNS (the redirect, or systemd-resolved's settings of the TUN)
is :mod:`.dnsstate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
from ipaddress import IPv4Network
from pathlib import Path

from telepresence.netfilter import conntrack, nftables, policy, routes, tun
from telepresence.netfilter.dnsstate import DnsApplied, HelperDns, undo_resolved_link
from telepresence.netfilter.journal import (
    Entry,
    Journal,
    LinkEntry,
    NftTableEntry,
    ResolvedLinkEntry,
    RouteEntry,
)
from telepresence.netfilter.nftables import Nft, NftError, TableConfig
from telepresence.netfilter.policy import Refused
from telepresence.netfilter.protocol import (
    AddHostRoutes,
    Error,
    HostRoutesDone,
    Ok,
    RefreshNameservers,
    RemoveHostRoutes,
    Request,
    Response,
    SetLinkDomains,
    Setup,
    SetupDone,
    SocketReady,
    Status,
    StatusReply,
    SubnetsDone,
    Teardown,
    UpdateSubnets,
    UpstreamSocket,
)
from telepresence.netfilter.resolvconf import NSSWITCH_CONF, RESOLV_CONF
from telepresence.netfilter.resolved import Resolved, ResolvedError, ResolvedLinks
from telepresence.netfilter.routestate import Applied, HelperRoutes

__all__ = ["LOG_FILE", "NetworkState", "undo_entry"]

log = logging.getLogger("telepresence.netfilter.helper")

LOG_FILE = Path("/var/log/telepresence/helper.log")
_SO_MARK = getattr(socket, "SO_MARK", 36)


class NetworkState:
    """Applies requests, one at a time; every change is journaled first and
    undone by :meth:`teardown`, each undo in its own try.

    ``resolv_conf`` is where the nameservers to redirect are read, at Setup and
    on every RefreshNameservers; ``nsswitch_conf`` and ``resolved`` (systemd-resolved on
    the system bus) decide the DNS mode at Setup (:mod:`.dnsstate`).
    """

    def __init__(
        self,
        *,
        nft: Nft,
        journal: Journal,
        resolv_conf: Path = RESOLV_CONF,
        nsswitch_conf: Path = NSSWITCH_CONF,
        resolved: ResolvedLinks | None = None,
    ) -> None:
        self._nft = nft
        self._journal = journal
        self._routes = HelperRoutes(nft=nft, journal=journal)
        self._dns = HelperDns(
            nft=nft,
            journal=journal,
            resolved=resolved if resolved is not None else Resolved(),
            resolv_conf=resolv_conf,
            nsswitch_conf=nsswitch_conf,
        )
        self._applied: Applied | None = None

    def handle(self, request: Request) -> tuple[Response, list[int]]:
        """The response and descriptors to send; the caller closes the descriptors after."""
        response, fds = self._answer(request)
        if isinstance(response, Error):
            response = Error(message=" ".join(response.message.split()))  # one line, always
        return response, fds

    def _answer(self, request: Request) -> tuple[Response, list[int]]:
        try:
            return self._dispatch(request)
        except (Refused, ValueError, NftError, routes.IpError, tun.TunError, ResolvedError) as e:
            log.warning("%s failed: %s", type(request).__name__, e)
            return Error(message=str(e)), []
        except OSError as e:
            log.warning("%s failed: %s", type(request).__name__, e)
            return Error(message=f"{type(request).__name__} failed: {e}"), []
        except Exception as e:
            log.exception("%s failed", type(request).__name__)
            return Error(message=f"internal error in the network helper ({e}); see {LOG_FILE}"), []

    def _dispatch(self, request: Request) -> tuple[Response, list[int]]:
        if isinstance(request, Setup):
            return self._setup(request)
        if isinstance(request, Status):
            return self._status(), []
        if isinstance(request, Teardown):
            failures = self.teardown()
            if failures:
                raise Refused("teardown incomplete: " + "; ".join(failures))
            return Ok(), []
        applied = self._applied
        if applied is None:
            raise Refused(f"{type(request).__name__} before Setup: send Setup first")
        if isinstance(request, UpdateSubnets):
            requested = policy.parse_ipv4_subnets(request.subnets)
            network = routes.laptop_network()
            applied.plan.check_subnets(requested, gateways=network.gateways)
            nets = applied.plan.routed(requested)
            new = set(nets) - set(applied.subnets)
            applied.plan.check_conflicts(sorted(new), network.routes)
            self._routes.reconcile(applied, subnets=nets, hosts=applied.hosts)
            return SubnetsDone(routed=[str(n) for n in applied.subnets]), []
        if isinstance(request, AddHostRoutes):
            ips = policy.parse_addresses(request.ips, what="host address")
            return self._routes.add_hosts(applied, ips), []
        if isinstance(request, RemoveHostRoutes):
            gone = set(policy.parse_addresses(request.ips, what="host address"))
            self._routes.reconcile(applied, subnets=applied.subnets, hosts=applied.hosts - gone)
            return HostRoutesDone(hosts=[str(h) for h in sorted(applied.hosts)]), []
        if isinstance(request, RefreshNameservers):
            return self._dns.refresh(applied.dns, table=applied.plan.table.name), []
        if isinstance(request, SetLinkDomains):
            return self._dns.set_domains(applied.dns, request), []
        if isinstance(request, UpstreamSocket):
            fd = upstream_socket(kind=request.kind, family=request.family)
            return SocketReady(kind=request.kind, family=request.family), [fd]
        raise Refused(f"unknown request {type(request).__name__}")

    # Setup ---------------------------------------------------------------

    def _setup(self, request: Setup) -> tuple[Response, list[int]]:
        if self._applied is not None:
            raise Refused("already set up: send Teardown first, or UpdateSubnets")
        mode, nameservers = self._dns.choose()
        link_dns = policy.LINK_DNS_ADDRESS if mode == "resolved" else None
        plan = policy.plan_setup(
            request, network=routes.laptop_network(), nameservers=nameservers, link_dns=link_dns
        )
        existing = routes.get_link(plan.tun_name)
        if existing is not None and existing.kind == "tun":
            raise Refused(
                f"TUN device {plan.tun_name} already exists: another telepresence session is "
                "connected, or one left it behind (run `telepresence quit`)"
            )
        if existing is not None:
            raise Refused(
                f"cannot create the TUN device {plan.tun_name}: the laptop has a "
                f"{existing.kind or 'network'} device of that name; rename or remove it"
            )
        subnets = plan.routed(plan.requested)
        dns = DnsApplied(mode=mode, nameservers=list(plan.table.dns_servers))
        applied = Applied(plan=plan, dns=dns)
        if link_dns is not None:
            applied.fixed.add(IPv4Network(link_dns))
        self._applied = applied
        try:
            self._create_tun(applied)
            self._routes.add(applied, sorted(set(subnets) | applied.fixed))
            applied.subnets = subnets
            self._create_table(applied)
            if link_dns is not None:
                assert applied.link is not None
                self._dns.configure_link(dns, link=applied.link, address=link_dns)
        except BaseException:
            failures = self.teardown()
            if failures:
                log.error("rollback of the failed Setup incomplete: %s", "; ".join(failures))
            raise
        assert applied.tun is not None
        log.info(
            "set up %s %s, routes %s, table %s, DNS mode %s",
            plan.tun_name,
            plan.tun_address,
            ", ".join(map(str, subnets)) or "none",
            plan.table.name,
            mode,
        )
        done = SetupDone(
            tun_name=plan.tun_name,
            routed=[str(n) for n in subnets],
            nameservers=[str(n) for n in plan.table.dns_servers],
            mark=plan.table.mark,
            dns_mode=mode,
            dns_address=str(link_dns) if link_dns is not None else "",
        )
        return done, [os.dup(applied.tun.fd)]

    def _create_tun(self, applied: Applied) -> None:
        plan = applied.plan
        applied.tun = tun.open_tun(plan.tun_name)
        link = routes.get_link(applied.tun.name)
        if link is None:
            raise tun.TunError(f"TUN device {applied.tun.name} vanished right after creation")
        applied.link = LinkEntry(name=link.name, ifindex=link.ifindex)
        self._journal.record(applied.link)
        routes.configure_tun(device=link.name, address=plan.tun_address)

    def _create_table(self, applied: Applied) -> None:
        plan = applied.plan
        config = TableConfig(
            name=plan.table.name,
            mark=plan.table.mark,
            proxy_port=plan.table.proxy_port,
            dns_port=plan.table.dns_port,
            dns_servers=plan.table.dns_servers,
            routed=applied.subnets,
            link_dns=plan.table.link_dns,
        )
        entry = NftTableEntry(name=config.name)
        self._journal.record(entry)
        try:
            self._nft.run(nftables.render_create(config))
        except NftError:
            # One transaction: nothing was created, and a table that exists is not ours.
            self._journal.forget(entry)
            if self._nft.table_exists(config.name):
                raise Refused(
                    f"nftables table ip {config.name} already exists: another telepresence "
                    "session is connected, or one left it behind (run `telepresence quit`)"
                ) from None
            raise
        applied.table = entry

    # Sockets and status ------------------------------------------------------

    def _status(self) -> StatusReply:
        applied = self._applied
        if applied is None:
            return StatusReply(configured=False, helper_pid=os.getpid())
        plan = applied.plan
        link = routes.get_link(plan.tun_name)
        present = (
            link is not None and applied.link is not None and link.ifindex == applied.link.ifindex
        )
        return StatusReply(
            configured=True,
            helper_pid=os.getpid(),
            tun_name=plan.tun_name,
            tun_address=str(plan.tun_address),
            tun_present=present,
            routes=[str(n) for n in routes.routes_on(plan.tun_name)] if present else [],
            hosts=[str(h) for h in sorted(applied.hosts)],
            nft_table=plan.table.name,
            nft_table_present=self._nft.table_exists(plan.table.name),
            dns_redirects=nftables.render_dns_redirects(
                dataclasses.replace(plan.table, dns_servers=applied.dns.nameservers)
            ),
            proxy_port=plan.table.proxy_port,
            mark=plan.table.mark,
            dns_mode=applied.dns.mode,
            dns_address=str(plan.table.link_dns or ""),
            link_domains=self._dns.status_domains(applied.dns),
        )

    # Teardown --------------------------------------------------------------------

    def teardown(self) -> list[str]:
        """Undoes everything, DNS first; returns what could not be undone.

        resolved's settings of the link go first, then the table: deleting it
        removes the DNS redirect and the proxy redirect in one atomic step, so
        the laptop resolves through its own nameserver again before anything
        slower happens.  Idempotent.
        """
        applied, self._applied = self._applied, None
        if applied is None:
            return []
        resolved_failure = self._dns.revert(applied.dns)
        failures: list[str] = []
        if applied.table is not None:
            try:
                _delete_table(self._nft, applied.table)
                # The NAT decisions its rules made live on in conntrack (conntrack.py).
                conntrack.forget_marked(applied.plan.table.mark)
                self._journal.forget(applied.table)
            except Exception as e:
                failures.append(f"nftables table {applied.table.name}: {e}")
        if applied.link is not None:
            try:
                self._routes.delete(applied, sorted(applied.routes))
            except Exception as e:
                failures.append(f"routes on {applied.link.name}: {e}")
            try:
                routes.delete_link(name=applied.link.name, ifindex=applied.link.ifindex)
                self._journal.forget(applied.link, *applied.routes.values())
                self._dns.link_deleted(applied.dns, resolved_failure)
                resolved_failure = None
            except Exception as e:
                failures.append(f"link {applied.link.name}: {e}")
        if resolved_failure is not None:
            failures.insert(0, resolved_failure)
        if applied.tun is not None:
            with contextlib.suppress(OSError):
                os.close(applied.tun.fd)
        if failures:
            log.error("teardown incomplete: %s", "; ".join(failures))
        else:
            log.info("teardown complete")
        return failures


def _delete_table(nft: Nft, entry: NftTableEntry) -> bool:
    """True if deleted; gone already is fine, and a table owned by another live
    process (the kernel refuses us) is not ours."""
    try:
        nft.run(nftables.render_delete(entry.name))
    except NftError as e:
        if "No such file or directory" in str(e):
            return False
        if "Operation not permitted" in str(e):
            log.info("table %s belongs to another live process: left alone", entry.name)
            return False
        raise
    return True


def upstream_socket(*, kind: str, family: int, mark: int = policy.MARK) -> int:
    """A new UDP or TCP socket, IPv4 or IPv6, with the helper's fixed mark; the
    caller owns the descriptor.

    SO_MARK needs CAP_NET_ADMIN, which the daemon lacks: the helper makes the
    socket and hands it over; the mark exempts it from the DNS redirect.  Only
    these two kinds and families, and only this mark: nothing that a raw or
    packet socket, or a mark that VPN policy routing exempts, could do.
    """
    kinds = {"udp": socket.SOCK_DGRAM, "tcp": socket.SOCK_STREAM}
    families = {4: socket.AF_INET, 6: socket.AF_INET6}
    if kind not in kinds or family not in families:
        raise Refused(f"no {kind} socket of IP version {family}: only udp or tcp, 4 or 6")
    sock = socket.socket(families[family], kinds[kind])
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, mark)
        return sock.detach()
    finally:
        sock.close()


def undo_entry(nft: Nft, entry: Entry, *, resolved: ResolvedLinks | None = None) -> bool:
    """Undoes one journal entry of a dead helper; False if it was gone already."""
    if isinstance(entry, ResolvedLinkEntry):
        return undo_resolved_link(entry, resolved if resolved is not None else Resolved())
    if isinstance(entry, NftTableEntry):
        deleted = _delete_table(nft, entry)
        # Also when the table vanished with its helper (kill -9): its connections did
        # not. Not while another live helper owns a table of that name: they are its.
        if not nft.table_exists(entry.name):
            conntrack.forget_marked(policy.MARK)
        return deleted
    if isinstance(entry, RouteEntry):
        network = IPv4Network(entry.network)
        return routes.delete_routes(device=entry.device, ifindex=entry.ifindex, networks=[network])
    return routes.delete_link(name=entry.name, ifindex=entry.ifindex)
