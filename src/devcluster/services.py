"""ClusterIP routing in the node namespace: Services and EndpointSlices to nftables DNAT.

`render` is pure (objects in, nft script out) so the rules can be unit tested; the
supervisor applies the script atomically whenever the objects change.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

TABLE = "devcluster-services"

Obj = dict[str, Any]


@dataclass(frozen=True, order=True)
class Frontend:
    ip: str
    protocol: str  # "tcp" or "udp"
    port: int


@dataclass(frozen=True, order=True)
class Backend:
    ip: str
    port: int


def _service_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def frontends(services: list[Obj]) -> dict[str, list[tuple[Frontend, str, int | str]]]:
    """ClusterIP:port of each service, with the port name and target port."""
    result: dict[str, list[tuple[Frontend, str, int | str]]] = {}
    for svc in services:
        spec = svc.get("spec", {})
        ip = spec.get("clusterIP")
        if not ip or ip == "None" or spec.get("type") == "ExternalName":
            continue
        key = _service_key(svc["metadata"]["namespace"], svc["metadata"]["name"])
        for port in spec.get("ports", []):
            proto = port.get("protocol", "TCP").lower()
            if proto not in ("tcp", "udp"):
                continue
            fe = Frontend(ip, proto, int(port["port"]))
            result.setdefault(key, []).append(
                (fe, port.get("name", ""), port.get("targetPort", port["port"]))
            )
    return result


def backends(slices: list[Obj]) -> dict[tuple[str, str, str], set[Backend]]:
    """Ready endpoints by (service key, port name, protocol)."""
    result: dict[tuple[str, str, str], set[Backend]] = defaultdict(set)
    for sl in slices:
        if sl.get("addressType") != "IPv4":
            continue
        meta = sl["metadata"]
        svc = meta.get("labels", {}).get("kubernetes.io/service-name")
        if not svc:
            continue
        key = _service_key(meta["namespace"], svc)
        for ep in sl.get("endpoints") or []:
            if ep.get("conditions", {}).get("ready") is False:
                continue
            for port in sl.get("ports") or []:
                if port.get("port") is None:
                    continue
                proto = port.get("protocol", "TCP").lower()
                for address in ep.get("addresses", []):
                    result[(key, port.get("name", ""), proto)].add(
                        Backend(address, int(port["port"]))
                    )
    return result


def render(services: list[Obj], slices: list[Obj]) -> str:
    """The whole table, replaced in one transaction."""
    eps = backends(slices)
    dnat: list[str] = []
    reject: list[str] = []
    for key, ports in sorted(frontends(services).items()):
        for fe, port_name, _target in sorted(ports, key=lambda p: p[0]):
            targets = sorted(eps.get((key, port_name, fe.protocol), set()))
            match = f"ip daddr {fe.ip} {fe.protocol} dport {fe.port}"
            if not targets:
                # Like kube-proxy: a service without ready endpoints refuses at once.
                reject.append(f"    {match} reject")
                continue
            if len(targets) == 1:
                dnat.append(f"    {match} dnat ip to {targets[0].ip}:{targets[0].port}")
                continue
            entries = ", ".join(f"{i} : {b.ip} . {b.port}" for i, b in enumerate(targets))
            dnat.append(
                f"    {match} dnat ip to numgen random mod {len(targets)} map {{ {entries} }}"
            )
    body = "\n".join(dnat)
    rejects = "\n".join(reject)
    return f"""table ip {TABLE}
delete table ip {TABLE}
table ip {TABLE} {{
  chain services {{
{body}
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    jump services
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    jump services
  }}
  chain no_endpoints {{
{rejects}
  }}
  chain filter_forward {{
    type filter hook forward priority filter - 1; policy accept;
    ct state new jump no_endpoints
  }}
  chain filter_output {{
    type filter hook output priority filter - 1; policy accept;
    ct state new jump no_endpoints
  }}
}}
"""
