"""Telepresence under load: many flows, a high connection rate, stalled readers, and a soak.

    sudo /opt/telepresence-dev/venv/bin/python -m bench.load_bench [--idle 1000]
        [--active 200] [--seconds 30] [--stalled 100] [--soak-minutes 0]

Run as root with devcluster up. Phases, each against pods in the cluster, from the laptop,
connected (bench/loadclient.py does the traffic):

  hold    IDLE connections opened and kept, ACTIVE ones echoing 1 KiB for SECONDS; every
          idle one must still echo at the end
  rate    fresh connections (connect, echo, close) for SECONDS from 64 workers
  stall   a download alone, then STALLED downloads whose readers stop after the headers,
          then the same download beside them
  soak    hold, rate and stall in turn for SOAK minutes; resident memory and open
          descriptors of the daemon, the root helper and the manager at the end against
          their values after the first round

All the while the RSS and descriptor count of those three processes are sampled from
/proc every 0.2 s. Targets (issue #10): zero errors; at least 1,000 connections a second
in every second; daemon RSS at most 200 MB throughout; stalled readers neither push
memory past the documented bound (docs/architecture.md, "Memory") nor slow the download;
after a soak, RSS and descriptors within 10% of the post-warm-up figures.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.contenders import devcluster, find_pids, in_laptop, kubectl
from devcluster.fixtures import deployment, http_app_manifest, to_yaml
from devcluster.images import TCP_ECHO_IMAGE
from telepresence.manager import config
from telepresence.tunnel.endpoint import RECEIVE_BUDGET, STREAM_INITIAL_WINDOW
from telepresence.tunnel.flows import PAUSE_READING_AT, WRITE_BUFFER_LIMIT

NS = "bench-load"
VENV_PYTHON = "/opt/telepresence-dev/venv/bin/python"
ECHO_PORTS = [9000, 9001, 9002, 9003]
CLIENT = Path(__file__).with_name("loadclient.py")
MB = 1_000_000
MIB = 1024 * 1024
#: The daemon's resident memory with one link and nothing buffered, measured here
#: (55 MB) with room for the interpreter's allocator keeping freed arenas.
DAEMON_BASELINE = 80 * MIB

PROCESSES = {
    "daemon": "-m telepresence.daemon",
    "helper": "telepresence-helper --connect",
    "manager": "-m telepresence.manager",
}


def daemon_bound(streams: int) -> int:
    """The daemon's documented bound with one link: its receive budget, plus per stream
    its initial window, what the local socket may buffer, and what waits for credit."""
    per_stream = STREAM_INITIAL_WINDOW + WRITE_BUFFER_LIMIT + PAUSE_READING_AT + 256 * 1024
    return DAEMON_BASELINE + RECEIVE_BUDGET + streams * per_stream


def manager_bound(streams: int) -> int:
    """The manager's sizing (manager/config.py) for one laptop link and this many streams."""
    return config.BASELINE + config.LINK_WORST_CASE + streams * config.STREAM_WORST_CASE


@dataclass
class Sample:
    at: float
    rss: dict[str, int]
    fds: dict[str, int]


@dataclass
class Sampler:
    """RSS and descriptors of the three processes, every 0.2 s, on a thread."""

    pids: dict[str, int]
    samples: list[Sample] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.samples.append(self.take())

    def take(self) -> Sample:
        rss, fds = {}, {}
        for name, pid in self.pids.items():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                rss[name] = next(
                    int(line.split()[1]) * 1024
                    for line in status.splitlines()
                    if line.startswith("VmRSS:")
                )
                fds[name] = len(list(Path(f"/proc/{pid}/fd").iterdir()))
            except (OSError, StopIteration):
                rss[name], fds[name] = 0, 0
        return Sample(time.time(), rss, fds)

    def peak(self, name: str, since: float, until: float) -> int:
        return max((s.rss[name] for s in self.samples if since <= s.at <= until), default=0)


def laptop_client(*args: str, timeout: float) -> tuple[dict[str, float], dict[str, Any]]:
    """Runs loadclient in the laptop; returns its marks and its result."""
    out = in_laptop(VENV_PYTHON, str(CLIENT), *args, timeout=timeout)
    marks: dict[str, float] = {}
    result: dict[str, Any] = {}
    for line in out.splitlines():
        record = json.loads(line)
        if "mark" in record:
            marks[record["mark"]] = record["at"]
        else:
            result = record["result"]
    return marks, result


def echo_manifest(namespace: str, *, replicas: int) -> str:
    """The TCP echo pods behind one Service with four ports onto the one container port:
    connections spread over four destinations, and with several replicas the manager's
    dials spread too."""
    objects = deployment(
        name="echo",
        namespace=namespace,
        image=TCP_ECHO_IMAGE,
        port=9000,
        replicas=replicas,
        args=["--port", "9000"],
    )
    spec = objects[1]["spec"]
    assert isinstance(spec, dict)
    spec["ports"] = [
        {"name": f"p{p}", "port": p, "targetPort": 9000, "protocol": "TCP"} for p in ECHO_PORTS
    ]
    return to_yaml(objects)


def setup() -> tuple[str, str]:
    """The echo pods and the HTTP pod; returns their ClusterIPs."""
    if f"namespace/{NS}" not in kubectl("get", "ns", "-o", "name").split():
        kubectl("create", "namespace", NS)
    kubectl("apply", "-f", "-", input=echo_manifest(NS, replicas=2))
    kubectl("apply", "-f", "-", input=http_app_manifest(name="bulk", namespace=NS))
    for name in ("echo", "bulk"):
        kubectl("rollout", "status", f"deployment/{name}", "-n", NS, "--timeout=180s")
    ips = [
        kubectl("get", "svc", name, "-n", NS, "-o", "jsonpath={.spec.clusterIP}").strip()
        for name in ("echo", "bulk")
    ]
    return ips[0], ips[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--active", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--stalled", type=int, default=100)
    parser.add_argument("--download-mib", type=int, default=512)
    parser.add_argument("--soak-minutes", type=float, default=0)
    args = parser.parse_args()
    CLIENT.parent.chmod(0o755)
    CLIENT.chmod(0o644)
    devcluster("up")
    echo_ip, bulk_ip = setup()
    in_laptop("telepresence", "quit")
    in_laptop("telepresence", "connect")
    pids = find_pids(PROCESSES)
    missing = sorted(set(PROCESSES) - set(pids))
    if missing:
        raise SystemExit(f"not running: {', '.join(missing)}")
    sampler = Sampler(pids)
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    ports = ",".join(map(str, ECHO_PORTS))
    report: dict[str, Any] = {}
    try:
        warm_at = None
        rounds = 0
        soak_until = time.monotonic() + args.soak_minutes * 60
        while True:
            rounds += 1
            marks, hold = laptop_client(
                "hold",
                echo_ip,
                ports,
                str(args.idle),
                str(args.active),
                str(args.seconds),
                timeout=600,
            )
            hold["daemon peak MB"] = sampler.peak("daemon", marks["opening"], marks["closed"]) / MB
            hold["manager peak MB"] = (
                sampler.peak("manager", marks["opening"], marks["closed"]) / MB
            )
            marks, rate = laptop_client(
                "rate", echo_ip, ports, str(args.seconds), "64", timeout=600
            )
            rate["daemon peak MB"] = sampler.peak("daemon", marks["rate"], marks["rate done"]) / MB
            marks, stall = laptop_client(
                "stall",
                bulk_ip,
                "8080",
                str(args.stalled),
                str(args.download_mib * MIB),
                timeout=600,
            )
            stall["daemon peak MB"] = (
                sampler.peak("daemon", marks["stalling"], marks["released"]) / MB
            )
            stall["manager peak MB"] = (
                sampler.peak("manager", marks["stalling"], marks["released"]) / MB
            )
            stall["daemon bound MB"] = daemon_bound(args.stalled + 1) / MB
            stall["manager bound MB"] = manager_bound(args.stalled + 1) / MB
            if rounds == 1:
                report.update(hold=hold, rate=rate, stall=stall)
                warm_at = settled(sampler) if args.soak_minutes else None
            if time.monotonic() >= soak_until:
                break
        if args.soak_minutes:
            end = settled(sampler)
            assert warm_at is not None
            report["soak"] = {
                "rounds": rounds,
                "minutes": args.soak_minutes,
                **{
                    f"{name} {kind}": [before, after, after / before if before else 0.0]
                    for name in sampler.pids
                    for kind, before, after in (
                        ("RSS MB", warm_at.rss[name] / MB, end.rss[name] / MB),
                        ("fds", warm_at.fds[name], end.fds[name]),
                    )
                },
                "last round": {"hold": hold, "rate": rate, "stall": stall},
            }
    finally:
        sampler.stop.set()
        in_laptop("telepresence", "quit")
    print_report(report, args)
    print(json.dumps(report))


def settled(sampler: Sampler) -> Sample:
    """The figures once the last round's connections are gone: the lowest descriptor count
    of the last seconds (closing sockets linger briefly), with the RSS of that moment."""
    time.sleep(3)  # a measurement window, not synchronisation
    recent = [s for s in sampler.samples if s.at >= time.time() - 3]
    return min(recent, key=lambda s: sum(s.fds.values()))


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    hold, rate, stall = report["hold"], report["rate"], report["stall"]
    rows = [
        ("hold: opened", f"{hold['opened']} of {args.idle + args.active}", ""),
        ("hold: errors", hold["errors"], "0"),
        ("hold: echo p50/p99 ms", f"{hold['p50 ms']:.2f} / {hold['p99 ms']:.2f}", ""),
        ("hold: daemon peak RSS MB", f"{hold['daemon peak MB']:.0f}", "<= 200"),
        ("hold: manager peak RSS MB", f"{hold['manager peak MB']:.0f}", ""),
        ("rate: connections/s mean", f"{rate['per s mean']:.0f}", ""),
        ("rate: connections/s worst second", rate["per s min"], ">= 1000"),
        ("rate: errors", rate["errors"], "0"),
        ("rate: daemon peak RSS MB", f"{rate['daemon peak MB']:.0f}", "<= 200"),
        ("stall: stalled flows", stall["stalled"], str(args.stalled)),
        ("stall: download alone MiB/s", f"{stall['alone MiB/s']:.0f}", ""),
        ("stall: download beside them", f"{stall['beside stalled MiB/s']:.0f}", ""),
        ("stall: ratio", f"{stall['ratio']:.2f}", ">= 0.9"),
        (
            "stall: daemon peak RSS MB",
            f"{stall['daemon peak MB']:.0f}",
            f"<= {stall['daemon bound MB']:.0f} (bound)",
        ),
        (
            "stall: manager peak RSS MB",
            f"{stall['manager peak MB']:.0f}",
            f"<= {stall['manager bound MB']:.0f} (sizing)",
        ),
    ]
    if "soak" in report:
        soak = report["soak"]
        rows.append(("soak: rounds", soak["rounds"], f"{soak['minutes']} min"))
        for key, value in soak.items():
            if isinstance(value, list):
                rows.append(
                    (
                        f"soak: {key} warm → end",
                        f"{value[0]:.0f} → {value[1]:.0f} ({value[2]:.2f})",
                        "0.90-1.10",
                    )
                )
    width = max(len(r[0]) for r in rows) + 2
    for name, value, target in rows:
        print(f"{name:<{width}}{value!s:>16}   {target}")
    if hold["examples"] or rate["examples"] or stall["examples"]:
        print("errors:", hold["examples"] + rate["examples"] + stall["examples"])


if __name__ == "__main__":
    main()
