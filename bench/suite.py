"""The benchmark suite: every path to one target pod, measured in one run, in rounds.

    sudo /opt/telepresence-dev/venv/bin/python -m bench.suite [--rounds 3] [--seconds 5]

Paths (bench/contenders.py): `direct` from a pod's network, no tunnel; `port-forward`,
`kubectl port-forward` in the laptop; `telepresence`, connected over port-forward (the
node's NodePorts closed to the laptop); `telepresence-direct`, connected over the direct
transport (NodePorts open, `devcluster nodeports`); `telepresence2`, Telepresence 2 built
from the Go module proxy and connected to its own manager (bench/telepresence2.py; the
first run builds it, several minutes). Each round visits every path in a
rotated order (BENCH.md: alternate, then take medians). Per path:

  up, down, down x4   iperf3 MiB/s, laptop to pod, pod to laptop, pod to laptop on 4 flows
  latency p50/p99     ms per HTTP request on a fresh connection
  loaded p50/p99      the same while one download runs beside it (head-of-line delay)
  connections/s       fresh connections, one echo each, 16 workers
  UDP loss            iperf3 -u at 100 Mbit/s, laptop to pod (not through port-forward)
  DNS p50/p99         a cluster name where the path resolves one; the laptop's own name
                      before connecting and while connected
  CPU s/GiB           user+system seconds per GiB moved during `down`, per process
  connect/quit s      telepresence and Telepresence 2, their managers already installed

Output: a table with ratios to port-forward and to direct, the JSON (`--json`), and a chart
(`--chart`, docs/bench.png by default) that the README shows. Run as root, devcluster up,
the product installed in the laptop (scripts/install-laptop.sh).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import probes, telepresence2
from bench.chart import render_ab, render_chart, render_table
from bench.contenders import (
    ECHO,
    HTTP,
    IPERF,
    Contender,
    Direct,
    PortForward,
    Telepresence,
    in_laptop,
    kubectl,
)
from bench.telepresence2 import Telepresence2
from devcluster.fixtures import deployment, to_yaml
from devcluster.images import HTTP_IMAGE, TCP_ECHO_IMAGE
from devcluster.node import pod_app_pids

NS = "bench-suite"
NAME = "target"
HERE = Path(__file__).parent
#: Tries per probe while it fails.
ATTEMPTS = 3
#: A name the laptop's own resolver answers (devcluster's dnsmasq), for the non-cluster DNS
#: figures.
LAPTOP_NAME = "www.example.test"


def target_manifest() -> str:
    """One pod with the HTTP server and the TCP echo, and a Service with those ports and
    iperf3's (TCP and UDP), which bench/suite.py starts inside the pod's network."""
    objects = deployment(
        name=NAME, namespace=NS, image=HTTP_IMAGE, port=HTTP, args=["--port", str(HTTP)]
    )
    pod = objects[0]["spec"]["template"]["spec"]  # type: ignore[index]
    pod["containers"].append(
        {
            "name": "echo",
            "image": TCP_ECHO_IMAGE,
            "args": ["--port", str(ECHO)],
            "ports": [{"containerPort": ECHO, "protocol": "TCP"}],
        }
    )
    objects[1]["spec"]["ports"] = [  # type: ignore[index]
        {"name": "http", "port": HTTP, "targetPort": HTTP, "protocol": "TCP"},
        {"name": "echo", "port": ECHO, "targetPort": ECHO, "protocol": "TCP"},
        {"name": "iperf", "port": IPERF, "targetPort": IPERF, "protocol": "TCP"},
        {"name": "iperf-udp", "port": IPERF, "targetPort": IPERF, "protocol": "UDP"},
    ]
    return to_yaml(objects)


def deploy() -> tuple[str, str, subprocess.Popen[bytes]]:
    """The target pod, ready, with an iperf3 server in its network; returns the pod's
    name, the Service's ClusterIP and the server process."""
    if f"namespace/{NS}" not in kubectl("get", "ns", "-o", "name").split():
        kubectl("create", "namespace", NS)
    kubectl("apply", "-f", "-", input=target_manifest())
    kubectl("rollout", "status", f"deployment/{NAME}", "-n", NS, "--timeout=180s")
    pods = json.loads(kubectl("get", "pods", "-n", NS, "-l", f"app={NAME}", "-o", "json"))
    pod = next(p for p in pods["items"] if not p["metadata"].get("deletionTimestamp"))
    pids = pod_app_pids(pod["metadata"]["uid"])
    if not pids:
        raise SystemExit(f"no process of pod {pod['metadata']['name']} found")
    pid = pids[0]
    # One test at a time, which is how the suite uses it.
    server = subprocess.Popen(
        ["nsenter", "-t", str(pid), "-n", "iperf3", "-s", "-p", str(IPERF)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ip = kubectl("get", "svc", NAME, "-n", NS, "-o", "jsonpath={.spec.clusterIP}").strip()
    return pod["metadata"]["name"], ip, server


def client_scripts() -> dict[str, Path]:
    """The Python clients as files every user can read (the laptop runs them as its user)."""
    folder = Path(tempfile.mkdtemp(prefix="tp-suite-"))
    folder.chmod(0o755)
    scripts = {
        "latency": probes.LATENCY_CLIENT,
        "dns": probes.DNS_CLIENT,
        "load": (HERE / "loadclient.py").read_text(),
    }
    paths = {}
    for name, text in scripts.items():
        path = folder / f"{name}.py"
        path.write_text(text)
        path.chmod(0o644)
        paths[name] = path
    return paths


def measure(
    contender: Contender, scripts: dict[str, Path], *, seconds: int, requests: int
) -> dict[str, Any]:
    result: dict[str, Any] = dict(contender.start())
    try:
        ports = contender.ports

        def probe(name: str, measure: Callable[[], Any]) -> Any:
            """Up to ATTEMPTS tries while the probe fails (kubectl port-forward and iperf3
            trip over the end of the test before: BENCH.md); every failure is kept under
            "failed" and listed below the table."""
            for attempt in range(1, ATTEMPTS + 1):
                contender.ready()
                value = measure()
                if not (isinstance(value, dict) and "error" in value) or attempt == ATTEMPTS:
                    break
                result.setdefault("failed", []).append(f"{name}: {value['error']}")
            result[name] = value
            return value

        run = contender.run
        probe(
            "up",
            lambda: probes.iperf_tcp(
                run, contender.host, ports[IPERF], reverse=False, seconds=seconds
            ),
        )
        cpu: dict[str, dict[str, float]] = {}

        def download() -> dict[str, Any]:
            pids = contender.pids()
            cpu["before"] = probes.cpu_seconds(pids)
            down = probes.iperf_tcp(
                run, contender.host, ports[IPERF], reverse=True, seconds=seconds
            )
            cpu["after"] = probes.cpu_seconds(pids)
            return down

        down = probe("down", download)
        if "bytes" in down:
            result["cpu s/GiB"] = probes.cpu_per_gib(cpu["before"], cpu["after"], down["bytes"])
        probe(
            "down x4",
            lambda: probes.iperf_tcp(
                run, contender.host, ports[IPERF], reverse=True, flows=4, seconds=seconds
            ),
        )
        probe(
            "latency ms",
            lambda: probes.latency(run, scripts["latency"], contender.host, ports[HTTP], requests),
        )
        probe(
            "latency loaded ms",
            lambda: probes.latency_under_load(
                run,
                scripts["latency"],
                contender.host,
                http=ports[HTTP],
                iperf=ports[IPERF],
                requests=requests,
                seconds=seconds + 3,
            ),
        )
        probe(
            "connections",
            lambda: probes.connection_rate(
                run, scripts["load"], contender.host, ports[ECHO], seconds
            ),
        )
        if contender.udp:
            probe(
                "udp",
                lambda: probes.iperf_udp(
                    run, contender.host, ports[IPERF], mbit=100, seconds=seconds
                ),
            )
        if not isinstance(contender, PortForward):
            probe("dns cluster ms", lambda: probes.dns(run, scripts["dns"], f"{NAME}.{NS}", 300))
        if contender.in_laptop:
            probe("dns laptop ms", lambda: probes.dns(run, scripts["dns"], LAPTOP_NAME, 300))
    finally:
        result.update(contender.stop())
    return result


def median_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-key median over the rounds that have a result for the key, recursively (a
    probe that failed in one round does not hide the others); other values from the first
    round that has the key."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for r in rounds for k in r):
        values = [r[key] for r in rounds if key in r]
        good = [v for v in values if not (isinstance(v, dict) and "error" in v)] or values
        first = good[0]
        if isinstance(first, dict) and "error" not in first:
            out[key] = median_of([v for v in good if isinstance(v, dict)])
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            out[key] = statistics.median(v for v in good if isinstance(v, (int, float)))
        else:
            out[key] = first
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--chart", type=Path, default=HERE.parent / "docs" / "bench.png")
    parser.add_argument(
        "--only", default="", help="comma-separated contender names, for a quick look"
    )
    parser.add_argument(
        "--event-loops",
        action="store_true",
        help="also run both telepresence paths with the daemon on asyncio's loop (an A/B "
        "of uvloop; printed after the main table)",
    )
    args = parser.parse_args()
    pod, cluster_ip, server = deploy()
    scripts = client_scripts()
    in_laptop("telepresence", "quit")
    contenders: list[Contender] = [
        Direct("direct", host=cluster_ip),
        PortForward("port-forward", namespace=NS, pod=pod),
        Telepresence("telepresence", cluster_ip=cluster_ip),
        Telepresence("telepresence-direct", cluster_ip=cluster_ip, transport="direct"),
        Telepresence2("telepresence2", cluster_ip=cluster_ip),
    ]
    if args.event_loops:
        contenders += [
            Telepresence("telepresence/asyncio", cluster_ip=cluster_ip, event_loop="asyncio"),
            Telepresence(
                "telepresence-direct/asyncio",
                cluster_ip=cluster_ip,
                transport="direct",
                event_loop="asyncio",
            ),
        ]
    if args.only:
        wanted = set(args.only.split(","))
        contenders = [c for c in contenders if c.name in wanted]
    rounds: dict[str, list[dict[str, Any]]] = {c.name: [] for c in contenders}
    with_tel2 = any(isinstance(c, Telepresence2) for c in contenders)
    try:
        if with_tel2:
            telepresence2.install()
        for index in range(args.rounds):
            order = contenders[index % len(contenders) :] + contenders[: index % len(contenders)]
            for contender in order:
                print(f"round {index + 1}: {contender.name}", file=sys.stderr, flush=True)
                rounds[contender.name].append(
                    measure(contender, scripts, seconds=args.seconds, requests=args.requests)
                )
    finally:
        server.terminate()
        in_laptop("telepresence", "quit", check=False)
        if with_tel2:
            telepresence2.uninstall()
    results = {name: median_of(r) for name, r in rounds.items()}
    results["rounds"] = rounds
    print(render_table(results))
    if args.event_loops:
        print(
            render_ab(
                results, [(p, f"{p}/asyncio") for p in ("telepresence", "telepresence-direct")]
            )
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    render_chart(results, args.chart)
    print(f"chart: {args.chart}", file=sys.stderr)


if __name__ == "__main__":
    main()
