"""The namespaces and links of devcluster's data plane.

Topology (routed veths between namespaces, so every hop is an explicit route; pods sit
on the bridge that CNI makes):

    laptop (198.51.100.2) --veth-- node (198.51.100.1; 192.0.2.1 on lo) --veth-- external
                                    |  \\-- cni0 bridge (10.244.0.1/24): pods, made by CNI
                                    \\-- toolbox (10.244.255.254, for `devcluster pod`)

The node namespace holds the control plane, the kubelet, kube-proxy's rules and CoreDNS.
The laptop reaches the API server port and nothing else; the external host is reachable
from pods only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from devcluster.settings import (
    EXTERNAL_NS,
    LAPTOP_NS,
    NODE_NS,
    TOOLBOX_NS,
    Addresses,
)
from devcluster.system import ip, netns_names, nft, run, sysctl

__all__ = ["create_base", "destroy_all", "netns_names"]

NETNS_ETC = Path("/etc/netns")


def _link(
    *,
    node_side: str,
    peer_ns: str,
    peer_ip: str,
    peer_prefix: int,
    node_ip: str | None,
    gateway: str,
) -> None:
    """A veth from the node namespace into peer_ns, with routes both ways."""
    ip(
        "link",
        "add",
        node_side,
        "netns",
        NODE_NS,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        peer_ns,
    )
    if node_ip:
        ip("addr", "add", f"{node_ip}/{peer_prefix}", "dev", node_side, netns=NODE_NS)
    ip("link", "set", node_side, "up", netns=NODE_NS)
    ip("addr", "add", f"{peer_ip}/{peer_prefix}", "dev", "eth0", netns=peer_ns)
    ip("link", "set", "lo", "up", netns=peer_ns)
    ip("link", "set", "eth0", "up", netns=peer_ns)
    if node_ip is None:
        # Pod-style: a /32 on the pod side, reached through the node's gateway address.
        ip("route", "add", f"{peer_ip}/32", "dev", node_side, netns=NODE_NS)
        ip("route", "add", gateway, "dev", "eth0", "scope", "link", netns=peer_ns)
        ip("route", "add", "default", "via", gateway, "dev", "eth0", netns=peer_ns)


def resolv_conf_text(*, nameserver: str, search: list[str], ndots: int) -> str:
    lines = [f"nameserver {nameserver}"]
    if search:
        lines.append("search " + " ".join(search))
    lines.append(f"options ndots:{ndots}")
    return "\n".join(lines) + "\n"


def write_resolv_conf(netns: str, *, nameserver: str, search: list[str], ndots: int) -> None:
    """`ip netns exec` and the laptop's mount namespace bind-mount
    /etc/netns/NAME/resolv.conf over /etc/resolv.conf."""
    folder = NETNS_ETC / netns
    folder.mkdir(parents=True, exist_ok=True)
    text = resolv_conf_text(nameserver=nameserver, search=search, ndots=ndots)
    (folder / "resolv.conf").write_text(text)


def laptop_resolv_conf(addr: Addresses) -> dict[str, Any]:
    """The plain laptop's resolv.conf: its home router's resolver, as DHCP gives it."""
    return {"nameserver": str(addr.laptop_resolver), "search": ["lan"], "ndots": 1}


#: Forwarded, so DNATed by kube-proxy: to a pod behind a NodePort (nft 1.0.6 cannot match
#: a range on the original port, and only NodePorts are DNATed on the node's address).
NODEPORTS_RULE = 'iifname "dc-laptop" ct status dnat ct original ip daddr @nodeports accept'


def create_base(addr: Addresses) -> None:
    """The node, laptop, external and toolbox namespaces and their links."""
    for name in (NODE_NS, LAPTOP_NS, EXTERNAL_NS, TOOLBOX_NS):
        ip("netns", "add", name)
    ip("link", "set", "lo", "up", netns=NODE_NS)
    ip("addr", "add", f"{addr.node_ip}/32", "dev", "lo", netns=NODE_NS)
    # The pods' gateway is a local address of the node, so the node answers ARP for it on
    # every pod veth (arp_ignore=0) and routes onwards.
    ip("addr", "add", f"{addr.pod_gateway}/32", "dev", "lo", netns=NODE_NS)
    sysctl("net.ipv4.ip_forward", "1", netns=NODE_NS)
    # Pods on one bridge: their replies to a Service's client must pass conntrack to be
    # un-DNATed (per network namespace since Linux 5.3; the default is already 1).
    sysctl("net.bridge.bridge-nf-call-iptables", "1", netns=NODE_NS)

    # Laptop: a /30 link; its only route into the cluster is the node's address.
    _link(
        node_side="dc-laptop",
        peer_ns=LAPTOP_NS,
        peer_ip=str(addr.laptop_link_laptop),
        peer_prefix=30,
        node_ip=str(addr.laptop_link_node),
        gateway="",
    )
    ip("route", "add", f"{addr.node_ip}/32", "via", str(addr.laptop_link_node), netns=LAPTOP_NS)
    ip("addr", "add", f"{addr.laptop_resolver}/32", "dev", "lo", netns=LAPTOP_NS)

    # External host: reachable from the node (so from pods), never from the laptop.
    _link(
        node_side="dc-external",
        peer_ns=EXTERNAL_NS,
        peer_ip=str(addr.external_ip),
        peer_prefix=30,
        node_ip=str(addr.external_link_node),
        gateway="",
    )
    ip("route", "add", "default", "via", str(addr.external_link_node), netns=EXTERNAL_NS)
    ip("addr", "add", f"{addr.metadata_ip}/32", "dev", "lo", netns=EXTERNAL_NS)
    ip("route", "add", f"{addr.metadata_ip}/32", "via", str(addr.external_ip), netns=NODE_NS)

    _link(
        node_side="dc-toolbox",
        peer_ns=TOOLBOX_NS,
        peer_ip=str(addr.toolbox_ip),
        peer_prefix=32,
        node_ip=None,
        gateway=str(addr.pod_gateway),
    )
    write_resolv_conf(
        TOOLBOX_NS,
        nameserver=str(addr.dns_service_ip),
        search=["default.svc.cluster.local", "svc.cluster.local", "cluster.local"],
        ndots=5,
    )
    write_resolv_conf(LAPTOP_NS, **laptop_resolv_conf(addr))

    # The laptop may open the API server port and nothing else in the cluster; with the
    # node's address in @nodeports (`devcluster nodeports open`), also its NodePorts, as a
    # kind node is reachable from its host. kube-proxy has DNATed such a connection to a
    # pod by the time it is forwarded, so it is matched by its original destination.
    nft(
        f"""
table ip devcluster-edge {{
  set nodeports {{
    type ipv4_addr;
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "dc-laptop" ct state established,related accept
    iifname "dc-laptop" ip daddr {addr.node_ip} tcp dport {addr.api_port} accept
    iifname "dc-laptop" counter reject with icmp type admin-prohibited
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    {NODEPORTS_RULE}
    iifname "dc-laptop" counter reject with icmp type admin-prohibited
    oifname "dc-laptop" ct state established,related accept
    oifname "dc-laptop" counter reject with icmp type admin-prohibited
  }}
}}
""",
        netns=NODE_NS,
    )


def set_nodeports(addr: Addresses, *, reachable: bool) -> None:
    """Opens (or closes again) the node's NodePort range to the laptop. Connections
    already open stay open (they are established); new ones follow the setting."""
    script = (
        f"add element ip devcluster-edge nodeports {{ {addr.node_ip} }}\n"
        if reachable
        else "flush set ip devcluster-edge nodeports\n"
    )
    nft(script, netns=NODE_NS)


def nodeports_open(addr: Addresses) -> bool:
    out = run(
        ["ip", "netns", "exec", NODE_NS, "nft", "list", "set", "ip", "devcluster-edge", "nodeports"]
    ).stdout
    return str(addr.node_ip) in out


def destroy_all() -> None:
    """Every namespace devcluster made, including pod namespaces left by a crashed run."""
    for name in netns_names():
        if name.startswith("dc-"):
            # Processes still inside keep a namespace alive; kill them first.
            pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
            if pids:
                run(["kill", "-9", *pids], check=False)
            ip("netns", "del", name, check=False)
    if NETNS_ETC.exists():
        for folder in NETNS_ETC.glob("dc-*"):
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()
