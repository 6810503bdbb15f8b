"""`up` is idempotent and `down` leaves nothing behind. Runs last: it stops the cluster."""

from __future__ import annotations

import subprocess
from pathlib import Path

from devcluster.procs import command_lines
from devcluster.settings import LAPTOP_USER, Settings
from tests.e2e.cluster import PS_PROCESSES, Cluster, running_processes


def _host_state() -> dict[str, str]:
    def sh(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout

    return {
        "netns": sh("ip", "netns", "list"),
        "nft": sh("nft", "list", "ruleset"),
        "links": sh("ip", "-o", "link", "show"),
        "routes": sh("ip", "route", "show", "table", "all"),
        "mounts": "\n".join(
            line
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if "netns" in line or "devcluster" in line or "secrets" in line
        ),
        "laptop user processes": running_processes(sh("ps", "-u", LAPTOP_USER, *PS_PROCESSES)),
        # The node's cgroups (containers are found through them) and its disk.
        "cgroups": "\n".join(sorted(str(p) for p in Path("/sys/fs/cgroup").glob("*/devcluster"))),
        "node dir": str(Settings().paths.node.exists()),
    }


def _cluster_processes(cluster: Cluster) -> list[str]:
    cache = str(cluster.settings.paths.cache)
    found = []
    for _, cmdline in command_lines():
        if (
            cache in cmdline
            or "devcluster.supervisor" in cmdline
            or ("dnsmasq" in cmdline and "198.51.100.53" in cmdline)
            or "devcluster.images" in cmdline
            or "/app/http_server.py" in cmdline
            or "telepresence.manager" in cmdline
        ):
            found.append(cmdline)
    return found


def test_up_twice_is_safe_and_down_leaves_nothing(cluster: Cluster) -> None:
    again = cluster.devcluster("up", "--sample-app")
    assert "already up" in again.stdout
    assert cluster.laptop("kubectl", "get", "--raw", "/readyz").stdout.strip() == "ok"
    running = _cluster_processes(cluster)
    # Containers and their shims are among what `down` must stop.
    assert any("/app/http_server.py" in p for p in running), running
    assert any("containerd-shim-runc-v2" in p for p in running), running

    cluster.devcluster("down")
    after = _host_state()
    assert after["cgroups"] == ""
    assert after["node dir"] == "False"
    assert "dc-" not in after["netns"]
    assert "dc-" not in after["mounts"]
    assert "devcluster" not in after["nft"]
    assert "dc-" not in after["links"]
    assert after["laptop user processes"] == ""
    assert _cluster_processes(cluster) == []
    assert not list(Path("/etc/netns").glob("dc-*"))

    # A second `down` is harmless, and `up` brings everything back.
    cluster.devcluster("down")
    assert _host_state() == after
    cluster.devcluster("up")
    assert cluster.laptop("kubectl", "get", "--raw", "/readyz").stdout.strip() == "ok"
    cluster.devcluster("down")
    assert _host_state() == after
