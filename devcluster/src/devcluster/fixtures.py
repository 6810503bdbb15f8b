"""Manifests of the workloads that tests, benchmarks and the tutorial deploy."""

from __future__ import annotations

import yaml

from devcluster.images import HTTP_IMAGE, SAMPLE_APP_IMAGE


def deployment(
    *,
    name: str,
    namespace: str,
    image: str,
    port: int,
    replicas: int = 1,
    args: list[str] | None = None,
    protocol: str = "TCP",
    run_as_user: int | None = None,
) -> list[dict[str, object]]:
    """A Deployment and a ClusterIP Service of the same name, as most tutorials write them."""
    labels = {"app": name}
    container: dict[str, object] = {
        "name": name,
        "image": image,
        "ports": [{"containerPort": port, "protocol": protocol}],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
    }
    if args:
        container["args"] = args
    # As a real deployment would: Ready only once the server accepts connections (the UDP
    # echo image listens on TCP too, for this), so a rollout means "answering".
    container["readinessProbe"] = {"tcpSocket": {"port": port}, "periodSeconds": 1}
    pod_spec: dict[str, object] = {"containers": [container]}
    if run_as_user is not None:
        pod_spec["securityContext"] = {"runAsUser": run_as_user, "runAsNonRoot": True}
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": pod_spec},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "selector": labels,
                "ports": [{"name": "main", "port": port, "targetPort": port, "protocol": protocol}],
            },
        },
    ]


def to_yaml(objects: list[dict[str, object]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


def sample_app_manifest() -> str:
    """The tutorial's sample web app: verylargejavaservice in default, port 8080."""
    return to_yaml(
        deployment(
            name="verylargejavaservice", namespace="default", image=SAMPLE_APP_IMAGE, port=8080
        )
    )


def http_app_manifest(*, name: str, namespace: str, replicas: int = 1, port: int = 8080) -> str:
    return to_yaml(
        deployment(
            name=name,
            namespace=namespace,
            image=HTTP_IMAGE,
            port=port,
            replicas=replicas,
            args=["--port", str(port)],
        )
    )
