"""The pod agent: what a kubelet would do for the pods kwok places on the node.

For every bound pod with an IP it creates a network namespace, gives the process its
service-account token, resolv.conf, env and user, starts the container command for the
image, probes it, and drives the pod's status through the state annotation that devcluster's
kwok stages follow. Deleted pods lose their processes and namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devcluster import network
from devcluster.images import command_for
from devcluster.kube import ApiError, Kube
from devcluster.kwokconf import RESTARTS_ANNOTATION, STATE_ANNOTATION
from devcluster.settings import CLUSTER_DOMAIN, NODE_NAME, Settings

log = logging.getLogger("devcluster.pods")

Obj = dict[str, Any]
PROBE_INTERVAL = 0.1
KWOK_API = "/apis/kwok.x-k8s.io/v1alpha1"


def _field_ref(pod: Obj, path: str) -> str:
    values = {
        "metadata.name": pod["metadata"]["name"],
        "metadata.namespace": pod["metadata"]["namespace"],
        "metadata.uid": pod["metadata"]["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.podIP": pod.get("status", {}).get("podIP", ""),
        "status.hostIP": pod.get("status", {}).get("hostIP", ""),
    }
    return str(values.get(path, ""))


def container_env(pod: Obj, container: Obj, settings: Settings) -> dict[str, str]:
    """The environment a kubelet gives a container (the parts our test images use)."""
    a = settings.addresses
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOSTNAME": pod["metadata"]["name"],
        "KUBERNETES_SERVICE_HOST": str(a.kubernetes_service_ip),
        "KUBERNETES_SERVICE_PORT": "443",
        "KUBERNETES_SERVICE_PORT_HTTPS": "443",
        "KUBERNETES_PORT": f"tcp://{a.kubernetes_service_ip}:443",
        # The images are Python modules of this project, read from the world-readable copy.
        "PYTHONPATH": str(settings.paths.src_copy),
        "PYTHONUNBUFFERED": "1",
        "LANG": "C.UTF-8",
    }
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif ref := item.get("valueFrom", {}).get("fieldRef"):
            env[item["name"]] = _field_ref(pod, ref["fieldPath"])
    return env


def run_as(pod: Obj, container: Obj) -> tuple[int, int]:
    pod_ctx = pod["spec"].get("securityContext") or {}
    ctx = container.get("securityContext") or {}
    uid = ctx.get("runAsUser", pod_ctx.get("runAsUser", 0))
    gid = ctx.get("runAsGroup", pod_ctx.get("runAsGroup", uid))
    return int(uid), int(gid)


def probe_port(container: Obj) -> int | None:
    """The port whose accepting connections means ready: the readiness probe's, else the first."""
    probe = container.get("readinessProbe") or {}
    for kind in ("tcpSocket", "httpGet"):
        port = probe.get(kind, {}).get("port")
        if isinstance(port, int):
            return port
        if isinstance(port, str):
            for p in container.get("ports") or []:
                if p.get("name") == port:
                    return int(p["containerPort"])
    for p in container.get("ports") or []:
        if p.get("protocol", "TCP") == "TCP":
            return int(p["containerPort"])
    return None


def _owner(pod: Obj) -> list[Obj]:
    meta = pod["metadata"]
    return [{"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}]


@dataclass
class PodRuntime:
    """The running side of one pod."""

    pod: Obj
    netns: str = ""
    folder: Path = Path()
    procs: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    restarts: int = 0
    state: str = ""

    @property
    def uid(self) -> str:
        return str(self.pod["metadata"]["uid"])

    @property
    def ns(self) -> str:
        return str(self.pod["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def ip(self) -> str:
        return str(self.pod["status"]["podIP"])


class PodAgent:
    def __init__(self, *, kube: Kube, settings: Settings, ca_cert: Path) -> None:
        self.kube = kube
        self.settings = settings
        self.ca_cert = ca_cert
        self.pods: dict[str, PodRuntime] = {}
        self.folder = settings.paths.run / "pods"

    # --- the watch loop -------------------------------------------------------------------

    async def run(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        async for kind, obj in self.kube.watch(
            "/api/v1/pods", fieldSelector=f"spec.nodeName={NODE_NAME}"
        ):
            try:
                if kind == "SYNC":
                    live = {p["metadata"]["uid"]: p for p in obj["items"]}
                    for uid in list(self.pods):
                        if uid not in live:
                            await self._stop(uid)
                    for pod in live.values():
                        await self._reconcile(pod)
                elif kind == "DELETED":
                    await self._stop(obj["metadata"]["uid"])
                else:
                    await self._reconcile(obj)
            except Exception:
                log.exception("reconciling pods after %s", kind)

    async def _reconcile(self, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        if pod["metadata"].get("deletionTimestamp"):
            await self._stop(uid)
            return
        if uid in self.pods:
            self.pods[uid].pod = pod
            return
        if not pod.get("status", {}).get("podIP") or pod["status"].get("phase") != "Pending":
            return
        runtime = PodRuntime(pod)
        self.pods[uid] = runtime
        task = asyncio.create_task(self._start(runtime), name=f"pod:{runtime.ns}/{runtime.name}")
        runtime.tasks.append(task)

    async def stop_all(self) -> None:
        for uid in list(self.pods):
            await self._stop(uid)

    # --- one pod ---------------------------------------------------------------------------

    async def _set_state(self, rt: PodRuntime, state: str) -> None:
        if rt.state == state:
            return
        rt.state = state
        with contextlib.suppress(ApiError):
            await self.kube.merge_patch(
                f"/api/v1/namespaces/{rt.ns}/pods/{rt.name}",
                {
                    "metadata": {
                        "annotations": {
                            STATE_ANNOTATION: state,
                            RESTARTS_ANNOTATION: str(rt.restarts),
                        }
                    }
                },
            )

    async def _start(self, rt: PodRuntime) -> None:
        containers = rt.pod["spec"]["containers"]
        commands = {c["name"]: command_for(c["image"], c.get("args") or []) for c in containers}
        if any(cmd is None for cmd in commands.values()):
            await self._set_state(rt, "image-pull-error")
            return
        # A recycled IP may still belong to a pod whose deletion we have not seen yet.
        for other in list(self.pods.values()):
            if other is not rt and other.netns and other.ip == rt.ip:
                await self._stop(other.uid)
        rt.folder = self.folder / rt.uid
        rt.folder.mkdir(parents=True, exist_ok=True)
        search = [f"{rt.ns}.svc.{CLUSTER_DOMAIN}", f"svc.{CLUSTER_DOMAIN}", CLUSTER_DOMAIN]
        rt.netns = await asyncio.to_thread(
            network.add_pod,
            uid=rt.uid,
            pod_ip=rt.ip,
            addr=self.settings.addresses,
            resolv_search=search,
        )
        sa_dir = await self._service_account(rt)
        await self._debug_objects(rt)
        for container in containers:
            cmd = commands[container["name"]]
            assert cmd is not None
            task = asyncio.create_task(
                self._keep_running(rt, container, cmd, sa_dir),
                name=f"container:{rt.ns}/{rt.name}/{container['name']}",
            )
            rt.tasks.append(task)

    async def _service_account(self, rt: PodRuntime) -> Path | None:
        spec = rt.pod["spec"]
        if spec.get("automountServiceAccountToken") is False:
            return None
        sa = spec.get("serviceAccountName") or "default"
        token = await self.kube.create(
            f"/api/v1/namespaces/{rt.ns}/serviceaccounts/{sa}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {
                    "expirationSeconds": 86400,
                    "boundObjectRef": {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "name": rt.name,
                        "uid": rt.uid,
                    },
                },
            },
        )
        folder = rt.folder / "serviceaccount"
        folder.mkdir(exist_ok=True)
        (folder / "token").write_text(token["status"]["token"])
        (folder / "namespace").write_text(rt.ns)
        shutil.copy(self.ca_cert, folder / "ca.crt")
        uid, gid = run_as(rt.pod, spec["containers"][0])
        for f in (folder, *folder.iterdir()):
            os.chown(f, uid, gid)
        folder.chmod(0o755)
        return folder

    async def _debug_objects(self, rt: PodRuntime) -> None:
        """PortForward, Logs and Exec objects tell kwok's kubelet API where this pod is."""
        ports = sorted(
            {
                int(p["containerPort"])
                for c in rt.pod["spec"]["containers"]
                for p in c.get("ports") or []
                if p.get("protocol", "TCP") == "TCP"
            }
        )
        meta = {"name": rt.name, "namespace": rt.ns, "ownerReferences": _owner(rt.pod)}
        objects = []
        if ports:
            objects.append(
                (
                    "portforwards",
                    {
                        "kind": "PortForward",
                        "spec": {
                            "forwards": [
                                {"ports": [p], "target": {"address": rt.ip, "port": p}}
                                for p in ports
                            ]
                        },
                    },
                )
            )
        objects.append(
            (
                "logs",
                {
                    "kind": "Logs",
                    "spec": {
                        "logs": [
                            {
                                "containers": [c["name"]],
                                "logsFile": str(rt.folder / f"{c['name']}.log"),
                                "previousLogsFile": str(rt.folder / f"{c['name']}.previous.log"),
                            }
                            for c in rt.pod["spec"]["containers"]
                        ]
                    },
                },
            )
        )
        uid, gid = run_as(rt.pod, rt.pod["spec"]["containers"][0])
        objects.append(
            (
                "execs",
                {
                    "kind": "Exec",
                    "spec": {
                        "execs": [
                            {
                                "local": {
                                    "workDir": "/",
                                    "envs": [
                                        {"name": "POD_NETNS", "value": f"/run/netns/{rt.netns}"}
                                    ],
                                    "securityContext": {"runAsUser": uid, "runAsGroup": gid},
                                }
                            }
                        ]
                    },
                },
            )
        )
        for resource, body in objects:
            body = {"apiVersion": "kwok.x-k8s.io/v1alpha1", "metadata": meta, **body}
            try:
                await self.kube.apply(f"{KWOK_API}/namespaces/{rt.ns}/{resource}/{rt.name}", body)
            except ApiError as e:
                log.warning("%s for %s/%s: %s", resource, rt.ns, rt.name, e)

    async def _keep_running(
        self, rt: PodRuntime, container: Obj, cmd: list[str], sa_dir: Path | None
    ) -> None:
        uid, gid = run_as(rt.pod, container)
        python = str(self.settings.paths.venv / "bin" / "python")
        argv = [
            "ip",
            "netns",
            "exec",
            rt.netns,
            python,
            "-m",
            "devcluster.podexec",
            "--uid",
            str(uid),
            "--gid",
            str(gid),
        ]
        if sa_dir is not None:
            argv += ["--sa-dir", str(sa_dir)]
        argv += ["--", python, *cmd]
        env = container_env(rt.pod, container, self.settings)
        name = container["name"]
        log_file = rt.folder / f"{name}.log"
        port = probe_port(container)
        backoff = 0.5
        while True:
            if log_file.exists():
                log_file.replace(rt.folder / f"{name}.previous.log")
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
            rt.procs[name] = proc
            await self._set_state(rt, "running")
            pumps = [
                asyncio.create_task(_write_cri_log(stream, label, log_file))
                for stream, label in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))
                if stream is not None
            ]
            probe = asyncio.create_task(self._probe(rt, port))
            code = await proc.wait()
            probe.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            log.warning("%s/%s/%s exited with %s", rt.ns, rt.name, name, code)
            rt.restarts += 1
            rt.state = ""
            await self._set_state(rt, "running")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10)

    async def _probe(self, rt: PodRuntime, port: int | None) -> None:
        """Ready once the process accepts connections (from the node, as a kubelet probes)."""
        while port is not None:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(rt.ip, port), 1)
            except (OSError, TimeoutError):
                await asyncio.sleep(PROBE_INTERVAL)
                continue
            writer.close()
            break
        await self._set_state(rt, "ready")

    async def _stop(self, uid: str) -> None:
        rt = self.pods.pop(uid, None)
        if rt is None:
            return
        for task in rt.tasks:
            task.cancel()
        for proc in rt.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        await asyncio.gather(*rt.tasks, return_exceptions=True)
        if rt.netns:
            await asyncio.to_thread(network.remove_pod, rt.uid)
        if rt.folder != Path() and rt.folder.exists():
            shutil.rmtree(rt.folder, ignore_errors=True)


async def _write_cri_log(stream: asyncio.StreamReader, label: str, path: Path) -> None:
    """Container output in the CRI log format that kwok's logs handler reads."""
    with path.open("a") as out:
        async for line in stream:
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            text = line.decode(errors="replace").rstrip("\n")
            out.write(f"{now} {label} F {text}\n")
            out.flush()


def describe(agent: PodAgent) -> str:
    return json.dumps(
        {
            uid: {
                "pod": f"{rt.ns}/{rt.name}",
                "ip": rt.pod["status"].get("podIP"),
                "state": rt.state,
                "restarts": rt.restarts,
            }
            for uid, rt in agent.pods.items()
        }
    )
