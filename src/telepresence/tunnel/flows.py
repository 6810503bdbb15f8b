"""Splicing a TCP socket to a tunnel stream, with back-pressure both ways.

The same class serves the laptop (an intercepted connection) and the manager (the
connection it dialled in the cluster). Memory per flow stays bounded: reading from the
socket pauses while the peer has not granted credit for what we hold, and credit is
returned to the peer only once the socket has taken the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import cast

from telepresence.tunnel.endpoint import TunnelStream
from telepresence.tunnel.frames import DialError

#: The local socket's send buffer, fixed rather than left to the kernel's autotuning (up to
#: 4 MiB on loopback): a reader that stalls then absorbs little before its stream stops
#: earning a larger window (tunnel/credit.py), and kernel memory per stalled flow stays
#: small too. Either end of the local socket is near (the laptop's loopback, a pod in
#: the cluster), so this covers its bandwidth-delay product many times over.
LOCAL_SEND_BUFFER = 256 * 1024
#: Stop reading the local socket while this much waits for the peer's credit.
PAUSE_READING_AT = 64 * 1024
#: Local writes buffered beyond this hold back the credit we return to the peer. asyncio
#: pauses a writer at 64 KiB by default, which holds back credit from then on as well.
WRITE_BUFFER_LIMIT = 64 * 1024


def abort_with_reset(transport: asyncio.BaseTransport | None) -> None:
    """Close so the other end sees RST at once (a refused port must look refused, not
    'open, then empty')."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    cast(asyncio.Transport, transport).abort()


class SocketFlow(asyncio.Protocol):
    """An asyncio Protocol on one side, a StreamHandler on the other."""

    def __init__(
        self,
        stream: TunnelStream | None = None,
        *,
        on_done: Callable[[SocketFlow], None] | None = None,
    ) -> None:
        self.stream = stream
        self.transport: asyncio.Transport | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._owed_credit = 0
        # Data the peer sent before our socket existed (the manager's dial in progress).
        self._early: list[bytes] = []
        self._early_eof = False
        self._local_eof = False
        self._peer_eof = False
        self._finished = False
        self._on_done = on_done

    # --- binding ---------------------------------------------------------------------

    def attach(self, stream: TunnelStream) -> None:
        self.stream = stream
        stream.handler = self

    # --- asyncio.Protocol: the local socket -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's does not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LOCAL_SEND_BUFFER)
        early, self._early = self._early, []
        for data in early:
            self.stream_data(data)
        if self._early_eof:
            self.stream_eof()

    def data_received(self, data: bytes) -> None:
        stream = self.stream
        if stream is None or stream.closed:
            return
        stream.write(data)
        if stream.buffered > PAUSE_READING_AT and not self._reading_paused:
            self._reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._local_eof = True
        if self.stream is not None:
            self.stream.close()
        self._maybe_finished()
        return True  # keep the socket open for what the peer still sends

    def connection_lost(self, exc: Exception | None) -> None:
        stream = self.stream
        if stream is not None and not stream.closed and not (self._local_eof and self._peer_eof):
            stream.reset()
        self._finish()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        owed, self._owed_credit = self._owed_credit, 0
        if self.stream is not None:
            self.stream.consumed(owed)

    # --- StreamHandler: the tunnel side ----------------------------------------------

    def stream_data(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            self._early.append(data)
            return
        if transport.is_closing():
            if self.stream is not None:
                self.stream.consumed(len(data))
            return
        transport.write(data)
        if self._writing_paused or transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            self._owed_credit += len(data)
        elif self.stream is not None:
            self.stream.consumed(len(data))

    def stream_eof(self) -> None:
        transport = self.transport
        if transport is None:
            self._early_eof = True
            return
        self._peer_eof = True
        if not transport.is_closing() and transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:
                # The program already reset its socket and asyncio has not noticed yet
                # (ENOTCONN): the flow is over both ways.
                if self.stream is not None:
                    self.stream.reset()
                abort_with_reset(transport)
                self._finish()
                return
        self._maybe_finished()

    def stream_reset(self) -> None:
        abort_with_reset(self.transport)
        self._finish()

    def stream_writable(self) -> None:
        stream = self.stream
        if self._reading_paused and stream is not None and stream.buffered <= PAUSE_READING_AT:
            self._reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def dial_result(self, error: DialError | None, message: str) -> None:
        if error is not None:
            abort_with_reset(self.transport)
            self._finish()

    # --- teardown --------------------------------------------------------------------

    def _maybe_finished(self) -> None:
        if self._local_eof and self._peer_eof and self.transport is not None:
            self.transport.close()
            self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self.stream is not None:
            self.stream.finish()
        if self._on_done is not None:
            self._on_done(self)
