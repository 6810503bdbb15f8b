"""The transparent TCP proxy: connections that nftables redirected to us, by destination.

The kernel keeps the destination the program asked for (SO_ORIGINAL_DST); the proxy asks
the traffic manager to dial exactly that, so every program on the laptop reaches ClusterIPs
and pod IPs with no per-program setup. A failed dial in the cluster resets the laptop's
connection at once, so a closed port looks closed.

Each connection is a :class:`~.flowbook.FlowRecord` in the session's book while it lives:
its state, and the bytes each way, counted in the data callbacks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import time

from telepresence.daemon.dialfailures import DialFailureLog
from telepresence.daemon.flowbook import FlowBook, FlowRecord
from telepresence.daemon.pool import ManagerPool, PoolUnavailable
from telepresence.tunnel.flows import SocketFlow, abort_with_reset
from telepresence.tunnel.frames import Dial, DialError, IPProtocol

log = logging.getLogger("telepresence.proxy")

SO_ORIGINAL_DST = 80


def original_destination(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    address = str(ipaddress.IPv4Address(raw[4:8]))
    return address, port


#: The record of a connection turned away before it became a flow (no destination, no
#: manager): in no book, and never counted into (its socket is aborted at once). Every
#: ProxyFlow has a record, so the data callbacks need no None check.
TURNED_AWAY = FlowRecord(
    protocol=IPProtocol.TCP, source="", address="", port=0, name="", link="", stream=0, started=0
)


class ProxyFlow(SocketFlow):
    def __init__(self, proxy: TransparentProxy) -> None:
        super().__init__(on_done=proxy._flow_done)
        self.proxy = proxy
        self.dial: Dial | None = None
        self.record = TURNED_AWAY

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.proxy.flows.add(self)
        sock = transport.get_extra_info("socket")
        try:
            address, port = original_destination(sock)
        except OSError:
            abort_with_reset(self.transport)
            return
        if (address, port) == self.proxy.address:
            # Someone connected to the proxy port itself: nothing to forward to.
            abort_with_reset(self.transport)
            return
        self.dial = Dial(IPProtocol.TCP, address, port)
        pool = self.proxy.pool
        try:
            self.stream = stream = pool.open_stream(self.dial, self)
        except PoolUnavailable as e:
            self.proxy.book.dial_failed(self.dial, DialError.FAILED, str(e))
            abort_with_reset(self.transport)
            return
        peer = transport.get_extra_info("peername")
        self.record = self.proxy.book.open(
            IPProtocol.TCP,
            source=f"{peer[0]}:{peer[1]}" if peer else "",
            address=address,
            port=port,
            link=pool.link_name(stream),
            stream=stream.id,
        )

    # The data path: one add per chunk, and the base class called directly (a super()
    # lookup costs as much again).

    def data_received(self, data: bytes) -> None:
        self.record.sent += len(data)
        SocketFlow.data_received(self, data)

    def stream_data(self, data: bytes) -> None:
        self.record.received += len(data)
        SocketFlow.stream_data(self, data)

    def eof_received(self) -> bool:
        self.record.laptop_eof = True
        return super().eof_received()

    def stream_eof(self) -> None:
        self.record.cluster_eof = True
        super().stream_eof()

    def stream_reset(self) -> None:
        stream = self.stream
        # A lost link resets all its flows at once: the pool records that once.
        if stream is not None and not stream.tunnel.closed:
            self.proxy.book.reset(self.record, "reset from the cluster side")
        super().stream_reset()

    def dial_result(self, error: DialError | None, message: str) -> None:
        self.record.dialing = False
        if error is not None and self.dial is not None:
            self.proxy.dial_log.failed(self.dial, error, message, now=time.monotonic())
        super().dial_result(error, message)


class TransparentProxy:
    def __init__(
        self,
        pool: ManagerPool,
        *,
        dial_log: DialFailureLog | None = None,
        book: FlowBook | None = None,
    ) -> None:
        self.pool = pool
        self.book = book if book is not None else FlowBook()
        self.dial_log = dial_log if dial_log is not None else DialFailureLog(book=self.book)
        self.flows: set[ProxyFlow] = set()
        self.server: asyncio.Server | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)

    async def start(self, *, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: ProxyFlow(self), host, port, reuse_address=True, backlog=1024
        )
        self.address = self.server.sockets[0].getsockname()[:2]
        return self.address[1]

    def _flow_done(self, flow: SocketFlow) -> None:
        self.flows.discard(flow)
        if isinstance(flow, ProxyFlow):
            self.book.close(flow.record)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for flow in list(self.flows):
            abort_with_reset(flow.transport)
        self.flows.clear()
