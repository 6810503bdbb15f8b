"""The traffic manager's objects: restricted pod security, least-privilege RBAC, a version
that an installer can compare, and YAML that kubectl takes as is."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import yaml

from telepresence import __version__, versions
from telepresence.k8s import managercode, manifests
from telepresence.k8s.api import object_path
from telepresence.manager import config
from telepresence.manager.dialpolicy import DialPolicy
from telepresence.tunnel.endpoint import RECEIVE_BUDGET, STREAM_INITIAL_WINDOW
from telepresence.versions import ProtocolRange

Obj = dict[str, Any]

#: 2000 bytes deflate cannot shrink.
NOISE = b"".join(hashlib.sha256(bytes([i])).digest() for i in range(63))[:2000]
#: A small stand-in for the code `connect` packs (tests/unit/test_managercode.py packs the
#: real one): two archives, so ordering and naming show.
CODE = managercode.pack(
    [
        managercode.SourceFile("telepresence/__init__.py", b'__version__ = "0"\n'),
        managercode.SourceFile("yarl/__init__.py", NOISE),
    ],
    limit=2300,
)
OWN_IMAGE = manifests.default_image()


def objects(**overrides: Any) -> list[Obj]:
    """The default install: the stock base image with the code in ConfigMaps."""
    kwargs: dict[str, Any] = {"image": manifests.DEFAULT_BASE_IMAGE, "code": CODE}
    return manifests.manager_objects(**{**kwargs, **overrides})


OBJECTS = objects()
OWN_IMAGE_OBJECTS = objects(image=OWN_IMAGE, code=None)


def by_kind(kind: str, objects: list[Obj] = OBJECTS) -> Obj:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def pod_spec(objects: list[Obj] = OBJECTS) -> Obj:
    spec: Obj = by_kind("Deployment", objects)["spec"]["template"]["spec"]
    return spec


def test_every_object_lands_in_the_manager_namespace_or_is_cluster_scoped() -> None:
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for obj in OBJECTS:
        namespace = obj["metadata"].get("namespace")
        assert (namespace is None) == (obj["kind"] in cluster_scoped), obj["kind"]
        assert namespace in (None, "ambassador")


def test_the_namespace_enforces_the_restricted_level() -> None:
    labels = by_kind("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_namespace_comes_first_and_the_deployment_last() -> None:
    kinds = [o["kind"] for o in OBJECTS]
    assert kinds[0] == "Namespace"
    assert kinds[-1] == "Deployment"
    assert kinds.index("ServiceAccount") < kinds.index("Deployment")


# --- the "restricted" Pod Security Standard, checked statically ---------------------------
# https://kubernetes.io/docs/concepts/security/pod-security-standards/ (restricted profile)

ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


#: The sysctls the baseline level (and so restricted) allows: Kubernetes' oldest safe set.
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
}


def restricted_violations(spec: Obj) -> list[str]:
    """What the restricted level forbids, as the admission plugin checks it."""
    problems = []
    pod_ctx = spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(key)
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            problems.append(f"volume {volume['name']}: {kinds}")
    for sysctl in pod_ctx.get("sysctls") or []:
        if sysctl["name"] not in SAFE_SYSCTLS:
            problems.append(f"sysctl {sysctl['name']}")
    if pod_ctx.get("runAsUser") == 0:
        problems.append("pod runAsUser 0")
    containers = [*(spec.get("initContainers") or []), *spec["containers"]]
    for c in containers:
        ctx = c.get("securityContext") or {}
        name = c["name"]
        if ctx.get("privileged"):
            problems.append(f"{name}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = ctx.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{name}: must drop ALL capabilities")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities")
        if not ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile")
        if ctx.get("procMount", "Default") != "Default":
            problems.append(f"{name}: procMount")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"{name}: hostPort")
        selinux = ctx.get("seLinuxOptions") or pod_ctx.get("seLinuxOptions") or {}
        if selinux.get("type", "container_t") not in ("container_t", "container_init_t"):
            problems.append(f"{name}: SELinux type")
    return problems


@pytest.mark.parametrize("objs", [OBJECTS, OWN_IMAGE_OBJECTS], ids=["base-image", "own-image"])
def test_the_manager_pod_passes_the_restricted_level(objs: list[Obj]) -> None:
    assert restricted_violations(pod_spec(objs)) == []


@pytest.mark.parametrize(
    ("container_change", "expected"),
    [
        ({"allowPrivilegeEscalation": True}, "allowPrivilegeEscalation"),
        ({"capabilities": {"drop": []}}, "drop ALL"),
        ({"runAsUser": 0}, "runAsUser 0"),
        ({"privileged": True}, "privileged"),
        ({"seccompProfile": {"type": "Unconfined"}}, "seccompProfile"),
    ],
)
def test_the_static_check_catches_what_restricted_rejects(
    container_change: Obj, expected: str
) -> None:
    spec = pod_spec(objects())
    spec["containers"][0]["securityContext"].update(container_change)
    if "seccompProfile" in container_change:
        spec["securityContext"].pop("seccompProfile")
    assert any(expected in p for p in restricted_violations(spec))


def test_the_manager_runs_as_the_images_numeric_non_root_user() -> None:
    ctx = pod_spec()["containers"][0]["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] == manifests.RUN_AS_USER != 0


# --- RBAC ------------------------------------------------------------------------------------

READ_VERBS = {"get", "list", "watch"}


def rules() -> list[tuple[str, Obj]]:
    return [
        (o["kind"], r) for o in OBJECTS if o["kind"] in ("ClusterRole", "Role") for r in o["rules"]
    ]


def test_rbac_has_no_wildcards() -> None:
    for _, rule in rules():
        for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            assert "*" not in (rule.get(key) or []), rule
            assert not any("*" in v for v in rule.get(key) or []), rule


def test_cluster_wide_access_is_read_only() -> None:
    cluster_rules = [r for kind, r in rules() if kind == "ClusterRole"]
    assert cluster_rules
    for rule in cluster_rules:
        assert set(rule["verbs"]) <= READ_VERBS, rule


def test_the_only_write_is_creating_services_in_the_manager_namespace() -> None:
    writes = [(kind, r) for kind, r in rules() if set(r["verbs"]) - READ_VERBS]
    assert len(writes) == 1
    kind, rule = writes[0]
    assert kind == "Role"
    assert by_kind("Role")["metadata"]["namespace"] == "ambassador"
    assert rule == {"apiGroups": [""], "resources": ["services"], "verbs": ["create"]}


def test_discovery_can_read_what_it_reads() -> None:
    granted = {
        (group, resource)
        for kind, r in rules()
        if kind == "ClusterRole" and set(r["verbs"]) >= READ_VERBS
        for group in r["apiGroups"]
        for resource in r["resources"]
    }
    for needed in [
        ("", "nodes"),
        ("", "services"),
        ("", "pods"),
        ("", "namespaces"),
        ("networking.k8s.io", "servicecidrs"),
    ]:
        assert needed in granted


def test_bindings_grant_the_roles_to_the_managers_service_account() -> None:
    sa = by_kind("ServiceAccount")["metadata"]
    for binding_kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = by_kind(binding_kind)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": role_kind,
            "name": by_kind(role_kind)["metadata"]["name"],
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}
        ]
    assert pod_spec()["serviceAccountName"] == sa["name"]


def test_cluster_scoped_names_carry_the_namespace() -> None:
    other = objects(namespace="tp-other")
    assert by_kind("ClusterRole", other)["metadata"]["name"] == "traffic-manager-tp-other"
    assert by_kind("ClusterRole")["metadata"]["name"] == "traffic-manager-ambassador"


# --- the deployment ---------------------------------------------------------------


def test_the_default_runs_the_delivered_code_on_the_stock_python_image() -> None:
    container = pod_spec()["containers"][0]
    assert container["image"] == "docker.io/library/python:3.11-slim"
    assert container["command"] == ["python3", "-m", "telepresence.manager"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    # The archives in order, from the read-only mount; nothing else of the image's.
    assert env["PYTHONPATH"] == "/opt/telepresence-code/0.zip:/opt/telepresence-code/1.zip"
    assert env["PYTHONDONTWRITEBYTECODE"] == env["PYTHONNOUSERSITE"] == "1"
    assert all(env[k] == "1" for k in managercode.PURE_PYTHON_ENV)
    assert container["volumeMounts"] == [
        {"name": "code", "mountPath": "/opt/telepresence-code", "readOnly": True}
    ]
    (volume,) = pod_spec()["volumes"]
    names = [s["configMap"]["name"] for s in volume["projected"]["sources"]]
    assert names == [o["metadata"]["name"] for o in OBJECTS if o["kind"] == "ConfigMap"]


def test_the_code_configmaps_are_immutable_named_by_digest_and_hold_the_archives() -> None:
    import base64

    maps = [o for o in OBJECTS if o["kind"] == "ConfigMap"]
    assert len(maps) == len(CODE.archives) == 2
    for i, cm in enumerate(maps):
        assert cm["immutable"] is True
        assert cm["metadata"]["name"] == f"traffic-manager-code-{CODE.short_digest}-{i}"
        assert cm["metadata"]["labels"][manifests.CODE_LABEL] == CODE.short_digest
        assert base64.b64decode(cm["binaryData"][f"{i}.zip"]) == CODE.archives[i]
    template = by_kind("Deployment")["spec"]["template"]["metadata"]
    assert template["annotations"][manifests.CODE_ANNOTATION] == f"sha256:{CODE.digest}"


def test_other_code_rolls_the_pod() -> None:
    other = managercode.pack([managercode.SourceFile("telepresence/__init__.py", b"")])
    old, new = pod_spec(), pod_spec(objects(code=other))
    assert old != new and old["volumes"] != new["volumes"]


def test_our_own_image_carries_its_code() -> None:
    container = pod_spec(OWN_IMAGE_OBJECTS)["containers"][0]
    assert container["image"] == f"ghcr.io/telepresence-py/traffic-manager:{__version__}"
    assert "args" not in container and "command" not in container
    assert "volumes" not in pod_spec(OWN_IMAGE_OBJECTS)
    assert not [o for o in OWN_IMAGE_OBJECTS if o["kind"] == "ConfigMap"]
    env = {e["name"] for e in container["env"]}
    assert "PYTHONPATH" not in env


def test_the_image_and_version_are_parameters() -> None:
    objs = objects(image="registry.example/tm:dev", code=None, version="9.9.9")
    deployment = by_kind("Deployment", objs)
    assert pod_spec(objs)["containers"][0]["image"] == "registry.example/tm:dev"
    annotation = manifests.VERSION_ANNOTATION
    assert deployment["metadata"]["annotations"][annotation] == "9.9.9"
    assert deployment["spec"]["template"]["metadata"]["annotations"][annotation] == "9.9.9"


def test_the_version_travels_on_the_deployment_and_its_pods() -> None:
    deployment = by_kind("Deployment")
    assert deployment["metadata"]["annotations"]["telepresence-py/version"] == __version__
    template = deployment["spec"]["template"]["metadata"]
    assert template["annotations"]["telepresence-py/version"] == __version__
    assert template["labels"]["app"] == "traffic-manager"
    assert deployment["spec"]["replicas"] == 1


def test_the_plain_tunnel_port_is_not_declared() -> None:
    # The tunnel listens on the pod's loopback for port-forwards; the pod network gets the
    # health port and the direct transport's TLS port, and the manager is told the latter.
    container = pod_spec()["containers"][0]
    ports = {p["name"]: (p["containerPort"], p["protocol"]) for p in container["ports"]}
    assert ports == {"health": (8082, "TCP"), "direct": (8083, "TCP")}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DIRECT_PORT"] == "8083"


def test_the_only_service_is_the_direct_transports_nodeport() -> None:
    services = [o for o in OBJECTS if o["kind"] == "Service"]
    assert [s["metadata"]["name"] for s in services] == ["traffic-manager-direct"]
    spec = services[0]["spec"]
    assert spec["type"] == "NodePort"
    # A laptop dials the node of its session's pod: no node may forward elsewhere.
    assert spec["externalTrafficPolicy"] == "Local"
    assert spec["ports"] == [
        {"name": "direct", "port": 8083, "targetPort": "direct", "protocol": "TCP"}
    ]
    assert spec["selector"] == {"app": "traffic-manager"}


def test_env_carries_the_pod_identity_and_empty_dial_lists_by_default() -> None:
    env = {e["name"]: e for e in pod_spec()["containers"][0]["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["TELEPRESENCE_DIAL_ALLOW"] == {"name": "TELEPRESENCE_DIAL_ALLOW", "value": ""}
    assert env["TELEPRESENCE_DIAL_DENY"] == {"name": "TELEPRESENCE_DIAL_DENY", "value": ""}


def test_dial_lists_are_parameters_and_the_manager_parses_them_back() -> None:
    objs = objects(dial_allow=["169.254.169.254/32"], dial_deny=["10.0.5.0/24", "10.0.6.0/24"])
    env = {e["name"]: e.get("value") for e in pod_spec(objs)["containers"][0]["env"]}
    assert env["TELEPRESENCE_DIAL_ALLOW"] == "169.254.169.254/32"
    assert env["TELEPRESENCE_DIAL_DENY"] == "10.0.5.0/24,10.0.6.0/24"
    policy = DialPolicy.from_env({k: v for k, v in env.items() if v is not None})
    assert policy.check("169.254.169.254").allowed
    assert not policy.check("10.0.6.1").allowed


def test_probes_ask_the_health_listener() -> None:
    container = pod_spec()["containers"][0]
    ready = container["readinessProbe"]
    live = container["livenessProbe"]
    for probe in (ready, live):
        assert probe["httpGet"] == {"path": "/readyz", "port": "health"}
        assert "tcpSocket" not in probe
    # Readiness is quick (connect waits on it); liveness restarts only after a minute.
    assert ready["periodSeconds"] * ready["failureThreshold"] <= 10
    assert live["periodSeconds"] * live["failureThreshold"] >= 60


def test_resources_request_little_and_limit_memory_only() -> None:
    resources = pod_spec()["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "50m", "memory": "64Mi"}
    assert resources["limits"] == {"memory": "384Mi"}  # no cpu limit: throttling is latency


def test_the_memory_limit_covers_the_planned_worst_case() -> None:
    limit = config.MEMORY_LIMIT_MIB * config.MIB
    worst = (
        config.BASELINE
        + config.PLANNED_SATURATED_LINKS * config.LINK_WORST_CASE
        + config.PLANNED_STALLED_STREAMS * config.STREAM_WORST_CASE
    )
    assert worst <= limit < worst + 128 * config.MIB
    assert config.STREAM_WORST_CASE >= 2 * STREAM_INITIAL_WINDOW
    assert config.LINK_WORST_CASE >= 2 * RECEIVE_BUDGET


def test_the_deployment_selects_its_own_pods() -> None:
    deployment = by_kind("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_the_yaml_is_plain_and_round_trips() -> None:
    text = manifests.manifests_yaml(image=manifests.DEFAULT_BASE_IMAGE, code=CODE)
    assert "&id" not in text and "*id" not in text  # no YAML anchors: kubectl users read it
    assert list(yaml.safe_load_all(text)) == OBJECTS


def test_objects_build_their_api_paths() -> None:
    paths = [object_path(o) for o in OBJECTS]
    assert paths == [
        "/api/v1/namespaces/ambassador",
        "/api/v1/namespaces/ambassador/serviceaccounts/traffic-manager",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles/traffic-manager-ambassador",
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/traffic-manager-ambassador",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/ambassador/roles/traffic-manager",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/ambassador/rolebindings/traffic-manager",
        f"/api/v1/namespaces/ambassador/configmaps/traffic-manager-code-{CODE.short_digest}-0",
        f"/api/v1/namespaces/ambassador/configmaps/traffic-manager-code-{CODE.short_digest}-1",
        "/api/v1/namespaces/ambassador/services/traffic-manager-direct",
        "/apis/apps/v1/namespaces/ambassador/deployments/traffic-manager",
    ]


def test_the_installer_reads_back_the_dial_lists_it_applies() -> None:
    # `ensure_manager` re-applies when the configured lists differ from the installed ones.
    from telepresence.k8s.install import _dial_env_of

    objs = objects(dial_allow=["169.254.169.254/32"])
    assert _dial_env_of(by_kind("Deployment", objs)) == ("169.254.169.254/32", "")
    assert _dial_env_of(by_kind("Deployment")) == ("", "")


# --- versions and uninstall ----------------------------------------------------------------


def test_the_protocol_range_travels_on_the_deployment_and_its_pods() -> None:
    dep = manifests.deployment("ns", image="i", version="1", protocol=ProtocolRange(1, 3))
    assert dep["metadata"]["annotations"][manifests.PROTOCOL_ANNOTATION] == "1-3"
    template = dep["spec"]["template"]["metadata"]["annotations"]
    assert template[manifests.PROTOCOL_ANNOTATION] == "1-3"


def test_test_overrides_reach_the_manager_only_when_set() -> None:
    names = {e["name"] for e in pod_spec()["containers"][0]["env"]}
    assert versions.VERSION_ENV not in names
    objs = objects(extra_env={versions.VERSION_ENV: "9.9.9"})
    env = {e["name"]: e.get("value") for e in pod_spec(objs)["containers"][0]["env"]}
    assert env[versions.VERSION_ENV] == "9.9.9"


def test_a_faked_version_does_not_change_the_code() -> None:
    faked = pod_spec(objects(version="9.9.9"))
    assert faked["containers"][0]["image"] == manifests.DEFAULT_BASE_IMAGE
    assert faked["volumes"] == pod_spec()["volumes"]


def test_the_namespace_is_marked_only_when_the_installer_creates_it() -> None:
    assert "annotations" not in by_kind("Namespace")["metadata"]
    owned = objects(owns_namespace=True)
    annotations = by_kind("Namespace", owned)["metadata"]["annotations"]
    assert annotations == {manifests.CREATED_NAMESPACE_ANNOTATION: "true"}


def test_uninstall_deletes_every_installed_object_deployment_first_namespace_last() -> None:
    refs = manifests.uninstall_objects("ambassador", delete_namespace=True)
    kinds = [r["kind"] for r in refs]
    assert kinds[0] == "Deployment" and kinds[-1] == "Namespace"
    # The code ConfigMaps go by their label (their names change with the code).
    installed = {(o["kind"], o["metadata"]["name"]) for o in OBJECTS if o["kind"] != "ConfigMap"}
    deleted = {(r["kind"], r["metadata"]["name"]) for r in refs}
    assert installed <= deleted
    assert deleted - installed == {("Service", "traffic-manager")}  # what older versions made
    assert kinds.index("RoleBinding") < kinds.index("Role")
    assert kinds.index("ClusterRoleBinding") < kinds.index("ClusterRole")
    assert [object_path(r) for r in refs][-3:] == [
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/traffic-manager-ambassador",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles/traffic-manager-ambassador",
        "/api/v1/namespaces/ambassador",
    ]


def test_uninstall_keeps_a_namespace_it_did_not_create() -> None:
    refs = manifests.uninstall_objects("team", delete_namespace=False)
    assert "Namespace" not in [r["kind"] for r in refs]
    assert all(r["metadata"].get("namespace") in (None, "team") for r in refs)
    cluster = [r["metadata"]["name"] for r in refs if "namespace" not in r["metadata"]]
    assert cluster == ["traffic-manager-team", "traffic-manager-team"]


def test_the_manager_widens_its_source_port_range_with_a_safe_sysctl() -> None:
    """A flow the laptop closes first leaves the manager's socket in TIME_WAIT; the default
    range would cap new connections to one pod port near 470 a second."""
    sysctls = pod_spec()["securityContext"]["sysctls"]
    assert sysctls == [{"name": "net.ipv4.ip_local_port_range", "value": "1024 65535"}]
    assert {s["name"] for s in sysctls} <= SAFE_SYSCTLS
