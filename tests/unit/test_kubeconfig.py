"""Loading a kubeconfig as kubectl does: merging KUBECONFIG, paths relative to the file that
defined them, TLS and proxy settings, and the credentials an access hands out."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from telepresence.k8s.api import KubeError
from telepresence.k8s.kubeconfig import (
    ClusterAccess,
    KubeconfigError,
    kubeconfig_paths,
    load,
    merge,
    resolve_command,
    resolve_path,
)
from tests.unit.test_credentials import runs, write_plugin

V1 = "client.authentication.k8s.io/v1"


def config(
    *,
    clusters: dict[str, dict[str, Any]] | None = None,
    users: dict[str, dict[str, Any]] | None = None,
    contexts: dict[str, dict[str, Any]] | None = None,
    current: str | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": n, "cluster": c} for n, c in (clusters or {}).items()],
        "users": [{"name": n, "user": u} for n, u in (users or {}).items()],
        "contexts": [{"name": n, "context": c} for n, c in (contexts or {}).items()],
    }
    if current is not None:
        doc["current-context"] = current
    return doc


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def one(
    tmp_path: Path,
    *,
    cluster: dict[str, Any] | None = None,
    user: dict[str, Any] | None = None,
    name: str = "kubeconfig",
) -> Path:
    """A kubeconfig with one context "c" of cluster "k" and user "u"."""
    return write(
        tmp_path / name,
        config(
            clusters={"k": {"server": "https://k8s.example.com:6443", **(cluster or {})}},
            users={"u": user or {}},
            contexts={"c": {"cluster": "k", "user": "u"}},
            current="c",
        ),
    )


def load_one(path: Path, **environ: str) -> ClusterAccess:
    return load(kubeconfig=str(path), environ=environ)


# --- merging ------------------------------------------------------------------------------


def test_the_first_file_to_define_a_name_wins_whole() -> None:
    a = config(
        clusters={"k": {"server": "https://a"}},
        users={"u": {"token": "from-a"}},
        contexts={"c": {"cluster": "k", "user": "u"}},
    )
    b = config(
        clusters={
            "k": {"server": "https://b", "tls-server-name": "b"},
            "k2": {"server": "https://2"},
        },
        users={"u": {"token": "from-b", "tokenFile": "x"}},
        contexts={"c": {"cluster": "k2"}},
        current="c",
    )
    merged = merge([(Path("/a/config"), a), (Path("/b/config"), b)])
    assert merged.clusters["k"].value == {"server": "https://a"}  # not merged field by field
    assert merged.clusters["k"].base == Path("/a")
    assert merged.clusters["k2"].base == Path("/b")
    assert merged.users["u"].value == {"token": "from-a"}
    assert merged.contexts["c"].value == {"cluster": "k", "user": "u"}
    # current-context: the first file that sets one, even if it is not the first file.
    assert merged.current_context == "c"


def test_the_first_non_empty_current_context_wins() -> None:
    docs = [config(current=""), config(current="second"), config(current="third")]
    merged = merge([(Path(f"/{i}"), d) for i, d in enumerate(docs)])
    assert merged.current_context == "second"


def test_nameless_entries_are_skipped() -> None:
    doc = {"clusters": [{"cluster": {"server": "x"}}, {"name": "", "cluster": {}}]}
    assert merge([(Path("/c"), doc)]).clusters == {}


def test_kubeconfig_list_drops_empty_items_and_repeats() -> None:
    env = {"KUBECONFIG": "/a::/b:/a"}
    assert kubeconfig_paths(environ=env) == [Path("/a"), Path("/b")]
    assert kubeconfig_paths("/x", environ=env) == [Path("/x")]


def test_missing_files_in_the_list_are_skipped_but_not_all(tmp_path: Path) -> None:
    path = one(tmp_path, user={"token": "t"})
    env = {"KUBECONFIG": f"{tmp_path / 'missing'}:{path}"}
    assert load(environ=env).server == "https://k8s.example.com:6443"
    with pytest.raises(KubeconfigError, match="no kubeconfig found at"):
        load(environ={"KUBECONFIG": str(tmp_path / "missing")})


# --- paths --------------------------------------------------------------------------------


def test_paths_resolve_against_the_defining_file() -> None:
    assert resolve_path("certs/ca.crt", Path("/home/u/.kube")) == Path("/home/u/.kube/certs/ca.crt")
    assert resolve_path("/etc/ca.crt", Path("/home/u/.kube")) == Path("/etc/ca.crt")
    assert resolve_command("aws", Path("/k")) == "aws"  # on PATH
    assert resolve_command("./bin/login", Path("/k")) == "/k/bin/login"
    assert resolve_command("bin/login", Path("/k")) == "/k/bin/login"
    assert resolve_command("/usr/bin/login", Path("/k")) == "/usr/bin/login"


async def test_merged_files_resolve_paths_each_from_its_own_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster comes from one file, the user from another; the process runs elsewhere."""
    clusters = write(
        tmp_path / "a" / "config",
        config(
            clusters={
                "k": {"server": "https://k8s.example.com", "certificate-authority": "ca.crt"}
            },
            contexts={"c": {"cluster": "k", "user": "u"}},
            current="c",
        ),
    )
    users = write(
        tmp_path / "b" / "config",
        config(
            users={
                "u": {
                    "client-certificate": "certs/me.crt",
                    "client-key": "certs/me.key",
                    "tokenFile": "token",
                    "exec": {"apiVersion": V1, "command": "./plugin"},
                }
            }
        ),
    )
    (tmp_path / "b" / "certs").mkdir()
    (tmp_path / "b" / "certs" / "me.crt").write_bytes(b"CERT")
    (tmp_path / "b" / "certs" / "me.key").write_bytes(b"KEY")
    (tmp_path / "b" / "token").write_text("file-token\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    env = {"KUBECONFIG": f"{clusters}:{users}"}
    # The CA is looked for next to the file that named it, not in the cwd.
    with pytest.raises(KubeconfigError, match=f"cannot read certificate-authority {tmp_path}/a/ca"):
        load(environ=env)
    (tmp_path / "a" / "config").write_text(
        (tmp_path / "a" / "config").read_text().replace("certificate-authority: ca.crt", "")
    )
    access = load(environ=env)
    assert (access.cert_data, access.key_data) == (b"CERT", b"KEY")
    assert access.token_file == tmp_path / "b" / "token"
    assert access.exec_config is not None
    assert access.exec_config.command == f"{tmp_path}/b/plugin"


def test_relative_kubeconfig_paths_are_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one(tmp_path, user={"tokenFile": "token"})
    (tmp_path / "token").write_text("t")
    monkeypatch.chdir(tmp_path)
    access = load(kubeconfig="kubeconfig", environ={})
    assert access.token_file == tmp_path / "token"


# --- clusters: TLS and proxies --------------------------------------------------------------


def test_a_ca_and_insecure_together_are_refused(tmp_path: Path) -> None:
    ca = base64.b64encode(b"-----BEGIN CERTIFICATE-----").decode()
    path = one(
        tmp_path, cluster={"insecure-skip-tls-verify": True, "certificate-authority-data": ca}
    )
    with pytest.raises(KubeconfigError) as info:
        load_one(path)
    assert str(info.value) == (
        "cluster 'k' sets both insecure-skip-tls-verify and a certificate-authority, which "
        "kubectl refuses too: remove one of them"
    )


def test_insecure_alone_still_works(tmp_path: Path) -> None:
    access = load_one(one(tmp_path, cluster={"insecure-skip-tls-verify": True}))
    assert access.insecure and access.ca_data is None


def test_a_ca_that_is_not_pem_is_a_kubeconfig_error(tmp_path: Path) -> None:
    ca = base64.b64encode(b"not a certificate").decode()
    with pytest.raises(
        KubeconfigError, match="cluster 'k': the certificate-authority is not a PEM"
    ):
        load_one(one(tmp_path, cluster={"certificate-authority-data": ca}))
    with pytest.raises(KubeconfigError, match="certificate-authority-data of cluster 'k' is not"):
        load_one(one(tmp_path, cluster={"certificate-authority-data": "%%%"}))


def test_tls_server_name_is_the_name_checked_and_sent(tmp_path: Path) -> None:
    access = load_one(one(tmp_path, cluster={"tls-server-name": "kubernetes.default"}))
    assert access.route.server_hostname == "kubernetes.default"
    assert load_one(one(tmp_path)).route.server_hostname is None


def test_the_clusters_proxy_url_is_the_route(tmp_path: Path) -> None:
    path = one(tmp_path, cluster={"proxy-url": "http://me:pw@proxy.corp:3128"})
    route = load_one(path, NO_PROXY="*").route
    assert route.proxy == "http://proxy.corp:3128"
    assert route.proxy_headers == {
        "Proxy-Authorization": "Basic " + base64.b64encode(b"me:pw").decode()
    }


def test_the_environment_proxy_honours_no_proxy(tmp_path: Path) -> None:
    path = one(tmp_path)
    assert load_one(path, HTTPS_PROXY="proxy:3128").route.proxy == "http://proxy:3128"
    assert load_one(path, HTTPS_PROXY="proxy:3128", NO_PROXY=".example.com").route.proxy is None
    assert load_one(path, HTTP_PROXY="proxy:3128").route.proxy is None  # an https server


def test_a_socks_proxy_is_refused_at_load(tmp_path: Path) -> None:
    path = one(tmp_path, cluster={"proxy-url": "socks5://localhost:1080"})
    with pytest.raises(KubeconfigError, match="proxy-url of cluster 'k' is a SOCKS proxy"):
        load_one(path)


# --- users --------------------------------------------------------------------------------


def test_a_certificate_needs_its_key(tmp_path: Path) -> None:
    cert = base64.b64encode(b"CERT").decode()
    with pytest.raises(KubeconfigError, match="user 'u' has a client certificate without"):
        load_one(one(tmp_path, user={"client-certificate-data": cert}))


def test_a_missing_token_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(KubeconfigError, match=f"cannot read tokenFile {tmp_path}/nope of user"):
        load_one(one(tmp_path, user={"tokenFile": "nope"}))


def test_an_auth_provider_alone_names_the_plugin_to_use(tmp_path: Path) -> None:
    path = one(tmp_path, user={"auth-provider": {"name": "oidc", "config": {}}})
    with pytest.raises(KubeconfigError, match=r"auth-provider 'oidc'.*switch to its exec plugin"):
        load_one(path)


@pytest.mark.parametrize(
    ("exec_config", "message"),
    [
        ({"apiVersion": V1}, "the exec plugin of user 'u' has no command"),
        ({"command": "p"}, "asks for apiVersion 'nothing'"),
        (
            {"command": "p", "apiVersion": "client.authentication.k8s.io/v1alpha1"},
            "telepresence speaks client.authentication.k8s.io/v1 and",
        ),
        ({"command": "p", "apiVersion": V1, "interactiveMode": "Always"}, "needs a terminal"),
    ],
)
def test_unusable_exec_configs_are_refused_at_load(
    tmp_path: Path, exec_config: dict[str, Any], message: str
) -> None:
    with pytest.raises(KubeconfigError, match=message):
        load_one(one(tmp_path, user={"exec": exec_config}))


def test_provide_cluster_info_passes_the_cluster_to_the_plugin(tmp_path: Path) -> None:
    ext = {"name": "client.authentication.k8s.io/exec", "extension": {"audience": "x"}}
    cluster = {"tls-server-name": "kube", "proxy-url": "http://p:1", "extensions": [ext]}
    user = {"exec": {"apiVersion": V1, "command": "p", "provideClusterInfo": True}}
    access = load_one(one(tmp_path, cluster=cluster, user=user))
    assert access.exec_config is not None and access.exec_config.cluster is not None
    assert json.loads(access.exec_config.cluster) == {
        "server": "https://k8s.example.com:6443",
        "tls-server-name": "kube",
        "proxy-url": "http://p:1",
        "config": {"audience": "x"},
    }
    user["exec"]["provideClusterInfo"] = False
    access = load_one(one(tmp_path, cluster=cluster, user=user))
    assert access.exec_config is not None and access.exec_config.cluster is None


def test_contexts_and_namespaces(tmp_path: Path) -> None:
    path = one(tmp_path, user={"token": "t"})
    assert load(kubeconfig=str(path), environ={}).namespace == "default"
    assert load(kubeconfig=str(path), namespace="ns", environ={}).namespace == "ns"
    with pytest.raises(KubeconfigError, match=r"context 'x' is not in the kubeconfig \(known: c\)"):
        load(kubeconfig=str(path), context="x", environ={})


# --- credentials as handed out --------------------------------------------------------------


async def test_static_credentials_are_one_object(tmp_path: Path) -> None:
    access = load_one(one(tmp_path, user={"token": "t"}))
    first = await access.credentials()
    assert first.headers == {"Authorization": "Bearer t"}
    assert await access.credentials() is first
    assert await access.credentials(rejected=first) is first  # nothing to renew


async def test_a_replaced_token_is_used(tmp_path: Path) -> None:
    """What the e2e installer tests do to act as a service account."""
    access = load_one(one(tmp_path, user={"token": "admin"}))
    await access.credentials()
    other = dataclasses.replace(access, cert_data=None, key_data=None, token="sa")
    assert (await other.credentials()).headers == {"Authorization": "Bearer sa"}


async def test_a_token_file_rotates_into_the_credentials(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("one")
    access = load_one(one(tmp_path, user={"tokenFile": "token", "token": "inline"}))
    first = await access.credentials()
    assert first.headers == {"Authorization": "Bearer one"}  # the file wins, as in client-go
    (tmp_path / "token.new").write_text("two")
    (tmp_path / "token.new").rename(tmp_path / "token")
    second = await access.credentials()
    assert second.headers == {"Authorization": "Bearer two"}
    assert second.tls is first.tls
    (tmp_path / "token").unlink()
    assert (await access.credentials()).headers == {"Authorization": "Bearer two"}


def exec_user(folder: Path, **env: str) -> dict[str, Any]:
    write_plugin(folder)
    pairs = {"PLUGIN_STATE": str(folder / "state"), **env}
    return {
        "exec": {
            "apiVersion": V1,
            "command": "./plugin",
            "env": [{"name": k, "value": v} for k, v in pairs.items()],
            "interactiveMode": "Never",
        }
    }


async def test_an_exec_credential_is_shared_by_the_whole_process(tmp_path: Path) -> None:
    path = one(tmp_path, user=exec_user(tmp_path))
    daemon, cli = load_one(path), load_one(path)
    first = await daemon.credentials()
    assert first.headers == {"Authorization": "Bearer token-1"}
    assert (await cli.credentials()).headers == first.headers
    assert await daemon.credentials() is first
    assert len(runs(tmp_path)) == 1
    # A 401: the plugin runs once more, and the other access follows without a run.
    renewed = await daemon.credentials(rejected=first)
    assert renewed.headers == {"Authorization": "Bearer token-2"}
    assert renewed.tls is first.tls  # no client certificate changed: same TLS context
    assert (await cli.credentials()).headers == renewed.headers
    assert (await daemon.credentials(rejected=first)) is renewed
    assert len(runs(tmp_path)) == 2


async def test_a_short_lived_exec_credential_is_used_and_the_plugin_told_no_cluster(
    tmp_path: Path,
) -> None:
    path = one(tmp_path, user=exec_user(tmp_path, PLUGIN_TTL="5"))
    access = load_one(path)
    assert (await access.credentials()).headers["Authorization"] == "Bearer token-1"
    # Five seconds of life: the 10 s margin is capped at half of it, so it is still used.
    assert (await access.credentials()).headers["Authorization"] == "Bearer token-1"
    info = json.loads(str(runs(tmp_path)[0]["info"]))
    assert info == {"apiVersion": V1, "kind": "ExecCredential", "spec": {"interactive": False}}


async def test_a_static_token_wins_over_the_plugins(tmp_path: Path) -> None:
    path = one(tmp_path, user={"token": "static", **exec_user(tmp_path)})
    access = load_one(path)
    assert (await access.credentials()).headers == {"Authorization": "Bearer static"}


async def test_a_failing_plugin_is_a_kube_error_naming_the_context(tmp_path: Path) -> None:
    path = one(tmp_path, user=exec_user(tmp_path, PLUGIN_MODE="fail"))
    with pytest.raises(KubeError) as info:
        await load_one(path).credentials()
    assert isinstance(info.value, KubeconfigError)
    assert str(info.value) == (
        f"context c: credential plugin {tmp_path}/plugin failed (exit status 3): expired "
        "refresh token: run `cloud login`"
    )
