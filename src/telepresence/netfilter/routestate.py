"""The helper's routes on its TUN, and the nft sets that must agree with them.

Part of :class:`.state.NetworkState`: Setup, UpdateSubnets and the host-route requests
move routes and sets through :meth:`HelperRoutes.reconcile`, which journals every route
before adding it and keeps the kernel's routes and the table's sets in step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from telepresence.netfilter import nftables, policy, routes, tun
from telepresence.netfilter.dnsstate import DnsApplied
from telepresence.netfilter.journal import Journal, LinkEntry, NftTableEntry, RouteEntry
from telepresence.netfilter.nftables import Nft, NftError
from telepresence.netfilter.policy import Plan
from telepresence.netfilter.protocol import HostRoutesDone
from telepresence.netfilter.subnets import IPAddress

__all__ = ["Applied", "HelperRoutes"]

log = logging.getLogger("telepresence.netfilter.helper")


@dataclass
class Applied:
    """What exists now, so teardown knows what to undo without asking the kernel."""

    plan: Plan
    dns: DnsApplied
    tun: tun.Tun | None = None
    link: LinkEntry | None = None
    table: NftTableEntry | None = None
    subnets: list[IPv4Network] = field(default_factory=list)
    hosts: set[IPv4Address] = field(default_factory=set)
    routes: dict[IPv4Network, RouteEntry] = field(default_factory=dict)
    #: The helper's own routes (the link DNS address), kept whatever subnets and hosts are.
    fixed: set[IPv4Network] = field(default_factory=set)

    def desired_routes(self) -> set[IPv4Network]:
        return set(self.subnets) | {IPv4Network(h) for h in self.hosts} | self.fixed


class HelperRoutes:
    """Adds and removes the TUN's routes (journaled first) and the table's sets."""

    def __init__(self, *, nft: Nft, journal: Journal) -> None:
        self._nft = nft
        self._journal = journal

    def add(self, applied: Applied, nets: Sequence[IPv4Network]) -> None:
        """Journal, then add; on failure remove what this call added, then raise."""
        assert applied.link is not None
        new = [n for n in nets if n not in applied.routes]
        if not new:
            return
        link = applied.link
        entries = {
            n: RouteEntry(network=str(n), device=link.name, ifindex=link.ifindex) for n in new
        }
        self._journal.record(*entries.values())
        applied.routes.update(entries)
        try:
            routes.add_routes(device=link.name, networks=new, source=applied.plan.tun_address)
        except routes.IpError:
            self._undo(applied, new)
            raise

    def _undo(self, applied: Applied, nets: Sequence[IPv4Network]) -> None:
        """Rollback on an error path: log its own failure, never mask the first one."""
        try:
            self.delete(applied, nets)
        except Exception as e:
            log.error("could not roll back routes %s: %s", ", ".join(map(str, nets)), e)

    def delete(self, applied: Applied, nets: Sequence[IPv4Network]) -> None:
        assert applied.link is not None
        routes.delete_routes(device=applied.link.name, ifindex=applied.link.ifindex, networks=nets)
        self._journal.forget(*(applied.routes.pop(n) for n in nets if n in applied.routes))

    def reconcile(
        self, applied: Applied, *, subnets: list[IPv4Network], hosts: set[IPv4Address]
    ) -> None:
        """Moves routes and sets to ``subnets`` + ``hosts``, touching only the difference.

        New routes first, then one nft transaction for both sets, then the
        removal of old routes: at no point is an address in a set but not
        routed, and a failure before the nft step leaves the old state.
        """
        plan = applied.plan
        before = applied.desired_routes()
        after = set(subnets) | {IPv4Network(h) for h in hosts} | applied.fixed
        added = sorted(after - before)
        self.add(applied, added)
        commands = nftables.render_set_update(
            table=plan.table.name,
            set_name=nftables.ROUTED_SET,
            add=sorted(set(subnets) - set(applied.subnets)),
            remove=sorted(set(applied.subnets) - set(subnets)),
        ) + nftables.render_set_update(
            table=plan.table.name,
            set_name=nftables.HOSTS_SET,
            add=sorted(hosts - applied.hosts),
            remove=sorted(applied.hosts - hosts),
        )
        if commands:
            try:
                self._nft.run(commands)
            except NftError:
                self._undo(applied, added)
                raise
        applied.subnets = list(subnets)
        applied.hosts = set(hosts)
        self.delete(applied, sorted(before - after))
        log.info(
            "routes now %s; hosts %s",
            ", ".join(map(str, applied.subnets)) or "none",
            ", ".join(map(str, sorted(applied.hosts))) or "none",
        )

    def add_hosts(self, applied: Applied, ips: list[IPAddress]) -> HostRoutesDone:
        """Routes each address that may be routed; the rest are skipped with a reason
        (a DNS answer must never break the session or hijack the laptop's network)."""
        skipped: list[str] = []
        allowed: list[IPv4Address] = []
        network = routes.laptop_network()
        for ip in dict.fromkeys(ips):
            reason = policy.host_refusal(
                ip, applied.plan, gateways=network.gateways, existing=network.routes
            )
            if reason is not None:
                skipped.append(reason)
            elif isinstance(ip, IPv4Address):
                allowed.append(ip)
        self.reconcile(applied, subnets=applied.subnets, hosts=applied.hosts | set(allowed))
        for reason in skipped:
            log.info("host route skipped: %s", reason)
        return HostRoutesDone(hosts=[str(h) for h in sorted(applied.hosts)], skipped=skipped)
