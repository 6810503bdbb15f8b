"""The cluster's namespaces, as the laptop's name rules need them.

`svc.ns` resolves only for namespaces that exist (or are mapped), and in the systemd-resolved
mode each one is a routing domain of the TUN link; so the set is listed at connect and
followed with a watch for as long as the session lasts, and every change is reported.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from telepresence.k8s.api import Changed, KubeApi, KubeError, Listed

log = logging.getLogger("telepresence.session")

PATH = "/api/v1/namespaces"
#: After a failed watch (the API server is away), the next try.
RETRY = 2.0


async def load(api: KubeApi) -> frozenset[str]:
    """The namespaces now; empty (with a log line) when the user may not list them."""
    try:
        listing = await api.list(PATH)
    except KubeError as e:
        log.info("cannot list namespaces (%s); only the cluster domain resolves", e)
        return frozenset()
    return frozenset(n["metadata"]["name"] for n in listing["items"])


async def follow(
    api: KubeApi,
    current: Callable[[], frozenset[str]],
    on_change: Callable[[frozenset[str]], None],
) -> None:
    """Keeps `svc.ns` names working for namespaces created or deleted while connected;
    runs until cancelled."""
    while True:
        try:
            async for event in api.watch(PATH):
                names = current()
                if isinstance(event, Listed):
                    names = frozenset(n["metadata"]["name"] for n in event.items)
                elif isinstance(event, Changed):
                    name = event.object["metadata"]["name"]
                    names = names - {name} if event.type == "DELETED" else names | {name}
                on_change(names)
        except KubeError as e:
            log.info("namespace watch: %s", e)
        await asyncio.sleep(RETRY)
