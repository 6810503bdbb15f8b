"""Subnet arithmetic: what to route to the cluster, and what it would break.

Pure functions over :mod:`ipaddress` objects.  The daemon feeds them what the
traffic-manager and the laptop's routing table report and acts on the result;
keeping the arithmetic here makes the "never swallow your own transport" and
"never hijack the laptop's networks silently" rules testable without a kernel.

All results are sorted IPv4 first, then IPv6, by network address and then
prefix length, so that repeated runs produce identical route sets and diffs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TypeAlias, TypeVar

__all__ = [
    "LOOPBACK_NETWORKS",
    "Conflict",
    "IPAddress",
    "IPNetwork",
    "cover_addresses",
    "find_conflicts",
    "parse_cidr_list",
    "routed_subnets",
]

IPNetwork: TypeAlias = IPv4Network | IPv6Network
IPAddress: TypeAlias = IPv4Address | IPv6Address

#: Never routed to the cluster, whatever the cluster or the user says: traffic
#: to these must stay on the laptop.
LOOPBACK_NETWORKS: tuple[IPNetwork, ...] = (
    IPv4Network("127.0.0.0/8"),
    IPv6Network("::1/128"),
)

_N = TypeVar("_N", IPv4Network, IPv6Network)


def _sort_key(net: IPNetwork) -> tuple[int, int, int]:
    return (net.version, int(net.network_address), net.prefixlen)


def _collapse(nets: Iterable[IPNetwork]) -> list[IPNetwork]:
    """Minimal sorted CIDR set covering exactly the union of ``nets``.

    :func:`ipaddress.collapse_addresses` refuses mixed versions, hence the split.
    """
    v4: list[IPv4Network] = []
    v6: list[IPv6Network] = []
    for net in nets:
        if isinstance(net, IPv4Network):
            v4.append(net)
        else:
            v6.append(net)
    result: list[IPNetwork] = [*ipaddress.collapse_addresses(v4)]
    result.extend(ipaddress.collapse_addresses(v6))
    return sorted(result, key=_sort_key)


def _subtract_one(net: _N, *, holes: Sequence[_N]) -> list[_N]:
    """``net`` minus every network in ``holes`` (same version), as CIDRs.

    Two CIDRs either are disjoint or one contains the other, so a hole either
    drops ``net`` entirely or lies in one of its halves.  Only halves with a
    hole in them are split further, and each carries only its own holes: the
    work grows with the number of holes times the prefix length.  (Trying
    every hole against every piece grew with their product: a never-proxy
    list of a few thousand addresses in a /8 took the helper minutes.)
    """
    inside = [hole for hole in holes if hole.overlaps(net)]
    if not inside:
        return [net]
    if any(net.subnet_of(hole) for hole in inside):
        return []
    kept: list[_N] = []
    for half in net.subnets():
        kept.extend(_subtract_one(half, holes=inside))
    return kept


def _subtract(nets: Iterable[IPNetwork], *, holes: Iterable[IPNetwork]) -> list[IPNetwork]:
    collapsed = _collapse(holes)
    holes_v4 = [h for h in collapsed if isinstance(h, IPv4Network)]
    holes_v6 = [h for h in collapsed if isinstance(h, IPv6Network)]
    result: list[IPNetwork] = []
    for net in _collapse(nets):
        if isinstance(net, IPv4Network):
            result.extend(_subtract_one(net, holes=holes_v4))
        else:
            result.extend(_subtract_one(net, holes=holes_v6))
    return _collapse(result)


def _host_network(addr: IPAddress) -> IPNetwork:
    return ipaddress.ip_network(addr)


def routed_subnets(
    *,
    service_cidrs: Iterable[IPNetwork],
    pod_cidrs: Iterable[IPNetwork],
    also_proxy: Iterable[IPNetwork] = (),
    never_proxy: Iterable[IPNetwork] = (),
    api_server_ips: Iterable[IPAddress] = (),
) -> list[IPNetwork]:
    """The minimal sorted set of subnets to route into the cluster.

    The union of service, pod and also-proxy subnets, minus never-proxy,
    minus each API server address as a single-host hole, minus loopback.
    The API server holes exist
    because the tunnel itself runs over the API server connection: if a pod
    CIDR or a broad ``--also-proxy`` covered the API server, its packets would
    be routed into the tunnel they are supposed to carry.  Keyword-only,
    because five same-typed arguments in a row are too easy to swap.
    """
    union = [*service_cidrs, *pod_cidrs, *also_proxy]
    holes = [*never_proxy, *map(_host_network, api_server_ips), *LOOPBACK_NETWORKS]
    return _subtract(union, holes=holes)


def cover_addresses(
    ips: Iterable[IPAddress],
    *,
    v4_group_prefix: int = 16,
    v6_group_prefix: int = 64,
) -> list[IPNetwork]:
    """A few networks covering observed addresses, when the cluster hides its CIDRs.

    Policy: addresses are grouped by their enclosing ``/v4_group_prefix``
    (IPv4) or ``/v6_group_prefix`` (IPv6) network, and each group is covered
    by the smallest single network containing all of its addresses.  So the
    result never claims more than one group-sized block per group (a
    ClusterIP at 10.96.0.1 can never make us route 10.0.0.0/8), yet addresses
    in one block, which in practice come from one CIDR, become one route
    rather than one per address.  A lone address gives a host route; re-run as
    new addresses are observed.  Callers must leave out addresses that are not
    the cluster's (host-network pods show node IPs, ``None`` ClusterIPs).
    """
    if not 0 <= v4_group_prefix <= 32:
        raise ValueError(f"v4_group_prefix must be within 0..32, got {v4_group_prefix}")
    if not 0 <= v6_group_prefix <= 128:
        raise ValueError(f"v6_group_prefix must be within 0..128, got {v6_group_prefix}")
    groups: dict[IPNetwork, tuple[int, int]] = {}
    for ip in ips:
        prefix = v4_group_prefix if ip.version == 4 else v6_group_prefix
        group = ipaddress.ip_network(ip).supernet(new_prefix=prefix)
        low, high = groups.get(group, (int(ip), int(ip)))
        groups[group] = (min(low, int(ip)), max(high, int(ip)))
    covers: list[IPNetwork] = []
    for group, (low, high) in groups.items():
        bits = group.max_prefixlen
        # Smallest common supernet: keep the leading bits low and high share.
        prefix = bits - (low ^ high).bit_length()
        # The class, not ip_network(): a small int would be taken for IPv4.
        covers.append(type(group)((low, prefix), strict=False))
    return sorted(covers, key=_sort_key)


def _ignored_route(net: IPNetwork, device: str, *, own_device: str | None) -> bool:
    """Routes that cannot conflict with ours in any way that matters.

    Default routes are what we are supposed to be more specific than, and
    that includes the 0.0.0.0/1 + 128.0.0.0/1 pair full-tunnel VPNs use to
    override the default route (our tunnel itself still runs over them);
    loopback, link-local, multicast and broadcast routes are on every laptop
    and never carry cluster traffic; routes on our own device are ours.
    """
    return (
        net.prefixlen <= 1
        or (own_device is not None and device == own_device)
        or net.is_loopback
        or net.is_link_local
        or net.is_multicast
        or net == IPv4Network("255.255.255.255/32")
    )


@dataclass(frozen=True, slots=True)
class Conflict:
    """A subnet we would route that overlaps a route the laptop already has."""

    subnet: IPNetwork
    route: IPNetwork
    device: str

    @property
    def overlap(self) -> IPNetwork:
        """The addresses both routes claim: the smaller of the two networks."""
        return self.route if self.route.prefixlen >= self.subnet.prefixlen else self.subnet

    @property
    def message(self) -> str:
        """One line for the user: what overlaps, who would win, and the fixes."""
        if self.route.prefixlen > self.subnet.prefixlen:
            effect = f"the laptop's route wins, cluster addresses in {self.route} are unreachable"
        elif self.route.prefixlen < self.subnet.prefixlen:
            effect = f"ours wins, {self.subnet} would no longer be reachable via {self.device}"
        else:
            effect = "which one wins is up to route metrics"
        return (
            f"cluster subnet {self.subnet} overlaps route {self.route} on device "
            f"{self.device} ({effect}); use --never-proxy {self.overlap} to keep "
            f"it local or --allow-conflicting-subnets {self.overlap} to route it "
            f"to the cluster"
        )


def find_conflicts(
    subnets: Iterable[IPNetwork],
    existing_routes: Iterable[tuple[IPNetwork, str]],
    *,
    own_device: str | None = None,
) -> list[Conflict]:
    """Every overlap between ``subnets`` and the laptop's ``(network, device)`` routes.

    One :class:`Conflict` per overlapping pair, sorted by subnet, route, device.
    Both directions count: a more specific laptop route hides part of the
    cluster, a more specific cluster route hides part of the laptop's network.
    See :func:`_ignored_route` for routes that are not considered.
    """
    ours = list(subnets)
    conflicts = {
        Conflict(subnet=subnet, route=route, device=device)
        for route, device in existing_routes
        if not _ignored_route(route, device, own_device=own_device)
        for subnet in ours
        if subnet.version == route.version and subnet.overlaps(route)
    }
    return sorted(conflicts, key=lambda c: (*_sort_key(c.subnet), *_sort_key(c.route), c.device))


_EXPECTED = "expected an IP address (10.0.0.5, fd00::5) or a CIDR (10.0.0.0/8, fd00::/8)"


def _parse_item(item: str, *, text: str) -> IPNetwork:
    where = f"{item!r} in {text!r}"
    if not item:
        raise ValueError(f"empty subnet in {text!r}: {_EXPECTED}, separated by commas")
    if "%" in item:
        raise ValueError(f"invalid subnet {where}: zone indices (%) are not allowed; {_EXPECTED}")
    try:
        return ipaddress.ip_network(item)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(item, strict=False)
    except ValueError:
        raise ValueError(f"invalid subnet {where}: {_EXPECTED}") from None
    raise ValueError(f"invalid subnet {where}: host bits set, did you mean {loose}? {_EXPECTED}")


def parse_cidr_list(text: str) -> list[IPNetwork]:
    """Parse a comma-separated flag value like ``10.0.0.0/8,192.168.1.5``.

    A bare address is a host network (/32 or /128).  Order is kept.  Host bits
    set (``10.0.0.5/8``) are an error rather than silently widened, because
    the user may have meant the host or the network.  Blank text is an empty
    list; an empty item (``a,,b`` or a trailing comma) is an error.
    """
    if not text.strip():
        return []
    return [_parse_item(item.strip(), text=text) for item in text.split(",")]
