"""What the benchmark suite measures on each path, as commands run where the client lives.

Each probe takes a ``run`` callable (the laptop as its user, or a pod's network) and
returns plain numbers. Bulk and UDP figures come from iperf3 at both ends, so the kernel,
not a Python server, is the far end; latency, the connection rate and DNS use small
Python clients (stdlib only) that time what an application sees.
"""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Run = Callable[..., str]
VENV_PYTHON = "/opt/telepresence-dev/venv/bin/python"
MIB = 1024 * 1024
GIB = 1024 * MIB

#: N requests to an HTTP server, each on a fresh connection; prints the seconds of each.
#: Reads by Content-Length: kubectl port-forward does not pass the server's close on.
LATENCY_CLIENT = r"""
import json, socket, sys, time

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
times = []
for _ in range(n):
    t = time.perf_counter()
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += s.recv(65536)
    s.close()
    times.append(time.perf_counter() - t)
print(json.dumps(times))
"""

#: N lookups of NAME with getaddrinfo in one process (process start would dominate a
#: `getent` per lookup), after one to warm the caches; prints the milliseconds of each, or
#: which name failed. The first lookup may wait up to 10 s for the name to appear (a
#: tunnel's DNS that is still learning namespaces): that wait is reported, not timed.
DNS_CLIENT = r"""
import json, socket, sys, time

name, n = sys.argv[1], int(sys.argv[2])
started = time.monotonic()
while True:
    try:
        socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)
        break
    except socket.gaierror as e:
        if time.monotonic() - started > 10:
            print(json.dumps({"error": f"{name}: {e}"}))
            sys.exit()
        time.sleep(0.1)
waited = time.monotonic() - started
times = []
for _ in range(n):
    t = time.perf_counter()
    try:
        socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as e:
        print(json.dumps({"error": f"{name} after {len(times)} lookups: {e}"}))
        sys.exit()
    times.append((time.perf_counter() - t) * 1000)
print(json.dumps({"times": times, "first s": waited}))
"""


def percentiles(samples: list[float], scale: float = 1.0) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50": statistics.median(ordered) * scale,
        "p99": ordered[max(0, math.ceil(len(ordered) * 0.99) - 1)] * scale,  # nearest rank
    }


def _iperf_json(out: str) -> dict[str, Any]:
    """iperf3 -J's report; text it printed instead (an error before the test) is kept."""
    try:
        # A warning line may come first ("Size of data read does not correspond ...").
        result: dict[str, Any] = json.loads(out[out.index("{") :])
    except (ValueError, json.JSONDecodeError):
        return {"error": out.strip()[:300] or "no output"}
    return result


def iperf_tcp(
    run: Run, host: str, port: int, *, reverse: bool, flows: int = 1, seconds: int = 5
) -> dict[str, Any]:
    """MiB/s the receiver saw. Through kubectl port-forward the final result exchange of an
    upload fails (BENCH.md); then the sender's own sum is all there is, and it says so."""
    cmd = ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J", "-P", str(flows)]
    if reverse:
        cmd.append("-R")
    result = _iperf_json(run(*cmd, timeout=seconds + 60, check=False))
    # The server finishes a test that broke at its end (through kubectl) only when it
    # notices: until then it turns the next one away as busy.
    deadline = time.monotonic() + 20
    while "busy" in str(result.get("error", "")) and time.monotonic() < deadline:
        time.sleep(0.5)
        result = _iperf_json(run(*cmd, timeout=seconds + 60, check=False))
    end = result.get("end", {})
    received = end.get("sum_received", {})
    if received.get("bytes"):
        return {"MiB/s": received["bits_per_second"] / 8 / MIB, "bytes": received["bytes"]}
    sent = end.get("sum_sent", {})
    if sent.get("bytes"):
        return {
            "MiB/s": sent["bits_per_second"] / 8 / MIB,
            "bytes": sent["bytes"],
            "note": "sender side only",
        }
    # Sometimes not even the sender's summary comes: its per-second intervals still do.
    intervals = [i.get("sum", {}) for i in result.get("intervals", [])]
    moved = sum(i.get("bytes", 0) for i in intervals)
    took = sum(i.get("seconds", 0.0) for i in intervals)
    if moved and took:
        return {"MiB/s": moved / took / MIB, "bytes": moved, "note": "sender side only"}
    return {"error": result.get("error", "no result")}


def iperf_udp(run: Run, host: str, port: int, *, mbit: int, seconds: int = 5) -> dict[str, Any]:
    """Datagrams of 1,200 bytes at `mbit` Mbit/s, laptop to pod: the loss the receiver saw."""
    cmd = [
        "iperf3", "-c", host, "-p", str(port), "-u", "-b", f"{mbit}M", "-l", "1200",
        "-t", str(seconds), "-J",
    ]  # fmt: skip
    result = _iperf_json(run(*cmd, timeout=seconds + 60, check=False))
    total = result.get("end", {}).get("sum", {})
    if "lost_percent" not in total:
        return {"error": result.get("error", "no result")}
    return {"offered Mbit/s": mbit, "loss %": total["lost_percent"]}


def latency(run: Run, script: Path, host: str, port: int, requests: int) -> dict[str, float]:
    times = json.loads(run(VENV_PYTHON, str(script), host, str(port), str(requests)))
    return percentiles(times, scale=1000)


def latency_under_load(
    run: Run, script: Path, host: str, *, http: int, iperf: int, requests: int, seconds: int
) -> dict[str, Any]:
    """Request latency while one download fills the path: what a bulk transfer adds to an
    interactive flow beside it (head-of-line delay in a shared connection or queue). The
    requests start once the download has run for a second, so it is at full speed."""
    loaded: dict[str, Any] = {}

    def download() -> None:
        loaded["download"] = iperf_tcp(run, host, iperf, reverse=True, seconds=seconds)

    worker = threading.Thread(target=download)
    worker.start()
    try:
        time.sleep(1)  # the download's ramp-up, not synchronisation: it has no signal to wait on
        times = json.loads(run(VENV_PYTHON, str(script), host, str(http), str(requests)))
    finally:
        worker.join()
    beside = loaded["download"]
    if "error" in beside:
        # Without the download this would be plain latency under another name.
        return {"error": f"the download beside the requests failed: {beside['error']}"}
    return {**percentiles(times, scale=1000), "download MiB/s": beside["MiB/s"]}


def connection_rate(run: Run, script: Path, host: str, port: int, seconds: int) -> dict[str, Any]:
    """bench/loadclient.py's rate mode: fresh connections, each one echo, 16 workers."""
    out = run(VENV_PYTHON, str(script), "rate", host, str(port), str(seconds), "16")
    result: dict[str, Any] = json.loads(out.splitlines()[-1])["result"]
    return {"per s": result["per s mean"], "errors": result["errors"]}


def dns(run: Run, script: Path, name: str, lookups: int) -> dict[str, Any]:
    """p50/p99 ms; a name that does not resolve is an error naming it, not a failed run."""
    out = json.loads(run(VENV_PYTHON, str(script), name, str(lookups)))
    if "error" in out:
        return {"error": out["error"]}
    return {**percentiles(out["times"]), "first s": out["first s"]}


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User plus system CPU time so far of each process, in seconds."""
    ticks = 100  # USER_HZ on Linux
    out = {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def cpu_per_gib(before: dict[str, float], after: dict[str, float], moved: int) -> dict[str, float]:
    gib = moved / GIB
    return {name: (after[name] - before[name]) / gib for name in after if name in before}
