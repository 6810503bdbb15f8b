"""`telepresence bench`: what this laptop's path to the cluster gives, and over which
transport; with ``--port-forward``, the same measurements through `kubectl port-forward`
beside it.

The tunnel's figures come from the daemon (`daemon/benchrun.py`); the port-forward ones
from here, through a `kubectl port-forward` to the manager's loopback bench port, started
afresh whenever kubectl has given up (it exits when a forwarded connection fails).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from typing import Any

from telepresence.benchclient import BenchError, measure
from telepresence.cli import client
from telepresence.manager.config import BENCH_LOCAL_PORT

#: How long kubectl may take to say where it listens.
KUBECTL_START = 30.0
_LISTENING = re.compile(rb"Forwarding from 127\.0\.0\.1:(\d+) ")


class BenchFailed(Exception):
    """One line for the user."""


def through_tunnel(seconds: float) -> dict[str, Any]:
    reply = client.request({"cmd": "bench", "seconds": seconds}, timeout=seconds * 3 + 90)
    if reply is None:
        raise BenchFailed("not connected: run `telepresence connect` first")
    return reply


class KubectlForward:
    """`kubectl port-forward` to the manager pod's bench port, restarted when it exits."""

    def __init__(self, *, namespace: str, pod: str, context: str, kubeconfig: str | None):
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            raise BenchFailed("--port-forward runs kubectl, which is not on PATH")
        self.argv = [
            kubectl, "port-forward", "-n", namespace, f"pod/{pod}", f":{BENCH_LOCAL_PORT}",
            "--context", context, *(["--kubeconfig", kubeconfig] if kubeconfig else []),
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.process is None or self.process.poll() is not None:
            await asyncio.to_thread(self._start)
        return await asyncio.open_connection("127.0.0.1", self.port)

    def _start(self) -> None:
        self.stop()
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # kubectl prints it once it listens
        found = _LISTENING.search(line)
        if found is None:
            err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
            self.stop()
            raise BenchError(f"kubectl port-forward failed: {err.strip() or line.decode()}")
        self.port = int(found.group(1))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


def through_kubectl(
    status: dict[str, Any], seconds: float, kubeconfig: str | None
) -> dict[str, Any]:
    user = status["user_daemon"]
    forward = KubectlForward(
        namespace=user["manager_namespace"],
        pod=user["manager_pod"],
        context=user["kubernetes_context"],
        kubeconfig=kubeconfig,
    )
    try:
        return asyncio.run(measure(forward.open, seconds=seconds))
    finally:
        forward.stop()


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    lines = [f"{'':<24}{'up MiB/s':>10}{'down MiB/s':>12}{'latency p50 / p99 ms':>24}"]
    for name, r in rows:
        latency = f"{r['latency ms']['p50']:.2f} / {r['latency ms']['p99']:.2f}"
        lines.append(f"{name:<24}{r['up MiB/s']:>10.0f}{r['down MiB/s']:>12.0f}{latency:>24}")
    return "\n".join(lines)
