"""Throughput and latency of the tunnel, against two baselines measured in the same run.

    python bench/tunnel_bench.py [--size-mib 1024] [--requests 300]

Paths compared (same HTTP server pod, same API server):
  direct        from inside the cluster network (`devcluster pod`), no tunnel at all
  telepresence  from the laptop, connected, by service name
  port-forward  from the laptop through `kubectl port-forward` to the same pod

Reported: download MiB/s and request latency p50/p99 (a new TCP connection per request),
with ratios against the direct path and against kubectl port-forward. Absolute numbers
depend on the machine; the ratios are the result. Run as root with devcluster up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from devcluster.cli import kubectl as admin_kubectl
from devcluster.fixtures import http_app_manifest
from devcluster.settings import Settings

NS = "bench"
VENV_PYTHON = "/opt/telepresence-dev/venv/bin/python"
PF_PORT = 18099

# Runs on the measuring side: N requests, each on a fresh connection; prints JSON.
LATENCY_CLIENT = r"""
import json, socket, sys, time

def get(s, path):
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    # Read by Content-Length: kubectl port-forward does not pass the server's close on.
    while len(body) < length:
        body += s.recv(65536)

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
times = []
for _ in range(n):
    t = time.perf_counter()
    s = socket.create_connection((host, port), timeout=10)
    get(s, "/")
    s.close()
    times.append(time.perf_counter() - t)
print(json.dumps(times))
"""

# Downloads N bytes with one connection; prints seconds and the bytes received.
DOWNLOAD_CLIENT = r"""
import json, socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()
s = socket.create_connection((host, port), timeout=30)
s.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
buf = bytearray(1 << 20)
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(65536)
got = len(head.partition(b"\r\n\r\n")[2])
while got < size and (n := s.recv_into(buf)):
    got += n
print(json.dumps({"seconds": time.perf_counter() - t, "bytes": got}))
"""


def devcluster(*args: str, check: bool = True, timeout: float = 900) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "devcluster.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise SystemExit(f"devcluster {' '.join(args[:3])} failed: {proc.stderr.strip()}")
    return proc.stdout


def laptop(*cmd: str, **kw: Any) -> str:
    return devcluster("laptop", "--", *cmd, **kw)


def pod(*cmd: str, **kw: Any) -> str:
    return devcluster("pod", "--", *cmd, **kw)


def kubectl(*args: str, input: str | None = None, check: bool = True) -> str:
    return admin_kubectl(Settings(), *args, input=input, check=check).stdout


def _clients() -> tuple[str, str]:
    """The two client scripts as files every user can read (the laptop runs them as its
    unprivileged user, pods as root), so no shell quoting stands between them and Python."""
    folder = Path(tempfile.mkdtemp(prefix="tp-bench-"))
    folder.chmod(0o755)
    paths = []
    for name, text in (("download.py", DOWNLOAD_CLIENT), ("latency.py", LATENCY_CLIENT)):
        path = folder / name
        path.write_text(text)
        path.chmod(0o644)
        paths.append(str(path))
    return paths[0], paths[1]


def _summary(download: dict[str, float], times: list[float], size: int) -> dict[str, float]:
    if download["bytes"] < size:
        raise SystemExit(f"short download: {download['bytes']} of {size}")
    times = sorted(times)
    return {
        "MiB/s": size / download["seconds"] / 2**20,
        "p50 ms": statistics.median(times) * 1000,
        "p99 ms": times[int(len(times) * 0.99) - 1] * 1000,
    }


def measure(
    run: Any, host: str, port: int, *, clients: tuple[str, str], size: int, requests: int
) -> dict[str, float]:
    download_client, latency_client = clients
    download = json.loads(run(VENV_PYTHON, download_client, host, str(port), str(size)))
    times = json.loads(run(VENV_PYTHON, latency_client, host, str(port), str(requests)))
    return _summary(download, times, size)


def with_port_forward(
    pod_name: str, *, clients: tuple[str, str], size: int, requests: int
) -> dict[str, float]:
    download_client, latency_client = clients
    script = (
        f"kubectl port-forward -n {NS} pod/{pod_name} {PF_PORT}:8080 >/dev/null 2>&1 & pf=$!; "
        f"trap 'kill $pf' EXIT; "
        f"for i in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:{PF_PORT}/ && break; "
        f"sleep 0.1; done; "
        f"{VENV_PYTHON} {download_client} 127.0.0.1 {PF_PORT} {size}; "
        f"{VENV_PYTHON} {latency_client} 127.0.0.1 {PF_PORT} {requests}"
    )
    out = laptop("sh", "-c", script).splitlines()
    return _summary(json.loads(out[0]), json.loads(out[1]), size)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    size = args.size_mib * 2**20
    clients = _clients()
    devcluster("up")
    kubectl("create", "namespace", NS, check=False)
    kubectl("apply", "-f", "-", input=http_app_manifest(name="bulk", namespace=NS))
    kubectl("rollout", "status", "deployment/bulk", "-n", NS, "--timeout=120s")
    pods = json.loads(kubectl("get", "pods", "-n", NS, "-l", "app=bulk", "-o", "json"))
    pod_name = pods["items"][0]["metadata"]["name"]

    results: dict[str, dict[str, float]] = {}
    results["direct"] = measure(
        pod, f"bulk.{NS}", 8080, clients=clients, size=size, requests=args.requests
    )
    results["port-forward"] = with_port_forward(
        pod_name, clients=clients, size=size, requests=args.requests
    )
    laptop("telepresence", "quit")
    laptop("telepresence", "connect")
    try:
        started = time.monotonic()
        results["telepresence"] = measure(
            laptop, f"bulk.{NS}", 8080, clients=clients, size=size, requests=args.requests
        )
        results["telepresence"]["wall s"] = time.monotonic() - started
    finally:
        laptop("telepresence", "quit")

    print(f"{'path':<14}{'MiB/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for name, r in results.items():
        print(f"{name:<14}{r['MiB/s']:>10.1f}{r['p50 ms']:>10.2f}{r['p99 ms']:>10.2f}")
    tp, direct, pf = results["telepresence"], results["direct"], results["port-forward"]
    print()
    print(
        f"throughput  telepresence/direct = {tp['MiB/s'] / direct['MiB/s']:.3f}   "
        f"telepresence/port-forward = {tp['MiB/s'] / pf['MiB/s']:.2f}"
    )
    print(
        f"p50 latency telepresence/direct = {tp['p50 ms'] / direct['p50 ms']:.2f}   "
        f"telepresence/port-forward = {tp['p50 ms'] / pf['p50 ms']:.2f}"
    )
    print(
        f"p99 latency telepresence/direct = {tp['p99 ms'] / direct['p99 ms']:.2f}   "
        f"telepresence/port-forward = {tp['p99 ms'] / pf['p99 ms']:.2f}"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
