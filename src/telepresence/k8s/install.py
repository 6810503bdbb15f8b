"""Installing, upgrading, finding and uninstalling the traffic manager.

`connect` calls :func:`ensure_manager`: a manager that is already serving and that
`installplan.plan` keeps costs one GET and one LIST; anything else is a server-side apply
of every object (which makes install and upgrade one code path), after a dry run of the
same apply, so that a user who lacks a permission learns it before anything has been
changed in the cluster. `telepresence manager upgrade` is the same call, asked to upgrade;
`telepresence manager uninstall` is :func:`uninstall_manager`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace

from telepresence import versions
from telepresence.k8s import installplan, managercode, manifests
from telepresence.k8s.api import (
    Forbidden,
    KubeApi,
    KubeError,
    NotFound,
    Obj,
    is_ready,
    object_path,
    resource_path,
    wait_until,
)
from telepresence.k8s.installplan import Action, Installed, Relation, Wanted
from telepresence.manager import config
from telepresence.manager.dialpolicy import format_networks
from telepresence.versions import LEGACY_PROTOCOL, ProtocolRange

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "ask a cluster admin to install the traffic manager with "
    "`telepresence manifests | kubectl apply --server-side -f -`"
)

#: Waiting reasons that mean the image will not arrive by waiting longer.
IMAGE_PULL_FAILURES = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
)


class InstallError(KubeError):
    """The manager was applied but does not serve; the message says why and what to do."""


class IncompatibleManager(KubeError):
    """The installed manager is one this client must not use or replace on its own (no
    protocol in common, or no readable version); the message names the fix."""


@dataclass(frozen=True, kw_only=True)
class ManagerInfo:
    pod_name: str
    pod_ip: str
    version: str
    upgraded: bool = False
    #: The manager's package version against this client's: a Relation's value (a
    #: string, so the info stays plain data).
    relation: str = Relation.SAME.value


def _deployment_path(namespace: str) -> str:
    return resource_path("apps/v1", "deployments", namespace=namespace, name=manifests.NAME)


def _pods_path(namespace: str) -> str:
    return resource_path("v1", "pods", namespace=namespace)


def _version_of(obj: Obj) -> str:
    annotations = obj.get("metadata", {}).get("annotations") or {}
    return str(annotations.get(manifests.VERSION_ANNOTATION, ""))


def _image_of(obj: Obj) -> str:
    """The manager container's image in a Deployment or a pod."""
    spec = obj.get("spec", {})
    spec = spec.get("template", {}).get("spec", spec)
    for container in spec.get("containers") or []:
        if container.get("name") == manifests.NAME:
            return str(container.get("image", ""))
    return ""


def _dial_env_of(obj: Obj) -> tuple[str, str]:
    """The manager container's dial allow and deny lists, as their env values."""
    spec = obj.get("spec", {})
    spec = spec.get("template", {}).get("spec", spec)
    for container in spec.get("containers") or []:
        if container.get("name") == manifests.NAME:
            env = {e.get("name"): e.get("value", "") for e in container.get("env") or []}
            return (
                str(env.get(config.DIAL_ALLOW_ENV, "")),
                str(env.get(config.DIAL_DENY_ENV, "")),
            )
    return ("", "")


def _info(pod: Obj, *, upgraded: bool = False) -> ManagerInfo:
    return ManagerInfo(
        pod_name=pod["metadata"]["name"],
        pod_ip=str(pod.get("status", {}).get("podIP", "")),
        version=_version_of(pod),
        upgraded=upgraded,
    )


def newest_ready(pods: list[Obj]) -> Obj | None:
    """The Ready pod created last: after a rollout, the one of the new ReplicaSet."""
    ready = [p for p in pods if is_ready(p) and p.get("status", {}).get("podIP")]
    if not ready:
        return None
    # RFC 3339 timestamps in UTC sort as strings; the name breaks ties deterministically.
    return max(
        ready, key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"])
    )


def pull_failure(pod: Obj) -> str | None:
    """Why the pod's manager container is stuck, when waiting will not help."""
    for status in pod.get("status", {}).get("containerStatuses") or []:
        waiting = (status.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason", "")
        if reason in IMAGE_PULL_FAILURES or reason == "CrashLoopBackOff":
            message = waiting.get("message", "")
            return f"{reason}: {message}" if message else str(reason)
    return None


async def find_manager_pod(
    api: KubeApi, namespace: str, *, avoid: Collection[str] = ()
) -> ManagerInfo | None:
    """The manager to talk to now: the newest Ready pod of the Deployment not in ``avoid``
    (stopping ones), or None. The daemon calls it again when its port-forward breaks, to
    re-join a restarted manager, and when its manager is stopping, to hand over."""
    listing = await api.list(_pods_path(namespace), label_selector=manifests.SELECTOR)
    items = [p for p in listing.get("items") or [] if p["metadata"]["name"] not in avoid]
    pod = newest_ready(items)
    return None if pod is None else _info(pod)


def installed_of(deployment: Obj) -> Installed:
    """What the installer needs to know of an installed manager's Deployment."""
    annotations = deployment.get("metadata", {}).get("annotations") or {}
    protocol_text = annotations.get(manifests.PROTOCOL_ANNOTATION)
    try:
        protocol: ProtocolRange | None = (
            LEGACY_PROTOCOL if protocol_text is None else ProtocolRange.parse(str(protocol_text))
        )
    except ValueError:
        protocol = None
    return Installed(
        version=_version_of(deployment),
        protocol=protocol,
        image=_image_of(deployment),
        dial=_dial_env_of(deployment),
    )


async def ensure_manager(
    api: KubeApi,
    *,
    namespace: str = manifests.DEFAULT_NAMESPACE,
    image: str | None = None,
    base_image: str | None = None,
    version: str | None = None,
    protocol: ProtocolRange | None = None,
    dial_allow: Sequence[str] | None = None,
    dial_deny: Sequence[str] | None = None,
    upgrade: bool = False,
    progress: Callable[[str], None] = lambda _: None,
    timeout: float = 120,
) -> ManagerInfo:
    """A serving traffic manager this client can talk to: the one already there, or ours,
    installed now. What happens to an installed one is :func:`installplan.plan`'s call:
    never a downgrade, an upgrade only when ``upgrade`` (`telepresence manager upgrade`).
    Raises :class:`IncompatibleManager` (a manager this client cannot use),
    :class:`Forbidden` (naming the missing permission and how an admin can install
    instead) or :class:`InstallError`.

    ``image`` (an image of our own, with the code in it) or ``base_image`` (a stock Python
    image for the code this client delivers in ConfigMaps) is an explicit choice (flag or
    config); neither means the default base image, which does not replace another image
    on a manager of our version (an admin's mirror, or our own image).
    ``dial_allow``/``dial_deny`` (the user's config) re-apply a manager of our version
    whose dial policy differs; left None, they leave an installed manager's policy alone
    (an admin may have set it) and install the defaults."""
    version = version or versions.package_version()
    protocol = protocol or versions.protocol_range()
    wanted_image = image or base_image or manifests.DEFAULT_BASE_IMAGE
    wanted_dial = (
        None
        if dial_allow is None and dial_deny is None
        else (format_networks(dial_allow or ()), format_networks(dial_deny or ()))
    )
    try:
        try:
            current: Obj | None = await api.get(_deployment_path(namespace))
        except NotFound:
            current = None
        installed = None if current is None else installed_of(current)
        decision = installplan.plan(
            installed,
            Wanted(
                version=version,
                protocol=protocol,
                image=wanted_image,
                image_explicit=image is not None or base_image is not None,
                dial=wanted_dial,
                upgrade=upgrade,
            ),
        )
        if decision.action is Action.REFUSE:
            raise IncompatibleManager(decision.message)
        code: managercode.CodeBundle | None = None
        if decision.message:
            progress(decision.message)
        if decision.action is Action.KEEP:
            assert installed is not None
            found = await find_manager_pod(api, namespace)
            if found is not None and found.version == installed.version:
                return replace(found, relation=decision.relation.value)
            # Rolling out, or its pod is gone: wait for the installed template's pod.
            wait_for: tuple[str, str, tuple[str, str] | None] = (
                installed.version,
                installed.image,
                None,
            )
        else:
            if image is None:
                try:
                    code = await asyncio.to_thread(managercode.build)
                except managercode.CodeError as e:
                    raise InstallError(str(e)) from e
            objects = manifests.manager_objects(
                namespace=namespace,
                image=wanted_image,
                code=code,
                version=version,
                protocol=protocol,
                dial_allow=dial_allow or (),
                dial_deny=dial_deny or (),
                owns_namespace=await _owns_namespace(api, namespace),
                extra_env=versions.overrides_in_effect(),
            )
            await _dry_run(api, objects)
            for obj in objects:
                await api.apply(obj)
            if installed is not None:
                await _delete_obsolete(api, namespace)
            wait_for = (version, wanted_image, wanted_dial)
        progress("Waiting for Traffic Manager")
        info = await _wait_ready(
            api,
            namespace=namespace,
            version=wait_for[0],
            image=wait_for[1],
            dial=wait_for[2],
            timeout=timeout,
        )
        if decision.action is not Action.KEEP:
            keep = None if code is None else code.short_digest
            await _delete_stale_code(api, namespace, keep=keep, best_effort=True)
    except Forbidden as e:
        raise e.with_hint(INSTALL_HINT) from e
    upgraded = decision.action in (Action.UPGRADE, Action.REAPPLY)
    # Whatever was applied is ours: the same version as this client.
    applied = decision.action is not Action.KEEP
    relation = Relation.SAME if applied else decision.relation
    return replace(info, upgraded=upgraded, relation=relation.value)


async def _owns_namespace(api: KubeApi, namespace: str) -> bool:
    """Whether the namespace is ours to delete on uninstall: missing now (the apply
    creates it), or created by an earlier install. Unknown (we may not read it) is no."""
    try:
        obj = await api.get(resource_path("v1", "namespaces", name=namespace))
    except NotFound:
        return True
    except KubeError:
        return False
    annotations = obj.get("metadata", {}).get("annotations") or {}
    return annotations.get(manifests.CREATED_NAMESPACE_ANNOTATION) == "true"


async def uninstall_manager(
    api: KubeApi,
    *,
    namespace: str = manifests.DEFAULT_NAMESPACE,
    progress: Callable[[str], None] = lambda _: None,
    timeout: float = 120,
    poll: float = 1.0,
) -> list[str]:
    """Deletes what `connect` installed, in :func:`manifests.uninstall_objects`'s order,
    and waits until the manager's pods (and the namespace, when it was ours) are gone, so
    that a `connect` right after installs afresh instead of meeting a terminating
    namespace. Returns what was deleted, as ``kind/name``; empty when nothing was there.
    Raises :class:`Forbidden` naming the missing permission."""
    owned = False
    try:
        ns = await api.get(resource_path("v1", "namespaces", name=namespace))
        annotations = ns.get("metadata", {}).get("annotations") or {}
        owned = annotations.get(manifests.CREATED_NAMESPACE_ANNOTATION) == "true"
    except NotFound:
        pass
    removed: list[str] = []
    for ref in manifests.uninstall_objects(namespace, delete_namespace=owned):
        if await api.delete(object_path(ref)) is not None:
            removed.append(f"{ref['kind'].lower()}/{ref['metadata']['name']}")
            progress(f"Deleted {removed[-1]}")
        if ref["kind"] == "Deployment":
            for name in await _delete_stale_code(api, namespace, keep=None):
                removed.append(name)
                progress(f"Deleted {name}")
    if not removed:
        return removed
    progress("Waiting for the Traffic Manager to be gone")
    try:
        async with asyncio.timeout(timeout):
            while await _left_behind(api, namespace, namespace_too=owned):
                await asyncio.sleep(poll)
    except TimeoutError:
        raise InstallError(
            f"the Traffic Manager's objects were deleted but its pods (or namespace "
            f"{namespace}) were still there after {timeout:g}s; see "
            f"`kubectl -n {namespace} get pods`"
        ) from None
    return removed


async def _left_behind(api: KubeApi, namespace: str, *, namespace_too: bool) -> bool:
    if namespace_too:
        try:
            await api.get(resource_path("v1", "namespaces", name=namespace))
        except NotFound:
            return False
        return True
    listing = await api.list(_pods_path(namespace), label_selector=manifests.SELECTOR)
    return bool(listing.get("items"))


#: Objects earlier versions installed and this one does not: the manager's Service, from
#: when the tunnel listened on the pod network.
def _obsolete_paths(namespace: str) -> list[str]:
    return [resource_path("v1", "services", namespace=namespace, name=manifests.NAME)]


async def _delete_obsolete(api: KubeApi, namespace: str) -> None:
    """Best effort: what is left is harmless (nothing listens behind the old Service), so a
    user who may not delete it is not stopped."""
    for path in _obsolete_paths(namespace):
        try:
            await api.delete(path)
        except KubeError as e:
            log.info("leaving %s in place: %s", path, e)


def _code_configmaps_path(namespace: str) -> str:
    return resource_path("v1", "configmaps", namespace=namespace)


async def _delete_stale_code(
    api: KubeApi, namespace: str, *, keep: str | None, best_effort: bool = False
) -> list[str]:
    """Deletes the code ConfigMaps of every digest but ``keep`` (all of them for None);
    returns what went. After an install, once the new pod is Ready (a pod of the old
    ReplicaSet still terminating keeps the files it mounted), and ``best_effort``, as
    leftovers are inert."""
    removed: list[str] = []
    try:
        listing = await api.list(
            _code_configmaps_path(namespace), label_selector=manifests.CODE_SELECTOR
        )
        for item in listing.get("items") or []:
            meta = item.get("metadata", {})
            if keep is not None and (meta.get("labels") or {}).get(manifests.CODE_LABEL) == keep:
                continue
            path = resource_path("v1", "configmaps", namespace=namespace, name=meta["name"])
            if await api.delete(path) is not None:
                removed.append(f"configmap/{meta['name']}")
    except KubeError as e:
        if not best_effort:
            raise
        log.info("leaving the manager's old code ConfigMaps in place: %s", e)
    return removed


async def _dry_run(api: KubeApi, objects: list[Obj]) -> None:
    """Applies everything with dryRun=All: authorization (RBAC escalation included),
    admission and validation run, nothing is stored. Objects of a namespace that does not
    exist yet answer NotFound after authorization passed; the real apply creates it first."""
    for obj in objects:
        try:
            await api.apply(obj, dry_run=True)
        except NotFound:
            if not obj["metadata"].get("namespace"):
                raise


async def _wait_ready(
    api: KubeApi,
    *,
    namespace: str,
    image: str,
    version: str,
    dial: tuple[str, str] | None = None,
    timeout: float,
) -> ManagerInfo:
    """Watches the manager's pods until one of the current template is Ready (with the
    dial policy ``dial`` when given, so a pod of the old policy is not taken)."""

    def current(pod: Obj) -> bool:
        return (
            _version_of(pod) == version
            and _image_of(pod) == image
            and (dial is None or _dial_env_of(pod) == dial)
        )

    def check(pods: dict[str, Obj]) -> Obj | None:
        mine = [p for p in pods.values() if current(p)]
        if (pod := newest_ready(mine)) is not None:
            return pod
        for pod in mine:
            if not pod["metadata"].get("deletionTimestamp") and (why := pull_failure(pod)):
                if why.startswith("CrashLoopBackOff"):
                    raise InstallError(
                        f"the Traffic Manager keeps crashing ({why}); see "
                        f"`kubectl -n {namespace} logs deploy/{manifests.NAME}`"
                    )
                raise InstallError(
                    f"the cluster cannot pull the Traffic Manager image {image} ({why}): "
                    "make sure the cluster can reach its registry, or pass "
                    "--manager-base-image with a Python image it can pull (a mirror of "
                    f"{manifests.DEFAULT_BASE_IMAGE}) or --manager-image with our own image"
                )
        return None

    try:
        async with asyncio.timeout(timeout):
            pod = await wait_until(
                api, _pods_path(namespace), check, label_selector=manifests.SELECTOR
            )
    except TimeoutError:
        raise InstallError(
            f"the Traffic Manager was not ready after {timeout:g}s; see "
            f"`kubectl -n {namespace} describe deploy/{manifests.NAME}` and its pods' events"
        ) from None
    return _info(pod)
