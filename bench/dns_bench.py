"""The laptop's own (non-cluster) lookups, before and while connected, in each laptop flavour.

    python bench/dns_bench.py [--lookups 300] [--flavours plain,resolved-stub,resolved-nss]

What a connected laptop costs its other programs: in the plain flavour every lookup passes
through our DNS server (the port-53 redirect) and is forwarded to the laptop's nameserver;
with systemd-resolved (Ubuntu's stub, Fedora's nss-resolve) they should not pass through us
at all. Measured with Python's getaddrinfo in the laptop, as an application asks:

  known     a name the laptop's resolver knows (www.example.test); resolved may cache it
  unique    a new name each time (NXDOMAIN from the laptop's resolver), so no cache helps

Reported: p50/p99 in ms per flavour, before and connected, and the connected/before ratio.
Absolute numbers depend on the machine; the ratios are the result. Run as root with
devcluster up; it leaves the laptop in the flavour it found.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

from devcluster import laptopdns
from devcluster.laptop import argv as laptop_argv
from devcluster.laptop import environment
from devcluster.settings import Settings

VENV_PYTHON = "/opt/telepresence-dev/venv/bin/python"

# Runs in the laptop: N lookups of each kind, prints the latencies in ms as JSON.
CLIENT = r"""
import json, socket, sys, time, uuid

def timed(name):
    start = time.perf_counter()
    try:
        socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror:
        pass
    return (time.perf_counter() - start) * 1000

n = int(sys.argv[1])
timed("www.example.test")  # warm: the first lookup pays for loading NSS modules
known = [timed("www.example.test") for _ in range(n)]
unique = [timed(f"n{uuid.uuid4().hex[:12]}.example.test") for _ in range(n)]
print(json.dumps({"known": known, "unique": unique}))
"""


def laptop(settings: Settings, *cmd: str, timeout: float = 300) -> str:
    proc = subprocess.run(
        laptop_argv(settings, list(cmd), root=False),
        env=environment(settings, root=False),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc.stdout


def measure(settings: Settings, lookups: int) -> dict[str, dict[str, float]]:
    raw = json.loads(laptop(settings, VENV_PYTHON, "-c", CLIENT, str(lookups)))
    result = {}
    for kind, samples in raw.items():
        samples.sort()
        result[kind] = {
            "p50_ms": statistics.median(samples),
            "p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lookups", type=int, default=300)
    parser.add_argument("--flavours", default=",".join(laptopdns.FLAVOURS))
    args = parser.parse_args()
    settings = Settings()
    found = laptopdns.current(settings)
    results: dict[str, Any] = {}
    try:
        for flavour in args.flavours.split(","):
            laptop(settings, "telepresence", "quit")
            laptopdns.apply(settings, laptopdns.check_flavour(flavour))
            before = measure(settings, args.lookups)
            laptop(settings, "telepresence", "connect")
            try:
                connected = measure(settings, args.lookups)
            finally:
                laptop(settings, "telepresence", "quit")
            results[flavour] = {"before": before, "connected": connected}
    finally:
        laptopdns.apply(settings, found)
    print(f"{'flavour':<14} {'lookup':<7} {'before p50/p99':>16} {'connected p50/p99':>19} ratio")
    for flavour, r in results.items():
        for kind in ("known", "unique"):
            b, c = r["before"][kind], r["connected"][kind]
            print(
                f"{flavour:<14} {kind:<7} {b['p50_ms']:>7.2f}/{b['p99_ms']:<7.2f} ms "
                f"{c['p50_ms']:>7.2f}/{c['p99_ms']:<7.2f} ms  {c['p50_ms'] / b['p50_ms']:.2f}x"
            )
    json.dump(results, sys.stderr)
    print(file=sys.stderr)


if __name__ == "__main__":
    main()
