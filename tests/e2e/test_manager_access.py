"""Who can use the traffic manager, and what it will dial: the tunnel is reachable only
through port-forward, and the manager refuses its own loopback and link-local addresses
(cloud metadata) unless an admin allows them."""

from __future__ import annotations

import json

from tests.e2e.cluster import POOL_CLIENT, Cluster, wait_for
from tests.e2e.test_outbound import connect, curl, quit_

NS = "ambassador"
VENV_PYTHON = "/opt/telepresence-dev/venv/bin/python"

# Asks the manager to dial each address:port given; prints what the manager answered.
RAW_DIALS = (
    POOL_CLIENT
    + r"""
from telepresence.tunnel.frames import Dial, IPProtocol

class Answer:
    def __init__(self):
        self.result = asyncio.get_running_loop().create_future()
    def dial_result(self, error, message):
        self.result.set_result(None if error is None else message)
    def stream_data(self, data): pass
    def stream_eof(self): pass
    def stream_reset(self): pass
    def stream_writable(self): pass

async def main(targets):
    access = kubeconfig.load()
    async with KubeApi(access) as api, aiohttp.ClientSession() as http:
        pool = await open_pool(api, http, access, "raw-dials")
        out = {}
        for target in targets:
            host, port = target.rsplit(":", 1)
            answer = Answer()
            pool.open_stream(Dial(IPProtocol.TCP, host, int(port)), answer)
            out[target] = await asyncio.wait_for(answer.result, 10)
        await pool.close()
    print(json.dumps(out))

asyncio.run(main(sys.argv[1:]))
"""
)


def _manager_pod(cluster: Cluster) -> dict[str, object]:
    pods = cluster.ready_pods(NS, "app=traffic-manager")
    assert len(pods) == 1, pods
    return pods[0]


def _dial_through_manager(cluster: Cluster, *targets: str) -> dict[str, str | None]:
    out = cluster.laptop(VENV_PYTHON, "-c", RAW_DIALS, *targets, timeout=60).stdout
    result: dict[str, str | None] = json.loads(out)
    return result


def test_the_tunnel_is_reachable_through_port_forward_only(cluster: Cluster) -> None:
    connect(cluster)
    try:
        pod = _manager_pod(cluster)
        ip = pod["status"]["podIP"]  # type: ignore[index]
        # From the pod network: the tunnel port refuses, the health port says only "ok".
        refused = cluster.pod("curl", "-sS", "-m", "3", f"http://{ip}:8081/", check=False)
        assert refused.returncode == 7, refused.stderr  # connection refused
        assert cluster.pod("curl", "-sf", "-m", "3", f"http://{ip}:8082/readyz").stdout == "ok\n"
        other = cluster.pod(
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-m",
            "3",
            f"http://{ip}:8082/",
            check=False,
        )
        assert other.stdout == "404"
        # The one Service is the direct transport's NodePort, which is TLS that only a
        # session's registered credentials pass (tests/e2e/test_direct.py).
        services = cluster.get("services", "-n", NS)["items"]
        assert [(s["metadata"]["name"], s["spec"]["ports"][0]["targetPort"]) for s in services] == [
            ("traffic-manager-direct", "direct")
        ]
        # Through the API server's port-forward, the session works.
        assert curl(cluster, "http://verylargejavaservice.default:8080/").returncode == 0
    finally:
        quit_(cluster)


def test_the_laptop_never_routes_the_metadata_address(cluster: Cluster) -> None:
    metadata = cluster.settings.addresses.metadata_ip
    out = cluster.laptop(
        "telepresence", "connect", "--also-proxy", f"{metadata}/32", check=False, timeout=120
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "link-local" in lines[0], out.stderr
    assert cluster.laptop("telepresence", "status").returncode == 0


def test_the_manager_refuses_metadata_and_its_own_loopback_unless_allowed(
    cluster: Cluster,
) -> None:
    metadata = str(cluster.settings.addresses.metadata_ip)
    # The address is live in the cluster: a pod reaches the stand-in metadata server.
    assert cluster.pod("curl", "-sf", "-m", "3", f"http://{metadata}/").returncode == 0
    connect(cluster)  # installs the manager with the default policy
    quit_(cluster)
    targets = (f"{metadata}:80", "127.0.0.1:8082")
    refused = _dial_through_manager(cluster, *targets)
    assert "dial policy" in (refused[f"{metadata}:80"] or ""), refused
    assert "link-local" in (refused[f"{metadata}:80"] or ""), refused
    assert "dial policy" in (refused["127.0.0.1:8082"] or ""), refused
    logs = cluster.kubectl("logs", "-n", NS, "deployment/traffic-manager").stdout
    assert f"TCP dial to {metadata}:80 refused" in logs

    # An admin's allow-list entry opens exactly that address.
    cluster.kubectl(
        "set",
        "env",
        "-n",
        NS,
        "deployment/traffic-manager",
        f"TELEPRESENCE_DIAL_ALLOW={metadata}/32",
    )
    cluster.rollout("traffic-manager", NS)
    try:

        def metadata_dialled() -> dict[str, str | None] | None:
            result = _dial_through_manager(cluster, *targets)
            return result if result[f"{metadata}:80"] is None else None

        opened = wait_for(metadata_dialled, timeout=60, what="the allowed address to be dialled")
        assert "dial policy" in (opened["127.0.0.1:8082"] or ""), opened
    finally:
        cluster.kubectl("delete", "deployment", "traffic-manager", "-n", NS, "--wait=true")


def test_a_user_without_port_forward_rights_is_told_which_permission(cluster: Cluster) -> None:
    """Everything a session needs but `create pods/portforward` on the manager's pods."""
    connect(cluster)  # the manager is installed, by the admin here
    quit_(cluster)
    sa_ns = "tp-noforward"
    cluster.kubectl("create", "namespace", sa_ns, check=False)
    cluster.kubectl("create", "serviceaccount", "dev", "-n", sa_ns, check=False)
    cluster.kubectl(
        "create",
        "clusterrole",
        "tp-noforward-reader",
        "--verb=get,list,watch",
        "--resource=pods,deployments.apps,namespaces,services",
        check=False,
    )
    cluster.kubectl(
        "create",
        "clusterrolebinding",
        "tp-noforward-reader",
        "--clusterrole=tp-noforward-reader",
        f"--serviceaccount={sa_ns}:dev",
        check=False,
    )
    token = cluster.kubectl("create", "token", "dev", "-n", sa_ns).stdout.strip()
    kubeconfig = cluster.token_kubeconfig(token, name="noforward")
    out = cluster.laptop(
        "telepresence",
        "connect",
        "--kubeconfig",
        kubeconfig,
        check=False,
        timeout=120,
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "pods/portforward" in lines[0] and NS in lines[0], lines[0]
    assert cluster.laptop("telepresence", "status").returncode == 0
    cluster.kubectl("delete", "clusterrolebinding,clusterrole", "tp-noforward-reader")
