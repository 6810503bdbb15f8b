"""One laptop UDP flow in the cluster: a connected UDP socket spliced to a tunnel stream."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from telepresence.tunnel.endpoint import TunnelStream
from telepresence.tunnel.frames import DialError

log = logging.getLogger("telepresence.manager")


class UdpDial(asyncio.DatagramProtocol):
    """A connected UDP socket in the cluster for one laptop flow; each tunnel datagram is
    one UDP datagram. It lives as long as the stream: the laptop expires idle flows."""

    def __init__(self, stream: TunnelStream) -> None:
        self.stream = stream
        stream.handler = self
        self.transport: asyncio.DatagramTransport | None = None
        self._early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def accepted(self) -> None:
        """Sends what the laptop sent before the socket existed. Only now, after the
        stream is accepted, may replies be carried back, so none is sent earlier."""
        early, self._early = self._early, []
        if self.transport is not None:
            for data in early:
                self.transport.sendto(data)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.stream.send_datagram(data)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for an earlier datagram: UDP senders expect loss, so carry on.
        log.debug("UDP flow error: %s", exc)

    def stream_data(self, data: bytes) -> None:
        if self.transport is None or not self.stream.ready:
            self._early.append(data)
        elif not self.transport.is_closing():
            self.transport.sendto(data)
        self.stream.consumed(len(data))

    def stream_eof(self) -> None:
        self.stream_reset()

    def stream_reset(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.stream.finish()

    def stream_writable(self) -> None:
        pass

    def dial_result(self, error: DialError | None, message: str) -> None:
        pass
