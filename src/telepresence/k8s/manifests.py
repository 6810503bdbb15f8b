"""The traffic manager's Kubernetes objects, as plain dicts; pure, no I/O.

`telepresence connect` server-side applies these; `telepresence manifests` prints the
same objects as YAML for clusters where users may not create cluster-wide RBAC and an
admin (or GitOps) installs the manager instead.

Least privilege: the manager only reads (nodes, namespaces, services, pods, ServiceCIDRs)
cluster-wide. Its one write is `create` on Services in its own namespace, which it uses
only as a dry-run probe for the service range on clusters older than 1.33 (RBAC cannot
restrict a verb to dry runs). Pods read: the pod subnet fallback covers observed pod IPs
when nodes have no podCIDRs. The pod passes the "restricted" Pod Security level, which
the namespace enforces, so a later edit that weakens it is rejected at admission.

The plain tunnel listens on the pod's loopback and is reached only through
`pods/portforward`, so who may use the manager is who may port-forward to its pod. The pod
network sees the health port, which answers `GET /readyz` and nothing else, and the direct
transport's port, which a NodePort Service exposes and which completes a TLS handshake only
for credentials a session registered over port-forward (`manager/directlisten.py`).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import yaml

from telepresence import __version__
from telepresence.k8s.managercode import PURE_PYTHON_ENV, CodeBundle
from telepresence.manager import config
from telepresence.manager.dialpolicy import format_networks
from telepresence.versions import ProtocolRange, protocol_range

Obj = dict[str, Any]

DEFAULT_NAMESPACE = "ambassador"
NAME = "traffic-manager"
APP_LABEL = {"app": NAME}
SELECTOR = "app=traffic-manager"
#: The manager's version: on the Deployment and its pod template. An annotation, because
#: a version such as ``1.0.0+dev`` is not a valid label value.
VERSION_ANNOTATION = "telepresence-py/version"
#: The tunnel protocol versions the manager speaks ("1" or "1-2"): a client decides from
#: the Deployment alone whether it can talk to the manager, before any port-forward.
PROTOCOL_ANNOTATION = "telepresence-py/protocol"
#: On the namespace, when `connect` created it: `telepresence manager uninstall` deletes
#: only a namespace that carries it, never one an admin made.
CREATED_NAMESPACE_ANNOTATION = "telepresence-py/created-namespace"
TUNNEL_PORT = config.TUNNEL_PORT
DIRECT_PORT = config.DIRECT_PORT
DIRECT_SERVICE = config.DIRECT_SERVICE
HEALTH_PORT = config.HEALTH_PORT
#: The uid the image's USER is; "restricted" needs non-root, and a numeric uid lets the
#: kubelet verify runAsNonRoot without reading the image.
RUN_AS_USER = 1000
#: The pod's grace period: the manager's drain (config.DRAIN_SECONDS) and a margin, before
#: the kubelet's SIGKILL.
TERMINATION_GRACE_SECONDS = 60
#: The image of our own (deploy/manager-image.toml), for those who build and load it.
IMAGE_REPOSITORY = "ghcr.io/telepresence-py/traffic-manager"
#: The default: an official Python image any cluster can pull, with the manager's code
#: delivered in ConfigMaps (`k8s/managercode.py`). Fully qualified, as CRI-O refuses
#: short names. Air-gapped users mirror it and set ``manager.baseImage``.
DEFAULT_BASE_IMAGE = "docker.io/library/python:3.11-slim"
#: On the pod template: the digest of the code it mounts, so the user sees which code a
#: pod runs (the ConfigMaps' names carry it too, which is what rolls the pod).
CODE_ANNOTATION = "telepresence-py/code"
#: Labels the code ConfigMaps: the installer deletes those of other digests once a
#: rollout is done, and uninstall deletes them all.
CODE_LABEL = "telepresence-py/manager-code"
CODE_SELECTOR = f"{CODE_LABEL}"
#: Where the code ConfigMaps are mounted in the pod.
CODE_DIR = "/opt/telepresence-code"

_MANAGED = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/managed-by": "telepresence"}


def default_image(version: str = __version__) -> str:
    """The reference of our own image for ``version`` (built by deploy/'s recipe)."""
    return f"{IMAGE_REPOSITORY}:{version}"


def code_configmap_name(bundle: CodeBundle, index: int) -> str:
    return f"{NAME}-code-{bundle.short_digest}-{index}"


def code_configmaps(namespace: str, bundle: CodeBundle) -> list[Obj]:
    """One immutable ConfigMap per archive, named by the code's digest: a pod keeps the
    code it started with through a rollout (an edited ConfigMap would change under a
    running manager), and the kubelet need not watch immutable ones."""
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(
                code_configmap_name(bundle, i),
                namespace,
                labels={CODE_LABEL: bundle.short_digest},
            ),
            "immutable": True,
            "binaryData": {f"{i}.zip": base64.b64encode(archive).decode()},
        }
        for i, archive in enumerate(bundle.archives)
    ]


def _code_delivery(bundle: CodeBundle) -> Obj:
    """What the container needs to run the code of ``bundle`` on a stock Python image:
    the command, the environment and the mounted archives."""
    path = ":".join(f"{CODE_DIR}/{i}.zip" for i in range(len(bundle.archives)))
    return {
        "command": ["python3", "-m", "telepresence.manager"],
        "env": [
            {"name": "PYTHONPATH", "value": path},
            # Nothing may be written (read-only root), and nothing of the image's user
            # site or bytecode caches may shadow the mounted code.
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
            {"name": "PYTHONNOUSERSITE", "value": "1"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            *({"name": k, "value": v} for k, v in sorted(PURE_PYTHON_ENV.items())),
        ],
        "volumeMounts": [{"name": "code", "mountPath": CODE_DIR, "readOnly": True}],
        "volume": {
            "name": "code",
            "projected": {
                "sources": [
                    {"configMap": {"name": code_configmap_name(bundle, i)}}
                    for i in range(len(bundle.archives))
                ],
            },
        },
    }


def cluster_role_name(namespace: str) -> str:
    """Cluster-scoped names carry the namespace, so two managers in two namespaces do not
    share (and fight over) one ClusterRole."""
    return f"{NAME}-{namespace}"


def _meta(
    name: str,
    namespace: str | None = None,
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> Obj:
    meta: Obj = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = {**_MANAGED, **(labels or {})}
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def namespace_object(namespace: str, *, owned: bool = False) -> Obj:
    """``owned``: this installer created the namespace (or created it before), so
    uninstall may delete it. Every apply must say so again, or server-side apply would
    drop the annotation it set earlier."""
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": _meta(
            namespace,
            labels={
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            },
            annotations={CREATED_NAMESPACE_ANNOTATION: "true"} if owned else None,
        ),
    }


def service_account(namespace: str) -> Obj:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(NAME, namespace)}


READ = ["get", "list", "watch"]


def cluster_role(namespace: str) -> Obj:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": _meta(cluster_role_name(namespace)),
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["nodes", "namespaces", "services", "pods"],
                "verbs": list(READ),
            },
            {
                "apiGroups": ["networking.k8s.io"],
                "resources": ["servicecidrs"],
                "verbs": list(READ),
            },
        ],
    }


def cluster_role_binding(namespace: str) -> Obj:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": _meta(cluster_role_name(namespace)),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": cluster_role_name(namespace),
        },
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": namespace}],
    }


def role(namespace: str) -> Obj:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(NAME, namespace),
        "rules": [
            # Only for the dry-run ClusterIP probe (service range on clusters before 1.33).
            {"apiGroups": [""], "resources": ["services"], "verbs": ["create"]},
        ],
    }


def role_binding(namespace: str) -> Obj:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(NAME, namespace),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": namespace}],
    }


#: The manager dials every laptop flow itself, and when the laptop's program closes first
#: the manager's socket is the one left in TIME_WAIT for a minute. With the kernel's
#: default range (32768-60999) that caps new connections to any one pod port near 470 a
#: second; a pod's own range is a "safe" sysctl that every cluster allows (Pod Security
#: "restricted" included), and widening it more than doubles that. The listening ports
#: inside it are skipped by the kernel when it picks a source port.
LOCAL_PORT_RANGE = "1024 65535"


def _restricted_security_context() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _health_probe(*, period: int, failures: int) -> Obj:
    return {
        "httpGet": {"path": config.READY_PATH, "port": "health"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def manager_env(
    *,
    dial_allow: Sequence[str] = (),
    dial_deny: Sequence[str] = (),
    extra: dict[str, str] | None = None,
) -> list[Obj]:
    """The manager container's environment. The dial lists are always present, empty by
    default, so an admin reading the YAML sees where to change them. ``extra``: the
    test-only version overrides of a faked client, so the manager it installs is faked
    the same way (see `telepresence.versions`)."""
    return [
        _field_env("POD_NAME", "metadata.name"),
        _field_env("POD_NAMESPACE", "metadata.namespace"),
        {"name": config.DIAL_ALLOW_ENV, "value": format_networks(dial_allow)},
        {"name": config.DIAL_DENY_ENV, "value": format_networks(dial_deny)},
        {"name": "DIRECT_PORT", "value": str(DIRECT_PORT)},
        *({"name": k, "value": v} for k, v in sorted((extra or {}).items())),
    ]


def deployment(
    namespace: str,
    *,
    image: str,
    version: str,
    protocol: ProtocolRange | None = None,
    dial_allow: Sequence[str] = (),
    dial_deny: Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
    code: CodeBundle | None = None,
) -> Obj:
    """``code``: run that code on ``image``, a stock Python image; None: ``image`` is
    one of our own, with the code in it."""
    annotations = {
        VERSION_ANNOTATION: version,
        PROTOCOL_ANNOTATION: str(protocol or protocol_range()),
    }
    container: Obj = {
        "name": NAME,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        # Not the tunnel port: it listens on the pod's loopback, for port-forwards.
        "ports": [
            {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
            {"name": "direct", "containerPort": DIRECT_PORT, "protocol": "TCP"},
        ],
        "env": manager_env(dial_allow=dial_allow, dial_deny=dial_deny, extra=extra_env),
        "securityContext": _restricted_security_context(),
        # Ready once the tunnel listens; `connect` waits for it.
        "readinessProbe": _health_probe(period=2, failures=3),
        # Restarted only after a minute without an answer (a wedged event loop), never
        # for one slow moment.
        "livenessProbe": _health_probe(period=10, failures=6),
        "resources": config.resources(),
    }
    pod_annotations = dict(annotations)
    volumes: list[Obj] = []
    if code is not None:
        delivery = _code_delivery(code)
        container["command"] = delivery["command"]
        container["env"] = [*container["env"], *delivery["env"]]
        container["volumeMounts"] = delivery["volumeMounts"]
        volumes.append(delivery["volume"])
        pod_annotations[CODE_ANNOTATION] = f"sha256:{code.digest}"
    container["env"] = [
        *container["env"],
        {"name": "TELEPRESENCE_DRAIN_SECONDS", "value": f"{config.DRAIN_SECONDS:g}"},
    ]
    pod_spec: Obj = {
        "serviceAccountName": NAME,
        # SIGTERM starts the manager's drain (laptops move their new flows to the
        # replacement; open ones finish here) for up to config.DRAIN_SECONDS.
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
            "sysctls": [{"name": "net.ipv4.ip_local_port_range", "value": LOCAL_PORT_RANGE}],
        },
        "containers": [container],
    }
    if volumes:
        pod_spec["volumes"] = volumes
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(NAME, namespace, labels=APP_LABEL, annotations=annotations),
        "spec": {
            "replicas": 1,
            # A rollout starts the new pod and waits for it to be Ready before it stops
            # the old one, so laptops always have a ready manager to move to.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "selector": {"matchLabels": dict(APP_LABEL)},
            "template": {
                "metadata": {"labels": {**_MANAGED, **APP_LABEL}, "annotations": pod_annotations},
                "spec": pod_spec,
            },
        },
    }


def direct_service(namespace: str) -> Obj:
    """The direct transport's way in from outside the cluster: a NodePort on every node.
    ``Local`` keeps a connection on the node it arrives at, so a laptop that dials the
    node of its session's pod reaches that pod, and no node forwards to another."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(DIRECT_SERVICE, namespace),
        "spec": {
            "type": "NodePort",
            "externalTrafficPolicy": "Local",
            "selector": dict(APP_LABEL),
            "ports": [
                {"name": "direct", "port": DIRECT_PORT, "targetPort": "direct", "protocol": "TCP"}
            ],
        },
    }


def _field_env(name: str, path: str) -> Obj:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def manager_objects(
    *,
    namespace: str = DEFAULT_NAMESPACE,
    image: str,
    code: CodeBundle | None,
    version: str = __version__,
    protocol: ProtocolRange | None = None,
    dial_allow: Sequence[str] = (),
    dial_deny: Sequence[str] = (),
    owns_namespace: bool = False,
    extra_env: dict[str, str] | None = None,
) -> list[Obj]:
    """Every object, in the order to apply them: the namespace, RBAC and code before the
    pod that needs them. ``code`` runs on ``image``, a stock Python image; without it,
    ``image`` is one of our own. ``version`` may be faked by a test, the code it runs not."""
    return [
        namespace_object(namespace, owned=owns_namespace),
        service_account(namespace),
        cluster_role(namespace),
        cluster_role_binding(namespace),
        role(namespace),
        role_binding(namespace),
        *(code_configmaps(namespace, code) if code is not None else ()),
        direct_service(namespace),
        deployment(
            namespace,
            image=image,
            code=code,
            version=version,
            protocol=protocol,
            dial_allow=dial_allow,
            dial_deny=dial_deny,
            extra_env=extra_env,
        ),
    ]


def _ref(api_version: str, kind: str, name: str, namespace: str | None = None) -> Obj:
    meta: Obj = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    return {"apiVersion": api_version, "kind": kind, "metadata": meta}


def uninstall_objects(namespace: str, *, delete_namespace: bool) -> list[Obj]:
    """What `telepresence manager uninstall` deletes, in order, as references (apiVersion,
    kind, name, namespace). The Deployment goes first, so the manager stops before its
    permissions do; then the Service earlier versions installed and the direct
    transport's; the bindings before the roles they grant; the cluster-scoped objects by
    their namespaced names, so another namespace's manager keeps its own; the namespace
    last, and only when the installer created it (deleting it would take everything else
    in it too)."""
    rbac = "rbac.authorization.k8s.io/v1"
    cluster_name = cluster_role_name(namespace)
    refs = [
        _ref("apps/v1", "Deployment", NAME, namespace),
        _ref("v1", "Service", NAME, namespace),
        _ref("v1", "Service", DIRECT_SERVICE, namespace),
        _ref(rbac, "RoleBinding", NAME, namespace),
        _ref(rbac, "Role", NAME, namespace),
        _ref("v1", "ServiceAccount", NAME, namespace),
        _ref(rbac, "ClusterRoleBinding", cluster_name),
        _ref(rbac, "ClusterRole", cluster_name),
    ]
    if delete_namespace:
        refs.append(_ref("v1", "Namespace", namespace))
    return refs


def to_yaml(objects: list[Obj]) -> str:
    """A multi-document YAML stream, as `kubectl apply --server-side -f -` takes it (the
    code ConfigMaps are too large for the annotation client-side apply would add)."""
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False)


def manifests_yaml(
    *,
    namespace: str = DEFAULT_NAMESPACE,
    image: str,
    code: CodeBundle | None,
    version: str = __version__,
    dial_allow: Sequence[str] = (),
    dial_deny: Sequence[str] = (),
) -> str:
    return to_yaml(
        manager_objects(
            namespace=namespace,
            image=image,
            code=code,
            version=version,
            dial_allow=dial_allow,
            dial_deny=dial_deny,
        )
    )
