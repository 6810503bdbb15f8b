"""Load generator that bench/load_bench.py runs inside the laptop, as its user (stdlib only).

    python loadclient.py hold  HOST PORTS IDLE ACTIVE SECONDS
    python loadclient.py rate  HOST PORTS SECONDS CONCURRENCY
    python loadclient.py stall HOST PORT STALLED SIZE [ROUNDS]

PORTS is a comma-separated list; connections go round-robin over it, so a long run does
not exhaust the ephemeral ports towards one destination (BENCH.md). Every phase prints
lines of JSON: ``{"mark": ...}`` with a wall-clock time when a phase starts or ends, so the
caller can attribute its memory samples, and one ``{"result": ...}`` at the end. Every
error is counted; a few are kept as examples.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

HTTP_HEAD_END = b"\r\n\r\n"


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def mark(name: str) -> None:
    emit(mark=name, at=time.time())


class Errors:
    def __init__(self) -> None:
        self.count = 0
        self.examples: list[str] = []

    def add(self, exc: BaseException) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(f"{type(exc).__name__}: {exc}")

    def summary(self) -> dict[str, Any]:
        return {"errors": self.count, "examples": self.examples}


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"p50 ms": 0.0, "p99 ms": 0.0}
    ordered = sorted(samples)
    return {
        "p50 ms": ordered[len(ordered) // 2] * 1000,
        "p99 ms": ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000,
    }


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(len(data)), 10)
    if got != data:
        raise ValueError("the echo differs from what was sent")


async def hold(host: str, ports: list[int], idle: int, active: int, seconds: float) -> None:
    """`idle` connections opened and kept, `active` ones echoing 1 KiB back and forth the
    whole time; at the end every idle one must still echo."""
    errors = Errors()
    gate = asyncio.Semaphore(64)

    async def open_one(i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with gate:
            port = ports[i % len(ports)]
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            await echo(reader, writer, b"hello %d\n" % i)
            return reader, writer

    mark("opening")
    opened = await asyncio.gather(
        *(open_one(i) for i in range(idle + active)), return_exceptions=True
    )
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for result in opened:
        if isinstance(result, BaseException):
            errors.add(result)
        else:
            conns.append(result)
    idle_conns, active_conns = conns[:idle], conns[idle:]
    mark("open")
    latencies: list[float] = []
    ops = 0
    deadline = time.monotonic() + seconds

    async def work(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal ops
        payload = os.urandom(1024)
        while time.monotonic() < deadline:
            started = time.perf_counter()
            await echo(reader, writer, payload)
            latencies.append(time.perf_counter() - started)
            ops += 1

    worked = await asyncio.gather(*(work(*c) for c in active_conns), return_exceptions=True)
    for outcome in worked:
        if isinstance(outcome, BaseException):
            errors.add(outcome)
    mark("checking idle")
    checks = await asyncio.gather(
        *(echo(r, w, b"still there\n") for r, w in idle_conns), return_exceptions=True
    )
    for outcome in checks:
        if isinstance(outcome, BaseException):
            errors.add(outcome)
    for _, writer in conns:
        writer.close()
    mark("closed")
    emit(
        result={
            "opened": len(conns),
            "idle": len(idle_conns),
            "active": len(active_conns),
            "echoes per s": ops / seconds,
            **percentiles(latencies),
            **errors.summary(),
        }
    )


async def rate(host: str, ports: list[int], seconds: float, concurrency: int) -> None:
    """As many fresh connections as `concurrency` workers make: connect, echo 16 bytes,
    close. Reports the rate per whole second, so a stall anywhere shows as a bad second."""
    errors = Errors()
    per_second: dict[int, int] = {}
    latencies: list[float] = []
    counter = 0
    start = time.monotonic()
    deadline = start + seconds

    async def worker() -> None:
        nonlocal counter
        while time.monotonic() < deadline:
            counter += 1
            port = ports[counter % len(ports)]
            began = time.perf_counter()
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
                try:
                    await echo(reader, writer, b"0123456789abcdef")
                finally:
                    writer.close()
            except (TimeoutError, OSError, ValueError, EOFError) as e:
                errors.add(e)
                continue
            latencies.append(time.perf_counter() - began)
            second = int(time.monotonic() - start)
            per_second[second] = per_second.get(second, 0) + 1

    mark("rate")
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    mark("rate done")
    full = [per_second.get(s, 0) for s in range(int(seconds))]
    emit(
        result={
            "connections": sum(per_second.values()),
            "per s mean": sum(full) / len(full),
            "per s min": min(full),
            "per s": full,
            **percentiles(latencies),
            **errors.summary(),
        }
    )


async def download(host: str, port: int, size: int) -> float:
    """MiB/s of one HTTP download of `size` bytes."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    writer.write(f"GET /bytes/{size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await reader.readuntil(HTTP_HEAD_END)
    got = 0
    while got < size:
        chunk = await reader.read(1 << 20)
        if not chunk:
            raise EOFError(f"download ended after {got} of {size} bytes")
        got += len(chunk)
    writer.close()
    return size / (time.perf_counter() - started) / 2**20


async def stall(host: str, port: int, stalled: int, size: int, rounds: int = 3) -> None:
    """Rounds of: a download alone, then `stalled` downloads whose readers stop after the
    headers, then the same download beside them, then the stalled ones dropped. Medians
    of the rounds, since a single download on two busy cores varies by tens of percent."""
    errors = Errors()
    alone: list[float] = []
    beside: list[float] = []
    held_most = 0
    mark("stalling")
    for _ in range(rounds):
        alone.append(await download(host, port, size))
        held = []
        for _ in range(stalled):
            try:
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(f"GET /bytes/{1 << 30} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                await asyncio.wait_for(reader.readuntil(HTTP_HEAD_END), 10)
                # Stop reading: the transport must not read on our behalf either.
                transport = writer.transport
                assert isinstance(transport, asyncio.ReadTransport)
                transport.pause_reading()
                held.append(writer)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as e:
                errors.add(e)
        held_most = max(held_most, len(held))
        beside.append(await download(host, port, size))
        for writer in held:
            writer.transport.abort()
    mark("released")
    alone_median, beside_median = statistics.median(alone), statistics.median(beside)
    emit(
        result={
            "stalled": held_most,
            "alone MiB/s": alone_median,
            "beside stalled MiB/s": beside_median,
            "ratio": beside_median / alone_median,
            "rounds": {"alone": alone, "beside": beside},
            **errors.summary(),
        }
    )


def main() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    mode, host, *rest = sys.argv[1:]
    if mode == "hold":
        ports, idle, active, seconds = rest
        asyncio.run(
            hold(host, [int(p) for p in ports.split(",")], int(idle), int(active), float(seconds))
        )
    elif mode == "rate":
        ports, seconds, concurrency = rest
        asyncio.run(
            rate(host, [int(p) for p in ports.split(",")], float(seconds), int(concurrency))
        )
    elif mode == "stall":
        port, count, size, *rounds = rest
        asyncio.run(stall(host, int(port), int(count), int(size), *map(int, rounds)))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
