"""The traffic manager's installer, discovery and DNS against devcluster's real API server.

Installs into the real default namespace `ambassador`, so the module starts and ends by
removing whatever a manager leaves (namespace, ClusterRole, ClusterRoleBinding): other
tests start clean. The installer runs in the laptop namespace as the laptop user, as the
user daemon does; discovery and DNS also run inside the cluster network, as the manager
pod does, with the manager's own service account.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from telepresence import __version__
from tests.e2e.cluster import Cluster, wait_for

VENV_PYTHON = "/opt/telepresence-dev/venv/bin/python"
NS = "ambassador"
#: Our own image, which devcluster builds with deploy/'s recipe (the default needs none).
OWN_IMAGE = f"ghcr.io/telepresence-py/traffic-manager:{__version__}"
#: The default: the manager's code in ConfigMaps, on the official Python image (devcluster's
#: stand-in has the same reference).
BASE_IMAGE = "docker.io/library/python:3.11-slim"
OLD_VERSION = "0.0.9"
EMPTY_ZIP = b"PK\x05\x06" + bytes(18)
CLUSTER_ROLE = "traffic-manager-ambassador"
NOPERM_NS = "tp-noperm"
HALF_ADMIN_ROLE = "tp-noperm-half-admin"

# Runs in the laptop namespace: one call of the installer API, JSON in on stdin, JSON out.
INSTALLER = """
import asyncio, dataclasses, json, sys
from telepresence.k8s import kubeconfig
from telepresence.k8s.api import KubeApi, KubeError
from telepresence.k8s.install import ensure_manager, find_manager_pod

async def main(args):
    access = kubeconfig.load()
    if args.get("token"):
        access = dataclasses.replace(access, cert_data=None, key_data=None, token=args["token"])
    progress = []
    async with KubeApi(access) as api:
        try:
            if args["op"] == "find":
                info = await find_manager_pod(api, "ambassador")
            else:
                info = await ensure_manager(
                    api, image=args.get("image"), base_image=args.get("base_image"),
                    version=args["version"],
                    upgrade=args.get("upgrade", False),
                    progress=progress.append, timeout=args.get("timeout", 120))
        except KubeError as e:
            return {"error": str(e), "type": type(e).__name__, "progress": progress}
    return {"info": info and dataclasses.asdict(info), "progress": progress}

print(json.dumps(asyncio.run(main(json.load(sys.stdin)))))
"""

# Runs discovery once: with the kubeconfig (argv[1] == "kubeconfig", resolv.conf in
# argv[2]) or as the pod's service account (argv[1] == "in-cluster", secrets dir argv[2]).
DISCOVERY = """
import asyncio, json, os, sys
from pathlib import Path
from telepresence.k8s import kubeconfig
from telepresence.k8s.api import KubeApi, in_cluster_access
from telepresence.manager.discovery import ClusterInfoSource, DiscoverySettings

async def main(mode, path):
    if mode == "kubeconfig":
        access = kubeconfig.load(namespace="ambassador")
        settings = DiscoverySettings(resolv_conf=Path(path))
    else:
        env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
        access = in_cluster_access(environ=env, secrets_dir=Path(path))
        settings = DiscoverySettings()
    found = asyncio.get_running_loop().create_future()
    async with KubeApi(access) as api:
        source = ClusterInfoSource(api, on_change=found.set_result, settings=settings)
        task = asyncio.create_task(source.run(max_attempts=1), name="discovery")
        info = await asyncio.wait_for(found, 30)
        task.cancel()
        probed = await source.probe_service_range()
    print(json.dumps({
        "service_subnets": info.service_subnets, "pod_subnets": info.pod_subnets,
        "cluster_domain": info.cluster_domain, "dns_server_ip": info.dns_server_ip,
        "service_source": source.state.service_source.name,
        "pod_source": source.state.pod_source.name,
        "probed": [str(n) for n in probed],
    }))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""

DNS = """
import asyncio, json, sys
import dns.message, dns.rcode, dns.rdatatype
from telepresence.manager.dnsresolver import lookup

async def main():
    out = {}
    for name, qtype in [
        ("kubernetes.default.svc.cluster.local", "A"),
        ("_https._tcp.kubernetes.default.svc.cluster.local.", "SRV"),
        ("no-such-service.default.svc.cluster.local", "A"),
    ]:
        msg = dns.message.from_wire(await lookup(name, dns.rdatatype.from_text(qtype)))
        out[f"{name} {qtype}"] = {
            "rcode": dns.rcode.to_text(msg.rcode()),
            "answers": [rr.to_text() for rrset in msg.answer for rr in rrset],
            "ttls": [rrset.ttl for rrset in msg.answer],
        }
    print(json.dumps(out))

asyncio.run(main())
"""


def install(cluster: Cluster, **args: Any) -> dict[str, Any]:
    args = {"op": "ensure", "version": __version__, **args}
    proc = cluster.laptop(VENV_PYTHON, "-c", INSTALLER, input=json.dumps(args), timeout=240)
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def remove_manager(cluster: Cluster) -> None:
    cluster.kubectl(
        "delete",
        f"clusterrolebinding/{CLUSTER_ROLE}",
        f"clusterrole/{CLUSTER_ROLE}",
        "--ignore-not-found",
    )
    cluster.kubectl("delete", "namespace", NS, "--ignore-not-found", "--wait=true", timeout=180)
    wait_for(lambda: not exists(cluster, "namespace", NS), timeout=120, what="ambassador gone")


def exists(cluster: Cluster, *what: str) -> bool:
    return cluster.kubectl("get", *what, "-o", "name", check=False).returncode == 0


@pytest.fixture(scope="module")
def clean(cluster: Cluster) -> Iterator[Cluster]:
    """No manager before the first test; none after the last."""
    remove_manager(cluster)
    yield cluster
    remove_manager(cluster)
    cluster.kubectl("delete", "namespace", NOPERM_NS, "--ignore-not-found", "--wait=false")
    cluster.kubectl("delete", f"clusterrole/{HALF_ADMIN_ROLE}", "--ignore-not-found")
    cluster.kubectl("delete", f"clusterrolebinding/{HALF_ADMIN_ROLE}", "--ignore-not-found")


def token_for(cluster: Cluster, account: str) -> str:
    cluster.kubectl("create", "serviceaccount", account, "-n", NOPERM_NS, check=False)
    return cluster.kubectl("create", "token", account, "-n", NOPERM_NS).stdout.strip()


def deployment(cluster: Cluster) -> dict[str, Any]:
    result: dict[str, Any] = cluster.get("deployment/traffic-manager", "-n", NS)
    return result


def test_a_user_who_may_only_read_pods_is_told_to_ask_an_admin(clean: Cluster) -> None:
    cluster = clean
    cluster.kubectl("create", "namespace", NOPERM_NS, check=False)
    cluster.kubectl(
        "create", "role", "pod-reader", "--verb=get", "--resource=pods", "-n", NOPERM_NS,
        check=False,
    )  # fmt: skip
    cluster.kubectl(
        "create", "rolebinding", "viewer-reads-pods", "--role=pod-reader",
        f"--serviceaccount={NOPERM_NS}:viewer", "-n", NOPERM_NS, check=False,
    )  # fmt: skip
    result = install(cluster, token=token_for(cluster, "viewer"))
    assert result["type"] == "Forbidden"
    assert result["error"] == (
        "your user may not get deployments in namespace ambassador: ask a cluster admin to "
        "install the traffic manager with "
        "`telepresence manifests | kubectl apply --server-side -f -`"
    )
    assert not exists(cluster, "namespace", NS)
    assert not exists(cluster, "clusterrole", CLUSTER_ROLE)


def test_a_user_who_may_create_namespaces_but_not_rbac_changes_nothing(clean: Cluster) -> None:
    """The dry run stops it before the namespace is created for real."""
    cluster = clean
    cluster.kubectl("create", "namespace", NOPERM_NS, check=False)
    cluster.apply(
        json.dumps(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": HALF_ADMIN_ROLE},
                "rules": [
                    {
                        "apiGroups": ["", "apps"],
                        "resources": ["deployments", "pods"],
                        "verbs": ["get", "list", "watch"],
                    },
                    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["create", "patch"]},
                ],
            }
        )
    )
    cluster.kubectl(
        "create", "clusterrolebinding", HALF_ADMIN_ROLE, f"--clusterrole={HALF_ADMIN_ROLE}",
        f"--serviceaccount={NOPERM_NS}:half-admin", check=False,
    )  # fmt: skip
    result = install(cluster, token=token_for(cluster, "half-admin"))
    assert result["type"] == "Forbidden", result
    assert result["progress"] == ["Installing Traffic Manager"]
    assert result["error"].startswith(
        "your user may not patch serviceaccounts in namespace ambassador: ask a cluster admin "
        "to install the traffic manager with "
        "`telepresence manifests | kubectl apply --server-side -f -`"
    )
    assert not exists(cluster, "namespace", NS)
    assert not exists(cluster, "clusterrole", CLUSTER_ROLE)


def test_install_is_idempotent_and_a_new_version_upgrades_only_when_asked(
    clean: Cluster,
) -> None:
    cluster = clean
    first = install(cluster, version=OLD_VERSION)
    assert "error" not in first, first
    assert first["progress"] == ["Installing Traffic Manager", "Waiting for Traffic Manager"]
    old = first["info"]
    assert old["version"] == OLD_VERSION
    assert old["upgraded"] is False
    ready = cluster.ready_pods(NS, "app=traffic-manager")
    assert [p["metadata"]["name"] for p in ready] == [old["pod_name"]]
    assert ready[0]["status"]["podIP"] == old["pod_ip"]
    namespace = cluster.get("namespace", NS)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"

    before = deployment(cluster)["metadata"]
    again = install(cluster, version=OLD_VERSION)
    assert again == {"info": old, "progress": []}
    after = deployment(cluster)["metadata"]
    assert after["resourceVersion"] == before["resourceVersion"]  # nothing was applied

    # A newer client keeps the older manager (teammates' sessions stay), and says how to
    # upgrade it.
    kept = install(cluster)
    assert kept["info"]["version"] == OLD_VERSION
    assert kept["info"]["pod_name"] == old["pod_name"]
    assert kept["progress"] == [
        f"Using Traffic Manager {OLD_VERSION} (older than this client {__version__}; "
        "`telepresence manager upgrade` upgrades it)"
    ]
    assert deployment(cluster)["metadata"]["resourceVersion"] == before["resourceVersion"]

    upgrade = install(cluster, upgrade=True)
    assert "error" not in upgrade, upgrade
    assert upgrade["progress"] == [
        f"Upgrading Traffic Manager from {OLD_VERSION} to {__version__}",
        "Waiting for Traffic Manager",
    ]
    new = upgrade["info"]
    assert new["version"] == __version__
    assert new["upgraded"] is True
    assert new["pod_name"] != old["pod_name"]
    pod = cluster.get("pod", new["pod_name"], "-n", NS)
    assert pod["metadata"]["annotations"]["telepresence-py/version"] == __version__
    annotations = deployment(cluster)["metadata"]["annotations"]
    assert annotations["telepresence-py/version"] == __version__
    # The old pod goes away on its own (rolling update), and the next connect is a no-op.
    wait_for(
        lambda: not exists(cluster, "pod", old["pod_name"], "-n", NS),
        timeout=90,
        what="the old manager pod to go",
    )
    assert install(cluster) == {"info": {**new, "upgraded": False}, "progress": []}


def code_configmaps(cluster: Cluster) -> dict[str, dict[str, Any]]:
    listing = cluster.get("configmaps", "-n", NS, "-l", "telepresence-py/manager-code")
    return {cm["metadata"]["name"]: cm for cm in listing["items"]}


def manager_process(cluster: Cluster, pod_name: str) -> int:
    pod = cluster.get("pod", pod_name, "-n", NS)
    (pid,) = wait_for(lambda: cluster.container_pids(pod), timeout=30, what="its process")
    return pid


def test_the_default_manager_is_our_code_on_the_stock_python_image(clean: Cluster) -> None:
    """No image of ours anywhere: the official Python image (devcluster's stand-in under
    its reference), our code from ConfigMaps, non-root, read-only, no compiled extension
    of ours, in a namespace that enforces the restricted level."""
    cluster = clean
    result = install(cluster)
    assert "error" not in result, result
    pod = cluster.get("pod", result["info"]["pod_name"], "-n", NS)
    (container,) = pod["spec"]["containers"]
    assert container["image"] == BASE_IMAGE
    (status,) = pod["status"]["containerStatuses"]
    assert status["image"] == BASE_IMAGE and status["ready"] is True
    namespace = cluster.get("namespace", NS)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    maps = code_configmaps(cluster)
    assert maps and all(cm["immutable"] is True for cm in maps.values())
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "code"]
    assert sorted(s["configMap"]["name"] for s in volume["projected"]["sources"]) == sorted(maps)

    pid = manager_process(cluster, pod["metadata"]["name"])
    proc = Path(f"/proc/{pid}")
    assert proc.joinpath("cmdline").read_bytes().split(b"\0")[:3] == [
        b"python3", b"-m", b"telepresence.manager",
    ]  # fmt: skip
    uids = next(line for line in proc.joinpath("status").read_text().splitlines()
                if line.startswith("Uid:"))  # fmt: skip
    assert uids.split()[1:] == ["1000"] * 4
    root = next(line.split() for line in proc.joinpath("mountinfo").read_text().splitlines()
                if line.split()[4] == "/")  # fmt: skip
    assert "ro" in root[5].split(",")
    # The manager's msgspec is the pure one from the archives: no shared object of it (or
    # of any other dependency) is mapped.
    maps_text = proc.joinpath("maps").read_text()
    assert "msgspec" not in maps_text and "site-packages" not in maps_text


def test_our_own_image_replaces_the_code_and_the_stale_code_goes(clean: Cluster) -> None:
    cluster = clean
    assert "error" not in install(cluster)
    current = code_configmaps(cluster)
    # Left by an earlier version's install: another digest (an empty zip will do).
    cluster.apply(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": "traffic-manager-code-0123456789ab-0",
                    "namespace": NS,
                    "labels": {"telepresence-py/manager-code": "0123456789ab"},
                },
                "binaryData": {"0.zip": base64.b64encode(EMPTY_ZIP).decode()},
            }
        )
    )
    own = install(cluster, image=OWN_IMAGE)
    assert own["progress"] == [
        f"Updating Traffic Manager image to {OWN_IMAGE}",
        "Waiting for Traffic Manager",
    ]
    pod = cluster.get("pod", own["info"]["pod_name"], "-n", NS)
    assert pod["spec"]["containers"][0]["image"] == OWN_IMAGE
    assert not [v for v in pod["spec"].get("volumes", []) if v["name"] == "code"]
    assert code_configmaps(cluster) == {}  # our image carries its code

    back = install(cluster, base_image=BASE_IMAGE)
    assert "error" not in back, back
    assert sorted(code_configmaps(cluster)) == sorted(current)


def test_an_image_the_cluster_cannot_pull_is_named_with_the_flag_to_fix_it(
    clean: Cluster,
) -> None:
    cluster = clean
    assert "error" not in install(cluster)
    bad = "ghcr.io/telepresence-py/traffic-manager:no-such-tag"
    result = install(cluster, image=bad, timeout=60)
    assert result["type"] == "InstallError", result
    assert bad in result["error"]
    assert "--manager-image" in result["error"]
    assert "ErrImagePull" in result["error"]
    # The previous manager kept serving through the failed rollout; going back is quick.
    back = install(cluster, base_image=BASE_IMAGE)
    assert back["progress"] == [
        f"Updating Traffic Manager image to {BASE_IMAGE}",
        "Waiting for Traffic Manager",
    ]
    assert back["info"]["upgraded"] is True


def test_find_manager_pod_rejoins_a_restarted_manager(clean: Cluster) -> None:
    cluster = clean
    current = install(cluster)["info"]
    found = install(cluster, op="find")["info"]
    assert found == {**current, "upgraded": False}
    cluster.kubectl("delete", "pod", current["pod_name"], "-n", NS, "--wait=false")

    def replacement() -> dict[str, Any] | None:
        info: dict[str, Any] | None = install(cluster, op="find")["info"]
        return info if info and info["pod_name"] != current["pod_name"] else None

    new = wait_for(replacement, timeout=90, what="a new Ready manager pod")
    assert new["version"] == __version__
    assert new["pod_ip"]


EXPECTED_INFO = {
    "service_subnets": ["10.96.0.0/16"],
    "pod_subnets": ["10.244.0.0/24"],
    "cluster_domain": "cluster.local",
    "dns_server_ip": "10.96.0.10",
    "service_source": "SERVICE_CIDRS",
    "pod_source": "NODE_CIDRS",
    "probed": ["10.96.0.0/16"],
}


def test_discovery_through_a_kubeconfig_from_the_laptop(clean: Cluster) -> None:
    cluster = clean
    assert "error" not in install(cluster)  # the probe creates (dry run) in ambassador
    pod_resolv_conf = cluster.pod("cat", "/etc/resolv.conf").stdout
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "resolv.conf"
        conf.write_text(pod_resolv_conf)
        Path(tmp).chmod(0o755)
        conf.chmod(0o644)
        proc = cluster.laptop(VENV_PYTHON, "-c", DISCOVERY, "kubeconfig", str(conf))
    assert json.loads(proc.stdout) == EXPECTED_INFO


def test_discovery_as_the_managers_service_account_inside_the_cluster(clean: Cluster) -> None:
    """The manager's least-privilege RBAC is enough for every source, the probe included,
    and the resolv.conf is a pod's."""
    cluster = clean
    assert "error" not in install(cluster)
    token = cluster.kubectl("create", "token", "traffic-manager", "-n", NS).stdout.strip()
    secrets = Path(tempfile.mkdtemp(prefix="tp-sa-"))
    try:
        (secrets / "token").write_text(token)
        (secrets / "namespace").write_text(NS)
        shutil.copy(cluster.settings.paths.pki / "ca.crt", secrets / "ca.crt")
        proc = cluster.pod(VENV_PYTHON, "-c", DISCOVERY, "in-cluster", str(secrets))
    finally:
        shutil.rmtree(secrets)
    assert json.loads(proc.stdout) == EXPECTED_INFO


def test_dns_lookups_go_to_the_cluster_resolver_in_wire_format(cluster: Cluster) -> None:
    proc = cluster.pod(VENV_PYTHON, "-c", DNS)
    answers = json.loads(proc.stdout)
    a = answers["kubernetes.default.svc.cluster.local A"]
    assert a["rcode"] == "NOERROR"
    assert a["answers"] == ["10.96.0.1"]
    assert a["ttls"][0] > 0
    srv = answers["_https._tcp.kubernetes.default.svc.cluster.local. SRV"]
    assert srv["rcode"] == "NOERROR"
    (record,) = srv["answers"]
    assert record.split()[2:] == ["443", "kubernetes.default.svc.cluster.local."]
    assert answers["no-such-service.default.svc.cluster.local A"] == {
        "rcode": "NXDOMAIN",
        "answers": [],
        "ttls": [],
    }
