"""The manager's TCP dial: the SYN leaves while the OPEN is handled, so a dial that the
kernel refuses at once is answered at once, with no task; the others finish in a task."""

from __future__ import annotations

import asyncio
import socket
from ipaddress import ip_network
from typing import Any, cast

from telepresence.manager import dialer
from telepresence.manager.dialpolicy import DialPolicy
from telepresence.tunnel.endpoint import TunnelStream
from telepresence.tunnel.frames import Dial, DialError, IPProtocol


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


async def test_a_dial_finishes_in_its_task_accepted_or_refused() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    accepted = FakeStream()
    await dial("127.0.0.1", port, accepted)
    assert accepted.accepted and accepted.rejected is None
    server.close()
    await server.wait_closed()
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    refused = FakeStream()
    await dial("127.0.0.1", closed_port, refused)
    assert refused.rejected == (DialError.REFUSED, "connection refused")
