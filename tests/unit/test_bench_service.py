"""`telepresence bench`: the manager's bench service (its logic alone, on a loopback
socket, and through the tunnel over loopback) and the daemon's refusal of an old manager."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from telepresence.benchclient import BenchError, measure
from telepresence.daemon import benchrun
from telepresence.daemon.control import Bench, parse_request
from telepresence.ipc import MalformedMessage
from telepresence.manager.benchservice import COUNT, END, REQUEST, BenchSession, SocketBench
from telepresence.versions import ProtocolRange
from tests.unit.test_direct_loopback import DirectWorld


class Recorder:
    """A Channel that keeps what the service sends."""

    def __init__(self, room: int = 1 << 30) -> None:
        self.sent = bytearray()
        self.finished = False
        self.aborted = False
        self.room = room

    def write(self, data: bytes) -> None:
        self.sent += data

    def waiting(self) -> int:
        return 0 if len(self.sent) < self.room else len(self.sent)

    def finish(self) -> None:
        self.finished = True

    def abort(self) -> None:
        self.aborted = True


def test_upload_is_counted_and_answered_at_its_end_marker() -> None:
    ch = Recorder()
    s = BenchSession(ch)
    head = REQUEST.pack(b"U", 0)
    s.data(head[:3])  # the request may come in pieces
    s.data(head[3:] + bytes(1000))
    s.data(bytes(23))
    assert not ch.sent
    s.data(END)
    assert ch.sent == COUNT.pack(1024) and ch.finished
    s.eof()  # the client's close afterwards changes nothing
    assert ch.sent == COUNT.pack(1024)


def test_echo_returns_every_byte_and_ends_with_the_client() -> None:
    ch = Recorder()
    s = BenchSession(ch)
    s.data(REQUEST.pack(b"E", 0) + b"ping")
    s.data(b"pong")
    assert ch.sent == b"pingpong" and not ch.finished
    s.eof()
    assert ch.finished


async def test_a_counted_download_sends_exactly_that_much() -> None:
    ch = Recorder()
    s = BenchSession(ch)
    s.data(REQUEST.pack(b"D", 100_000))
    assert len(ch.sent) == 100_000 and ch.finished and set(ch.sent) == {0}


async def test_an_endless_download_stops_when_the_channel_is_full() -> None:
    ch = Recorder(room=300_000)
    s = BenchSession(ch)
    s.data(REQUEST.pack(b"D", 0))
    # Written until the channel had more than `room` waiting, then nothing more.
    assert 300_000 <= len(ch.sent) < 300_000 + 64 * 1024
    assert not ch.finished


def test_an_unknown_request_is_cut() -> None:
    ch = Recorder()
    BenchSession(ch).data(REQUEST.pack(b"Z", 0))
    assert ch.aborted and not ch.sent


async def test_the_loopback_service_measures_like_the_tunnel() -> None:
    """The `--port-forward` far end: the same service on a plain socket."""
    server = await asyncio.get_running_loop().create_server(SocketBench, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        result = await measure(
            lambda: asyncio.open_connection("127.0.0.1", port), seconds=0.2, pings=20
        )
    finally:
        server.close()
    assert result["up MiB/s"] > 1 and result["down MiB/s"] > 1
    assert 0 < result["latency ms"]["p50"] <= result["latency ms"]["p99"]


@pytest.fixture
async def joined() -> AsyncIterator[DirectWorld]:
    w = DirectWorld()
    await w.start()
    await w.join()
    yield w
    await w.close()


async def test_the_tunnel_measures_against_the_manager(joined: DirectWorld) -> None:
    # The manager's dial policy here opens 127.0.0.0/8 only: had it dialled 0.0.0.0, the
    # flows would have been refused.
    result = await benchrun.run(joined.pool, seconds=0.2)
    assert result["up MiB/s"] > 1 and result["down MiB/s"] > 1
    assert 0 < result["latency ms"]["p50"] <= result["latency ms"]["p99"]


async def test_a_manager_before_protocol_3_has_no_bench() -> None:
    w = DirectWorld()
    await w.start(protocol=ProtocolRange(1, 2))
    try:
        await w.pool.start()
        with pytest.raises(
            BenchError, match="has no bench service; `telepresence manager upgrade`"
        ):
            await benchrun.run(w.pool, seconds=0.2)
    finally:
        await w.close()


def test_the_control_request_carries_a_number() -> None:
    assert parse_request(b'{"cmd": "bench", "seconds": 2}\n') == Bench(2.0)
    with pytest.raises(MalformedMessage, match="seconds: expected a number"):
        parse_request(b'{"cmd": "bench", "seconds": "2"}\n')
