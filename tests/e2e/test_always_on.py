"""The connection survives what a laptop lives through: the API server restarting, the
network to it gone for 30 s, and a 60 s sleep (the daemons stopped, then continued). Each
time the tunnel is back within 5 s of the way being open again, without the user; while
it is away, `status` says Reconnecting and why, cluster names and addresses fail fast,
and the laptop's own names keep answering."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.test_outbound import HELPER_PROCESS, TITLE, connect, curl, quit_

RECOVERY = 5.0
API = "192.0.2.1"
SERVICE = "verylargejavaservice.default"


@pytest.fixture
def connected(cluster: Cluster) -> Iterator[Cluster]:
    connect(cluster)
    assert _works(cluster)
    yield cluster
    quit_(cluster)


def _works(cluster: Cluster) -> bool:
    out = curl(cluster, f"{SERVICE}:8080", "--max-time", "2", timeout=10)
    return out.returncode == 0 and re.search(f"<title>{TITLE}</title>", out.stdout) is not None


def _status(cluster: Cluster) -> dict[str, str]:
    data = json.loads(cluster.laptop("telepresence", "status", "-o", "json").stdout)
    return dict(data["user_daemon"])


def _back_within(cluster: Cluster, since: float, what: str) -> float:
    wait_for(lambda: _works(cluster), timeout=RECOVERY + 10, what=what, interval=0.2)
    took = time.monotonic() - since
    assert took <= RECOVERY, f"{what} took {took:.1f} s"
    return took


def _prompt(cluster: Cluster, *cmd: str, limit: float = 1.5) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    out = cluster.laptop(*cmd, check=False, timeout=30)
    took = time.monotonic() - started
    assert took < limit, f"{' '.join(cmd)} took {took:.1f} s"
    return out


def _laptop_names_answer(cluster: Cluster) -> None:
    out = _prompt(cluster, "getent", "hosts", "www.example.test")
    assert out.returncode == 0 and out.stdout.split()[0] == "198.51.100.2"


def test_the_api_server_restarts(connected: Cluster) -> None:
    c = connected
    killed = subprocess.run(["pkill", "-KILL", "-x", "kube-apiserver"], check=False)
    assert killed.returncode == 0, "no kube-apiserver process"
    _laptop_names_answer(c)
    # Back when the API server answers again (devcluster's supervisor restarts it).
    wait_for(
        lambda: c.kubectl("get", "--raw", "/readyz", check=False, timeout=10).returncode == 0,
        timeout=120,
        what="the API server to answer again",
        interval=0.1,
    )
    took = _back_within(c, time.monotonic(), "the tunnel after the API server restarted")
    print(f"API server restart: working again {took:.2f} s after it answered")


_DROP = f"""
table inet tpdrop {{
    chain out {{
        type filter hook output priority 0; policy accept;
        ip daddr {API} tcp dport 6443 drop
    }}
}}
"""


def test_the_network_to_the_api_server_goes_away_for_30_seconds(connected: Cluster) -> None:
    c = connected
    svc_ip = c.get("service", "verylargejavaservice", "-n", "default")["spec"]["clusterIP"]
    c.laptop("nft", "-f", "-", root=True, input=_DROP)
    try:
        wait_for(
            lambda: _status(c)["status"] == "Reconnecting",
            timeout=10,
            what="status to say Reconnecting",
        )
        assert _status(c)["reconnect_reason"], "Reconnecting says why"
        text = c.laptop("telepresence", "status").stdout
        assert "Status            : Reconnecting (" in text
        # For the 30 s: the laptop's names answer, cluster names and addresses fail fast.
        until = time.monotonic() + 30
        while time.monotonic() < until:
            _laptop_names_answer(c)
            _prompt(c, "getent", "hosts", f"{SERVICE}.svc.cluster.local", limit=3)
            failed = _prompt(
                c, "curl", "-sS", "--max-time", "10", f"http://{svc_ip}:8080/", limit=3
            )
            assert failed.returncode != 0
    finally:
        c.laptop("nft", "delete", "table", "inet", "tpdrop", root=True, check=False)
    took = _back_within(c, time.monotonic(), "the tunnel after the network came back")
    assert _status(c)["status"] == "Connected"
    print(f"network back: working again {took:.2f} s later")


def _pids(cluster: Cluster, pattern: str) -> str:
    return ",".join(cluster.laptop("pgrep", "-f", pattern, root=True).stdout.split())


def test_a_laptop_that_sleeps_for_a_minute(connected: Cluster) -> None:
    c = connected
    pattern = f"telepresence\\.daemon|{HELPER_PROCESS}"
    stopped = c.laptop("pkill", "-STOP", "-f", pattern, root=True, check=False)
    assert stopped.returncode == 0, "no daemon to stop"
    try:
        # The laptop sleeps for 60 s: nothing of ours runs (the manager forgets the session
        # after 30 s of silence, and the port-forwards may die meanwhile). The minute is the
        # scenario, not a wait for something; it checks that everything stays asleep.
        until = time.monotonic() + 60

        def slept_a_minute() -> bool:
            states = c.laptop("ps", "-o", "stat=", "-p", _pids(c, pattern), root=True).stdout
            assert states.split() and all(s.startswith("T") for s in states.split()), states
            return time.monotonic() >= until

        wait_for(slept_a_minute, timeout=90, what="a minute asleep", interval=2)
    finally:
        c.laptop("pkill", "-CONT", "-f", pattern, root=True, check=False)
    took = _back_within(c, time.monotonic(), "the tunnel after a 60 s sleep")
    print(f"sleep: working again {took:.2f} s after waking")
