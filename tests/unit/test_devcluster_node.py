"""The node's configuration files: each setting this host needs is there, and parses."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import yaml

from devcluster import node
from devcluster.pki import KeyPair
from devcluster.settings import Settings


def test_containerd_config_is_version_3_with_what_this_host_needs() -> None:
    conf = tomllib.loads(node.containerd_config(Settings()))
    assert conf["version"] == 3
    runtime = conf["plugins"]["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is True
    assert runtime["netns_mounts_under_state_dir"] is True
    runc = runtime["containerd"]["runtimes"]["runc"]["options"]
    assert runc == {"BinaryName": node.RUNC, "SystemdCgroup": False}
    images = conf["plugins"]["io.containerd.cri.v1.images"]
    assert images["pinned_images"]["sandbox"] == node.PAUSE_IMAGE
    # The node's view of /run is private: the socket path is the usual one inside it.
    assert conf["grpc"]["address"] == node.CONTAINERD_SOCKET


def test_cni_hands_out_the_nodes_pod_cidr_behind_its_first_address() -> None:
    s = Settings()
    conf = json.loads(node.cni_config(s))
    (bridge,) = conf["plugins"]
    assert bridge["type"] == "bridge"
    assert bridge["ipMasq"] is False
    assert bridge["hairpinMode"] is True
    (rng,) = bridge["ipam"]["ranges"][0]
    assert rng == {"subnet": "10.244.0.0/24", "gateway": "10.244.0.1"}


def test_kubelet_checks_kernel_defaults_instead_of_writing_them() -> None:
    s = Settings()
    conf = yaml.safe_load(
        node.kubelet_config(s, ca=Path("/ca.crt"), serving=KeyPair(Path("/k.crt"), Path("/k.key")))
    )
    assert conf["protectKernelDefaults"] is True
    assert conf["failCgroupV1"] is False
    assert conf["cgroupDriver"] == "cgroupfs"
    assert conf["cgroupRoot"] == f"/{node.CGROUP_ROOT}"
    assert conf["clusterDNS"] == ["10.96.0.10"]
    assert conf["authorization"] == {"mode": "Webhook"}
    assert conf["authentication"]["anonymous"] == {"enabled": False}
    assert conf["imageGCHighThresholdPercent"] == 100


def test_kube_proxy_runs_nftables_and_leaves_conntrack_sysctls_alone() -> None:
    conf = yaml.safe_load(node.kube_proxy_config(Settings(), kubeconfig=Path("/kp")))
    assert conf["mode"] == "nftables"
    assert conf["clusterCIDR"] == "10.244.0.0/16"
    assert conf["conntrack"]["maxPerCore"] == 0
    assert conf["conntrack"]["min"] == 0


def test_the_mount_script_binds_the_kernel_defaults_the_kubelet_checks() -> None:
    script = node._mount_script(Settings())
    assert script.splitlines()[1] == "mount --make-rprivate /"
    for name in node.KERNEL_DEFAULTS:
        assert f"/proc/sys/{name}" in script
    # /var/lib is bound last: the node's own directory lives under it on the host.
    binds = [line for line in script.splitlines() if line.startswith("mount --")]
    assert binds.index("mount --bind /var/lib/devcluster/var-lib /var/lib") > binds.index(
        "mount --rbind /var/lib/devcluster/run /run"
    )
