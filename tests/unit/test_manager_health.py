"""The health listener: GET /readyz answers readiness, everything else 404, with bounded
reads. The pure part first, then the asyncio shell on loopback."""

from __future__ import annotations

import asyncio

import pytest

from telepresence.manager.health import HealthServer, respond, status_for
from tests.unit.waiting import until

PROBE = (
    b"GET /readyz HTTP/1.1\r\nHost: 10.244.0.5:8082\r\nUser-Agent: kube-probe/1.33\r\n"
    b"Accept: */*\r\nConnection: close\r\n\r\n"
)


@pytest.mark.parametrize(
    ("head", "ready", "status"),
    [
        (PROBE, True, 200),
        (PROBE, False, 503),
        (b"GET /readyz HTTP/1.0\r\n\r\n", True, 200),
        (b"GET /readyz?verbose HTTP/1.1\r\n\r\n", True, 404),
        (b"GET /readyz/ HTTP/1.1\r\n\r\n", True, 404),
        (b"GET / HTTP/1.1\r\n\r\n", True, 404),
        (b"GET /metrics HTTP/1.1\r\n\r\n", True, 404),
        (b"HEAD /readyz HTTP/1.1\r\n\r\n", True, 404),
        (b"POST /readyz HTTP/1.1\r\n\r\n", True, 404),
        (b"GET /readyz HTTP/2.0\r\n\r\n", True, 404),
        (b"GET  /readyz HTTP/1.1\r\n\r\n", True, 404),
        (b"\xfeTPX\x00\x01", True, 404),
        (b"", True, 404),
    ],
)
def test_status(head: bytes, ready: bool, status: int) -> None:
    assert status_for(head, ready=ready) == status


def test_responses_are_complete_and_tell_nothing_else() -> None:
    ok = respond(PROBE, ready=True)
    assert ok == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
        b"Connection: close\r\n\r\nok\n"
    )
    assert respond(PROBE, ready=False).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    missing = respond(b"GET /version HTTP/1.1\r\n\r\n", ready=True)
    assert missing.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert missing.endswith(b"\r\n\r\nnot found\n")


async def _serve(server: HealthServer) -> tuple[asyncio.Server, int]:
    listener = await server.start("127.0.0.1", 0)
    return listener, listener.sockets[0].getsockname()[1]


async def _ask(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(-1), 5)
    finally:
        writer.close()


async def test_the_listener_asks_readiness_for_every_request() -> None:
    state = {"ready": False}
    listener, port = await _serve(HealthServer(ready=lambda: state["ready"]))
    async with listener:
        assert (await _ask(port, PROBE)).startswith(b"HTTP/1.1 503 ")
        state["ready"] = True
        assert (await _ask(port, PROBE)).startswith(b"HTTP/1.1 200 ")
        assert (await _ask(port, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404 ")


async def test_an_oversized_request_is_closed_unanswered() -> None:
    listener, port = await _serve(HealthServer(ready=lambda: True, max_request=256))
    async with listener:
        assert await _ask(port, b"GET /readyz HTTP/1.1\r\nX: " + b"a" * 1024) == b""


async def test_a_slow_client_is_closed_after_the_read_timeout() -> None:
    listener, port = await _serve(HealthServer(ready=lambda: True, read_timeout=0.2))
    async with listener:
        assert await _ask(port, b"GET /readyz HTTP/1.1\r\n") == b""


async def test_clients_beyond_the_limit_are_closed_at_once() -> None:
    server = HealthServer(ready=lambda: True, read_timeout=5, max_clients=1)
    listener, port = await _serve(server)
    async with listener:
        _, held = await asyncio.open_connection("127.0.0.1", port)  # sends nothing
        try:
            await until(lambda: server.clients >= 1, "the held client to be counted")
            try:
                answer = await _ask(port, PROBE)
            except ConnectionResetError:
                answer = b""
            assert answer == b""
        finally:
            held.close()
        await until(lambda: not server.clients, "the closed clients to be forgotten")
        assert (await _ask(port, PROBE)).startswith(b"HTTP/1.1 200 ")
