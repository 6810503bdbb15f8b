"""The manager's TCP dial: the SYN leaves while the OPEN is handled, so a dial that the
kernel refuses at once is answered at once, with no task; the others finish in a task,
which waits for the handshake only when connect() did not complete it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable
from ipaddress import ip_network
from typing import Any, cast

import pytest

from telepresence.manager import dialer
from telepresence.manager.dialpolicy import DialPolicy
from telepresence.tunnel.endpoint import TunnelStream
from telepresence.tunnel.frames import Dial, DialError, IPProtocol
from tests.unit.waiting import until


class FakeStream:
    def __init__(self) -> None:
        self.handler: object = None
        self.closed = False
        self.rejected: tuple[DialError, str] | None = None
        self.accepted = False

    def reject(self, code: DialError, message: str) -> None:
        self.rejected = (code, message)

    def accept(self) -> None:
        self.accepted = True

    # What the dialled socket's flow calls once the test's server closes it.
    def close(self) -> None:
        # The server closed; the laptop side finishes at once too, so nothing is left open.
        transport = getattr(self.handler, "transport", None)
        if transport is not None:
            transport.close()

    def reset(self) -> None:
        self.closed = True

    def finish(self) -> None:
        pass


def dial(address: str, port: int, stream: FakeStream) -> Any:
    return dialer.open_stream(
        cast(TunnelStream, stream),
        Dial(IPProtocol.TCP, address, port),
        session="s",
        protocol=3,
        policy=DialPolicy(allow=[ip_network("127.0.0.0/8")]),
    )


def test_a_destination_without_a_route_is_refused_before_any_task() -> None:
    # The limited broadcast address has no TCP route: connect() fails at once, before any
    # packet is sent.
    stream = FakeStream()
    assert dial("255.255.255.255", 80, stream) is None
    assert stream.rejected is not None and stream.rejected[0] is DialError.UNREACHABLE


class ClosingServer:
    """Accepts and closes at once; `stop` waits until every dial it saw is closed."""

    def __init__(self) -> None:
        self.seen = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._close, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def _close(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.seen += 1
        writer.close()

    async def stop(self, dials: int) -> None:
        await until(lambda: self.seen == dials, f"the server to see {dials} dials")
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def closed_port() -> int:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        return int(unused.getsockname()[1])


async def test_a_handshake_that_connect_completed_is_not_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits = []

    async def waited(sock: socket.socket) -> None:
        waits.append(sock)

    monkeypatch.setattr(dialer, "_connected", waited)
    server = ClosingServer()
    port = await server.start()
    # Loopback completes the handshake inside connect() all but very rarely: three tries.
    for _ in range(3):
        accepted = FakeStream()
        await dial("127.0.0.1", port, accepted)
        assert accepted.accepted and accepted.rejected is None
    assert len(waits) < 3
    await server.stop(3)


async def test_a_refusal_inside_connect_is_answered_before_any_task() -> None:
    refused_at_once = []
    for _ in range(3):  # as above, loopback answers inside connect() all but very rarely
        stream = FakeStream()
        task = dial("127.0.0.1", closed_port(), stream)
        if task is None:
            refused_at_once.append(stream)
        else:
            await task
        assert stream.rejected == (DialError.REFUSED, "connection refused")
    assert refused_at_once


async def test_a_dial_still_in_progress_finishes_in_its_task_accepted_or_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dialer, "_finished_now", lambda sock: False)
    server = ClosingServer()
    port = await server.start()
    accepted = FakeStream()
    task: Awaitable[None] = dial("127.0.0.1", port, accepted)
    assert task is not None and not accepted.accepted
    await task
    assert accepted.accepted and accepted.rejected is None
    await server.stop(1)
    refused = FakeStream()
    await dial("127.0.0.1", closed_port(), refused)
    assert refused.rejected == (DialError.REFUSED, "connection refused")
