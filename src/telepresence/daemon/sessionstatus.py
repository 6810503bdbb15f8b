"""What `telepresence status` shows of a session: plain data, for the CLI to print or to
emit as JSON (the keys are what scripts read; keep them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from telepresence import versions

if TYPE_CHECKING:
    from telepresence.daemon.session import Session


def describe(session: Session) -> dict[str, Any]:
    access = session.access
    pool = session.pool.status() if session.pool else None
    info = session.cluster_info
    domain = info.cluster_domain if info else "cluster.local"
    state = (
        "Connected"
        if session.connected and pool and pool.connected
        else ("Reconnecting" if session.connected else "Connecting")
    )
    # Where new flows go now: after a rollout, the replacement.
    manager_pod = (session.pool.manager_pod if session.pool else "") or session.manager_pod
    return {
        "root_daemon": {
            "running": session.helper is not None,
            "version": session.version,
            "dns": session.dns.status(cluster_domain=domain),
            "subnets": [str(s) for s in session.routed],
            "host_routes": sorted(str(h) for h in session.host_routes),
            "also_proxy": list(session.request.also_proxy),
            "never_proxy": list(session.request.never_proxy),
        },
        "user_daemon": {
            "running": True,
            "version": session.version,
            "status": state,
            "reconnect_reason": pool.reason if pool and state == "Reconnecting" else "",
            "kubernetes_server": access.server if access else "",
            "kubernetes_context": access.context if access else "",
            "manager_namespace": session.manager_namespace,
            "manager_pod": manager_pod,
            "manager_version": pool.manager_version if pool else "",
            # How the manager compares with this client, for `status` to print as is.
            "manager": versions.describe_manager(
                manager_version=pool.manager_version if pool else "",
                client_version=session.version,
            ),
            "tunnel_protocol": pool.protocol if pool else 0,
            "tunnel_connections": pool.connections if pool else 0,
            # How new flows reach the manager: "direct (…)" or "port-forward (direct: why not)".
            "transport": session.direct.describe() if session.direct else "port-forward",
            "udp_flows": len(session.udp.flows) if session.udp else 0,
            "reconnects": pool.reconnects if pool else 0,
            "proxy": "ON" if session.connected else "OFF",
            "mapped_namespaces": session.mapped_namespaces(),
            "all_namespaces_mapped": session.request.mapped_namespaces is None,
            "search_namespaces": list(session.search_namespaces()),
            "intercepts": len(session.intercepts),
            "intercept_list": [
                {"name": n, "namespace": ns, "kind": "local-only"}
                for n, ns in session.intercepts.items()
            ],
            "service_subnets": list(info.service_subnets) if info else [],
            "pod_subnets": list(info.pod_subnets) if info else [],
        },
    }
