"""The traffic manager's pods, watched through the API: the fast signal of a rollout.

A pod being deleted (a rollout, a node drain, `kubectl delete`) gets its deletion
timestamp in the API the moment the delete is accepted, before the kubelet even sends
SIGTERM, and a replacement's Ready condition shows as soon as the kubelet reports it. A
missed heartbeat would take seconds; the manager's own ``Draining`` message cannot cross a
port-forward that hangs. The pool (:meth:`.pool.ManagerPool.manager_pods`) gets both
sets after every event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Protocol

from telepresence.k8s import manifests
from telepresence.k8s.api import (
    Changed,
    Forbidden,
    KubeApi,
    KubeError,
    Listed,
    Obj,
    is_ready,
    resource_path,
)

log = logging.getLogger("telepresence.session")

#: After a failed watch (the API server is away), the next try.
RETRY = 1.0


class PodsListener(Protocol):
    def manager_pods(self, *, stopping: set[str], ready: set[str]) -> None: ...


def pod_states(pods: Iterable[Obj], *, deleted: Iterable[str] = ()) -> tuple[set[str], set[str]]:
    """(stopping, ready): pods with a deletion timestamp or already gone, and pods that
    serve. Pure, for the tests."""
    stopping = set(deleted)
    ready = set()
    for pod in pods:
        name = pod["metadata"]["name"]
        if pod["metadata"].get("deletionTimestamp"):
            stopping.add(name)
        elif is_ready(pod):
            ready.add(name)
    return stopping, ready


async def watch_manager_pods(api: KubeApi, namespace: str, listener: PodsListener) -> None:
    """Runs until cancelled; a failing watch is retried (the heartbeat still covers us)."""
    path = resource_path("v1", "pods", namespace=namespace)
    pods: dict[str, Obj] = {}
    while True:
        try:
            async for event in api.watch(path, label_selector=manifests.SELECTOR):
                deleted: list[str] = []
                if isinstance(event, Listed):
                    gone = set(pods)
                    pods = {p["metadata"]["name"]: p for p in event.items}
                    deleted = sorted(gone - set(pods))
                elif isinstance(event, Changed):
                    name = event.object["metadata"]["name"]
                    if event.type == "DELETED":
                        pods.pop(name, None)
                        deleted = [name]
                    else:
                        pods[name] = event.object
                stopping, ready = pod_states(pods.values(), deleted=deleted)
                listener.manager_pods(stopping=stopping, ready=ready)
        except Forbidden as e:
            # Optional (docs/architecture.md): Draining and the heartbeat still cover us.
            log.info("not watching the traffic manager's pods (%s): rollouts show later", e)
            return
        except KubeError as e:
            log.info("watching the traffic manager's pods: %s", e)
        await asyncio.sleep(RETRY)
