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

No Service: the tunnel listens on the pod's loopback and is reached only through
`pods/portforward`, so who may use the manager is who may port-forward to its pod. The
pod network sees only the health port, which answers `GET /readyz` and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from telepresence import __version__
from telepresence.manager import config
from telepresence.manager.dialpolicy import format_networks

Obj = dict[str, Any]

DEFAULT_NAMESPACE = "ambassador"
NAME = "traffic-manager"
APP_LABEL = {"app": NAME}
SELECTOR = "app=traffic-manager"
#: The manager's version: on the Deployment and its pod template. An annotation, because
#: a version such as ``1.0.0+dev`` is not a valid label value.
VERSION_ANNOTATION = "telepresence-py/version"
TUNNEL_PORT = config.TUNNEL_PORT
HEALTH_PORT = config.HEALTH_PORT
#: The uid the image's USER is; "restricted" needs non-root, and a numeric uid lets the
#: kubelet verify runAsNonRoot without reading the image.
RUN_AS_USER = 1000
IMAGE_REPOSITORY = "ghcr.io/telepresence-py/traffic-manager"

_MANAGED = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/managed-by": "telepresence"}


def default_image(version: str = __version__) -> str:
    return f"{IMAGE_REPOSITORY}:{version}"


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


def namespace_object(namespace: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": _meta(
            namespace,
            labels={
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            },
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


def manager_env(*, dial_allow: Sequence[str] = (), dial_deny: Sequence[str] = ()) -> list[Obj]:
    """The manager container's environment. The dial lists are always present, empty by
    default, so an admin reading the YAML sees where to change them."""
    return [
        _field_env("POD_NAME", "metadata.name"),
        _field_env("POD_NAMESPACE", "metadata.namespace"),
        {"name": config.DIAL_ALLOW_ENV, "value": format_networks(dial_allow)},
        {"name": config.DIAL_DENY_ENV, "value": format_networks(dial_deny)},
    ]


def deployment(
    namespace: str,
    *,
    image: str,
    version: str,
    dial_allow: Sequence[str] = (),
    dial_deny: Sequence[str] = (),
) -> Obj:
    annotations = {VERSION_ANNOTATION: version}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(NAME, namespace, labels=APP_LABEL, annotations=annotations),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": dict(APP_LABEL)},
            "template": {
                "metadata": {"labels": {**_MANAGED, **APP_LABEL}, "annotations": dict(annotations)},
                "spec": {
                    "serviceAccountName": NAME,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUN_AS_USER,
                        "runAsGroup": RUN_AS_USER,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": NAME,
                            "image": image,
                            # Only the health port: the tunnel port listens on the pod's
                            # loopback, for port-forwards, and is not the pod network's.
                            "ports": [
                                {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
                            ],
                            "env": manager_env(dial_allow=dial_allow, dial_deny=dial_deny),
                            "securityContext": _restricted_security_context(),
                            # Ready once the tunnel listens; `connect` waits for it.
                            "readinessProbe": _health_probe(period=2, failures=3),
                            # Restarted only after a minute without an answer (a wedged
                            # event loop), never for one slow moment.
                            "livenessProbe": _health_probe(period=10, failures=6),
                            "resources": config.resources(),
                        }
                    ],
                },
            },
        },
    }


def _field_env(name: str, path: str) -> Obj:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def manager_objects(
    *,
    namespace: str = DEFAULT_NAMESPACE,
    image: str | None = None,
    version: str = __version__,
    dial_allow: Sequence[str] = (),
    dial_deny: Sequence[str] = (),
) -> list[Obj]:
    """Every object, in the order to apply them: the namespace and RBAC before the pod
    that needs them."""
    return [
        namespace_object(namespace),
        service_account(namespace),
        cluster_role(namespace),
        cluster_role_binding(namespace),
        role(namespace),
        role_binding(namespace),
        deployment(
            namespace,
            image=image or default_image(version),
            version=version,
            dial_allow=dial_allow,
            dial_deny=dial_deny,
        ),
    ]


def to_yaml(objects: list[Obj]) -> str:
    """A multi-document YAML stream, as `kubectl apply -f -` takes it."""
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False)


def manifests_yaml(
    *,
    namespace: str = DEFAULT_NAMESPACE,
    image: str | None = None,
    version: str = __version__,
    dial_allow: Sequence[str] = (),
    dial_deny: Sequence[str] = (),
) -> str:
    return to_yaml(
        manager_objects(
            namespace=namespace,
            image=image,
            version=version,
            dial_allow=dial_allow,
            dial_deny=dial_deny,
        )
    )
