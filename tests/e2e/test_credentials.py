"""Credentials and connectivity the way kubectl has them, against the real API server:
an exec plugin (cached for its lifetime, shared by REST calls and port-forwards), a
CONNECT proxy from `proxy-url`, `tls-server-name`, a kubeconfig CA that replaces the trust
store, paths relative to the kubeconfig, and a merged KUBECONFIG."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devcluster.pki import Authority
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.test_outbound import curl, laptop_state, quit_

HOME = Path("/home/tpuser")
WORK = HOME / "credentials-test"
SA = "tp-credentials"
APP = "verylargejavaservice.default:8080"

# An exec credential plugin, as EKS's or GKE's: prints an ExecCredential with the token in
# its directory, valid for PLUGIN_LIFETIME seconds, and logs each call's exec info.
PLUGIN = """#!/opt/telepresence-dev/venv/bin/python
import datetime, json, os, pathlib
here = pathlib.Path(os.environ["PLUGIN_DIR"])
with open(here / "calls", "a") as log:
    log.write(os.environ.get("KUBERNETES_EXEC_INFO", "") + "\\n")
expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
    seconds=int(os.environ["PLUGIN_LIFETIME"]))
print(json.dumps({
    "apiVersion": "client.authentication.k8s.io/v1",
    "kind": "ExecCredential",
    "status": {"token": (here / "token").read_text().strip(),
               "expirationTimestamp": expiry.strftime("%Y-%m-%dT%H:%M:%SZ")},
}))
"""

# A CONNECT proxy on the laptop's loopback: it alone knows the name `api.via-proxy.test`
# (the API server's address is argv[2]), logs every CONNECT target and exits when its
# stdin closes.
PROXY = """
import asyncio, sys, threading, os
port, api, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()

async def handle(reader, writer):
    request = await reader.readuntil(b"\\r\\n\\r\\n")
    method, target = request.split(b" ")[:2]
    with open(log, "a") as f:
        f.write(target.decode() + "\\n")
    if method != b"CONNECT":
        writer.write(b"HTTP/1.1 405 Method Not Allowed\\r\\n\\r\\n")
        writer.close()
        return
    host, _, port_ = target.decode().rpartition(":")
    host = api if host == "api.via-proxy.test" else host
    up_reader, up_writer = await asyncio.open_connection(host, int(port_))
    writer.write(b"HTTP/1.1 200 Connection established\\r\\n\\r\\n")
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print("listening", flush=True)
    done = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(
        done.set_result, None)), daemon=True).start()
    await done
    os._exit(0)

asyncio.run(main())
"""


# Closes the laptop user's own way to the API server (test scaffolding, in the laptop
# namespace only).
BLOCK = """
table inet tp-test-block {{
    chain output {{
        type filter hook output priority 0;
        meta skuid {user} ip daddr {host} tcp dport {port} reject with tcp reset
    }}
}}
"""


def write(cluster: Cluster, path: Path, text: str, mode: str = "600") -> None:
    cluster.laptop("sh", "-c", f"cat > {path} && chmod {mode} {path}", input=text)


def read(cluster: Cluster, path: Path) -> str:
    return cluster.laptop("sh", "-c", f"cat {path} 2>/dev/null || true").stdout


def kubeconfig(
    cluster: Cluster, *, server: str | None = None, user: dict[str, Any], **cluster_entry: Any
) -> dict[str, Any]:
    entry = {"server": server or cluster.settings.addresses.api_url, **cluster_entry}
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "creds",
        "clusters": [{"name": "dc", "cluster": entry}],
        "users": [{"name": "dev", "user": user}],
        "contexts": [{"name": "creds", "context": {"cluster": "dc", "user": "dev"}}],
    }


def connect_with(
    cluster: Cluster, config: dict[str, Any], *env: str, name: str = "config"
) -> subprocess.CompletedProcess[str]:
    path = WORK / name
    write(cluster, path, json.dumps(config))
    return cluster.laptop(
        "env", *env, "telepresence", "connect", "--kubeconfig", str(path),
        check=False, timeout=180,
    )  # fmt: skip


@pytest.fixture(scope="module")
def creds(cluster: Cluster) -> Iterator[Cluster]:
    """A service account with a token in the work directory, the cluster's CA beside it,
    and nothing connected; afterwards the laptop is as it was."""
    quit_(cluster)
    before = laptop_state(cluster)
    cluster.kubectl("create", "serviceaccount", SA, "-n", "default", check=False)
    cluster.kubectl(
        "create", "clusterrolebinding", SA, "--clusterrole=cluster-admin",
        f"--serviceaccount=default:{SA}", check=False,
    )  # fmt: skip
    token = cluster.kubectl("create", "token", SA, "-n", "default", "--duration=1h").stdout
    cluster.laptop("rm", "-rf", str(WORK))
    cluster.laptop("mkdir", "-m", "700", str(WORK))
    write(cluster, WORK / "token", token.strip())
    write(cluster, WORK / "ca.crt", (cluster.settings.paths.pki / "ca.crt").read_text())
    write(cluster, WORK / "plugin", PLUGIN, mode="700")
    yield cluster
    quit_(cluster)
    cluster.laptop("rm", "-rf", str(WORK))
    cluster.kubectl("delete", "clusterrolebinding", SA, "--ignore-not-found")
    cluster.kubectl("delete", "serviceaccount", SA, "-n", "default", "--ignore-not-found")
    assert laptop_state(cluster) == before


def works(cluster: Cluster) -> None:
    page = curl(cluster, APP)
    assert page.returncode == 0 and "<title>" in page.stdout, page.stderr


def plugin_user(lifetime: int) -> dict[str, Any]:
    return {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": "./plugin",  # relative to the kubeconfig's directory
            "env": [
                {"name": "PLUGIN_DIR", "value": str(WORK)},
                {"name": "PLUGIN_LIFETIME", "value": str(lifetime)},
            ],
            "interactiveMode": "Never",
        }
    }


def plugin_calls(cluster: Cluster) -> list[str]:
    return [line for line in read(cluster, WORK / "calls").splitlines() if line]


def test_an_exec_credential_is_reused_for_its_lifetime(creds: Cluster) -> None:
    cluster = creds
    cluster.laptop("rm", "-f", str(WORK / "calls"))
    out = connect_with(cluster, kubeconfig(cluster, user=plugin_user(3600), **{
        "certificate-authority": "ca.crt"}))  # fmt: skip
    assert out.returncode == 0, out.stderr
    works(cluster)
    # The version check, the install check and four port-forwards: one plugin run.
    calls = plugin_calls(cluster)
    assert len(calls) == 1, calls
    info = json.loads(calls[0])
    assert info["apiVersion"] == "client.authentication.k8s.io/v1"
    assert info["spec"]["interactive"] is False
    # The manager goes away; the new port-forwards reuse the credential.
    pod = cluster.ready_pods("ambassador", "app=traffic-manager")[0]["metadata"]["name"]
    cluster.kubectl("delete", "pod", pod, "-n", "ambassador", "--wait=false")
    wait_for(
        lambda: (
            curl(cluster, APP).returncode == 0
            and cluster.ready_pods("ambassador", "app=traffic-manager")[0]["metadata"]["name"]
            != pod
        ),
        timeout=90,
        what="the session on the new manager",
    )
    works(cluster)
    assert len(plugin_calls(cluster)) == 1
    quit_(cluster)


def test_a_credential_expiring_in_60_s_is_renewed_once_per_expiry(creds: Cluster) -> None:
    """The issue's case: a TokenRequest token whose ExecCredential expires in 60 s. The
    session keeps working past the expiry, and the plugin runs again once (10 s before the
    expiry), not once per port-forward: every manager restart below opens four."""
    cluster = creds
    cluster.laptop("rm", "-f", str(WORK / "calls"))
    out = connect_with(cluster, kubeconfig(cluster, user=plugin_user(60), **{
        "certificate-authority": "ca.crt"}))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert len(plugin_calls(cluster)) == 1

    def restart_manager_and_count() -> int | None:
        pods = cluster.ready_pods("ambassador", "app=traffic-manager")
        old = pods[0]["metadata"]["name"]
        cluster.kubectl("delete", "pod", old, "-n", "ambassador", "--wait=false")
        wait_for(
            lambda: curl(cluster, APP).returncode == 0
            and [p["metadata"]["name"] for p in
                 cluster.ready_pods("ambassador", "app=traffic-manager")] not in ([], [old]),
            timeout=90,
            what="the session on a new manager",
        )  # fmt: skip
        calls = len(plugin_calls(cluster))
        return calls if calls > 1 else None

    assert wait_for(restart_manager_and_count, timeout=150, what="a renewed credential") == 2
    works(cluster)
    quit_(cluster)


def test_an_expired_exec_credential_is_fetched_again(creds: Cluster) -> None:
    cluster = creds
    cluster.laptop("rm", "-f", str(WORK / "calls"))
    # Expired as soon as issued: every use asks again, nothing stale is sent.
    out = connect_with(cluster, kubeconfig(cluster, user=plugin_user(0), **{
        "certificate-authority": "ca.crt"}))  # fmt: skip
    assert out.returncode == 0, out.stderr
    works(cluster)
    assert len(plugin_calls(cluster)) > 1
    quit_(cluster)


@pytest.fixture()
def proxy(creds: Cluster) -> Iterator[tuple[int, Path]]:
    """The CONNECT proxy in the laptop namespace, as the laptop user."""
    cluster = creds
    port, log = 3128, WORK / "proxy.log"
    cluster.laptop("rm", "-f", str(log))
    host = cluster.settings.addresses.api_url.split("//")[1].rsplit(":", 1)[0]
    # The proxy runs as root; the laptop user's own connections to the API server are
    # refused, so the proxy is the only way there.
    proc = subprocess.Popen(
        [sys.executable, "-m", "devcluster.cli", "laptop", "--root", "--",
         "/opt/telepresence-dev/venv/bin/python", "-c", PROXY, str(port), host, str(log)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "listening"
    api_port = cluster.settings.addresses.api_url.rsplit(":", 1)[1]
    cluster.laptop("nft", "-f", "-", root=True, input=BLOCK.format(
        user="tpuser", host=host, port=api_port))  # fmt: skip
    try:
        direct = curl(cluster, f"https://{host}:{api_port}/version", "-k")
        assert direct.returncode != 0, "the direct way to the API server must be closed"
        yield port, log
    finally:
        cluster.laptop("nft", "delete", "table", "inet", "tp-test-block", root=True)
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


def test_a_proxy_url_carries_rest_calls_and_port_forwards(
    creds: Cluster, proxy: tuple[int, Path]
) -> None:
    """Only the proxy knows the server's name; the certificate is checked against
    tls-server-name (a name the API server's certificate has) and the CA of a relative
    path; the token comes from a relative tokenFile."""
    cluster = creds
    port, log = proxy
    api_port = cluster.settings.addresses.api_url.rsplit(":", 1)[1]
    config = kubeconfig(
        cluster,
        server=f"https://api.via-proxy.test:{api_port}",
        user={"tokenFile": "token"},
        **{
            "proxy-url": f"http://127.0.0.1:{port}",
            "tls-server-name": "kubernetes.default.svc",
            "certificate-authority": "ca.crt",
        },
    )
    out = connect_with(cluster, config)
    assert out.returncode == 0, out.stderr
    works(cluster)
    targets = [t for t in read(cluster, log).splitlines() if t]
    # REST calls and every port-forward went through it.
    assert len(targets) >= 2 and set(targets) == {f"api.via-proxy.test:{api_port}"}
    quit_(cluster)

    config["clusters"][0]["cluster"]["tls-server-name"] = "not-the-api-server.example"
    out = connect_with(cluster, config, name="wrong-name")
    assert out.returncode != 0
    (line,) = out.stderr.strip().splitlines()
    assert "certificate" in line.lower(), line


def test_https_proxy_is_used_unless_no_proxy_names_the_server(
    creds: Cluster, proxy: tuple[int, Path]
) -> None:
    cluster = creds
    port, log = proxy
    address = cluster.settings.addresses.api_url.split("//")[1]
    config = kubeconfig(cluster, user={"tokenFile": "token"}, **{"certificate-authority": "ca.crt"})
    out = connect_with(cluster, config, f"HTTPS_PROXY=http://127.0.0.1:{port}")
    assert out.returncode == 0, out.stderr
    works(cluster)
    targets = [t for t in read(cluster, log).splitlines() if t]
    assert len(targets) >= 2 and set(targets) == {address}
    quit_(cluster)
    cluster.laptop("rm", "-f", str(log))
    host = address.rsplit(":", 1)[0]
    out = connect_with(
        cluster, config, f"HTTPS_PROXY=http://127.0.0.1:{port}", f"NO_PROXY=example.com,{host}"
    )
    # NO_PROXY sent it the direct way, which this test closed: refused, and the proxy saw
    # nothing.
    assert out.returncode != 0
    (line,) = out.stderr.strip().splitlines()
    assert "cannot reach the API server" in line, line
    assert read(cluster, log) == ""


def test_the_kubeconfig_ca_replaces_the_system_trust_store(creds: Cluster) -> None:
    """The laptop's trust store (SSL_CERT_FILE) trusts the cluster CA, but the kubeconfig
    names another CA: kubectl refuses, and so do we."""
    cluster = creds
    other = WORK / "other-ca.crt"
    with tempfile.TemporaryDirectory() as tmp:
        # Another CA of the same name, with its own key.
        write(cluster, other, Authority(Path(tmp)).ca.cert.read_text())
    config = kubeconfig(
        cluster, user={"tokenFile": "token"}, **{"certificate-authority": str(other)}
    )
    trust = f"SSL_CERT_FILE={WORK / 'ca.crt'}"
    out = connect_with(cluster, config, trust)
    assert out.returncode != 0
    (line,) = out.stderr.strip().splitlines()
    assert "certificate" in line.lower(), line
    assert "User Daemon: Not running" in cluster.laptop("telepresence", "status").stdout


def test_a_merged_kubeconfig_takes_each_entry_from_the_first_file(creds: Cluster) -> None:
    cluster = creds
    first = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "merged",
        "contexts": [{"name": "merged", "context": {"cluster": "dc", "user": "dev"}}],
    }
    second = kubeconfig(cluster, user={"tokenFile": "token"}, **{"certificate-authority": "ca.crt"})
    # The second file's context of the same name is never used (it names no cluster).
    second["contexts"] = [{"name": "merged", "context": {"cluster": "nowhere", "user": "dev"}}]
    second["current-context"] = "nowhere"
    write(cluster, WORK / "first", json.dumps(first))
    write(cluster, WORK / "second", json.dumps(second))
    out = cluster.laptop(
        "env", f"KUBECONFIG={WORK / 'first'}:{WORK / 'second'}", "telepresence", "connect",
        check=False, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Connected to context merged" in out.stdout
    works(cluster)
    quit_(cluster)
