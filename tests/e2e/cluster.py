"""A handle on devcluster for tests: run commands in the laptop, a pod, or as cluster admin."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from devcluster import laptopdns, node
from devcluster.settings import Settings

T = TypeVar("T")


# The start of a script that joins the traffic manager as a tunnel-level client (what anyone
# allowed to port-forward to it could run), without the daemon: `await open_pool(name)`
# returns a started ManagerPool; the script's own main follows.
POOL_CLIENT = r"""
import asyncio, json, sys
import aiohttp
from telepresence.daemon.pool import ManagerPool
from telepresence.k8s import kubeconfig
from telepresence.k8s.api import KubeApi
from telepresence.k8s.install import find_manager_pod
from telepresence.k8s.portforward import PortForward

async def open_pool(api, http, access, name):
    async def open_forward(pod, avoid):
        if pod is None:
            pod = (await find_manager_pod(api, "ambassador", avoid=avoid)).pod_name
        return pod, await PortForward.open(http, access, namespace="ambassador",
                                           pod=pod, port=8081)
    pool = ManagerPool(open_forward=open_forward, size=1, client_name=name,
                       install_id=name, on_cluster_info=lambda _: None)
    await pool.start()
    return pool
"""


def user_argv(user: str, env: dict[str, str], *cmd: str) -> list[str]:
    """A command line that runs CMD in the laptop namespace as ``user`` (any laptop user,
    not only devcluster's), with exactly ``env``."""
    return [
        *laptopdns.enter_argv(Settings()),
        "setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--",
        "env", "-i", *(f"{k}={v}" for k, v in env.items()), *cmd,
    ]  # fmt: skip


def run_without_terminal(
    argv: list[str], *, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """ARGV in a session of its own with no controlling terminal, as a script or a CI job
    runs things: sudo cannot ask for a password there."""
    return subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def wait_for(
    check: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.1
) -> T:
    """Polls `check` until it returns something truthy, or fails naming `what`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = check()
            if result:
                return result
            last = result
        except Exception as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


#: `ps` options for `running_processes`: pid, state and command line, no header.
PS_PROCESSES = ("-o", "pid=,stat=,args=")


def running_processes(ps_output: str) -> str:
    """`ps -u USER` lines (PS_PROCESSES) without zombies: a process that has exited and
    waits for PID 1 to reap it holds nothing, and some inits (this machine's) reap orphans
    only seconds later."""
    return "\n".join(
        line for line in ps_output.splitlines() if line.split()[1:2] and line.split()[1][0] != "Z"
    )


@dataclass
class Cluster:
    settings: Settings = field(default_factory=Settings)

    def devcluster(
        self, *args: str, timeout: float = 1800, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "devcluster.cli", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"devcluster {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def _run(
        self, argv: list[str], *, input: str | None, timeout: float, check: bool
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def laptop(
        self,
        *cmd: str,
        root: bool = False,
        input: str | None = None,
        timeout: float = 60,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """CMD in the laptop namespace, as the laptop's unprivileged user unless root. The
        test harness's Python (the dev venv's) gets devcluster's readable copy of the
        sources; the product runs from the laptop user's install."""
        flags = ["--root"] if root else []
        if cmd and cmd[0] == self.harness_python:
            cmd = ("env", f"PYTHONPATH={self.settings.paths.src_copy}", *cmd)
        return self._run(
            [sys.executable, "-m", "devcluster.cli", "laptop", *flags, "--", *cmd],
            input=input,
            timeout=timeout,
            check=check,
        )

    @property
    def harness_python(self) -> str:
        return str(self.settings.paths.venv / "bin" / "python")

    def harness_argv(self, *cmd: str) -> list[str]:
        """A command line that runs the harness's Python in the laptop namespace as the
        laptop user (for Popen)."""
        return [
            sys.executable, "-m", "devcluster.cli", "laptop", "--",
            "env", f"PYTHONPATH={self.settings.paths.src_copy}", self.harness_python, *cmd,
        ]  # fmt: skip

    def pod(
        self, *cmd: str, input: str | None = None, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """CMD inside the cluster network, as a pod would run it."""
        return self._run(
            [sys.executable, "-m", "devcluster.cli", "pod", "--", *cmd],
            input=input,
            timeout=timeout,
            check=check,
        )

    def kubectl(
        self, *args: str, input: str | None = None, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """kubectl as cluster admin (from the node namespace)."""
        s = self.settings
        argv = [
            "ip",
            "netns",
            "exec",
            "dc-node",
            str(s.binary("kubectl")),
            f"--kubeconfig={s.paths.admin_kubeconfig}",
            *args,
        ]
        return self._run(argv, input=input, timeout=timeout, check=check)

    def apply(self, manifest: str) -> None:
        self.kubectl("apply", "-f", "-", input=manifest)

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", "-o", "json", *args).stdout)

    def rollout(self, name: str, namespace: str, timeout: int = 120) -> None:
        self.kubectl(
            "rollout",
            "status",
            f"deployment/{name}",
            "-n",
            namespace,
            f"--timeout={timeout}s",
            timeout=timeout + 10,
        )

    def token_kubeconfig(self, token: str, *, name: str, namespace: str | None = None) -> str:
        """A kubeconfig in the laptop user's home for a bearer token (a ServiceAccount's),
        as a developer with limited rights would have; returns its path."""
        context: dict[str, str] = {"cluster": "dc", "user": "dev"}
        if namespace:
            context["namespace"] = namespace
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": name,
            "clusters": [
                {
                    "name": "dc",
                    "cluster": {
                        "server": self.settings.addresses.api_url,
                        "insecure-skip-tls-verify": True,
                    },
                }
            ],
            "users": [{"name": "dev", "user": {"token": token}}],
            "contexts": [{"name": name, "context": context}],
        }
        path = f"/home/tpuser/{name}.kubeconfig"
        self.laptop("sh", "-c", f"cat > {path}", input=json.dumps(config))
        return path

    def container_pids(self, pod: dict[str, Any]) -> list[int]:
        """Processes of a pod's app containers (the pause process left out)."""
        return node.pod_app_pids(pod["metadata"]["uid"])

    def pod_cgroups(self, pod: dict[str, Any]) -> list[Path]:
        root = Path("/sys/fs/cgroup")
        return list(root.glob(f"*/{node.CGROUP_ROOT}/kubepods/**/pod{pod['metadata']['uid']}"))

    def ready_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        pods = self.get("pods", "-n", namespace, "-l", selector)["items"]
        return [
            p
            for p in pods
            if not p["metadata"].get("deletionTimestamp")
            and any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in p.get("status", {}).get("conditions", [])
            )
        ]
