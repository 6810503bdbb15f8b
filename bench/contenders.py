"""The ways the benchmark suite reaches the same target pod, each set up and torn down per
round: from inside the cluster (no tunnel), through `kubectl port-forward`, and through
telepresence. Each says where its clients run, which address and ports reach the target,
and which processes' CPU time it costs.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field

from devcluster.cli import kubectl as admin_kubectl
from devcluster.procs import command_lines
from devcluster.settings import Settings

#: Ports of the target pod (bench/suite.py deploys it): iperf3, HTTP, TCP echo.
IPERF, HTTP, ECHO = 5201, 8080, 9000
#: The cluster's own processes on every path that goes through the API server.
CLUSTER_PROCESSES = {
    "kube-apiserver": "/kube-apiserver ",
    "kubelet": "/kubelet --config",
    "containerd": "/containerd --config",
}


def devcluster(*args: str, timeout: float = 600, check: bool = True) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "devcluster.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise SystemExit(f"devcluster {' '.join(args[:4])} failed: {proc.stderr.strip()[-800:]}")
    return proc.stdout


def kubectl(*args: str, input: str | None = None) -> str:
    """kubectl as the cluster's admin, from the host."""
    return admin_kubectl(Settings(), *args, input=input).stdout


def in_laptop(*cmd: str, timeout: float = 600, check: bool = True) -> str:
    return devcluster("laptop", "--", *cmd, timeout=timeout, check=check)


def in_pod(*cmd: str, timeout: float = 600, check: bool = True) -> str:
    return devcluster("pod", "--", *cmd, timeout=timeout, check=check)


def timed_in_laptop(*cmd: str) -> float:
    """Seconds `cmd` took in the laptop, less what entering the laptop costs (timed with
    `true` just before)."""
    started = time.monotonic()
    in_laptop("true")
    overhead = time.monotonic() - started
    started = time.monotonic()
    in_laptop(*cmd)
    return max(0.0, time.monotonic() - started - overhead)


def find_pids(markers: dict[str, str]) -> dict[str, int]:
    found = {}
    for pid, cmdline in command_lines():
        for name, marker in markers.items():
            if name not in found and marker in cmdline:
                found[name] = pid
    return found


@dataclass
class Contender:
    name: str
    #: The address that reaches the target, and each target port's number on this path.
    host: str = ""
    ports: dict[int, int] = field(default_factory=lambda: {p: p for p in (IPERF, HTTP, ECHO)})
    udp: bool = True
    in_laptop: bool = True

    def run(self, *cmd: str, timeout: float = 600, check: bool = True) -> str:
        runner = in_laptop if self.in_laptop else in_pod
        return runner(*cmd, timeout=timeout, check=check)

    def start(self) -> dict[str, float]:
        """Set up; returns timings worth reporting (connect time)."""
        return {}

    def stop(self) -> dict[str, float]:
        return {}

    def ready(self) -> None:
        """Called before each probe: bring the path back if the last probe broke it."""

    def pids(self) -> dict[str, int]:
        return {}


@dataclass
class Direct(Contender):
    """Clients in a pod's network: the cluster's own path, the ceiling."""

    def __post_init__(self) -> None:
        self.in_laptop = False


@dataclass
class PortForward(Contender):
    """`kubectl port-forward` in the laptop, one local port per target port."""

    namespace: str = ""
    pod: str = ""
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.udp = False
        self.ports = {IPERF: 15201, HTTP: 18080, ECHO: 19000}

    def start(self) -> dict[str, float]:
        self.host = "127.0.0.1"
        mapping = [f"{local}:{remote}" for remote, local in self.ports.items()]
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "devcluster.cli", "laptop", "--",
                "kubectl", "port-forward", "-n", self.namespace, f"pod/{self.pod}", *mapping,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        url = f"http://127.0.0.1:{self.ports[HTTP]}/"
        # Each try is a process in the laptop, a few hundred ms: the polling interval.
        while in_laptop(
            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url, check=False
        ) != ("200"):
            if time.monotonic() > deadline:
                raise SystemExit("kubectl port-forward did not start within 60 s")
        return {}

    def ready(self) -> None:
        """kubectl port-forward exits ("lost connection to pod") when one forwarded
        connection fails, as iperf3's upload does at its end (BENCH.md), and only some
        time later: a fresh one for every probe."""
        self.stop()
        self.start()

    def stop(self) -> dict[str, float]:
        in_laptop("pkill", "-f", f"port-forward -n {self.namespace}", check=False)
        if self.process is not None:
            self.process.wait(timeout=30)
        return {}

    def pids(self) -> dict[str, int]:
        return find_pids({"kubectl": f"port-forward -n {self.namespace}", **CLUSTER_PROCESSES})


@dataclass
class Telepresence(Contender):
    """Connected; the target by its ClusterIP (DNS is measured on its own). ``transport``:
    "port-forward" with the node's NodePorts closed to the laptop (a cloud cluster seen
    from outside its network), "direct" with them open (a kind node from its host); the
    run fails unless `status` shows that transport in use."""

    cluster_ip: str = ""
    transport: str = "port-forward"
    #: "asyncio": the daemon on the standard library's loop even with uvloop installed
    #: (`--event-loops`, an A/B of the two in one run).
    event_loop: str = ""

    def start(self) -> dict[str, float]:
        self.host = self.cluster_ip
        in_laptop("telepresence", "quit")
        devcluster("nodeports", "open" if self.transport == "direct" else "closed")
        env = [f"TELEPRESENCE_EVENT_LOOP={self.event_loop}"] if self.event_loop else []
        connect = timed_in_laptop("env", *env, "telepresence", "connect")
        deadline = time.monotonic() + 30
        while True:
            shown = in_laptop("telepresence", "status")
            line = next((x for x in shown.splitlines() if "Transport" in x), "")
            if f": {self.transport} (" in line:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name}: status shows {line.strip()!r}")
        return {"connect s": connect}

    def stop(self) -> dict[str, float]:
        quit_s = timed_in_laptop("telepresence", "quit")
        devcluster("nodeports", "closed")
        return {"quit s": quit_s}

    def pids(self) -> dict[str, int]:
        return find_pids(
            {
                "daemon": "-m telepresence.daemon",
                "helper": "telepresence-helper --connect",
                "manager": "-m telepresence.manager",
                **CLUSTER_PROCESSES,
            }
        )
