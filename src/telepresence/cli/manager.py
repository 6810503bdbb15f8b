"""`telepresence manager upgrade` and `telepresence manager uninstall`.

They run in the CLI process, against the API server directly, not through the daemon: they
must work when no daemon runs (an admin tidying a cluster, a user after `quit`). Imported
only by these commands, so asyncio and the Kubernetes client stay out of `status`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from telepresence import versions
from telepresence.k8s import kubeconfig
from telepresence.k8s.api import KubeApi, KubeError
from telepresence.k8s.install import ensure_manager, uninstall_manager
from telepresence.k8s.installplan import INSTALLING

T = TypeVar("T")


class ManagerCommandError(Exception):
    """One line for the user, naming the fix."""


def _run(
    *,
    kubeconfig_path: str | None,
    context: str | None,
    work: Callable[[KubeApi], Coroutine[Any, Any, T]],
) -> T:
    try:
        access = kubeconfig.load(kubeconfig=kubeconfig_path, context=context)
    except kubeconfig.KubeconfigError as e:
        raise ManagerCommandError(str(e)) from e

    async def go() -> T:
        async with KubeApi(access) as api:
            return await work(api)

    try:
        return asyncio.run(go())
    except KubeError as e:
        raise ManagerCommandError(str(e)) from e


def upgrade(
    *,
    kubeconfig_path: str | None,
    context: str | None,
    namespace: str,
    image: str | None,
    base_image: str | None,
    dial_allow: Sequence[str] | None,
    dial_deny: Sequence[str] | None,
    progress: Callable[[str], None],
) -> str:
    """Applies this client's manager over an older one (or installs it); leaves a newer
    one alone. Returns the last line to print, empty when the progress said it all."""
    said: list[str] = []

    def tell(line: str) -> None:
        said.append(line)
        progress(line)

    info = _run(
        kubeconfig_path=kubeconfig_path,
        context=context,
        work=lambda api: ensure_manager(
            api,
            namespace=namespace,
            image=image,
            base_image=base_image,
            dial_allow=dial_allow,
            dial_deny=dial_deny,
            upgrade=True,
            progress=tell,
        ),
    )
    if info.upgraded or INSTALLING in said:
        return f"Traffic Manager {info.version or versions.package_version()} ready in {namespace}"
    return ""


def uninstall(
    *,
    kubeconfig_path: str | None,
    context: str | None,
    namespace: str,
    progress: Callable[[str], None],
) -> str:
    removed = _run(
        kubeconfig_path=kubeconfig_path,
        context=context,
        work=lambda api: uninstall_manager(api, namespace=namespace, progress=progress),
    )
    if not removed:
        return f"Nothing to remove: no Traffic Manager objects in namespace {namespace}"
    return f"Traffic Manager uninstalled from namespace {namespace} ({len(removed)} objects)"
