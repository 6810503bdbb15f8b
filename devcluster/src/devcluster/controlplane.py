"""Command lines and configuration files of the control-plane components."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from devcluster.pki import Authority, KeyPair, service_account_keys
from devcluster.settings import CLUSTER_DOMAIN, NODE_NAME, Settings


@dataclass(frozen=True)
class Component:
    """One long-running process of the cluster; the supervisor restarts it when it stops."""

    name: str
    argv: list[str]


def kubeconfig(*, server: str, ca: Path, client: KeyPair, user: str = "admin") -> str:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "devcluster",
                "cluster": {"server": server, "certificate-authority-data": _b64(ca)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": _b64(client.cert),
                    "client-key-data": _b64(client.key),
                },
            }
        ],
        "contexts": [{"name": "devcluster", "context": {"cluster": "devcluster", "user": user}}],
        "current-context": "devcluster",
    }
    return yaml.safe_dump(config, sort_keys=False)


def _b64(path: Path) -> str:
    import base64

    return base64.b64encode(path.read_bytes()).decode()


@dataclass(frozen=True)
class Credentials:
    ca: KeyPair
    apiserver: KeyPair
    kubelet_client: KeyPair
    kubelet_server: KeyPair
    #: The kubelet's own identity towards the API server (Node authorizer, NodeRestriction).
    node_client: KeyPair
    kube_proxy: KeyPair
    admin: KeyPair
    service_account: KeyPair


def make_credentials(settings: Settings) -> Credentials:
    a = settings.addresses
    folder = settings.paths.pki
    ca = Authority(folder)
    hosts = (
        str(a.node_ip),
        str(a.kubernetes_service_ip),
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        f"kubernetes.default.svc.{CLUSTER_DOMAIN}",
        "localhost",
        "127.0.0.1",
    )
    return Credentials(
        ca=ca.ca,
        apiserver=ca.issue("apiserver", cn="kube-apiserver", hosts=hosts, server=True),
        kubelet_client=ca.issue(
            "apiserver-kubelet-client",
            cn="kube-apiserver-kubelet-client",
            org="system:masters",
            client=True,
        ),
        kubelet_server=ca.issue(
            "kubelet", cn=NODE_NAME, hosts=(str(a.node_ip), NODE_NAME), server=True
        ),
        node_client=ca.issue(
            "kubelet-client", cn=f"system:node:{NODE_NAME}", org="system:nodes", client=True
        ),
        # Bound to system:node-proxier by the API server's default RBAC.
        kube_proxy=ca.issue("kube-proxy", cn="system:kube-proxy", client=True),
        admin=ca.issue("admin", cn="devcluster-admin", org="system:masters", client=True),
        service_account=service_account_keys(folder),
    )


def components(settings: Settings, creds: Credentials) -> list[Component]:
    a = settings.addresses
    run = settings.paths.run
    admin_kc = str(settings.paths.admin_kubeconfig)
    b = settings.binary
    return [
        Component(
            "etcd",
            [
                str(b("etcd")),
                "--name=devcluster",
                f"--data-dir={run / 'etcd'}",
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=devcluster=http://127.0.0.1:2380",
                "--listen-metrics-urls=http://127.0.0.1:2381",
                # The data lives on tmpfs and the cluster is disposable: skip fsync.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        ),
        Component(
            "kube-apiserver",
            [
                str(b("kube-apiserver")),
                "--etcd-servers=http://127.0.0.1:2379",
                f"--bind-address={a.node_ip}",
                f"--advertise-address={a.node_ip}",
                f"--secure-port={a.api_port}",
                f"--service-cluster-ip-range={a.service_cidr}",
                f"--client-ca-file={creds.ca.cert}",
                f"--tls-cert-file={creds.apiserver.cert}",
                f"--tls-private-key-file={creds.apiserver.key}",
                f"--kubelet-client-certificate={creds.kubelet_client.cert}",
                f"--kubelet-client-key={creds.kubelet_client.key}",
                "--kubelet-preferred-address-types=InternalIP",
                f"--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
                f"--service-account-key-file={creds.service_account.cert}",
                f"--service-account-signing-key-file={creds.service_account.key}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                "--profiling=false",
            ],
        ),
        Component(
            "kube-controller-manager",
            [
                str(b("kube-controller-manager")),
                f"--kubeconfig={admin_kc}",
                f"--authentication-kubeconfig={admin_kc}",
                f"--authorization-kubeconfig={admin_kc}",
                "--bind-address=127.0.0.1",
                "--allocate-node-cidrs=true",
                f"--cluster-cidr={a.pod_cidr}",
                "--node-cidr-mask-size=24",
                f"--service-cluster-ip-range={a.service_cidr}",
                f"--service-account-private-key-file={creds.service_account.key}",
                f"--root-ca-file={creds.ca.cert}",
                "--use-service-account-credentials=true",
                "--leader-elect=false",
            ],
        ),
        Component(
            "kube-scheduler",
            [
                str(b("kube-scheduler")),
                f"--kubeconfig={admin_kc}",
                f"--authentication-kubeconfig={admin_kc}",
                f"--authorization-kubeconfig={admin_kc}",
                "--bind-address=127.0.0.1",
                "--leader-elect=false",
            ],
        ),
        Component(
            "coredns",
            [
                str(b("coredns")),
                "-conf",
                str(run / "Corefile"),
            ],
        ),
    ]


def corefile(settings: Settings) -> str:
    """Cluster DNS: cluster.local from the API, the external host's name, NXDOMAIN otherwise.

    The catch-all lives in its own server block because `template` runs before `kubernetes`.
    """
    a = settings.addresses
    kc = settings.paths.admin_kubeconfig
    return f"""{CLUSTER_DOMAIN}:53 in-addr.arpa:53 {{
    bind {a.node_ip}
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa {{
        kubeconfig {kc} devcluster
        pods insecure
        ttl 5
    }}
    cache 5
}}
external.test:53 {{
    bind {a.node_ip}
    errors
    hosts {{
        {a.external_ip} {a.external_name}
    }}
}}
.:53 {{
    bind {a.node_ip}
    errors
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
"""
