"""The long-running devcluster process: the control plane and the node.

`devcluster up` starts it detached; it lives in the node network namespace (while keeping
the host's mount namespace; containerd and the kubelet get a private one, see `node`),
restarts components that stop, and on SIGTERM stops every component it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from devcluster import controlplane, laptop, node
from devcluster.kube import ApiError, Kube
from devcluster.procs import Supervised
from devcluster.settings import (
    EXTERNAL_NS,
    LAPTOP_NS,
    NODE_NAME,
    NODE_NS,
    Settings,
)
from devcluster.system import enter_netns

log = logging.getLogger("devcluster")

READY_FILE = "ready"
STATUS_FILE = "status.json"
#: Written by `devcluster up` after building: image reference -> OCI archive to import.
IMAGES_FILE = "images.json"


async def wait_tcp(host: str, port: int, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{what} did not listen on {host}:{port} in {timeout:.0f}s"
                ) from e
            await asyncio.sleep(0.1)


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_dir = settings.paths.run
        self.procs: list[Supervised] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.kube: Kube | None = None

    def _proc(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Supervised:
        p = Supervised(name, argv, log_file=self.settings.paths.logs / f"{name}.log", env=env)
        p.start()
        self.procs.append(p)
        return p

    def _task(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self.tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    async def start(self) -> None:
        s = self.settings
        a = s.addresses
        paths = s.paths
        creds = controlplane.make_credentials(s)
        paths.admin_kubeconfig.write_text(
            controlplane.kubeconfig(server=a.api_url, ca=creds.ca.cert, client=creds.admin)
        )
        paths.admin_kubeconfig.chmod(0o600)
        laptop.write_kubeconfig(s, ca=creds.ca.cert, admin=creds.admin)
        (self.run_dir / "Corefile").write_text(controlplane.corefile(s))
        comps = {c.name: c for c in controlplane.components(s, creds)}
        node_files = node.write_configs(s, creds)
        node.create_cgroup_root()
        node.create_mount_namespace(s)

        self._proc("etcd", comps["etcd"].argv)
        await wait_tcp("127.0.0.1", 2379, timeout=60, what="etcd")
        self._proc("kube-apiserver", comps["kube-apiserver"].argv)
        self.kube = Kube(
            server=a.api_url, ca=creds.ca.cert, cert=creds.admin.cert, key=creds.admin.key
        )
        # containerd starts and takes the images while the API server comes up.
        self._proc(
            "containerd",
            node.in_node(s, [str(s.binary("containerd")), f"--config={node_files['containerd']}"]),
            env=node_env(s),
        )
        await self._wait_api_ready()
        self._proc("kube-controller-manager", comps["kube-controller-manager"].argv)
        self._proc("kube-scheduler", comps["kube-scheduler"].argv)
        await self._bootstrap()
        await self._import_images()
        self._proc(
            "kubelet",
            node.in_node(
                s,
                [
                    str(s.binary("kubelet")),
                    f"--config={node_files['kubelet']}",
                    f"--kubeconfig={node_files['kubelet-kubeconfig']}",
                    f"--hostname-override={NODE_NAME}",
                    f"--node-ip={a.node_ip}",
                    "--v=1",
                ],
            ),
            env=node_env(s),
        )
        self._proc(
            "kube-proxy",
            node.in_node(
                s,
                [
                    str(s.binary("kube-proxy")),
                    f"--config={node_files['kube-proxy']}",
                    "--v=1",
                ],
            ),
            env=node_env(s),
        )
        self._proc("coredns", comps["coredns"].argv)
        self._proc("laptop-dnsmasq", ["ip", "netns", "exec", LAPTOP_NS, *dnsmasq_argv(s)])
        python = str(paths.venv / "bin" / "python")
        self._proc(
            "external-http",
            [
                "ip",
                "netns",
                "exec",
                EXTERNAL_NS,
                python,
                "-m",
                "devcluster.images.http",
                "--port",
                "80",
            ],
            env={**os.environ, "PYTHONPATH": str(paths.src_copy), "POD_NAME": a.external_name},
        )
        await wait_tcp(str(a.node_ip), 53, timeout=60, what="coredns")
        await self._wait_node_ready()
        self._task(self._write_status(), "status")
        (self.run_dir / READY_FILE).write_text(str(os.getpid()))
        log.info("devcluster is up")

    async def _import_images(self) -> None:
        """Every image devcluster builds, into containerd's k8s.io namespace (no registry)."""
        s = self.settings
        archives = json.loads((self.run_dir / IMAGES_FILE).read_text())
        socket_path = node.host_containerd_socket(s)
        deadline = time.monotonic() + 60
        while not socket_path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "containerd did not create its socket in 60s; see containerd.log"
                )
            await asyncio.sleep(0.1)
        imported = await asyncio.to_thread(
            node.import_images, s, {ref: Path(path) for ref, path in archives.items()}
        )
        log.info("imported %s", ", ".join(imported))

    async def _wait_api_ready(self) -> None:
        assert self.kube is not None
        deadline = time.monotonic() + 120
        while True:
            try:
                await self.kube.request("GET", "/readyz")
                return
            except Exception as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kube-apiserver not ready after 120s: {e}") from e
                await asyncio.sleep(0.2)

    async def _wait_node_ready(self) -> None:
        assert self.kube is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                obj = await self.kube.get(f"/api/v1/nodes/{NODE_NAME}")
            except ApiError:
                await asyncio.sleep(0.2)
                continue
            conditions = obj.get("status", {}).get("conditions", [])
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                return
            await asyncio.sleep(0.2)
        raise RuntimeError("the node did not become Ready in 90s; see kubelet.log")

    async def _bootstrap(self) -> None:
        """Objects every cluster has that no controller makes here: cluster DNS's Service."""
        assert self.kube is not None
        a = self.settings.addresses
        # Cluster DNS runs on the node, behind the usual kube-dns ClusterIP.
        await self.kube.apply(
            "/api/v1/namespaces/kube-system/services/kube-dns",
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": "kube-dns",
                    "namespace": "kube-system",
                    "labels": {"k8s-app": "kube-dns"},
                },
                "spec": {
                    "clusterIP": str(a.dns_service_ip),
                    "ports": [
                        {"name": "dns", "port": 53, "protocol": "UDP"},
                        {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                    ],
                },
            },
        )
        await self.kube.apply(
            "/apis/discovery.k8s.io/v1/namespaces/kube-system/endpointslices/kube-dns-node",
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": "kube-dns-node",
                    "namespace": "kube-system",
                    "labels": {"kubernetes.io/service-name": "kube-dns"},
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [str(a.node_ip)], "conditions": {"ready": True}}],
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                ],
            },
        )
        # The default service account appears asynchronously; pods need it.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                await self.kube.get("/api/v1/namespaces/default/serviceaccounts/default")
                return
            except ApiError:
                await asyncio.sleep(0.2)

    async def _write_status(self) -> None:
        path = self.run_dir / STATUS_FILE
        while True:
            status = {
                "pid": os.getpid(),
                "components": {
                    p.name: {
                        "pid": p.proc.pid if p.proc else None,
                        "running": p.proc is not None and p.proc.returncode is None,
                        "restarts": p.restarts,
                    }
                    for p in self.procs
                },
            }
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(status, indent=2))
            tmp.replace(path)
            await asyncio.sleep(1)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for p in reversed(self.procs):
            await p.stop()
        if self.kube is not None:
            await self.kube.close()
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / READY_FILE).unlink()


def node_env(settings: Settings) -> dict[str, str]:
    """The node's components find runc, the shim, nft and mount tools on PATH."""
    shim_dir = settings.binary("containerd-shim-runc-v2").parent
    return {
        **os.environ,
        "PATH": f"{shim_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    }


def dnsmasq_argv(settings: Settings) -> list[str]:
    """The laptop's own resolver, standing in for a home router: it knows some LAN names and
    answers NXDOMAIN for everything else (the laptop has no internet)."""
    a = settings.addresses
    return [
        "dnsmasq",
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--log-facility=-",
        "--log-queries",
        "--user=root",
        "--pid-file=",
        f"--listen-address={a.laptop_resolver}",
        "--bind-interfaces",
        "--port=53",
        "--local=/#/",
        f"--host-record=www.example.test,{a.laptop_link_laptop}",
        f"--host-record=printer.lan,{a.laptop_link_laptop}",
        f"--host-record=example.dev,{a.laptop_link_laptop}",
        f"--host-record=web,{a.laptop_link_laptop}",
    ]


async def amain(settings: Settings) -> int:
    sup = Supervisor(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        starting = asyncio.create_task(sup.start(), name="start")
        stopping = asyncio.create_task(stop.wait(), name="stop-signal")
        done, _ = await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting in done:
            starting.result()
            await stop.wait()
        else:
            starting.cancel()
        return 0
    except Exception as e:
        log.exception("devcluster failed")
        (settings.paths.run / "failed").write_text(f"{e}\n")
        return 1
    finally:
        await sup.stop()


def main() -> None:
    settings = Settings()
    settings.paths.logs.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # Stop writing status before anything else can read a stale ready file.
    for stale in (READY_FILE, "failed"):
        with contextlib.suppress(FileNotFoundError):
            (settings.paths.run / stale).unlink()
    enter_netns(NODE_NS)
    socket.setdefaulttimeout(None)
    sys.exit(asyncio.run(amain(settings)))


if __name__ == "__main__":
    main()
