"""`telepresence bench` in the daemon: flows to the manager's bench service, through the
session's pool like any program's flow, measured by `benchclient`.

A flow here is a SocketFlow on one end of a socket pair, as the transparent proxy makes
for a redirected connection, so the figures include the daemon's own flow handling; only
the kernel's redirect of a real program's connection is left out. No port is opened.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from telepresence.benchclient import BenchError, measure
from telepresence.daemon.pool import ManagerPool
from telepresence.manager.benchservice import BENCH_ADDRESS, BENCH_PORT, BENCH_PROTOCOL
from telepresence.tunnel.flows import SocketFlow
from telepresence.tunnel.frames import Dial, IPProtocol

#: Longest measurement a request may ask for: the control connection waits for it.
MAX_SECONDS = 60.0


async def open_bench_flow(pool: ManagerPool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    flow = SocketFlow()
    try:
        flow.attach(pool.open_stream(Dial(IPProtocol.TCP, BENCH_ADDRESS, BENCH_PORT), flow))
        await loop.connect_accepted_socket(lambda: flow, theirs)
    except BaseException:
        ours.close()
        theirs.close()
        raise
    return await asyncio.open_connection(sock=ours)


async def run(pool: ManagerPool, *, seconds: float) -> dict[str, Any]:
    """Raises BenchError naming what to do when the manager cannot take part."""
    if pool.agreed_protocol < BENCH_PROTOCOL:
        raise BenchError(
            f"the traffic manager {pool.manager_version} has no bench service; "
            "`telepresence manager upgrade` installs one that has"
        )
    if not 0 < seconds <= MAX_SECONDS:
        raise BenchError(f"--seconds must be more than 0 and at most {MAX_SECONDS:g}")
    return await measure(lambda: open_bench_flow(pool), seconds=seconds)
