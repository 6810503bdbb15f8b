"""devcluster behaves like a real cluster: API, RBAC, pod security, pods, services, DNS,
port-forward, and a laptop that reaches the API server and nothing else."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from devcluster.fixtures import deployment, http_app_manifest, to_yaml
from devcluster.images import HTTP_IMAGE, PYTHON_BASE_IMAGE, UDP_ECHO_IMAGE
from devcluster.images.http import pattern_bytes
from tests.e2e.cluster import Cluster, wait_for

NS = "dc-test"
VENV_PYTHON = "/opt/telepresence-dev/venv/bin/python"


@pytest.fixture(scope="module")
def web(cluster: Cluster) -> list[dict[str, object]]:
    """Two replicas of the HTTP image behind a ClusterIP Service `web` in dc-test."""
    cluster.kubectl("create", "namespace", NS, check=False)
    cluster.apply(http_app_manifest(name="web", namespace=NS, replicas=2))
    cluster.rollout("web", NS)
    return wait_for(
        lambda: (pods := cluster.ready_pods(NS, "app=web")) and len(pods) == 2 and pods,
        timeout=60,
        what="two ready web pods",
    )


def test_kubectl_from_the_laptop_reports_the_built_version(cluster: Cluster) -> None:
    version = json.loads(cluster.laptop("kubectl", "version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.36.")
    assert version["clientVersion"]["gitVersion"].startswith("v1.36.")


def test_rbac_denies_what_a_restricted_service_account_lacks(cluster: Cluster) -> None:
    ns = "dc-rbac"
    cluster.kubectl("create", "namespace", ns, check=False)
    cluster.kubectl("create", "serviceaccount", "viewer", "-n", ns, check=False)
    cluster.kubectl(
        "create", "role", "pod-reader", "--verb=get,list", "--resource=pods", "-n", ns, check=False
    )
    cluster.kubectl(
        "create",
        "rolebinding",
        "viewer-reads-pods",
        "--role=pod-reader",
        f"--serviceaccount={ns}:viewer",
        "-n",
        ns,
        check=False,
    )
    token = cluster.kubectl("create", "token", "viewer", "-n", ns).stdout.strip()
    as_viewer = [
        "env",
        "KUBECONFIG=/dev/null",
        "kubectl",
        f"--server={cluster.settings.addresses.api_url}",
        "--insecure-skip-tls-verify",
        f"--token={token}",
        "-n",
        ns,
    ]
    allowed = cluster.laptop(*as_viewer, "get", "pods", check=False)
    assert allowed.returncode == 0, allowed.stderr
    denied = cluster.laptop(*as_viewer, "get", "secrets", check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()


def test_restricted_pod_security_rejects_a_privileged_pod(cluster: Cluster) -> None:
    ns = "dc-restricted"
    cluster.apply(
        to_yaml(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {
                        "name": ns,
                        "labels": {"pod-security.kubernetes.io/enforce": "restricted"},
                    },
                }
            ]
        )
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "privileged", "namespace": ns},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "image": "devcluster.local/http-server:1.0",
                    "securityContext": {"privileged": True},
                }
            ]
        },
    }
    result = cluster.kubectl("apply", "-f", "-", input=to_yaml([pod]), check=False)
    assert result.returncode != 0
    assert "violates PodSecurity" in result.stderr


def test_replicas_get_distinct_pod_ips_and_the_service_reaches_both(
    cluster: Cluster, web: list[dict[str, object]]
) -> None:
    ips = {p["status"]["podIP"] for p in web}  # type: ignore[index]
    names = {p["metadata"]["name"] for p in web}  # type: ignore[index]
    assert len(ips) == 2
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network("10.244.0.0/16") for ip in ips)
    cluster_ip = cluster.get("service", "web", "-n", NS)["spec"]["clusterIP"]
    for target in (f"web.{NS}", cluster_ip):
        seen: set[str] = set()

        def both_answered(target: str = target, seen: set[str] = seen) -> bool:
            out = cluster.pod("curl", "-sf", "-m", "3", f"http://{target}:8080/").stdout
            seen.add(out.strip())
            return seen == names

        wait_for(both_answered, timeout=30, what=f"answers from both pods through {target}")


def test_each_pod_answers_on_its_own_ip(cluster: Cluster, web: list[dict[str, object]]) -> None:
    for pod in web:
        ip = pod["status"]["podIP"]  # type: ignore[index]
        out = cluster.pod("curl", "-sf", "-m", "3", f"http://{ip}:8080/").stdout
        assert out.strip() == pod["metadata"]["name"]  # type: ignore[index]


def test_selector_less_service_with_manual_endpoints_reaches_the_external_host(
    cluster: Cluster,
) -> None:
    cluster.kubectl("create", "namespace", NS, check=False)
    ext = str(cluster.settings.addresses.external_ip)
    cluster.apply(
        to_yaml(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "extdb", "namespace": NS},
                    "spec": {"ports": [{"port": 8080, "targetPort": 80}]},
                },
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": "extdb-1",
                        "namespace": NS,
                        "labels": {"kubernetes.io/service-name": "extdb"},
                    },
                    "addressType": "IPv4",
                    "ports": [{"port": 80, "protocol": "TCP", "name": ""}],
                    "endpoints": [{"addresses": [ext]}],
                },
            ]
        )
    )
    out = wait_for(
        lambda: cluster.pod("curl", "-sf", "-m", "3", f"http://extdb.{NS}:8080/").stdout,
        timeout=30,
        what="the external host through a selector-less service",
    )
    assert out.strip() == cluster.settings.addresses.external_name


def test_external_name_service_resolves_through_cluster_dns(cluster: Cluster) -> None:
    cluster.kubectl("create", "namespace", NS, check=False)
    a = cluster.settings.addresses
    cluster.apply(
        to_yaml(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "extname", "namespace": NS},
                    "spec": {"type": "ExternalName", "externalName": a.external_name},
                }
            ]
        )
    )
    out = wait_for(
        lambda: (
            cluster.pod("getent", "hosts", f"extname.{NS}.svc.cluster.local", check=False).stdout
        ),
        timeout=30,
        what="the ExternalName service to resolve",
    )
    assert out.split()[0] == str(a.external_ip)
    # The external host's name is cluster DNS's, not the laptop's.
    assert cluster.laptop("getent", "hosts", a.external_name, check=False).returncode != 0


def test_headless_service_returns_every_ready_pod(
    cluster: Cluster, web: list[dict[str, object]]
) -> None:
    cluster.apply(
        to_yaml(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "web-headless", "namespace": NS},
                    "spec": {
                        "clusterIP": "None",
                        "selector": {"app": "web"},
                        "ports": [{"port": 8080}],
                    },
                }
            ]
        )
    )
    expected = sorted(p["status"]["podIP"] for p in web)  # type: ignore[index]

    def answer() -> list[str] | None:
        out = cluster.pod("dig", "+short", f"web-headless.{NS}.svc.cluster.local").stdout
        found = sorted(out.split())
        return found if found == expected else None

    wait_for(answer, timeout=30, what="every ready pod IP in the headless answer")
    assert cluster.get("service", "web-headless", "-n", NS)["spec"]["clusterIP"] == "None"
    # Pod DNS names of a real cluster: <ip-with-dashes>.<ns>.pod.
    ip = expected[0]
    out = cluster.pod("dig", "+short", f"{ip.replace('.', '-')}.{NS}.pod.cluster.local").stdout
    assert out.strip() == ip


PORT_FORWARD_SCRIPT = """
import asyncio, hashlib, json, sys
import aiohttp
from telepresence.k8s import kubeconfig
from telepresence.k8s.portforward import PortForward

async def main(namespace, pod, size, port):
    access = kubeconfig.load()
    async with aiohttp.ClientSession() as session:
        pf = await PortForward.open(session, access, namespace=namespace, pod=pod, port=port)
        request = f"GET /bytes/{size} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n"
        await pf.send(request.encode())
        buf = bytearray()
        while b"\\r\\n\\r\\n" not in buf:
            buf += await pf.receive()
        head, _, body = bytes(buf).partition(b"\\r\\n\\r\\n")
        digest = hashlib.sha256(body)
        got = len(body)
        while got < size:
            chunk = await pf.receive()
            if not chunk:
                break
            digest.update(chunk)
            got += len(chunk)
        await pf.close()
    print(json.dumps({"status": head.split(b"\\r\\n")[0].decode(), "bytes": got,
                      "sha256": digest.hexdigest()}))

port = int(sys.argv[4]) if len(sys.argv) > 4 else 8080
asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), port))
"""


def test_python_port_forward_through_the_api_server_moves_50mb_intact(
    cluster: Cluster, web: list[dict[str, object]]
) -> None:
    size = 50 * 1024 * 1024
    pod = web[0]["metadata"]["name"]  # type: ignore[index]
    out = cluster.laptop(
        VENV_PYTHON, "-c", PORT_FORWARD_SCRIPT, NS, pod, str(size), timeout=120
    ).stdout
    result = json.loads(out)
    assert result["status"] == "HTTP/1.1 200 OK"
    assert result["bytes"] == size
    assert result["sha256"] == hashlib.sha256(pattern_bytes(size)).hexdigest()


def _kubectl_port_forward(cluster: Cluster, ns: str, pod: str, port: int) -> str:
    """The body that `curl` gets through `kubectl port-forward` on the laptop."""
    script = f"""
kubectl port-forward -n {ns} pod/{pod} 18080:{port} >/dev/null 2>&1 &
pf=$!
trap 'kill $pf' EXIT
for i in $(seq 1 100); do
  if out=$(curl -sf -m 2 http://127.0.0.1:18080/); then echo "$out"; exit 0; fi
  sleep 0.1
done
exit 1
"""
    return cluster.laptop("sh", "-c", script, timeout=60).stdout.strip()


def test_kubectl_port_forward_from_the_laptop_reaches_the_pod(
    cluster: Cluster, web: list[dict[str, object]]
) -> None:
    pod = web[1]["metadata"]["name"]  # type: ignore[index]
    assert _kubectl_port_forward(cluster, NS, str(pod), 8080) == pod


def test_the_laptop_reaches_the_api_server_and_nothing_else(
    cluster: Cluster, web: list[dict[str, object]]
) -> None:
    assert cluster.laptop("kubectl", "get", "--raw", "/readyz").stdout.strip() == "ok"
    cluster_ip = cluster.get("service", "web", "-n", NS)["spec"]["clusterIP"]
    pod_ip = web[0]["status"]["podIP"]  # type: ignore[index]
    dns_ip = str(cluster.settings.addresses.dns_service_ip)
    for url in (
        f"http://{cluster_ip}:8080/",
        f"http://{pod_ip}:8080/",
        f"http://{dns_ip}:53/",
        f"http://{cluster.settings.addresses.external_ip}/",
    ):
        started = time.monotonic()
        result = cluster.laptop("curl", "-s", "-m", "10", url, check=False)
        assert result.returncode != 0, f"the laptop reached {url}"
        assert time.monotonic() - started < 3, f"{url} did not fail at once"
    for name in (f"web.{NS}.svc.cluster.local", f"web.{NS}", "kubernetes.default"):
        started = time.monotonic()
        assert cluster.laptop("getent", "hosts", name, check=False).returncode != 0
        assert time.monotonic() - started < 3, f"{name} did not fail at once"


def test_the_laptop_resolves_non_cluster_names_through_its_own_resolver(
    cluster: Cluster,
) -> None:
    out = cluster.laptop("getent", "hosts", "www.example.test").stdout
    assert out.split()[0] == str(cluster.settings.addresses.laptop_link_laptop)
    dig = cluster.laptop("dig", "+short", "www.example.test").stdout
    assert dig.strip() == str(cluster.settings.addresses.laptop_link_laptop)


def _pod(name: str, ns: str, container: dict[str, Any], **spec: Any) -> str:
    return to_yaml(
        [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"containers": [{"name": "main", **container}], **spec},
            }
        ]
    )


def _waiting_reason(cluster: Cluster, name: str, ns: str) -> str | None:
    status = cluster.get("pod", name, "-n", ns).get("status", {})
    for c in status.get("containerStatuses", []):
        reason = c.get("state", {}).get("waiting", {}).get("reason")
        if reason:
            return str(reason)
    return None


def _restarts(cluster: Cluster, name: str, ns: str) -> int:
    statuses = cluster.get("pod", name, "-n", ns)["status"].get("containerStatuses", [])
    return int(statuses[0]["restartCount"]) if statuses else 0


KUBELET_NS = "dc-kubelet"


@pytest.fixture(scope="module")
def kubelet_ns(cluster: Cluster) -> str:
    """A namespace whose pods start fresh, even on a cluster an earlier run used."""
    cluster.kubectl("create", "namespace", KUBELET_NS, check=False)
    cluster.kubectl(
        "delete", "pods", "--all", "-n", KUBELET_NS, "--grace-period=0", "--force", "--wait"
    )
    return KUBELET_NS


def test_a_pod_gets_what_a_kubelet_gives(cluster: Cluster, kubelet_ns: str) -> None:
    """Service-account files, env, resolv.conf, hostname and the user it asked for, seen
    from inside the container through `kubectl exec`; its output through `kubectl logs`."""
    ns = kubelet_ns
    cluster.apply(
        _pod(
            "probe",
            ns,
            {
                "image": HTTP_IMAGE,
                "args": ["--port", "8080"],
                "ports": [{"containerPort": 8080}],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
            },
            securityContext={"runAsUser": 4242, "runAsGroup": 4242},
        )
    )
    cluster.kubectl("wait", "--for=condition=Ready", "pod/probe", "-n", ns, "--timeout=60s")
    pod = cluster.get("pod", "probe", "-n", ns)
    out = cluster.pod("curl", "-sf", "-m", "3", f"http://{pod['status']['podIP']}:8080/").stdout
    assert out.strip() == "probe"

    def inside(*cmd: str) -> str:
        return cluster.kubectl("exec", "probe", "-n", ns, "--", *cmd).stdout

    assert re.search(r"^Uid:\s+4242\s", inside("cat", "/proc/self/status"), re.M)
    # PID 1 of the container's own PID namespace is the image's entrypoint.
    assert b"/app/http_server.py" in inside("cat", "/proc/1/cmdline").encode()
    assert inside("hostname").strip() == "probe"
    environ = dict(line.split("=", 1) for line in inside("env").splitlines() if "=" in line)
    assert environ["KUBERNETES_SERVICE_HOST"] == "10.96.0.1"
    assert environ["KUBERNETES_SERVICE_PORT"] == "443"
    assert environ["HOSTNAME"] == "probe"
    resolv = inside("cat", "/etc/resolv.conf")
    assert "nameserver 10.96.0.10" in resolv
    assert f"search {ns}.svc.cluster.local svc.cluster.local cluster.local" in resolv
    mounts = inside("cat", "/proc/self/mounts")
    # /var/run is a symlink to /run in the image: the kernel names the real path.
    assert " /run/secrets/kubernetes.io/serviceaccount " in mounts
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert inside("cat", f"{sa}/namespace") == ns
    token = inside("cat", f"{sa}/token")
    whoami = cluster.pod(
        "env",
        "KUBECONFIG=/dev/null",
        str(cluster.settings.binary("kubectl")),
        "--server=https://10.96.0.1",
        "--insecure-skip-tls-verify",
        f"--token={token}",
        "auth",
        "whoami",
        "-o",
        "json",
    ).stdout
    assert json.loads(whoami)["status"]["userInfo"]["username"] == (
        f"system:serviceaccount:{ns}:default"
    )
    logs = cluster.kubectl("logs", "probe", "-n", ns).stdout
    assert "serving HTTP on 0.0.0.0:8080" in logs


def test_a_non_root_image_runs_with_a_read_only_root(cluster: Cluster, kubelet_ns: str) -> None:
    ns = kubelet_ns
    cluster.apply(
        _pod(
            "readonly",
            ns,
            {
                "image": HTTP_IMAGE,
                "securityContext": {
                    "runAsNonRoot": True,
                    "readOnlyRootFilesystem": True,
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                },
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
            },
        )
    )
    cluster.kubectl("wait", "--for=condition=Ready", "pod/readonly", "-n", ns, "--timeout=60s")
    status = cluster.kubectl("exec", "readonly", "-n", ns, "--", "id", "-u").stdout
    assert status.strip() == "1000"  # the image's USER
    write = cluster.kubectl("exec", "readonly", "-n", ns, "--", "touch", "/app/x", check=False)
    assert write.returncode != 0
    assert "Read-only file system" in write.stderr


def test_run_as_non_root_refuses_a_root_image(cluster: Cluster, kubelet_ns: str) -> None:
    ns = kubelet_ns
    cluster.apply(
        _pod(
            "rootimage",
            ns,
            {"image": PYTHON_BASE_IMAGE, "command": ["sleep", "3600"]},
            securityContext={"runAsNonRoot": True},
        )
    )
    wait_for(
        lambda: _waiting_reason(cluster, "rootimage", ns) == "CreateContainerConfigError",
        timeout=60,
        what="CreateContainerConfigError for runAsNonRoot on a root image",
    )


@pytest.mark.parametrize(
    ("policy", "reasons"),
    [("IfNotPresent", {"ErrImagePull", "ImagePullBackOff"}), ("Never", {"ErrImageNeverPull"})],
)
def test_an_unknown_image_is_not_pulled(
    cluster: Cluster, kubelet_ns: str, policy: str, reasons: set[str]
) -> None:
    ns = kubelet_ns
    name = f"unpullable-{policy.lower()}"
    cluster.apply(
        _pod(name, ns, {"image": "example.invalid/nothing:0.0", "imagePullPolicy": policy})
    )
    wait_for(
        lambda: _waiting_reason(cluster, name, ns) in reasons,
        timeout=60,
        what=f"one of {reasons} on the unknown image",
    )
    assert cluster.get("pod", name, "-n", ns)["status"]["phase"] == "Pending"


def test_a_failing_liveness_probe_restarts_the_container(cluster: Cluster, kubelet_ns: str) -> None:
    ns = kubelet_ns
    cluster.apply(
        _pod(
            "unlively",
            ns,
            {
                "image": HTTP_IMAGE,
                # Nothing listens on 9999: every liveness check fails.
                "livenessProbe": {
                    "tcpSocket": {"port": 9999},
                    "periodSeconds": 1,
                    "failureThreshold": 1,
                },
            },
        )
    )
    wait_for(
        lambda: _restarts(cluster, "unlively", ns) >= 1,
        timeout=90,
        what="the kubelet to restart the container whose liveness probe fails",
    )


def test_readiness_gates_the_services_endpoints(cluster: Cluster, kubelet_ns: str) -> None:
    ns = kubelet_ns
    objects = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "gated", "namespace": ns, "labels": {"app": "gated"}},
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "image": HTTP_IMAGE,
                        "readinessProbe": {
                            "exec": {"command": ["test", "-f", "/tmp/ready"]},
                            "periodSeconds": 1,
                        },
                        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                    }
                ],
                "volumes": [{"name": "tmp", "emptyDir": {}}],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "gated", "namespace": ns},
            "spec": {"selector": {"app": "gated"}, "ports": [{"port": 80, "targetPort": 8080}]},
        },
    ]
    cluster.apply(to_yaml(objects))
    wait_for(
        lambda: _ready_endpoints(cluster, ns, "gated") is not None,
        timeout=60,
        what="the EndpointSlice of gated",
    )
    wait_for(
        lambda: cluster.get("pod", "gated", "-n", ns)["status"].get("podIP"),
        timeout=60,
        what="gated to run",
    )
    assert _ready_endpoints(cluster, ns, "gated") == []
    refused = cluster.pod("curl", "-s", "-m", "3", f"http://gated.{ns}/", check=False)
    assert refused.returncode != 0

    cluster.kubectl("exec", "gated", "-n", ns, "--", "touch", "/tmp/ready")
    wait_for(
        lambda: _ready_endpoints(cluster, ns, "gated"),
        timeout=30,
        what="the pod to become a ready endpoint",
    )
    out = wait_for(
        lambda: cluster.pod("curl", "-sf", "-m", "3", f"http://gated.{ns}/", check=False).stdout,
        timeout=30,
        what="the Service to answer once the pod is ready",
    )
    assert out.strip() == "gated"


def _ready_endpoints(cluster: Cluster, ns: str, service: str) -> list[str] | None:
    slices = cluster.get("endpointslices", "-n", ns, "-l", f"kubernetes.io/service-name={service}")[
        "items"
    ]
    if not slices:
        return None
    return [
        address
        for sl in slices
        for ep in sl.get("endpoints") or []
        if ep.get("conditions", {}).get("ready")
        for address in ep["addresses"]
    ]


def test_a_killed_process_restarts_and_a_deleted_pod_leaves_nothing(cluster: Cluster) -> None:
    ns = "dc-restart"
    cluster.kubectl("create", "namespace", ns, check=False)
    cluster.apply(http_app_manifest(name="phoenix", namespace=ns))
    cluster.rollout("phoenix", ns)
    pod = wait_for(
        lambda: cluster.ready_pods(ns, "app=phoenix"), timeout=60, what="a ready phoenix pod"
    )[0]
    name = pod["metadata"]["name"]
    first = wait_for(lambda: cluster.container_pids(pod), timeout=30, what="its process")
    subprocess.run(["kill", "-9", *map(str, first)], check=True)

    def restarted_and_ready() -> bool:
        p = cluster.get("pod", name, "-n", ns)
        ready = any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p["status"].get("conditions", [])
        )
        return _restarts(cluster, name, ns) >= 1 and ready

    wait_for(restarted_and_ready, timeout=60, what="the pod to restart its process and be ready")
    second = cluster.container_pids(pod)
    assert second and not set(second) & set(first)
    ip = pod["status"]["podIP"]
    assert cluster.pod("curl", "-sf", "-m", "3", f"http://{ip}:8080/").stdout.strip() == name

    cluster.kubectl("delete", "deployment", "phoenix", "-n", ns, "--wait=true")
    wait_for(
        lambda: not cluster.get("pods", "-n", ns)["items"], timeout=60, what="the pod to be deleted"
    )
    wait_for(lambda: not cluster.pod_cgroups(pod), timeout=30, what="the pod's cgroups to go")
    assert not any(Path(f"/proc/{pid}").exists() for pid in second)
    gone = cluster.pod("curl", "-s", "-m", "3", f"http://{ip}:8080/", check=False)
    assert gone.returncode != 0


def test_port_forward_reaches_an_undeclared_port_bound_to_the_pods_loopback(
    cluster: Cluster, kubelet_ns: str
) -> None:
    """A real kubelet dials localhost:PORT inside the pod, on any port."""
    ns = kubelet_ns
    cluster.apply(
        _pod(
            "loopback",
            ns,
            {
                "image": HTTP_IMAGE,
                "args": ["--bind", "127.0.0.1", "--port", "9090"],
                "startupProbe": {
                    "exec": {"command": ["python3", "-c", CONNECT_9090]},
                    "periodSeconds": 1,
                },
            },
        )
    )
    cluster.kubectl("wait", "--for=condition=Ready", "pod/loopback", "-n", ns, "--timeout=60s")
    ip = cluster.get("pod", "loopback", "-n", ns)["status"]["podIP"]
    assert cluster.pod("curl", "-s", "-m", "3", f"http://{ip}:9090/", check=False).returncode != 0

    size = 1024 * 1024
    out = cluster.laptop(VENV_PYTHON, "-c", PORT_FORWARD_SCRIPT, ns, "loopback", str(size), "9090")
    result = json.loads(out.stdout)
    assert result["bytes"] == size
    assert result["sha256"] == hashlib.sha256(pattern_bytes(size)).hexdigest()
    assert _kubectl_port_forward(cluster, ns, "loopback", 9090) == "loopback"


CONNECT_9090 = "import socket; socket.create_connection(('127.0.0.1', 9090), 1)"


def test_node_port_answers_on_the_node(cluster: Cluster, web: list[dict[str, object]]) -> None:
    cluster.apply(
        to_yaml(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "web-nodeport", "namespace": NS},
                    "spec": {
                        "type": "NodePort",
                        "selector": {"app": "web"},
                        "ports": [{"port": 8080, "targetPort": 8080}],
                    },
                }
            ]
        )
    )
    port = cluster.get("service", "web-nodeport", "-n", NS)["spec"]["ports"][0]["nodePort"]
    names = {p["metadata"]["name"] for p in web}  # type: ignore[index]
    node_ip = cluster.settings.addresses.node_ip
    out = wait_for(
        lambda: (
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    "dc-node",
                    "curl",
                    "-sf",
                    "-m",
                    "3",
                    f"http://{node_ip}:{port}/",
                ],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
        ),
        timeout=30,
        what="the NodePort to answer on the node's address",
    )
    assert out.strip() in names


def test_udp_echo_answers_through_its_cluster_ip_and_pod_ip(cluster: Cluster) -> None:
    ns = "dc-udp"
    cluster.kubectl("create", "namespace", ns, check=False)
    cluster.apply(
        to_yaml(
            deployment(
                name="udpecho",
                namespace=ns,
                image=UDP_ECHO_IMAGE,
                port=9000,
                protocol="UDP",
                args=["--port", "9000"],
            )
        )
    )
    cluster.rollout("udpecho", ns)
    pod = wait_for(lambda: cluster.ready_pods(ns, "app=udpecho"), timeout=60, what="udp pod")[0]
    svc_ip = cluster.get("service", "udpecho", "-n", ns)["spec"]["clusterIP"]
    client = (
        "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "s.settimeout(2); s.sendto(b'ping', (sys.argv[1], 9000)); print(s.recv(100).decode())"
    )
    for target in (svc_ip, pod["status"]["podIP"]):
        # kube-proxy programs a new Service's rules a moment after the pod is ready.
        out = wait_for(
            lambda target=target: (
                cluster.pod(VENV_PYTHON, "-c", client, target, check=False).stdout
            ),
            timeout=30,
            what=f"a UDP echo from {target}",
        )
        assert out.strip() == "ping"
