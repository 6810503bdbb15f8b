"""What the laptop needs to act like a pod: service and pod subnets, cluster domain and
DNS server, discovered by the traffic manager and kept current.

The deciding is pure (:class:`ClusterState`, the parsers); :class:`ClusterInfoSource` is
the asyncio shell that feeds it from the API server and reports changes.

Service subnets, best source first:
  1. ServiceCIDR objects (networking.k8s.io/v1 from Kubernetes 1.33, v1beta1 before);
  2. the range the API server names when a dry-run Service asks for an invalid ClusterIP
     (older servers say "The range of valid IPs is 10.96.0.0/12");
  3. a cover of the ClusterIPs observed on Services.
Pod subnets: the nodes' ``spec.podCIDRs``; else a cover of the observed pod IPs (clusters
whose CNI does its own IPAM leave podCIDRs empty).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from telepresence.k8s.api import (
    ApiError,
    Forbidden,
    Invalid,
    KubeApi,
    KubeError,
    Listed,
    NotFound,
    WatchEvent,
    resource_path,
)
from telepresence.netfilter.subnets import IPAddress, IPNetwork, cover_addresses
from telepresence.tunnel.messages import ClusterInfo

log = logging.getLogger(__name__)

Obj = dict[str, Any]

RESOLV_CONF = Path("/etc/resolv.conf")
DEFAULT_CLUSTER_DOMAIN = "cluster.local"

#: Addresses that no Service can be given: a dry-run create asking for one of them is
#: refused with the valid range in the message. Documentation addresses (RFC 5737/3849)
#: are never a cluster's service range.
PROBE_IPS = ("192.0.2.254", "2001:db8::fe")


# --- resolv.conf ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ResolvConf:
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


def parse_resolv_conf(text: str) -> ResolvConf:
    """resolv.conf(5) as glibc reads it: the last ``search`` (or ``domain``) line wins,
    comments start with ``#`` or ``;``."""
    nameservers: list[str] = []
    search: list[str] = []
    options: list[str] = []
    for raw in text.splitlines():
        line = re.split(r"[#;]", raw, maxsplit=1)[0].split()
        if not line:
            continue
        keyword, args = line[0], line[1:]
        if keyword == "nameserver" and args:
            nameservers.append(args[0])
        elif keyword in ("search", "domain"):
            search = [a.rstrip(".") for a in args]
        elif keyword == "options":
            options.extend(args)
    return ResolvConf(nameservers=tuple(nameservers), search=tuple(search), options=tuple(options))


def cluster_domain(search: Iterable[str], *, namespace: str | None = None) -> str:
    """The cluster domain from a pod's search list, which a kubelet writes as
    ``<ns>.svc.<domain> svc.<domain> <domain>``."""
    entries = [s.lower().rstrip(".") for s in search]
    if namespace:
        prefix = f"{namespace.lower()}.svc."
        for entry in entries:
            if entry.startswith(prefix):
                return entry[len(prefix) :]
    # The kubelet's triple, then a "svc.<domain>" with "<domain>" after it; checking the
    # neighbours keeps a namespace named "svc" ("svc.svc.<domain>") from fooling it.
    for want_triple in (True, False):
        for i, entry in enumerate(entries):
            domain = entry[4:]
            if not entry.startswith("svc.") or entries[i + 1 : i + 2] != [domain]:
                continue
            if not want_triple or (i > 0 and entries[i - 1].endswith(f".svc.{domain}")):
                return domain
    for entry in entries:
        if entry.startswith("svc."):
            return entry[4:]
    return DEFAULT_CLUSTER_DOMAIN


@dataclass(frozen=True, kw_only=True)
class DnsConfig:
    cluster_domain: str
    dns_server_ip: str


def dns_config(resolv: ResolvConf, *, namespace: str | None = None) -> DnsConfig:
    return DnsConfig(
        cluster_domain=cluster_domain(resolv.search, namespace=namespace),
        dns_server_ip=resolv.nameservers[0] if resolv.nameservers else "",
    )


# --- the dry-run probe -------------------------------------------------------------------

_RANGE = re.compile(r"range of valid IPs is\s*(?P<rest>.*)", re.IGNORECASE | re.DOTALL)
_CIDR = re.compile(r"[0-9A-Fa-f:.]+/\d{1,3}")


def parse_service_range_error(message: str) -> list[IPNetwork]:
    """The service range from the API server's refusal of an invalid ClusterIP, e.g.
    ``... the provided IP (1.1.1.1) is not in the valid range. The range of valid IPs is
    10.96.0.0/16``. Empty when the message does not name it (newer servers may not)."""
    found = _RANGE.search(message)
    if not found:
        return []
    nets: list[IPNetwork] = []
    for text in _CIDR.findall(found["rest"]):
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.ip_network(text, strict=False))
    return collapse(nets)


def probe_service(namespace: str, ip: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"generateName": "telepresence-probe-", "namespace": namespace},
        "spec": {"clusterIP": ip, "ports": [{"port": 443}]},
    }


# --- the pure state ----------------------------------------------------------------------


def collapse(nets: Iterable[IPNetwork]) -> list[IPNetwork]:
    v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


def _networks(values: Iterable[Any]) -> list[IPNetwork]:
    nets: list[IPNetwork] = []
    for v in values:
        with contextlib.suppress(ValueError, TypeError):
            nets.append(ipaddress.ip_network(str(v), strict=False))
    return nets


def _addresses(values: Iterable[Any]) -> list[IPAddress]:
    ips: list[IPAddress] = []
    for v in values:
        with contextlib.suppress(ValueError, TypeError):
            ips.append(ipaddress.ip_address(str(v)))
    return ips


def service_cidr_networks(obj: Obj) -> list[IPNetwork]:
    return _networks(obj.get("spec", {}).get("cidrs") or [])


def service_cluster_ips(obj: Obj) -> list[IPNetwork]:
    """A Service's ClusterIPs as host networks; headless ("None") and ExternalName have none."""
    spec = obj.get("spec", {})
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    return [ipaddress.ip_network(ip) for ip in _addresses(ips)]


def node_pod_cidrs(obj: Obj) -> list[IPNetwork]:
    spec = obj.get("spec", {})
    return _networks(spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []))


def pod_ips(obj: Obj) -> list[IPNetwork]:
    """A pod's own IPs; host-network pods show their node's address, which is not the
    cluster's to route."""
    if obj.get("spec", {}).get("hostNetwork"):
        return []
    status = obj.get("status", {})
    ips = [p.get("ip") for p in status.get("podIPs") or []] or [status.get("podIP")]
    return [ipaddress.ip_network(ip) for ip in _addresses(i for i in ips if i)]


Extract = Callable[[Obj], list[IPNetwork]]


@dataclass
class Table:
    """Networks per object of one watched collection, kept current from watch events."""

    extract: Extract
    rows: dict[str, list[IPNetwork]] = field(default_factory=dict)
    synced: bool = False

    def apply(self, event: WatchEvent) -> None:
        if isinstance(event, Listed):
            self.rows = {_key(o): self.extract(o) for o in event.items}
            self.synced = True
        elif event.type == "DELETED":
            self.rows.pop(_key(event.object), None)
        else:
            self.rows[_key(event.object)] = self.extract(event.object)

    def networks(self) -> list[IPNetwork]:
        return [n for nets in self.rows.values() for n in nets]


def _key(obj: Obj) -> str:
    meta = obj.get("metadata", {})
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


class ServiceSource(Enum):
    SERVICE_CIDRS = "ServiceCIDR objects"
    PROBE = "the dry-run probe's error"
    CLUSTER_IPS = "observed ClusterIPs"


class PodSource(Enum):
    NODE_CIDRS = "nodes' podCIDRs"
    POD_IPS = "observed pod IPs"


def _strings(nets: Iterable[IPNetwork]) -> tuple[str, ...]:
    ordered = sorted(nets, key=lambda n: (n.version, int(n.network_address), n.prefixlen))
    return tuple(str(n) for n in ordered)


@dataclass
class ClusterState:
    """Everything discovery knows; :meth:`info` turns it into the message for laptops."""

    dns: DnsConfig
    service_source: ServiceSource
    pod_source: PodSource
    service_cidrs: Table = field(default_factory=lambda: Table(service_cidr_networks))
    probed: list[IPNetwork] = field(default_factory=list)
    cluster_ips: Table = field(default_factory=lambda: Table(service_cluster_ips))
    nodes: Table = field(default_factory=lambda: Table(node_pod_cidrs))
    pods: Table = field(default_factory=lambda: Table(pod_ips))

    def tables(self) -> list[Table]:
        """The tables that feed the chosen sources: all must be synced before an answer."""
        tables = [self.nodes if self.pod_source is PodSource.NODE_CIDRS else self.pods]
        if self.service_source is ServiceSource.SERVICE_CIDRS:
            tables.append(self.service_cidrs)
        elif self.service_source is ServiceSource.CLUSTER_IPS:
            tables.append(self.cluster_ips)
        return tables

    @property
    def ready(self) -> bool:
        return all(t.synced for t in self.tables())

    def service_subnets(self) -> list[IPNetwork]:
        if self.service_source is ServiceSource.SERVICE_CIDRS:
            return collapse(self.service_cidrs.networks())
        if self.service_source is ServiceSource.PROBE:
            return collapse(self.probed)
        return cover_addresses(n.network_address for n in self.cluster_ips.networks())

    def pod_subnets(self) -> list[IPNetwork]:
        if self.pod_source is PodSource.NODE_CIDRS:
            return collapse(self.nodes.networks())
        return cover_addresses(n.network_address for n in self.pods.networks())

    def info(self) -> ClusterInfo:
        return ClusterInfo(
            service_subnets=_strings(self.service_subnets()),
            pod_subnets=_strings(self.pod_subnets()),
            cluster_domain=self.dns.cluster_domain,
            dns_server_ip=self.dns.dns_server_ip,
        )


def choose_service_source(
    *, service_cidrs: list[IPNetwork], probed: list[IPNetwork]
) -> ServiceSource:
    if service_cidrs:
        return ServiceSource.SERVICE_CIDRS
    if probed:
        return ServiceSource.PROBE
    return ServiceSource.CLUSTER_IPS


def choose_pod_source(*, node_cidrs: list[IPNetwork]) -> PodSource:
    return PodSource.NODE_CIDRS if node_cidrs else PodSource.POD_IPS


# --- the asyncio shell -------------------------------------------------------------------

SERVICE_CIDR_VERSIONS = ("networking.k8s.io/v1", "networking.k8s.io/v1beta1")


@dataclass(frozen=True, kw_only=True)
class DiscoverySettings:
    """``retry_*``: after the API server goes away (an upgrade, a restart) discovery starts
    over, quickly at first, then at most every 30 s so a long outage costs little."""

    resolv_conf: Path = RESOLV_CONF
    retry_initial: float = 0.5
    retry_max: float = 30.0


class ClusterInfoSource:
    """Watches the cluster and calls ``on_change`` with a :class:`ClusterInfo` whenever
    the value differs from the last one reported (the first one included)."""

    def __init__(
        self,
        api: KubeApi,
        *,
        on_change: Callable[[ClusterInfo], None],
        namespace: str | None = None,
        settings: DiscoverySettings = DiscoverySettings(),
    ) -> None:
        self.api = api
        self.namespace = namespace or api.namespace
        self.on_change = on_change
        self.settings = settings
        self.current: ClusterInfo | None = None
        self.state: ClusterState | None = None

    def read_dns(self) -> DnsConfig:
        try:
            text = self.settings.resolv_conf.read_text()
        except OSError as e:
            log.warning("cannot read %s (%s): no cluster DNS server", self.settings.resolv_conf, e)
            text = ""
        return dns_config(parse_resolv_conf(text), namespace=self.namespace)

    async def run(self, *, max_attempts: int | None = None) -> None:
        """Runs until cancelled, starting over after API failures; ``max_attempts`` bounds
        the starts, for tests."""
        delay = self.settings.retry_initial
        attempt = 0
        while max_attempts is None or attempt < max_attempts:
            attempt += 1
            try:
                await self._run_once()
            except* KubeError as group:
                # Watches run in a TaskGroup, whose failures come grouped.
                reasons = "; ".join(str(e) for e in group.exceptions)
                log.warning("cluster discovery failed, retrying in %.1fs: %s", delay, reasons)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.retry_max)

    async def _run_once(self) -> None:
        dns = self.read_dns()
        cidrs, cidr_path = await self._list_service_cidrs()
        probed = [] if cidrs else await self.probe_service_range()
        node_cidrs = await self._list_node_cidrs()
        state = ClusterState(
            dns=dns,
            service_source=choose_service_source(service_cidrs=cidrs, probed=probed),
            pod_source=choose_pod_source(node_cidrs=node_cidrs),
            probed=probed,
        )
        self.state = state
        log.info(
            "service subnets from %s, pod subnets from %s",
            state.service_source.value,
            state.pod_source.value,
        )
        watches: list[tuple[str, Table]] = []
        if state.service_source is ServiceSource.SERVICE_CIDRS:
            assert cidr_path is not None
            watches.append((cidr_path, state.service_cidrs))
        elif state.service_source is ServiceSource.CLUSTER_IPS:
            watches.append((resource_path("v1", "services"), state.cluster_ips))
        if state.pod_source is PodSource.NODE_CIDRS:
            watches.append((resource_path("v1", "nodes"), state.nodes))
        else:
            watches.append((resource_path("v1", "pods"), state.pods))
        async with asyncio.TaskGroup() as group:
            for path, table in watches:
                group.create_task(self._follow(path, table, state), name=f"discovery:{path}")
        if not watches:  # pragma: no cover - a pod source is always watched
            self._publish(state)

    async def _follow(self, path: str, table: Table, state: ClusterState) -> None:
        async for event in self.api.watch(path):
            table.apply(event)
            self._publish(state)

    def _publish(self, state: ClusterState) -> None:
        if not state.ready:
            return
        info = state.info()
        if info != self.current:
            self.current = info
            log.info("cluster info: %s", info)
            self.on_change(info)

    async def _list_service_cidrs(self) -> tuple[list[IPNetwork], str | None]:
        for version in SERVICE_CIDR_VERSIONS:
            path = resource_path(version, "servicecidrs")
            try:
                listing = await self.api.list(path)
            except (NotFound, Forbidden) as e:
                log.debug("no ServiceCIDRs at %s: %s", path, e)
                continue
            nets = [n for o in listing.get("items") or [] for n in service_cidr_networks(o)]
            if nets:
                return nets, path
        return [], None

    async def probe_service_range(self) -> list[IPNetwork]:
        """Asks for an impossible ClusterIP in a dry run and reads the range in the refusal."""
        path = resource_path("v1", "services", namespace=self.namespace)
        nets: list[IPNetwork] = []
        for ip in PROBE_IPS:
            try:
                await self.api.create(path, probe_service(self.namespace, ip), dry_run=True)
            except Invalid as e:
                nets.extend(parse_service_range_error(e.detail))
            except ApiError as e:
                log.debug("service range probe with %s: %s", ip, e)
        return collapse(nets)

    async def _list_node_cidrs(self) -> list[IPNetwork]:
        try:
            listing = await self.api.list(resource_path("v1", "nodes"))
        except Forbidden as e:
            log.warning("cannot list nodes, covering pod IPs instead: %s", e)
            return []
        return [n for o in listing.get("items") or [] for n in node_pod_cidrs(o)]
