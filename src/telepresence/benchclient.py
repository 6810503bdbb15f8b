"""`telepresence bench`'s measurements against the manager's bench service.

The same three measurements run over whatever connection ``open_conn`` makes: a flow
through the tunnel (the daemon opens it, `daemon/session.py`) or a connection through
`kubectl port-forward` to the service's loopback port (the CLI, `cli/bench.py`). The far
end is the manager itself (`manager/benchservice.py`), so the figures are the path's: the
laptop, the transport and the manager, not an app or the cluster network behind them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from telepresence.manager.benchservice import COUNT, DOWNLOAD, ECHO, END, REQUEST, UPLOAD

MIB = 1024 * 1024
_CHUNK = bytes(256 * 1024)

OpenConn = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class BenchError(Exception):
    """A measurement failed; the message says which and why."""


async def measure(open_conn: OpenConn, *, seconds: float, pings: int = 100) -> dict[str, Any]:
    """Upload and download MiB/s over one connection each for ``seconds``, and the
    round trip of one byte on a fresh connection, ``pings`` times (p50/p99 ms)."""
    return {
        "up MiB/s": await _timed(_upload(open_conn, seconds), "upload", seconds),
        "down MiB/s": await _timed(_download(open_conn, seconds), "download", seconds),
        "latency ms": await _timed(_latency(open_conn, pings), "latency", seconds),
    }


async def _timed(coro: Awaitable[Any], what: str, seconds: float) -> Any:
    try:
        return await asyncio.wait_for(coro, seconds + 30)
    except TimeoutError:
        raise BenchError(f"the {what} did not finish within {seconds + 30:g} s") from None
    except (OSError, asyncio.IncompleteReadError) as e:
        raise BenchError(f"the {what} failed: {e or type(e).__name__}") from None


async def _upload(open_conn: OpenConn, seconds: float) -> float:
    reader, writer = await open_conn()
    try:
        writer.write(REQUEST.pack(UPLOAD, 0))
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            writer.write(_CHUNK)
            await writer.drain()
        writer.write(END)
        # What the far end received, once it has all of it: the rate the path gave.
        (received,) = COUNT.unpack(await reader.readexactly(COUNT.size))
        return float(received / (time.monotonic() - start) / MIB)
    finally:
        writer.close()


async def _download(open_conn: OpenConn, seconds: float) -> float:
    reader, writer = await open_conn()
    try:
        writer.write(REQUEST.pack(DOWNLOAD, 0))
        start = time.monotonic()
        total = 0
        while (elapsed := time.monotonic() - start) < seconds:
            data = await reader.read(len(_CHUNK))
            if not data:
                raise BenchError("the download ended early")
            total += len(data)
        return float(total / elapsed / MIB)
    finally:
        writer.close()


async def _latency(open_conn: OpenConn, pings: int) -> dict[str, float]:
    times = []
    for _ in range(pings):
        start = time.monotonic()
        reader, writer = await open_conn()
        try:
            writer.write(REQUEST.pack(ECHO, 0) + b"x")
            await reader.readexactly(1)
            times.append((time.monotonic() - start) * 1000)
        finally:
            writer.close()
    times.sort()
    return {
        "p50": times[len(times) // 2],
        "p99": times[min(len(times) - 1, len(times) * 99 // 100)],
    }
