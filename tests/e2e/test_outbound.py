"""Outbound sessions, end to end on devcluster: the laptop (its namespace, its unprivileged
user) connects, reaches the cluster by name and address, and quits leaving nothing behind."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster.fixtures import http_app_manifest
from devcluster.images.http import pattern_bytes
from tests.e2e.cluster import PS_PROCESSES, Cluster, running_processes, wait_for

TITLE = "Welcome to the EdgyCorp WebApp"
VENV_PYTHON = "/opt/telepresence-dev/venv/bin/python"


def laptop_state(cluster: Cluster) -> dict[str, str]:
    """Everything on the laptop that connect may change and quit must restore."""

    def root(*cmd: str) -> str:
        return cluster.laptop(*cmd, root=True, check=False).stdout

    listening = "\n".join(
        sorted(
            line.split()[4] for line in root("ss", "-Hlntu").splitlines() if len(line.split()) > 4
        )
    )
    return {
        "nft": root("nft", "list", "ruleset"),
        "links": root("ip", "-br", "link"),
        "addresses": root("ip", "-br", "addr"),
        "routes": root("ip", "route", "show", "table", "all"),
        "rules": root("ip", "rule"),
        "sysctl forwarding": root(
            "sysctl", "net.ipv4.ip_forward", "net.ipv4.conf.all.route_localnet"
        ),
        "listening": listening,
        "processes": running_processes(root("ps", "-u", "tpuser", *PS_PROCESSES)),
        "resolv.conf": root("cat", "/etc/resolv.conf"),
        "nsswitch.conf": root("cat", "/etc/nsswitch.conf"),
        # systemd-resolved's links and their DNS (empty where resolved does not run).
        "resolvectl": root("resolvectl", "status"),
        "telepresence processes": "\n".join(
            line
            for line in root("ps", "-eo", "user,args").splitlines()
            if re.search(r"telepresence\.(daemon|netfilter|cli)|telepresence-helper", line)
            and "ps -eo" not in line
        ),
    }


#: How the helper shows in `ps`: the installed launcher, run by sudo for the laptop user.
HELPER_PROCESS = "telepresence-helper --connect"


def connect(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return cluster.laptop("telepresence", "connect", *args, timeout=180)


def quit_(cluster: Cluster) -> None:
    cluster.laptop("telepresence", "quit", timeout=60)


@pytest.fixture(scope="module")
def baseline(cluster: Cluster) -> dict[str, str]:
    quit_(cluster)
    return laptop_state(cluster)


@pytest.fixture
def connected(cluster: Cluster, baseline: dict[str, str]) -> Iterator[Cluster]:
    connect(cluster)
    yield cluster
    quit_(cluster)
    assert laptop_state(cluster) == baseline


def curl(
    cluster: Cluster, url: str, *extra: str, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    return cluster.laptop(
        "curl", "-sS", "--max-time", "10", *extra, url, check=False, timeout=timeout
    )


def test_the_user_story(cluster: Cluster, baseline: dict[str, str]) -> None:
    out = connect(cluster)
    assert "Connected to context devcluster (https://192.0.2.1:6443)" in out.stdout
    status = cluster.laptop("telepresence", "status").stdout
    assert "Status            : Connected" in status
    assert "Telepresence proxy: ON (networking to the cluster is enabled)" in status
    page = curl(cluster, "verylargejavaservice.default:8080")
    assert page.returncode == 0, page.stderr
    assert re.search(f"<title>{TITLE}</title>", page.stdout)
    quit_(cluster)
    started = time.monotonic()
    after = curl(cluster, "verylargejavaservice.default:8080")
    assert after.returncode != 0
    assert time.monotonic() - started < 5, "after quit the request must fail at once"
    assert laptop_state(cluster) == baseline


def test_connect_twice_says_so_and_changes_nothing(connected: Cluster) -> None:
    before = laptop_state(connected)
    again = connect(connected)
    assert "Already connected to context devcluster" in again.stdout
    assert laptop_state(connected) == before


def test_status_when_not_connected(cluster: Cluster, baseline: dict[str, str]) -> None:
    text = cluster.laptop("telepresence", "status").stdout
    assert "User Daemon: Not running" in text
    data = json.loads(cluster.laptop("telepresence", "status", "--output", "json").stdout)
    assert data["user_daemon"]["running"] is False


def test_status_while_connected_text_and_json(connected: Cluster) -> None:
    data = json.loads(connected.laptop("telepresence", "status", "-o", "json").stdout)
    user, root = data["user_daemon"], data["root_daemon"]
    assert user["status"] == "Connected"
    assert user["kubernetes_context"] == "devcluster"
    assert user["kubernetes_server"] == "https://192.0.2.1:6443"
    assert user["manager_version"] == "0.1.0"
    assert user["intercepts"] == 0
    assert root["running"] is True
    assert "10.96.0.0/16" in root["subnets"]
    assert any(s.startswith("10.244.") for s in root["subnets"])
    assert root["dns"]["nameservers"] == ["198.51.100.53"]
    # The API server is never routed into the tunnel that runs over it.
    assert not any("192.0.2.1" in s for s in root["subnets"])


def test_names_resolve_every_way_and_other_names_still_work(connected: Cluster) -> None:
    c = connected
    svc_ip = c.get("service", "verylargejavaservice", "-n", "default")["spec"]["clusterIP"]
    for name in (
        "verylargejavaservice.default",
        "verylargejavaservice.default.svc",
        "verylargejavaservice.default.svc.cluster.local",
    ):
        assert c.laptop("getent", "hosts", name).stdout.split()[0] == svc_ip
        assert c.laptop("dig", "+short", name).stdout.strip() == svc_ip
        assert c.laptop("dig", "+short", "+tcp", name).stdout.strip() == svc_ip
    py = c.laptop(
        VENV_PYTHON,
        "-c",
        "import socket; print(socket.gethostbyname('verylargejavaservice.default'))",
    ).stdout.strip()
    assert py == svc_ip
    # The laptop's own resolver keeps answering its names.
    assert c.laptop("getent", "hosts", "www.example.test").stdout.split()[0] == "198.51.100.2"
    assert c.laptop("dig", "+short", "www.example.test").stdout.strip() == "198.51.100.2"


@pytest.fixture(scope="module")
def two_namespaces(cluster: Cluster) -> dict[str, list[str]]:
    pods: dict[str, list[str]] = {}
    for ns in ("tp-alpha", "tp-beta"):
        cluster.kubectl("create", "namespace", ns, check=False)
        cluster.apply(http_app_manifest(name="echo", namespace=ns, replicas=2))
        cluster.rollout("echo", ns)
        ready = wait_for(
            lambda ns=ns: (p := cluster.ready_pods(ns, "app=echo")) and len(p) == 2 and p,
            timeout=60,
            what=f"echo pods in {ns}",
        )
        pods[ns] = sorted(p["metadata"]["name"] for p in ready)
    return pods


def test_same_port_in_two_namespaces_each_answers_from_its_own_pods(
    connected: Cluster, two_namespaces: dict[str, list[str]]
) -> None:
    c = connected
    for ns, names in two_namespaces.items():
        cluster_ip = c.get("service", "echo", "-n", ns)["spec"]["clusterIP"]
        for target in (f"echo.{ns}", cluster_ip):
            seen: set[str] = set()

            def both(target: str = target, seen: set[str] = seen, names: list[str] = names) -> bool:
                out = curl(c, f"http://{target}:8080/")
                assert out.returncode == 0, out.stderr
                seen.add(out.stdout.strip())
                assert seen <= set(names), f"{target} answered from {seen - set(names)}"
                return seen == set(names)

            wait_for(both, timeout=30, what=f"both pods of {ns} through {target}")


def test_a_pod_by_its_ip_and_a_50mb_download_intact(
    connected: Cluster, two_namespaces: dict[str, list[str]]
) -> None:
    c = connected
    pod = c.get("pod", two_namespaces["tp-alpha"][0], "-n", "tp-alpha")
    ip = pod["status"]["podIP"]
    assert curl(c, f"http://{ip}:8080/").stdout.strip() == pod["metadata"]["name"]
    size = 50 * 1024 * 1024
    out = c.laptop(
        "sh",
        "-c",
        f"curl -sS --max-time 120 http://echo.tp-alpha:8080/bytes/{size} | sha256sum",
        timeout=150,
    ).stdout
    assert out.split()[0] == hashlib.sha256(pattern_bytes(size)).hexdigest()


#: A client that shuts down its sending side after the request (HTTP/1.0 clients, `nc -N`)
#: and reads the answer to the end; prints its size and digest.
HALF_CLOSED_GET = """
import hashlib, socket, sys
size = int(sys.argv[1])
s = socket.create_connection(("echo.tp-alpha", 8080), timeout=30)
s.sendall(b"GET /bytes/%d HTTP/1.0\\r\\nHost: echo\\r\\n\\r\\n" % size)
s.shutdown(socket.SHUT_WR)
data = bytearray()
while chunk := s.recv(1 << 20):
    data += chunk
body = bytes(data).partition(b"\\r\\n\\r\\n")[2]
print(len(body), hashlib.sha256(body).hexdigest())
"""


def test_a_half_closed_request_gets_its_whole_answer_and_its_end(
    connected: Cluster, two_namespaces: dict[str, list[str]]
) -> None:
    # Both directions of the flow end while most of the answer still waits for the
    # laptop's credit; the tunnel once dropped those bytes and the FIN, and this read hung.
    for size in (1024 * 1024, 1024 * 1024 + 4321, 3 * 1024 * 1024):
        out = connected.laptop("python3", "-c", HALF_CLOSED_GET, str(size), timeout=90).stdout
        assert out.split() == [str(size), hashlib.sha256(pattern_bytes(size)).hexdigest()]


def test_a_closed_port_is_refused_at_once(connected: Cluster) -> None:
    svc_ip = connected.get("service", "verylargejavaservice", "-n", "default")["spec"]["clusterIP"]
    started = time.monotonic()
    out = curl(connected, f"http://{svc_ip}:9999/")
    # The kernel accepted the redirected connection locally; the failed dial in the cluster
    # resets it at once: refused or reset, never "connected, then an empty reply" (52).
    assert out.returncode in (7, 56), out.stderr
    assert "reset" in out.stderr or "refused" in out.stderr, out.stderr
    assert time.monotonic() - started < 3


def test_processes_users_and_sockets(connected: Cluster) -> None:
    c = connected
    ps = c.laptop("ps", "-eo", "user,args", root=True).stdout.splitlines()
    daemon = [line for line in ps if "telepresence.daemon" in line]
    # The installed, root-owned helper (scripts/install-laptop.sh), detached from sudo.
    helper = [line for line in ps if HELPER_PROCESS in line]
    assert daemon and all(line.split()[0] == "tpuser" for line in daemon), daemon
    assert any(line.split()[0] == "root" for line in helper), ps
    # No listener off loopback.
    listeners = c.laptop("ss", "-Hlntu", root=True).stdout.splitlines()
    for line in listeners:
        local = line.split()[4]
        assert local.startswith(("127.", "[::1]", "198.51.100.53:")), line
    # Control sockets are owner-only.
    sockets = c.laptop("sh", "-c", "find $HOME/.cache -type s -exec stat -c '%a %U %n' {} +").stdout
    assert sockets.strip(), "no control socket found"
    for line in sockets.splitlines():
        mode, owner, _ = line.split(" ", 2)
        assert owner == "tpuser" and int(mode, 8) & 0o077 == 0, line
    # The manager runs as non-root in a namespace enforcing "restricted".
    ns = c.get("namespace", "ambassador")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    pod = c.get("pods", "-n", "ambassador", "-l", "app=traffic-manager")["items"][0]
    uid = pod["spec"]["containers"][0]["securityContext"].get("runAsUser") or pod["spec"].get(
        "securityContext", {}
    ).get("runAsUser")
    assert uid and uid != 0
    netns_procs = subprocess.run(
        ["ps", "-eo", "uid,args"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    manager_procs = [line for line in netns_procs if "telepresence.manager" in line]
    assert manager_procs and all(int(line.split()[0]) == uid for line in manager_procs)


def test_100_parallel_requests_share_the_fixed_pool(connected: Cluster) -> None:
    script = (
        "seq 1 100 | xargs -P 100 -I{} curl -s -o /dev/null -w '%{http_code}\\n' "
        "--max-time 30 http://verylargejavaservice.default:8080/"
    )
    codes = connected.laptop("sh", "-c", script, timeout=120).stdout.split()
    assert codes == ["200"] * 100
    status = json.loads(connected.laptop("telepresence", "status", "-o", "json").stdout)
    assert status["user_daemon"]["tunnel_connections"] <= 4


def test_deleting_the_manager_pod_is_recovered_without_the_user(connected: Cluster) -> None:
    c = connected
    old = c.get("pods", "-n", "ambassador", "-l", "app=traffic-manager")["items"][0]
    c.kubectl("delete", "pod", "-n", "ambassador", old["metadata"]["name"], "--wait=false")

    def works_again() -> bool:
        out = curl(c, "verylargejavaservice.default:8080", timeout=15)
        return out.returncode == 0 and TITLE in out.stdout

    wait_for(
        works_again,
        timeout=90,
        what="requests to work again after the manager restarted",
        interval=0.5,
    )


@pytest.mark.parametrize(
    "process", ["telepresence.daemon", HELPER_PROCESS], ids=["daemon", "helper"]
)
def test_kill_9_then_quit_restores_everything(
    cluster: Cluster, baseline: dict[str, str], process: str
) -> None:
    connect(cluster)
    killed = cluster.laptop("pkill", "-9", "-f", process, root=True, check=False)
    assert killed.returncode == 0, f"no process matched {process}"
    quit_(cluster)
    wait_for(
        lambda: laptop_state(cluster) == baseline,
        timeout=30,
        what=f"the laptop to be as before after kill -9 of {process} and quit",
    )
    assert cluster.laptop("getent", "hosts", "www.example.test").returncode == 0
    started = time.monotonic()
    assert curl(cluster, "verylargejavaservice.default:8080").returncode != 0
    assert time.monotonic() - started < 5


def test_unknown_context_fails_with_one_line_and_leaves_nothing(
    cluster: Cluster, baseline: dict[str, str]
) -> None:
    out = cluster.laptop("telepresence", "connect", "--context", "nope", check=False, timeout=60)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0] and "--context" in lines[0], out.stderr
    assert laptop_state(cluster) == baseline


def test_unreachable_api_server_fails_with_one_line_and_leaves_nothing(
    cluster: Cluster, baseline: dict[str, str]
) -> None:
    kubeconfig = Path(cluster.settings.paths.laptop_kubeconfig).read_text()
    broken = kubeconfig.replace("https://192.0.2.1:6443", "https://192.0.2.1:6999")
    cluster.laptop("sh", "-c", "cat > $HOME/broken.kubeconfig", input=broken)
    out = cluster.laptop(
        "telepresence",
        "connect",
        "--kubeconfig",
        "/home/tpuser/broken.kubeconfig",
        check=False,
        timeout=60,
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the API server" in lines[0], out.stderr
    assert laptop_state(cluster) == baseline


STALL_SCRIPT = r"""
import hashlib, json, socket, sys, time
host, stalled, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
request = b"GET /bytes/1073741824 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
idle = []
for _ in range(stalled):  # enough to put a stalled flow on every pooled connection
    s = socket.create_connection((host, 8080), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.sendall(request)
    idle.append(s)
print("stalled", flush=True)
sys.stdin.readline()  # the test measures the daemon's memory while these stall
t = time.monotonic()
s = socket.create_connection((host, 8080), timeout=30)
s.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
data = bytearray()
while chunk := s.recv(1 << 20):
    data += chunk
body = bytes(data).partition(b"\r\n\r\n")[2]
print(json.dumps({"seconds": time.monotonic() - t, "bytes": len(body),
                  "sha256": hashlib.sha256(body).hexdigest()}), flush=True)
"""


def _daemon_rss_kib(cluster: Cluster) -> int:
    pid = cluster.laptop("pgrep", "-u", "tpuser", "-f", "telepresence.daemon").stdout.split()[0]
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


def test_stalled_readers_do_not_stop_another_download_and_memory_stays_bounded(
    connected: Cluster,
) -> None:
    c = connected
    size = 50 * 1024 * 1024
    rss_before = _daemon_rss_kib(c)
    proc = subprocess.Popen(
        [
            VENV_PYTHON,
            "-m",
            "devcluster.cli",
            "laptop",
            "--",
            VENV_PYTHON,
            "-c",
            STALL_SCRIPT,
            "verylargejavaservice.default",
            "8",
            str(size),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "stalled"
        # The stalled flows fill every buffer they are allowed while we sample (each sample
        # takes a process start, which paces the loop); memory must stay flat.
        samples = [_daemon_rss_kib(c) for _ in range(20)]
        proc.stdin.write("go\n")
        proc.stdin.flush()
        result = json.loads(proc.stdout.readline())
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert result["bytes"] == size
    assert result["sha256"] == hashlib.sha256(pattern_bytes(size)).hexdigest()
    # 8 stalled flows may each hold about one window (256 KiB) plus socket buffers; the
    # daemon must not buffer the gigabyte each of them asked for.
    assert max(samples) - rss_before < 48 * 1024, (rss_before, samples)
    assert _daemon_rss_kib(c) - rss_before < 64 * 1024


def test_a_user_who_may_not_install_the_manager_gets_one_line_and_nothing_is_left(
    cluster: Cluster, baseline: dict[str, str]
) -> None:
    ns = "tp-limited"
    cluster.kubectl("create", "namespace", ns, check=False)
    cluster.kubectl("create", "serviceaccount", "dev", "-n", ns, check=False)
    cluster.kubectl(
        "create", "role", "pods-only", "--verb=get,list", "--resource=pods", "-n", ns, check=False
    )
    cluster.kubectl(
        "create",
        "rolebinding",
        "dev-pods",
        "--role=pods-only",
        f"--serviceaccount={ns}:dev",
        "-n",
        ns,
        check=False,
    )
    token = cluster.kubectl("create", "token", "dev", "-n", ns).stdout.strip()
    kubeconfig = cluster.token_kubeconfig(token, name="limited", namespace=ns)
    before_ns = cluster.kubectl("get", "namespaces", "-o", "name").stdout
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
    assert "telepresence manifests" in lines[0] or "forbidden" in lines[0].lower(), lines[0]
    assert laptop_state(cluster) == baseline
    assert cluster.kubectl("get", "namespaces", "-o", "name").stdout == before_ns
