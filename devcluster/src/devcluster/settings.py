"""Versions, paths and the address plan of devcluster, in one place.

Every address lives in the documentation ranges or the cluster ranges, so that nothing
devcluster creates can collide with a real network the host is attached to.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass(frozen=True, kw_only=True)
class Versions:
    """Pinned component versions; Kubernetes is one setting so a 1.31-1.36 matrix can follow."""

    kubernetes: str = field(default_factory=lambda: _env("DEVCLUSTER_K8S_VERSION", "v1.36.3"))
    etcd: str = field(default_factory=lambda: _env("DEVCLUSTER_ETCD_VERSION", "v3.6.16"))
    coredns: str = field(default_factory=lambda: _env("DEVCLUSTER_COREDNS_VERSION", "v1.14.7"))
    containerd: str = field(default_factory=lambda: _env("DEVCLUSTER_CONTAINERD_VERSION", "v2.4.2"))


@dataclass(frozen=True, kw_only=True)
class Addresses:
    """The address plan (see shared/CLUSTER.md)."""

    service_cidr: IPv4Network = IPv4Network("10.96.0.0/16")
    pod_cidr: IPv4Network = IPv4Network("10.244.0.0/16")
    # The node's own podCIDR (the controller-manager allocates the first /24 of pod_cidr to
    # the one node); CNI's host-local hands out pod IPs from it.
    node_pod_cidr: IPv4Network = IPv4Network("10.244.0.0/24")
    kubernetes_service_ip: IPv4Address = IPv4Address("10.96.0.1")
    dns_service_ip: IPv4Address = IPv4Address("10.96.0.10")
    # The node's address, on the node namespace's loopback: API server, kubelet API, CoreDNS.
    node_ip: IPv4Address = IPv4Address("192.0.2.1")
    api_port: int = 6443
    kubelet_port: int = 10250
    # Gateway every pod namespace routes through (answered by proxy ARP on the node side).
    pod_gateway: IPv4Address = IPv4Address("169.254.1.1")
    # `devcluster pod` runs in a namespace with this address: routed like a pod, but outside the
    # node's podCIDR so CNI never hands it out.
    toolbox_ip: IPv4Address = IPv4Address("10.244.255.254")
    laptop_link_node: IPv4Address = IPv4Address("198.51.100.1")
    laptop_link_laptop: IPv4Address = IPv4Address("198.51.100.2")
    # The laptop's own resolver (dnsmasq), like a home router's.
    laptop_resolver: IPv4Address = IPv4Address("198.51.100.53")
    external_link_node: IPv4Address = IPv4Address("203.0.113.1")
    external_ip: IPv4Address = IPv4Address("203.0.113.2")
    external_name: str = "db.external.test"
    # A cloud's instance metadata address, answered by the external host: what a pod (the
    # traffic manager included) could reach on a real cloud, and the laptop must not.
    metadata_ip: IPv4Address = IPv4Address("169.254.169.254")

    @property
    def api_url(self) -> str:
        return f"https://{self.node_ip}:{self.api_port}"


@dataclass(frozen=True, kw_only=True)
class Paths:
    """Where devcluster keeps things. Binaries are cached by version outside the repo."""

    cache: Path = field(
        default_factory=lambda: Path(
            _env("DEVCLUSTER_CACHE", str(Path.home() / ".cache" / "devcluster"))
        )
    )
    run: Path = field(default_factory=lambda: Path(_env("DEVCLUSTER_RUN", "/run/devcluster")))
    # The laptop user's Python environment and a world-readable copy of the project's sources:
    # outside root's home, which other users cannot read.
    opt: Path = field(default_factory=lambda: Path(_env("DEVCLUSTER_OPT", "/opt/telepresence-dev")))

    # The node's disk: containerd's images and snapshots, the kubelet's and CNI's state, pod
    # logs. Not under /run, which may be a small tmpfs on other hosts.
    node: Path = field(
        default_factory=lambda: Path(_env("DEVCLUSTER_NODE_DIR", "/var/lib/devcluster"))
    )

    @property
    def pki(self) -> Path:
        return self.run / "pki"

    @property
    def logs(self) -> Path:
        return self.run / "logs"

    @property
    def venv(self) -> Path:
        return self.opt / "venv"

    @property
    def src_copy(self) -> Path:
        return self.opt / "src"

    @property
    def laptop_bin(self) -> Path:
        return self.opt / "bin"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.run / "admin.kubeconfig"

    @property
    def laptop_home(self) -> Path:
        return Path("/home") / LAPTOP_USER

    @property
    def laptop_kubeconfig(self) -> Path:
        return self.laptop_home / ".kube" / "config"


# Names of the namespaces devcluster creates on the host. All start with "dc-" so that
# `down` finds every one of them, including pod namespaces of an earlier crashed run.
NODE_NS = "dc-node"
LAPTOP_NS = "dc-laptop"
EXTERNAL_NS = "dc-external"
TOOLBOX_NS = "dc-toolbox"
POD_NS_PREFIX = "dc-pod-"
NODE_NAME = "devcluster-node"
LAPTOP_USER = "tpuser"
CLUSTER_DOMAIN = "cluster.local"


@dataclass(frozen=True, kw_only=True)
class Settings:
    versions: Versions = field(default_factory=Versions)
    addresses: Addresses = field(default_factory=Addresses)
    paths: Paths = field(default_factory=Paths)

    def binary(self, name: str) -> Path:
        """The cached path of a built binary."""
        v = self.versions
        folder = {
            "etcd": f"etcd-{v.etcd}",
            "coredns": f"coredns-{v.coredns}",
            "containerd": f"containerd-{v.containerd}",
            "containerd-shim-runc-v2": f"containerd-{v.containerd}",
            "ctr": f"containerd-{v.containerd}",
        }.get(name, f"kubernetes-{v.kubernetes}")
        return self.paths.cache / "bin" / folder / name
