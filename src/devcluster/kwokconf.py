"""kwok's configuration: kwok's own node stages, and pod stages of ours.

kwok's default pod stages mark a pod Ready the moment it is bound. devcluster runs real
processes, so a pod's life is driven by an annotation that devcluster's pod agent sets:

  (bound, no IP)            -> devcluster-pod-ip:      IP from the node's podCIDR, Pending
  state=running             -> devcluster-pod-running: Running, not Ready
  state=ready               -> devcluster-pod-ready:   Running and Ready (the probe passed)
  state=image-pull-error    -> devcluster-pod-waiting: Pending, waiting on ErrImagePull
  deletionTimestamp         -> devcluster-pod-delete:  deleted
"""

from __future__ import annotations

from pathlib import Path

from devcluster.settings import Settings

STATE_ANNOTATION = "devcluster.local/state"
RESTARTS_ANNOTATION = "devcluster.local/restarts"
CRDS = ("portforwards", "logs", "execs")


def kwok_source(settings: Settings) -> Path:
    """kwok's module source, in the Go module cache the build filled."""
    return settings.paths.cache / "go" / "mod" / f"sigs.k8s.io/kwok@{settings.versions.kwok}"


def node_stage_files(settings: Settings) -> list[Path]:
    stage = kwok_source(settings) / "kustomize" / "stage" / "node"
    return [
        stage / "fast" / "node-initialize.yaml",
        stage / "heartbeat-with-lease" / "node-heartbeat-with-lease.yaml",
    ]


def crd_files(settings: Settings) -> list[Path]:
    bases = kwok_source(settings) / "kustomize" / "crd" / "bases"
    return [bases / f"kwok.x-k8s.io_{name}.yaml" for name in CRDS]


def _container_statuses(*, ready: str, state: str, restarts: bool = True) -> str:
    # Annotations exist in every state but the first, and `index` fails on a missing map.
    count = f'{{{{ or (index $.metadata.annotations "{RESTARTS_ANNOTATION}") "0" }}}}'
    return f"""
      containerStatuses:
      {{{{ range .spec.containers }}}}
      - image: {{{{ .image | Quote }}}}
        imageID: {{{{ .image | Quote }}}}
        name: {{{{ .name | Quote }}}}
        ready: {ready}
        started: {"true" if "running" in state else "false"}
        restartCount: {count if restarts else "0"}
        state:
{state}
      {{{{ end }}}}"""


def _stage(name: str, selector: str, template: str) -> str:
    return f"""apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: {name}
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
{selector}
  next:
    statusTemplate: |
      {{{{ $now := Now }}}}
{template}
"""


_NOT_DELETED = """    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'"""
_HAS_IP = """    - key: '.status.podIP'
      operator: 'Exists'"""


def _in_state(state: str) -> str:
    return f"""{_NOT_DELETED}
{_HAS_IP}
    - key: '.metadata.annotations["{STATE_ANNOTATION}"]'
      operator: 'In'
      values: ['{state}']"""


def _conditions(ready: str) -> str:
    return f"""      conditions:
      - {{type: PodScheduled, status: "True"}}
      - {{type: Initialized, status: "True", lastTransitionTime: {{{{ $now | Quote }}}}}}
      - {{type: ContainersReady, status: "{ready}", lastTransitionTime: {{{{ $now | Quote }}}}}}
      - {{type: Ready, status: "{ready}", lastTransitionTime: {{{{ $now | Quote }}}}}}"""


def pod_stages() -> str:
    ip_stage = _stage(
        "devcluster-pod-ip",
        f"""{_NOT_DELETED}
    - key: '.status.podIP'
      operator: 'DoesNotExist'
    - key: '.status.phase'
      operator: 'In'
      values: ['Pending']""",
        """      {{ $hostIPs := NodeIPsWith .spec.nodeName }}
      {{ with $hostIPs }}
      hostIP: {{ index . 0 | Quote }}
      hostIPs:
      {{ range . }}
      - ip: {{ . | Quote }}
      {{ end }}
      {{ end }}
      {{ $podIPs := PodIPsWith .spec.nodeName ( or .spec.hostNetwork false )
           ( or .metadata.uid "" ) ( or .metadata.name "" ) ( or .metadata.namespace "" ) }}
      {{ with $podIPs }}
      podIP: {{ index . 0 | Quote }}
      podIPs:
      {{ range . }}
      - ip: {{ . | Quote }}
      {{ end }}
      {{ end }}
      phase: Pending
      startTime: {{ $now | Quote }}
"""
        + _conditions("False")
        + _container_statuses(
            ready="false",
            state="""          waiting:
            reason: ContainerCreating""",
            restarts=False,
        ),
    )
    running = _stage(
        "devcluster-pod-running",
        _in_state("running"),
        "      phase: Running\n"
        + _conditions("False")
        + _container_statuses(
            ready="false",
            state="""          running:
            startedAt: {{ $now | Quote }}""",
        ),
    )
    ready = _stage(
        "devcluster-pod-ready",
        _in_state("ready"),
        "      phase: Running\n"
        + _conditions("True")
        + _container_statuses(
            ready="true",
            state="""          running:
            startedAt: {{ $now | Quote }}""",
        ),
    )
    waiting = _stage(
        "devcluster-pod-waiting",
        _in_state("image-pull-error"),
        "      phase: Pending\n"
        + _conditions("False")
        + _container_statuses(
            ready="false",
            state="""          waiting:
            reason: ErrImagePull
            message: devcluster has no command for this image reference""",
        ),
    )
    delete = """apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: devcluster-pod-delete
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'Exists'
  next:
    delete: true
"""
    return "---\n".join([ip_stage, running, ready, waiting, delete])


def kwok_argv(settings: Settings, *, config: Path, cert: Path, key: Path) -> list[str]:
    a = settings.addresses
    configs = [config, *node_stage_files(settings)]
    return [
        str(settings.binary("kwok")),
        f"--kubeconfig={settings.paths.admin_kubeconfig}",
        *(f"--config={c}" for c in configs),
        "--manage-all-nodes=true",
        f"--server-address={a.node_ip}:{a.kubelet_port}",
        f"--node-ip={a.node_ip}",
        f"--node-port={a.kubelet_port}",
        f"--cidr={a.node_pod_cidr}",
        f"--tls-cert-file={cert}",
        f"--tls-private-key-file={key}",
        "--enable-crds=PortForward,Logs,Exec",
        "--node-lease-duration-seconds=40",
    ]
