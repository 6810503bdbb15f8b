"""The traffic manager process: its listeners, signals and drain, around `server.Manager`.

`python3 -m telepresence.manager` runs `main`. Apart from `server.py` so the network side
(tunnels, sessions, dials) reads without the process wiring, and tests can run a `Manager`
without any of it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time

from telepresence.fdlimit import raise_open_file_limit
from telepresence.manager.benchservice import SocketBench
from telepresence.manager.config import (
    BENCH_LOCAL_PORT,
    DIRECT_HOST,
    DRAIN_SECONDS,
    HEALTH_HOST,
    HEALTH_PORT,
    TUNNEL_HOST,
    TUNNEL_PORT,
)
from telepresence.manager.dialpolicy import DialPolicy, DialPolicyError
from telepresence.manager.directlisten import DirectListener
from telepresence.manager.health import HealthServer
from telepresence.manager.server import Manager, TunnelConnection

log = logging.getLogger("telepresence.manager")


async def serve(
    *,
    tunnel_port: int,
    health_port: int,
    dial_policy: DialPolicy,
    drain_seconds: float = DRAIN_SECONDS,
    direct_port: int = 0,
) -> None:
    """``direct_port``: where the direct transport listens; 0: no direct transport."""
    from telepresence.manager.runtime import cluster_info_source, dns_lookup

    direct = DirectListener() if direct_port else None
    manager = Manager(
        dns_lookup=dns_lookup, dial_policy=dial_policy, direct=direct, direct_port=direct_port
    )
    loop = asyncio.get_running_loop()
    # Loopback only: the kubelet's port-forward dials localhost in the pod, and nothing on
    # the pod network can reach the tunnel, so RBAC on pods/portforward decides who uses it.
    tunnel_server = await loop.create_server(
        lambda: TunnelConnection(manager), TUNNEL_HOST, tunnel_port, reuse_address=True
    )
    # On the pod network, but TLS with a session's own credentials or nothing: only a
    # laptop that registered them over a port-forward link gets past the handshake.
    direct_server = (
        await loop.create_server(
            lambda: TunnelConnection(manager, direct=True),
            DIRECT_HOST,
            direct_port,
            ssl=direct.context,
            ssl_handshake_timeout=5,
            reuse_address=True,
        )
        if direct is not None
        else None
    )
    # `telepresence bench --port-forward`'s far end: loopback, so port-forward only.
    bench_server = await loop.create_server(
        SocketBench, TUNNEL_HOST, BENCH_LOCAL_PORT, reuse_address=True
    )
    # Not ready once stopping: laptops (and Services) pick a replacement.
    health = HealthServer(ready=lambda: tunnel_server.is_serving() and manager.draining is None)
    health_server = await health.start(HEALTH_HOST, health_port)
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    tasks = [
        asyncio.create_task(manager.expire_sessions(), name="expire-sessions"),
        asyncio.create_task(cluster_info_source(manager.set_cluster_info), name="cluster-info"),
    ]
    stop = asyncio.create_task(stopping.wait(), name="stopping")
    log.info(
        "traffic manager %s (protocol %s): tunnel on %s:%d, health on %s:%d",
        manager.version,
        manager.protocol,
        TUNNEL_HOST,
        tunnel_port,
        HEALTH_HOST,
        health_port,
    )
    if direct_server is not None:
        log.info("direct transport (mutual TLS) on %s:%d", DIRECT_HOST, direct_port)
    log.info("%s", dial_policy.describe())
    try:
        async with tunnel_server, health_server:
            done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop:
                    task.result()
            # SIGTERM: a rollout, a node drain or a delete. Keep serving while the laptops
            # move to a replacement; they close their links here once idle.
            manager.drain(drain_seconds)
            drained = await manager.drained(deadline=time.monotonic() + drain_seconds)
            log.info(
                "stopped: %s",
                "every laptop moved" if drained else f"{len(manager.connections)} links cut",
            )
    finally:
        if direct_server is not None:
            direct_server.close()
        bench_server.close()
        stop.cancel()
        for task in tasks:
            task.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(prog="traffic-manager")
    parser.add_argument(
        "--tunnel-port", type=int, default=int(os.environ.get("TUNNEL_PORT", TUNNEL_PORT))
    )
    parser.add_argument(
        "--health-port", type=int, default=int(os.environ.get("HEALTH_PORT", HEALTH_PORT))
    )
    parser.add_argument(
        "--direct-port",
        type=int,
        default=int(os.environ.get("DIRECT_PORT", "0")),
        help="listen for the direct transport (mutual TLS) here; 0: port-forward only",
    )
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args()
    try:
        # Before anything listens: a typo in the policy must stop the pod, not weaken it.
        dial_policy = DialPolicy.from_env(os.environ)
    except DialPolicyError as e:
        sys.exit(f"traffic-manager: {e}")
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    drain = float(os.environ.get("TELEPRESENCE_DRAIN_SECONDS", DRAIN_SECONDS))
    raise_open_file_limit()
    asyncio.run(
        serve(
            tunnel_port=args.tunnel_port,
            health_port=args.health_port,
            dial_policy=dial_policy,
            drain_seconds=drain,
            direct_port=args.direct_port,
        )
    )
