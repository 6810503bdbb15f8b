"""The two ways the laptop reaches a manager pod: a port-forward through the API server
(always), and the direct transport's endpoints (`direct.py`), when the cluster has them.

Both look the manager up through the API with the user's own credentials; apart from
the session (`session.py`) so that what is dialled where reads in one place.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import aiohttp

from telepresence.daemon.direct import DirectUnavailable, Endpoint, endpoints
from telepresence.daemon.pool import PoolUnavailable
from telepresence.k8s.api import Forbidden, KubeApi, KubeError, NotFound, resource_path
from telepresence.k8s.install import find_manager_pod
from telepresence.k8s.kubeconfig import ClusterAccess
from telepresence.k8s.manifests import DIRECT_SERVICE, TUNNEL_PORT
from telepresence.k8s.portforward import PortForward, portforward_hint


async def open_forward(
    api: KubeApi,
    access: ClusterAccess,
    http: aiohttp.ClientSession,
    *,
    namespace: str,
    pod: str | None,
    avoid: frozenset[str],
) -> tuple[str, PortForward]:
    """A port-forward to ``pod``, or to the newest ready manager pod not in ``avoid``."""
    if pod is None:
        try:
            info = await find_manager_pod(api, namespace, avoid=avoid)
        except Forbidden as e:
            raise e.with_hint(portforward_hint(namespace)) from e
        if info is None:
            raise PoolUnavailable("no ready traffic manager pod")
        pod = info.pod_name
    # The access caches credentials and the TLS context for the REST calls and every
    # port-forward alike: an exec credential plugin runs once per credential lifetime.
    forward = await PortForward.open(http, access, namespace=namespace, pod=pod, port=TUNNEL_PORT)
    return pod, forward


async def locate_direct(
    api: KubeApi,
    *,
    namespace: str,
    pod: str,
    configured: str | None,
    routed: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> list[Endpoint]:
    """Where the direct listener of ``pod`` can be reached: ``configured`` when set, else
    its Service's load balancer or the NodePort on the pod's node. Raises
    DirectUnavailable saying why there is nowhere."""
    if configured:
        return endpoints(configured=configured, node_port=None, host_ip=None)
    try:
        service = await api.get(
            resource_path("v1", "services", namespace=namespace, name=DIRECT_SERVICE)
        )
        pod_obj = await api.get(resource_path("v1", "pods", namespace=namespace, name=pod))
    except NotFound as e:
        raise DirectUnavailable(
            f"no Service {DIRECT_SERVICE} in {namespace} (a manager installed by an older "
            "client; `telepresence manager upgrade` adds it)"
        ) from e
    except KubeError as e:
        raise DirectUnavailable(f"cannot look the manager up: {e}") from e
    port = _direct_port(service)
    return endpoints(
        configured=None,
        node_port=port.get("nodePort"),
        host_ip=(pod_obj.get("status") or {}).get("hostIP"),
        ingress=_ingress(service),
        service_port=port.get("port", 0),
        routed=routed,
    )


def _direct_port(service: dict[str, Any]) -> dict[str, Any]:
    for port in (service.get("spec") or {}).get("ports") or []:
        if port.get("name") == "direct":
            return dict(port)
    return {}


def _ingress(service: dict[str, Any]) -> list[str]:
    ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    return [i.get("ip") or i.get("hostname") for i in ingress if i.get("ip") or i.get("hostname")]
