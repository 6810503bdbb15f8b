"""The manager's connections to its cluster: discovery through the API, DNS through the
cluster's resolver. Kept apart from server.py so the server can be tested without either."""

from __future__ import annotations

from collections.abc import Callable

from telepresence.k8s.api import KubeApi, in_cluster_access
from telepresence.manager.discovery import ClusterInfoSource
from telepresence.manager.dnsresolver import lookup
from telepresence.tunnel.messages import ClusterInfo


async def cluster_info_source(on_change: Callable[[ClusterInfo], None]) -> None:
    """Runs discovery until cancelled, reporting every change of the cluster's subnets."""
    async with KubeApi(in_cluster_access()) as api:
        await ClusterInfoSource(api, on_change=on_change).run()


async def dns_lookup(qname: str, qtype: int) -> bytes:
    return await lookup(qname, qtype)
