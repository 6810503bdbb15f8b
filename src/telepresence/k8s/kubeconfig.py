"""Reading a kubeconfig the way kubectl does: KUBECONFIG list, --context, credentials.

Credentials come from client certificates (file or inline data), bearer tokens, or an exec
plugin (cloud auth helpers), which must run as the user: this is why the user daemon, not the
root helper, talks to the cluster.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class KubeconfigError(Exception):
    """The kubeconfig cannot be used; the message names the fix."""


@dataclass(frozen=True, kw_only=True)
class ClusterAccess:
    """Everything needed to reach one API server as one user."""

    context: str
    server: str
    namespace: str
    ca_data: bytes | None = None
    insecure: bool = False
    cert_data: bytes | None = None
    key_data: bytes | None = None
    token: str | None = None
    exec_config: dict[str, Any] | None = field(default=None, compare=False)

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif self.ca_data:
            ctx.load_verify_locations(cadata=self.ca_data.decode())
        cert, key = self.cert_data, self.key_data
        if self.exec_config is not None:
            cred = run_exec_plugin(self.exec_config)
            cert = cred.get("clientCertificateData", "").encode() or cert
            key = cred.get("clientKeyData", "").encode() or key
        if cert and key:
            # ssl only loads chains from files; keep them in a private temp dir briefly.
            with tempfile.TemporaryDirectory() as tmp:
                cert_file = Path(tmp) / "client.crt"
                key_file = Path(tmp) / "client.key"
                cert_file.write_bytes(cert)
                key_file.write_bytes(key)
                ctx.load_cert_chain(str(cert_file), str(key_file))
        return ctx

    def headers(self) -> dict[str, str]:
        token = self.token
        if self.exec_config is not None:
            token = run_exec_plugin(self.exec_config).get("token") or token
        return {"Authorization": f"Bearer {token}"} if token else {}


def _data(entry: dict[str, Any], key: str, base: Path) -> bytes | None:
    if data := entry.get(f"{key}-data"):
        return base64.b64decode(data)
    if path := entry.get(key):
        p = Path(path)
        if not p.is_absolute():
            p = base / p
        try:
            return p.read_bytes()
        except OSError as e:
            raise KubeconfigError(f"cannot read {key} {p}: {e.strerror}") from e
    return None


def kubeconfig_paths(explicit: str | None = None) -> list[Path]:
    if explicit:
        return [Path(explicit)]
    env = os.environ.get("KUBECONFIG")
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    return [Path.home() / ".kube" / "config"]


def _merge(paths: list[Path]) -> tuple[dict[str, Any], dict[str, Path]]:
    """Merges kubeconfig files: the first file to define a name wins, as in kubectl."""
    merged: dict[str, Any] = {"clusters": {}, "users": {}, "contexts": {}, "current-context": ""}
    origin: dict[str, Path] = {}
    found = False
    for path in paths:
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            continue
        except (OSError, yaml.YAMLError) as e:
            raise KubeconfigError(f"cannot read kubeconfig {path}: {e}") from e
        found = True
        for kind in ("clusters", "users", "contexts"):
            for item in doc.get(kind) or []:
                key = f"{kind}/{item['name']}"
                if item["name"] not in merged[kind]:
                    merged[kind][item["name"]] = item.get(kind[:-1], {}) or {}
                    origin[key] = path.parent
        if not merged["current-context"] and doc.get("current-context"):
            merged["current-context"] = doc["current-context"]
    if not found:
        names = ", ".join(str(p) for p in paths)
        raise KubeconfigError(f"no kubeconfig found at {names}; set KUBECONFIG or --kubeconfig")
    return merged, origin


def load(
    *, kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None
) -> ClusterAccess:
    merged, origin = _merge(kubeconfig_paths(kubeconfig))
    name = context or merged["current-context"]
    if not name:
        raise KubeconfigError("the kubeconfig has no current context; pass --context NAME")
    ctx = merged["contexts"].get(name)
    if ctx is None:
        known = ", ".join(sorted(merged["contexts"])) or "none"
        raise KubeconfigError(
            f"context {name!r} is not in the kubeconfig (known: {known}); pass --context with "
            "one of those"
        )
    cluster = merged["clusters"].get(ctx.get("cluster", ""))
    if cluster is None or not cluster.get("server"):
        raise KubeconfigError(
            f"context {name!r} names cluster {ctx.get('cluster')!r}, "
            "which has no server in the kubeconfig"
        )
    user = merged["users"].get(ctx.get("user", ""), {})
    cbase = origin.get(f"clusters/{ctx.get('cluster')}", Path.cwd())
    ubase = origin.get(f"users/{ctx.get('user')}", Path.cwd())
    token = user.get("token")
    if not token and user.get("tokenFile"):
        token = Path(user["tokenFile"]).read_text().strip()
    return ClusterAccess(
        context=name,
        server=str(cluster["server"]).rstrip("/"),
        namespace=namespace or ctx.get("namespace") or "default",
        ca_data=_data(cluster, "certificate-authority", cbase),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        cert_data=_data(user, "client-certificate", ubase),
        key_data=_data(user, "client-key", ubase),
        token=token,
        exec_config=user.get("exec"),
    )


def run_exec_plugin(config: dict[str, Any]) -> dict[str, Any]:
    """Runs a client-go credential plugin and returns its ExecCredential status."""
    env = dict(os.environ)
    for item in config.get("env") or []:
        env[item["name"]] = item["value"]
    argv = [config["command"], *(config.get("args") or [])]
    try:
        proc = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=60, check=False
        )
    except FileNotFoundError as e:
        hint = config.get("installHint") or f"install {config['command']}"
        raise KubeconfigError(f"credential plugin {config['command']} not found: {hint}") from e
    if proc.returncode != 0:
        raise KubeconfigError(
            f"credential plugin {config['command']} failed: {proc.stderr.strip()[:200]}"
        )
    status: dict[str, Any] = json.loads(proc.stdout).get("status", {})
    return status
