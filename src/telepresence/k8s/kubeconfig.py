"""Reading a kubeconfig the way kubectl does: KUBECONFIG list, --context, credentials.

Credentials come from client certificates (file or inline data), bearer tokens (inline or a
``tokenFile`` that is read again as it rotates), or an exec plugin (cloud auth helpers), which
must run as the user: this is why the user daemon, not the root helper, talks to the cluster.

Merging follows kubectl: of the files in KUBECONFIG, the first to define a cluster, user or
context name wins, and so does the first to set ``current-context``; a relative path in an
entry (``certificate-authority``, ``client-certificate``, ``client-key``, ``tokenFile``, and an
exec ``command`` that contains a slash) starts at the directory of the file that defined the
entry. Loading is pure but for reading the files; what changes while the process runs
(plugin credentials, token files, TLS contexts) lives in :mod:`telepresence.k8s.credentials`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from telepresence.k8s.api import Credentials, KubeError, Route
from telepresence.k8s.credentials import (
    EXEC_API_VERSIONS,
    CredentialError,
    CredentialSettings,
    ExecConfig,
    ExecCredential,
    TlsContexts,
    TokenFile,
    shared_exec_plugin,
    tls_context,
)
from telepresence.k8s.proxy import Proxy, ProxyError, select_proxy

EXEC_EXTENSION = "client.authentication.k8s.io/exec"


class KubeconfigError(KubeError):
    """The kubeconfig cannot be used; the message names the fix."""


# --- files and merging (pure but for reading) ---------------------------------------------


def kubeconfig_paths(
    explicit: str | None = None, *, environ: Mapping[str, str] | None = None
) -> list[Path]:
    """``--kubeconfig``, else the KUBECONFIG list (empty items and repeats dropped), else
    ``~/.kube/config``."""
    if explicit:
        return [Path(explicit)]
    env = os.environ if environ is None else environ
    if value := env.get("KUBECONFIG"):
        return [Path(p) for p in dict.fromkeys(value.split(os.pathsep)) if p]
    return [Path.home() / ".kube" / "config"]


@dataclass(frozen=True)
class Entry:
    """A named cluster, user or context, and the directory its relative paths start from."""

    value: Mapping[str, Any]
    base: Path


@dataclass(frozen=True, kw_only=True)
class Merged:
    clusters: dict[str, Entry]
    users: dict[str, Entry]
    contexts: dict[str, Entry]
    current_context: str = ""


def merge(files: Iterable[tuple[Path, Mapping[str, Any]]]) -> Merged:
    """Merges parsed kubeconfig files, in KUBECONFIG order: the first file to define a name
    wins (entries are never merged field by field), and the first non-empty
    ``current-context`` wins."""
    maps: dict[str, dict[str, Entry]] = {"clusters": {}, "users": {}, "contexts": {}}
    current = ""
    for path, doc in files:
        base = Path(os.path.abspath(path)).parent
        for kind, found in maps.items():
            items = doc.get(kind) or []
            if not isinstance(items, list):
                raise KubeconfigError(f"kubeconfig {path}: {kind} is not a list")
            for item in items:
                if not isinstance(item, dict) or not item.get("name"):
                    continue
                name = str(item["name"])
                if name not in found:
                    body = item.get(kind[:-1]) or {}
                    if not isinstance(body, dict):
                        raise KubeconfigError(f"kubeconfig {path}: {kind} {name!r} is not a map")
                    found[name] = Entry(body, base)
        if not current and doc.get("current-context"):
            current = str(doc["current-context"])
    return Merged(
        clusters=maps["clusters"],
        users=maps["users"],
        contexts=maps["contexts"],
        current_context=current,
    )


def read_kubeconfigs(paths: list[Path]) -> list[tuple[Path, Mapping[str, Any]]]:
    """The files that exist, parsed; missing ones are skipped, as kubectl does, unless none
    exists at all."""
    found: list[tuple[Path, Mapping[str, Any]]] = []
    for path in paths:
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            continue
        except (OSError, yaml.YAMLError) as e:
            raise KubeconfigError(f"cannot read kubeconfig {path}: {e}") from e
        if not isinstance(doc, dict):
            raise KubeconfigError(f"kubeconfig {path} is not a YAML map")
        found.append((path, doc))
    if not found:
        names = ", ".join(str(p) for p in paths)
        raise KubeconfigError(f"no kubeconfig found at {names}; set KUBECONFIG or --kubeconfig")
    return found


def resolve_path(value: str, base: Path) -> Path:
    """A path from a kubeconfig entry: absolute as written, else under ``base``, the
    directory of the file that defined the entry (kubectl's rule, whatever the cwd)."""
    path = Path(value)
    return path if path.is_absolute() else base / path


def resolve_command(command: str, base: Path) -> str:
    """An exec plugin's command: a bare name is looked up on PATH; a relative path with a
    slash starts at the kubeconfig's directory."""
    if "/" not in command or os.path.isabs(command):
        return command
    return str(base / command)


def _data(entry: Entry, key: str, *, owner: str) -> bytes | None:
    """``key-data`` (base64) if set, else the file ``key`` names."""
    if data := entry.value.get(f"{key}-data"):
        try:
            return base64.b64decode(str(data), validate=True)
        except (binascii.Error, ValueError) as e:
            raise KubeconfigError(f"{key}-data of {owner} is not base64: {e}") from e
    if path := entry.value.get(key):
        p = resolve_path(str(path), entry.base)
        try:
            return p.read_bytes()
        except OSError as e:
            raise KubeconfigError(f"cannot read {key} {p} of {owner}: {e.strerror}") from e
    return None


def _exec_config(
    raw: Mapping[str, Any], *, user: str, base: Path, cluster: Mapping[str, Any] | None
) -> ExecConfig:
    owner = f"the exec plugin of user {user!r}"
    command = str(raw.get("command") or "")
    if not command:
        raise KubeconfigError(f"{owner} has no command: fix users[].user.exec in the kubeconfig")
    api_version = str(raw.get("apiVersion") or "")
    if api_version not in EXEC_API_VERSIONS:
        raise KubeconfigError(
            f"{owner} asks for apiVersion {api_version or 'nothing'!r}; telepresence speaks "
            f"{' and '.join(EXEC_API_VERSIONS)}"
        )
    if raw.get("interactiveMode") == "Always":
        raise KubeconfigError(
            f"{owner} ({command}) needs a terminal (interactiveMode: Always), which the "
            "telepresence daemon does not have: log in with the plugin's own command first, "
            "or use a kubeconfig that does not need a prompt"
        )
    env: list[tuple[str, str]] = []
    for item in raw.get("env") or []:
        if not isinstance(item, dict) or "name" not in item:
            raise KubeconfigError(f"{owner} has an env entry without a name")
        env.append((str(item["name"]), str(item.get("value", ""))))
    return ExecConfig(
        command=resolve_command(command, base),
        api_version=api_version,
        args=tuple(str(a) for a in raw.get("args") or ()),
        env=tuple(env),
        install_hint=str(raw.get("installHint") or ""),
        cluster=(
            json.dumps(cluster, sort_keys=True)
            if raw.get("provideClusterInfo") and cluster is not None
            else None
        ),
    )


def _exec_cluster(cluster: Mapping[str, Any], *, server: str, ca: bytes | None) -> dict[str, Any]:
    """spec.cluster of KUBERNETES_EXEC_INFO (client.authentication.k8s.io Cluster)."""
    info: dict[str, Any] = {"server": server}
    if name := cluster.get("tls-server-name"):
        info["tls-server-name"] = str(name)
    if cluster.get("insecure-skip-tls-verify"):
        info["insecure-skip-tls-verify"] = True
    if ca:
        info["certificate-authority-data"] = base64.b64encode(ca).decode()
    if url := cluster.get("proxy-url"):
        info["proxy-url"] = str(url)
    if cluster.get("disable-compression"):
        info["disable-compression"] = True
    for ext in cluster.get("extensions") or []:
        if isinstance(ext, dict) and ext.get("name") == EXEC_EXTENSION:
            info["config"] = ext.get("extension")
    return info


# --- the access ---------------------------------------------------------------------------


@dataclass
class _Live:
    """What a :class:`ClusterAccess` learns while it runs. Not copied by
    ``dataclasses.replace``: a replaced access starts afresh (exec plugins stay shared)."""

    tls: TlsContexts | None = None
    token_file: TokenFile | None = None
    issued: Credentials | None = None
    exec_credential: ExecCredential | None = None


@dataclass(frozen=True, kw_only=True)
class ClusterAccess:
    """Everything needed to reach one API server as one user: an
    :class:`~telepresence.k8s.api.Access`."""

    context: str
    server: str
    namespace: str
    ca_data: bytes | None = field(default=None, repr=False)
    insecure: bool = False
    tls_server_name: str | None = None
    proxy: Proxy | None = None
    cert_data: bytes | None = field(default=None, repr=False)
    key_data: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    exec_config: ExecConfig | None = None
    settings: CredentialSettings = field(default_factory=CredentialSettings, compare=False)
    _live: _Live = field(default_factory=_Live, init=False, compare=False, repr=False)

    @property
    def route(self) -> Route:
        proxy = self.proxy
        return Route(
            server_hostname=self.tls_server_name,
            proxy=proxy.url if proxy else None,
            proxy_headers=proxy.headers() if proxy else {},
        )

    async def credentials(self, *, rejected: Credentials | None = None) -> Credentials:
        """Static credentials as loaded; a tokenFile re-read as it rotates; an exec plugin's
        credential from the process-wide cache. A token in the kubeconfig wins over the
        plugin's, as in kubectl; the plugin's client certificate wins over the kubeconfig's."""
        live = self._live
        stale = rejected is not None and rejected is live.issued
        try:
            token = self.token
            cert, key = self.cert_data, self.key_data
            if self.token_file is not None:
                if live.token_file is None:
                    live.token_file = TokenFile(
                        self.token_file, max_age=self.settings.token_file_max_age
                    )
                if stale:
                    live.token_file.expire()
                # client-go: the file's content, while readable, over an inline token.
                try:
                    token = live.token_file.read() or token
                except CredentialError:
                    if not token:
                        raise
            if self.exec_config is not None:
                plugin = shared_exec_plugin(self.exec_config, settings=self.settings)
                got = await plugin.get(rejected=live.exec_credential if stale else None)
                live.exec_credential = got
                token = token or got.token
                if got.cert and got.key:
                    cert, key = got.cert, got.key
            if live.tls is None:
                live.tls = TlsContexts(ca=self.ca_data, insecure=self.insecure)
            tls = live.tls.get(cert, key)
        except CredentialError as e:
            raise KubeconfigError(f"context {self.context}: {e}") from e
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        issued = live.issued
        if issued is None or issued.tls is not tls or issued.headers != headers:
            issued = live.issued = Credentials(headers=headers, tls=tls)
        return issued


def load(
    *,
    kubeconfig: str | None = None,
    context: str | None = None,
    namespace: str | None = None,
    environ: Mapping[str, str] | None = None,
    settings: CredentialSettings | None = None,
) -> ClusterAccess:
    """The access of ``context`` (else the current context). ``environ`` (default: this
    process's) supplies KUBECONFIG and the proxy variables."""
    env = os.environ if environ is None else environ
    merged = merge(read_kubeconfigs(kubeconfig_paths(kubeconfig, environ=env)))
    name = context or merged.current_context
    if not name:
        raise KubeconfigError("the kubeconfig has no current context; pass --context NAME")
    ctx = merged.contexts.get(name)
    if ctx is None:
        known = ", ".join(sorted(merged.contexts)) or "none"
        raise KubeconfigError(
            f"context {name!r} is not in the kubeconfig (known: {known}); pass --context with "
            "one of those"
        )
    cluster_name = str(ctx.value.get("cluster", ""))
    cluster = merged.clusters.get(cluster_name)
    if cluster is None or not cluster.value.get("server"):
        raise KubeconfigError(
            f"context {name!r} names cluster {cluster_name!r}, which has no server in the "
            "kubeconfig"
        )
    user_name = str(ctx.value.get("user", ""))
    user = merged.users.get(user_name, Entry({}, Path.cwd()))
    c, u = cluster.value, user.value

    server = str(c["server"]).rstrip("/")
    if "://" not in server:
        server = "https://" + server
    insecure = bool(c.get("insecure-skip-tls-verify"))
    ca = _data(cluster, "certificate-authority", owner=f"cluster {cluster_name!r}")
    if insecure and ca:
        raise KubeconfigError(
            f"cluster {cluster_name!r} sets both insecure-skip-tls-verify and a "
            "certificate-authority, which kubectl refuses too: remove one of them"
        )
    if ca:
        try:
            tls_context(ca=ca, insecure=False)  # a bad CA is a kubeconfig error, found now
        except CredentialError as e:
            raise KubeconfigError(f"cluster {cluster_name!r}: {e}") from e
    try:
        proxy = select_proxy(
            server, proxy_url=c.get("proxy-url") or None, environ=env, cluster=cluster_name
        )
    except ProxyError as e:
        raise KubeconfigError(str(e)) from e

    owner = f"user {user_name!r}"
    cert = _data(user, "client-certificate", owner=owner)
    key = _data(user, "client-key", owner=owner)
    if bool(cert) != bool(key):
        raise KubeconfigError(
            f"{owner} has a client certificate without its key, or a key without its "
            "certificate: set both client-certificate(-data) and client-key(-data)"
        )
    token_file = None
    if u.get("tokenFile"):
        token_file = resolve_path(str(u["tokenFile"]), user.base)
        if not u.get("token") and not os.access(token_file, os.R_OK):
            raise KubeconfigError(f"cannot read tokenFile {token_file} of {owner}")
    provider = u.get("auth-provider")
    if isinstance(provider, dict) and not (cert or u.get("token") or token_file or u.get("exec")):
        raise KubeconfigError(
            f"{owner} logs in through the auth-provider {provider.get('name', '?')!r}, which "
            "telepresence does not support: switch to its exec plugin (kubelogin for oidc "
            "and azure, gke-gcloud-auth-plugin for gcp)"
        )
    exec_config = None
    if isinstance(u.get("exec"), dict):
        exec_config = _exec_config(
            u["exec"],
            user=user_name,
            base=user.base,
            cluster=_exec_cluster(c, server=server, ca=ca),
        )
    return ClusterAccess(
        context=name,
        server=server,
        namespace=namespace or ctx.value.get("namespace") or "default",
        ca_data=ca,
        insecure=insecure,
        tls_server_name=str(c["tls-server-name"]) if c.get("tls-server-name") else None,
        proxy=proxy,
        cert_data=cert,
        key_data=key,
        token=str(u["token"]) if u.get("token") else None,
        token_file=token_file,
        exec_config=exec_config,
        settings=settings or CredentialSettings(),
    )


__all__ = [
    "ClusterAccess",
    "Entry",
    "KubeconfigError",
    "Merged",
    "kubeconfig_paths",
    "load",
    "merge",
    "read_kubeconfigs",
    "resolve_command",
    "resolve_path",
]
