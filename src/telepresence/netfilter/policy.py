"""What the root helper agrees to do: its own fixed choices, and the checks on requests.

The helper runs as root for an unprivileged caller, so the caller only asks
and this module decides.  Names, addresses and the socket mark are the
helper's, not the request's; the nameservers to redirect come from the
laptop's resolv.conf, not from the request (the DNS choices are :mod:`.dnspolicy`);
a subnet is refused when it would capture the laptop's own way out (default
route, default gateway), addresses that never leave the machine or a link
(loopback, link-local, multicast, reserved), or the API server the tunnel runs
over.  Fields of a request can only narrow what is routed (``never_proxy``,
``api_server_ips``) or accept an overlap the user named
(``allow_conflicting_subnets``).

Pure functions and values: the helper reads the laptop's routes, rules and
resolv.conf, and passes them in.  Every refusal is a :class:`Refused` with one
line that says what is wrong and what to do; see docs/security.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_address

from telepresence.netfilter.nftables import TableConfig
from telepresence.netfilter.protocol import Setup
from telepresence.netfilter.routes import LaptopNetwork
from telepresence.netfilter.subnets import (
    IPAddress,
    IPNetwork,
    find_conflicts,
    parse_cidr_list,
    routed_subnets,
)

__all__ = [
    "LINK_DNS_ADDRESS",
    "MARK",
    "MIN_PREFIX",
    "NFT_TABLE",
    "PORT_RANGE",
    "RESERVED",
    "TUN_ADDRESS",
    "TUN_NAME",
    "Plan",
    "Refused",
    "check_mark_unused",
    "check_routable",
    "host_refusal",
    "parse_addresses",
    "parse_ipv4_subnets",
    "plan_setup",
]

#: The TUN device; one session per network namespace, so one fixed name.
TUN_NAME = "tel0"
#: From 198.18.0.0/15 (RFC 2544, benchmarking): never on the internet or a LAN.
TUN_ADDRESS = IPv4Address("198.18.255.254")
#: The daemon's DNS server as systemd-resolved sees it (DNS mode "resolved"): routed /32
#: to the TUN, where the daemon answers UDP (resolved accepts an answer only on the link
#: it asked on, so not a loopback address); TCP to it is redirected to the daemon's TCP
#: server.  Next to the TUN's address, in the same benchmarking range.
LINK_DNS_ADDRESS = IPv4Address("198.18.255.253")
NFT_TABLE = "telepresence"
#: The mark on upstream DNS sockets, which the table's chains let pass.  Fixed so
#: that a caller cannot choose a mark that a VPN's policy routing exempts (such as
#: wg-quick's 0xca6c): bits outside the masks used by kube-proxy (0xc000), Calico
#: (0xffff0000), Tailscale (0xff0000) and Cilium (0x0f00); Setup also refuses to
#: run where an `ip rule` matches it.  0x1074: "t".
MARK = 0x1074
#: Redirect targets are the daemon's own listeners on ephemeral ports; a
#: privileged port would be a root service's.
PORT_RANGE = range(1024, 65536)
#: No cluster's service or pod range is wider than a /8; a wider subnet is
#: internet-sized and would capture other users' traffic too.
MIN_PREFIX = 8
#: Never routed, whatever the request: traffic to these stays on the machine or
#: its links ("this network", loopback, link-local, multicast, reserved/broadcast).
RESERVED: tuple[tuple[IPNetwork, str], ...] = (
    (IPv4Network("0.0.0.0/8"), "'this network'"),
    (IPv4Network("127.0.0.0/8"), "loopback"),
    (IPv4Network("169.254.0.0/16"), "link-local"),
    (IPv4Network("224.0.0.0/4"), "multicast"),
    (IPv4Network("240.0.0.0/4"), "reserved and broadcast"),
    (IPv6Network("::1/128"), "loopback"),
    (IPv6Network("fe80::/10"), "link-local"),
    (IPv6Network("ff00::/8"), "multicast"),
)


class Refused(Exception):
    """The helper will not do what was asked; the message is one line: what and why."""


def _parse_networks(items: Sequence[str], *, what: str) -> list[IPNetwork]:
    try:
        return parse_cidr_list(",".join(items))
    except ValueError as e:
        raise Refused(f"{what}: {e}") from None


def parse_ipv4_subnets(items: Sequence[str]) -> list[IPv4Network]:
    """The subnets of a Setup or UpdateSubnets (CIDRs or single addresses); IPv6 is
    refused, as the helper routes none yet."""
    requested: list[IPv4Network] = []
    for net in _parse_networks(items, what="subnets"):
        if not isinstance(net, IPv4Network):
            raise Refused(
                f"subnet {net} is IPv6, which the network helper does not route yet; leave it out"
            )
        requested.append(net)
    return requested


def parse_addresses(items: Iterable[str], *, what: str) -> list[IPAddress]:
    """IP addresses, as ``what`` (named in the refusal) of a request."""
    result: list[IPAddress] = []
    for item in items:
        try:
            result.append(ip_address(item))
        except ValueError:
            raise Refused(f"invalid {what} {item!r}: expected an IP address") from None
    return result


def _port(value: int, *, what: str) -> int:
    if value not in PORT_RANGE:
        raise Refused(
            f"invalid {what} {value}: expected {PORT_RANGE.start}..{PORT_RANGE.stop - 1} "
            "(the daemon's own listener)"
        )
    return value


def _reserved_overlap(net: IPNetwork) -> str | None:
    for reserved, name in RESERVED:
        if reserved.version == net.version and net.overlaps(reserved):
            return f"{reserved} ({name})"
    return None


def check_routable(
    nets: Iterable[IPv4Network],
    *,
    gateways: Iterable[IPv4Address],
    api_server_ips: Iterable[IPAddress],
) -> None:
    """Refuses the first subnet that must never be routed into the tunnel."""
    gateways = list(gateways)
    api_servers = list(api_server_ips)
    for net in nets:
        if net.prefixlen == 0:
            raise Refused(f"refusing to route {net}: it is the default route")
        if net.prefixlen < MIN_PREFIX:
            raise Refused(
                f"refusing to route {net}: wider than /{MIN_PREFIX}, larger than any "
                "cluster's range; name the cluster's subnets instead"
            )
        if (reserved := _reserved_overlap(net)) is not None:
            raise Refused(f"refusing to route {net}: it overlaps {reserved}")
        for gateway in gateways:
            if gateway in net:
                raise Refused(
                    f"refusing to route {net}: it covers {gateway}, the laptop's default "
                    "gateway; use --never-proxy or a narrower subnet"
                )
        for api in api_servers:
            if api.version == 4 and api in net:
                raise Refused(
                    f"refusing to route {net}: it covers the API server's address {api}, "
                    "which the tunnel itself runs over"
                )


def check_mark_unused(rule_marks: Iterable[tuple[int, int]], *, mark: int = MARK) -> None:
    """Refuses to hand out marked sockets where a policy routing rule selects that
    mark: those sockets would bypass a VPN (or be routed elsewhere) unlike any
    other socket of the user."""
    for fwmark, mask in rule_marks:
        if mark & mask == fwmark & mask:
            raise Refused(
                f"an ip rule selects fwmark 0x{fwmark:x}/0x{mask:x}, which matches telepresence's "
                f"socket mark 0x{mark:x}; remove that rule or disconnect the tool that made it"
            )


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A checked Setup: everything needed to apply it and to check later requests."""

    requested: list[IPv4Network]
    never_proxy: list[IPNetwork]
    api_server_ips: list[IPAddress]
    allowed_conflicts: list[IPNetwork]
    table: TableConfig

    @property
    def tun_name(self) -> str:
        return TUN_NAME

    @property
    def tun_address(self) -> IPv4Address:
        return TUN_ADDRESS

    def routed(self, subnets: Iterable[IPv4Network]) -> list[IPv4Network]:
        """``subnets`` minus never-proxy (and, as a second line of defence, minus the
        API server and loopback, which :func:`check_routable` already refused)."""
        nets = routed_subnets(
            service_cidrs=subnets,
            pod_cidrs=(),
            never_proxy=self.never_proxy,
            api_server_ips=self.api_server_ips,
        )
        return [n for n in nets if isinstance(n, IPv4Network)]

    def check_subnets(
        self, nets: Iterable[IPv4Network], *, gateways: Iterable[IPv4Address]
    ) -> None:
        check_routable(nets, gateways=gateways, api_server_ips=self.api_server_ips)

    def check_conflicts(
        self, nets: Iterable[IPv4Network], existing: Iterable[tuple[IPNetwork, str]]
    ) -> None:
        """Refuses the first overlap of ``nets`` with the laptop's routes (naming the
        fixes) that does not lie inside one of the allowed-conflict CIDRs."""
        conflicts = [
            c
            for c in find_conflicts(nets, existing, own_device=TUN_NAME)
            if not _within(c.overlap, self.allowed_conflicts)
        ]
        if conflicts:
            more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
            raise Refused(conflicts[0].message + more)


def _within(net: IPNetwork, nets: Iterable[IPNetwork]) -> bool:
    return any(
        net.subnet_of(other)  # type: ignore[arg-type]  # same version checked first
        for other in nets
        if other.version == net.version
    )


def host_refusal(
    ip: IPAddress,
    plan: Plan,
    *,
    gateways: Iterable[IPv4Address],
    existing: Iterable[tuple[IPNetwork, str]],
) -> str | None:
    """Why a single address from a cluster DNS answer must not get a host route,
    or None.  Skipped rather than refused: one bad answer must not fail the others."""
    if not isinstance(ip, IPv4Address):
        return f"{ip}: IPv6 is not routed by the network helper yet"
    if ip in (TUN_ADDRESS, LINK_DNS_ADDRESS):
        return f"{ip}: the network helper's own address"
    net = IPv4Network(ip)
    try:
        plan.check_subnets([net], gateways=gateways)
        if not plan.routed([net]):
            return f"{ip}: never proxied (--never-proxy)"
        plan.check_conflicts([net], existing)
    except Refused as e:
        return f"{ip}: {e}"
    return None


def plan_setup(
    request: Setup,
    *,
    network: LaptopNetwork,
    nameservers: Sequence[IPv4Address],
    link_dns: IPv4Address | None = None,
) -> Plan:
    """Checks a Setup against the laptop as it is now, without changing anything.

    ``network`` and ``nameservers`` are what the helper itself read from the
    kernel and resolv.conf, never what the request says; ``link_dns`` is
    :data:`LINK_DNS_ADDRESS` in DNS mode "resolved" (then ``nameservers`` is empty).
    """
    requested = parse_ipv4_subnets(request.subnets)
    apis = parse_addresses(request.api_server_ips, what="API server address")
    never_proxy = _parse_networks(request.never_proxy, what="never-proxy subnets")
    check_routable(requested, gateways=network.gateways, api_server_ips=apis)
    allowed = _parse_networks(request.allow_conflicting_subnets, what="allowed conflicts")
    for net in allowed:
        if net.prefixlen == 0 or (reserved := _reserved_overlap(net)) is not None:
            what = "every route" if net.prefixlen == 0 else reserved
            raise Refused(
                f"refusing to allow conflicts in {net}: it covers {what}; name the "
                "conflicting subnets themselves"
            )
    check_mark_unused(network.rule_marks)
    table = TableConfig(
        name=NFT_TABLE,
        mark=MARK,
        proxy_port=_port(request.proxy_port, what="proxy port"),
        dns_port=_port(request.dns_redirect_port, what="DNS redirect port"),
        dns_servers=list(nameservers),
        routed=[],
        link_dns=link_dns,
    )
    plan = Plan(
        requested=requested,
        never_proxy=never_proxy,
        api_server_ips=apis,
        allowed_conflicts=allowed,
        table=table,
    )
    plan.check_conflicts(plan.routed(requested), network.routes)
    return plan
