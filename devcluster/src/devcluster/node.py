"""The real node: containerd, runc, the kubelet and kube-proxy, in the node's namespaces.

They share the node's network namespace with the control plane, plus a mount namespace of
their own, so that what they hard-code (`/var/lib/kubelet`, `/var/log/pods`,
`/run/containerd`, the kernel tunables the kubelet checks) is private to devcluster:

    /var/lib  <- <node dir>/var-lib     containerd's content and snapshots, kubelet, CNI state
    /var/log  <- <node dir>/var-log     pod logs
    /run      <- <node dir>/run         containerd's sockets, runc state, pod netns mounts;
                                        /run/devcluster (certificates, configs) bound inside
    /proc/sys/{vm/overcommit_memory, kernel/panic, kernel/panic_on_oops}
              <- files with the values a kubelet expects (`protectKernelDefaults: true`
                 makes it check them instead of writing the host's)

Containers get cgroups under devcluster's own root in every v1 hierarchy, so the host's
cgroups are never written. Everything here is undone by `teardown`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import yaml

from devcluster.controlplane import Credentials, kubeconfig
from devcluster.pki import KeyPair
from devcluster.settings import CLUSTER_DOMAIN, NODE_NAME, Settings
from devcluster.system import run

#: The kubelet refuses to start unless these read as it wants (protectKernelDefaults).
KERNEL_DEFAULTS = {
    "vm/overcommit_memory": "1",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
}
CGROUP_ROOT = "devcluster"
CGROUP_FS = Path("/sys/fs/cgroup")
PAUSE_IMAGE = "devcluster.local/pause:3.10"
RUNC = "/usr/sbin/runc"
CNI_BIN = "/usr/lib/cni"
#: Inside the node's mount namespace.
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"


def config_dir(settings: Settings) -> Path:
    """Node configuration, under the run directory so both mount namespaces see it."""
    return settings.paths.run / "node"


def mount_ns_file(settings: Settings) -> Path:
    return settings.paths.run / "ns" / "node-mnt"


def host_containerd_socket(settings: Settings) -> Path:
    """containerd's socket as the host sees it (for `ctr` from outside the node)."""
    return settings.paths.node / "run" / "containerd" / "containerd.sock"


# --- configuration files (pure) ----------------------------------------------------------


def containerd_config(settings: Settings) -> str:
    cni_conf = config_dir(settings) / "cni"
    return f"""version = 3
root = "/var/lib/containerd"
state = "/run/containerd"
# Plugins that need kernel features or host paths a node here does not have.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{CONTAINERD_SOCKET}"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{PAUSE_IMAGE}"

[plugins.'io.containerd.cri.v1.runtime']
  # The sandbox has no CAP_SYS_RESOURCE: runc cannot lower oom_score_adj below ours.
  restrict_oom_score_adj = true
  # Pod network namespaces stay under containerd's state, not the host's /run/netns.
  netns_mounts_under_state_dir = true
  enable_selinux = false
  disable_apparmor = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{CNI_BIN}"]
    conf_dir = "{cni_conf}"
    max_conf_num = 1

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""


def cni_config(settings: Settings) -> str:
    """A bridge with host-local addresses from the node's podCIDR; the node routes the rest.

    No masquerade: every hop stays inside devcluster's namespaces, so addresses stay real.
    Hairpin lets a pod reach itself through its own Service (kube-proxy masquerades that).
    """
    a = settings.addresses
    gateway = next(a.node_pod_cidr.hosts())
    conf = {
        "cniVersion": "1.0.0",
        "name": "devcluster",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(a.node_pod_cidr), "gateway": str(gateway)}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }
        ],
    }
    return json.dumps(conf, indent=2)


def kubelet_config(settings: Settings, *, ca: Path, serving: KeyPair) -> str:
    a = settings.addresses
    conf = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": str(a.node_ip),
        "port": a.kubelet_port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(serving.cert),
        "tlsPrivateKeyFile": str(serving.key),
        "clusterDomain": CLUSTER_DOMAIN,
        "clusterDNS": [str(a.dns_service_ip)],
        "resolvConf": str(config_dir(settings) / "resolv.conf"),
        "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
        "imageServiceEndpoint": f"unix://{CONTAINERD_SOCKET}",
        # This host: cgroup v1 (hybrid), no systemd, and a private root for our cgroups.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{CGROUP_ROOT}",
        "cgroupsPerQOS": True,
        "enforceNodeAllocatable": ["pods"],
        "failSwapOn": False,
        "protectKernelDefaults": True,
        # Disk thresholds low and image GC off: the host's disk is not ours to police, and
        # imported images cannot be pulled again.
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "maxPods": 110,
        "nodeStatusUpdateFrequency": "4s",
        "syncFrequency": "10s",
        "shutdownGracePeriod": "0s",
        "containerLogMaxSize": "10Mi",
    }
    return yaml.safe_dump(conf, sort_keys=False)


def kube_proxy_config(settings: Settings, *, kubeconfig: Path) -> str:
    a = settings.addresses
    conf = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "nftables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": NODE_NAME,
        "bindAddress": str(a.node_ip),
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "clusterCIDR": str(a.pod_cidr),
        "detectLocalMode": "ClusterCIDR",
        # Zero means "leave the kernel's conntrack settings alone": they are the host's.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }
    return yaml.safe_dump(conf, sort_keys=False)


# --- images ------------------------------------------------------------------------------


def _ctr(settings: Settings, *args: str, timeout: float = 300) -> str:
    return run(
        [
            str(settings.binary("ctr")),
            f"--address={host_containerd_socket(settings)}",
            "--namespace=k8s.io",
            *args,
        ],
        timeout=timeout,
    ).stdout


def image_digests(settings: Settings) -> dict[str, str]:
    """What containerd holds: reference -> manifest digest."""
    digests = {}
    for line in _ctr(settings, "images", "ls").splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3:
            digests[fields[0]] = fields[2]
    return digests


def import_archive(settings: Settings, archive: Path) -> None:
    """Imports one image archive that devcluster itself does not build (the benchmark's
    Telepresence 2 manager); the next `up` removes it again, as a name it does not build."""
    _ctr(settings, "images", "import", str(archive))


def import_images(settings: Settings, archives: dict[str, Path]) -> list[str]:
    """Imports (and unpacks) every archive whose image containerd lacks or holds at another
    digest, so a rebuilt image reaches the node without a restart, and removes the names it
    no longer builds; returns what it imported."""
    from devcluster.oci import manifest_digest

    held = image_digests(settings)
    imported = []
    for reference, archive in sorted(archives.items()):
        if held.get(reference) == manifest_digest(archive):
            continue
        _ctr(settings, "images", "import", str(archive))
        imported.append(reference)
    # Names devcluster no longer builds (a renamed image) go, as they would not exist on a
    # fresh node: the kubelet reports an image by any of its names. The CRI's own
    # digest references (sha256:...) stay.
    stale = [ref for ref in held if ref not in archives and "sha256:" not in ref]
    if stale:
        _ctr(settings, "images", "rm", *sorted(stale))
    return imported


# --- preparing and removing the node ---------------------------------------------------


def write_configs(settings: Settings, creds: Credentials) -> dict[str, Path]:
    """Kubeconfigs and config files of the node; returns their paths."""
    a = settings.addresses
    ca = creds.ca
    folder = config_dir(settings)
    (folder / "cni").mkdir(parents=True, exist_ok=True)
    kubelet_client = creds.node_client
    proxy_client = creds.kube_proxy
    serving = creds.kubelet_server
    paths = {
        "containerd": folder / "containerd.toml",
        "kubelet": folder / "kubelet.yaml",
        "kubelet-kubeconfig": folder / "kubelet.kubeconfig",
        "kube-proxy": folder / "kube-proxy.yaml",
        "kube-proxy-kubeconfig": folder / "kube-proxy.kubeconfig",
    }
    paths["containerd"].write_text(containerd_config(settings))
    (folder / "cni" / "10-devcluster.conflist").write_text(cni_config(settings))
    (folder / "resolv.conf").write_text(f"nameserver {a.node_ip}\n")
    paths["kubelet"].write_text(kubelet_config(settings, ca=ca.cert, serving=serving))
    paths["kubelet-kubeconfig"].write_text(
        kubeconfig(server=a.api_url, ca=ca.cert, client=kubelet_client)
    )
    paths["kube-proxy-kubeconfig"].write_text(
        kubeconfig(server=a.api_url, ca=ca.cert, client=proxy_client)
    )
    paths["kube-proxy"].write_text(
        kube_proxy_config(settings, kubeconfig=paths["kube-proxy-kubeconfig"])
    )
    for p in paths.values():
        p.chmod(0o600)
    return paths


def _mount_script(settings: Settings) -> str:
    """Run inside the new mount namespace: make the node's private view of the host."""
    d = settings.paths.node
    run_dir = settings.paths.run
    values = config_dir(settings) / "kernel"
    lines = [
        "set -e",
        "mount --make-rprivate /",
        # run_dir is under /run: after the rbind it shows at its usual path.
        f"mkdir -p {d}{run_dir} {d}/var-lib {d}/var-log",
        f"mount --bind {run_dir} {d}{run_dir}",
        f"mount --rbind {d}/run /run",
        f"mount --bind {d}/var-log /var/log",
        f"mount --bind {d}/var-lib /var/lib",
    ]
    for name in KERNEL_DEFAULTS:
        lines.append(f"mount --bind {values}/{name.replace('/', '.')} /proc/sys/{name}")
    return "\n".join(lines) + "\n"


def create_mount_namespace(settings: Settings) -> Path:
    """A persistent mount namespace (bound to a file) that containerd and the kubelet share."""
    ns_file = mount_ns_file(settings)
    folder = ns_file.parent
    folder.mkdir(parents=True, exist_ok=True)
    # A namespace file must live on a private mount, or the bind would propagate.
    if run(["mountpoint", "-q", str(folder)], check=False).returncode != 0:
        run(["mount", "--bind", str(folder), str(folder)])
    run(["mount", "--make-private", str(folder)])
    ns_file.touch()
    values = config_dir(settings) / "kernel"
    values.mkdir(parents=True, exist_ok=True)
    for name, value in KERNEL_DEFAULTS.items():
        (values / name.replace("/", ".")).write_text(value + "\n")
    try:
        run(
            [
                "unshare",
                f"--mount={ns_file}",
                "--propagation",
                "private",
                "sh",
                "-c",
                _mount_script(settings),
            ]
        )
    except Exception:
        remove_mount_namespace(settings)
        raise
    return ns_file


def in_node(settings: Settings, argv: list[str]) -> list[str]:
    """argv run in the node's mount namespace (the network namespace is the caller's)."""
    return ["nsenter", f"--mount={mount_ns_file(settings)}", "--", *argv]


def create_cgroup_root() -> None:
    """devcluster's root in every v1 hierarchy; cpuset needs its cpus and mems copied."""
    for hierarchy in _hierarchies():
        root = hierarchy / CGROUP_ROOT
        root.mkdir(exist_ok=True)
        if hierarchy.name == "cpuset":
            for knob in ("cpuset.cpus", "cpuset.mems"):
                (root / knob).write_text((hierarchy / knob).read_text())


def _hierarchies() -> list[Path]:
    """Every mounted hierarchy: the v1 controllers, and the hybrid host's v2 `unified`
    one, where runc also places containers."""
    if not CGROUP_FS.exists():
        return []
    return [p for p in sorted(CGROUP_FS.iterdir()) if p.is_dir() and (p / "cgroup.procs").exists()]


def _cgroup_pids() -> set[int]:
    pids: set[int] = set()
    for hierarchy in _hierarchies():
        root = hierarchy / CGROUP_ROOT
        if not root.exists():
            continue
        for procs in root.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in procs.read_text().split())
    return pids


def _shim_pids(settings: Settings) -> set[int]:
    shim = str(settings.binary("containerd-shim-runc-v2"))
    pids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(entry / "exe") == shim:
                pids.add(int(entry.name))
    return pids


def kill_containers(settings: Settings) -> None:
    """Every container process and every shim, even those a crashed run left behind."""
    deadline = time.monotonic() + 10
    while True:
        pids = _cgroup_pids() | _shim_pids(settings)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"container processes would not die: {sorted(pids)}")
        time.sleep(0.1)


def remove_cgroup_root() -> None:
    for hierarchy in _hierarchies():
        root = hierarchy / CGROUP_ROOT
        if not root.exists():
            continue
        # Leaves first: a cgroup with children cannot be removed.
        for folder in sorted(
            (p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
        ):
            with contextlib.suppress(OSError):
                folder.rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()


def remove_mount_namespace(settings: Settings) -> None:
    ns_file = mount_ns_file(settings)
    folder = ns_file.parent
    if ns_file.exists():
        run(["umount", str(ns_file)], check=False)
        with contextlib.suppress(OSError):
            ns_file.unlink()
    if folder.exists():
        run(["umount", str(folder)], check=False)
        with contextlib.suppress(OSError):
            folder.rmdir()


def teardown(settings: Settings) -> None:
    """Containers, shims, cgroups, the mount namespace (and with it every mount of the node:
    overlays, volumes, pod netns files) and the node's files. Safe to run twice."""
    kill_containers(settings)
    remove_cgroup_root()
    remove_mount_namespace(settings)
    d = settings.paths.node
    if d.exists():
        # Overlay upper dirs may hold files of any uid and mode; plain rm copes.
        run(["rm", "-rf", "--one-file-system", str(d)], check=False, timeout=300)


def pod_app_pids(uid: str) -> list[int]:
    """Processes of a pod's app containers (the pause process left out), found from the host
    through the kubelet's cgroups: for tests and benchmarks that enter a pod's namespaces."""
    root = Path("/sys/fs/cgroup/pids") / CGROUP_ROOT / "kubepods"
    pids = []
    for procs in root.glob(f"**/pod{uid}/*/cgroup.procs"):
        for pid in procs.read_text().split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if cmdline and not cmdline.startswith(b"/pause"):
                pids.append(int(pid))
    return sorted(pids)
