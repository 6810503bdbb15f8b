"""The manager's built-in far end for `telepresence bench`: a sink, a source and an echo.

A user who asks "what does my cluster path give?" needs a far end that is neither their
app nor the network behind the manager, so the figures are the tunnel's: the laptop, its
transport (port-forward or direct) and the manager. Sessions reach it by dialling
`BENCH_ADDRESS`:`BENCH_PORT` through the tunnel (protocol 3; the manager never dials that
address, and the dial policy refuses 0.0.0.0/8 anyway). For the comparison with `kubectl
port-forward`, the same service listens on the pod's loopback (`config.BENCH_LOCAL_PORT`),
reachable only through port-forward, as the tunnel is.

The request is one byte and an 8-byte count (network order), then:

- ``U``: the client sends zeros, then one `END` byte; the service answers with the
  8-byte count of what it received and closes. (A marker, not a half-close: `kubectl
  port-forward` closes both ways when its client half-closes.)
- ``D``: the service sends zeros until the client goes away (or ``count`` bytes, if not 0).
- ``E``: the service echoes everything until the client half-closes.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Protocol, cast

from telepresence.tunnel.endpoint import TunnelStream
from telepresence.tunnel.frames import DialError

#: What a session dials for the bench service: an address no socket can be opened to.
BENCH_ADDRESS = "0.0.0.0"
BENCH_PORT = 9
#: The first tunnel protocol version whose managers serve it.
BENCH_PROTOCOL = 3
REQUEST = struct.Struct(">cQ")
COUNT = struct.Struct(">Q")
UPLOAD, DOWNLOAD, ECHO = b"U", b"D", b"E"
#: Ends an upload; every byte before it is zero.
END = b"\x01"
#: The source writes while less than this waits to be sent (back-pressure both ways).
SOURCE_AHEAD = 256 * 1024
_ZEROS = bytes(64 * 1024)
#: Chunks written in one go before the source lets other work run.
BURST = 16


class Channel(Protocol):
    """Where the service's bytes go: a tunnel stream or a loopback socket."""

    def write(self, data: bytes) -> None: ...
    def waiting(self) -> int: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...


class BenchSession:
    """One bench connection's logic, fed by the adapters below."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._head = bytearray()
        self._op: bytes | None = None
        self._left = 0
        self._received = 0
        self._done = False

    def data(self, data: bytes) -> None:
        if self._op is None:
            self._head += data
            if len(self._head) < REQUEST.size:
                return
            op, count = REQUEST.unpack_from(self._head)
            data = bytes(self._head[REQUEST.size :])
            self._head.clear()
            if op not in (UPLOAD, DOWNLOAD, ECHO):
                self._done = True
                self._channel.abort()
                return
            self._op, self._left = op, count
            if op == DOWNLOAD:
                self.writable()
        if self._op == UPLOAD:
            self._received += len(data)
            if data.endswith(END) and not self._done:
                self._done = True
                self._channel.write(COUNT.pack(self._received))
                self._channel.finish()
        elif self._op == ECHO and data:
            self._channel.write(data)

    def eof(self) -> None:
        if self._op != DOWNLOAD and not self._done:
            self._done = True
            self._channel.finish()

    def writable(self) -> None:
        """Room to send again: the source tops up what waits to SOURCE_AHEAD. A socket
        that takes everything at once never makes anything wait, so after a burst the
        source yields to the event loop and goes on from there."""
        if self._op != DOWNLOAD or self._done:
            return
        for _ in range(BURST):
            if self._channel.waiting() >= SOURCE_AHEAD:
                return  # the channel calls again when there is room
            size = len(_ZEROS) if not self._left else min(len(_ZEROS), self._left)
            self._channel.write(_ZEROS[:size] if size < len(_ZEROS) else _ZEROS)
            if self._left:
                self._left -= size
                if not self._left:
                    self._done = True
                    self._channel.finish()
                    return
        asyncio.get_running_loop().call_soon(self.writable)


class StreamBench:
    """The service on a tunnel stream (a StreamHandler)."""

    def __init__(self, stream: TunnelStream) -> None:
        self.stream = stream
        self.session = BenchSession(self)

    # Channel
    def write(self, data: bytes) -> None:
        self.stream.write(data)

    def waiting(self) -> int:
        return self.stream.buffered

    def finish(self) -> None:
        self.stream.close()

    def abort(self) -> None:
        self.stream.reset()

    # StreamHandler
    def stream_data(self, data: bytes) -> None:
        self.session.data(data)
        self.stream.consumed(len(data))

    def stream_eof(self) -> None:
        self.session.eof()

    def stream_reset(self) -> None:
        self.session._done = True

    def stream_writable(self) -> None:
        self.session.writable()

    def dial_result(self, error: DialError | None, message: str) -> None:
        pass  # the service is dialled, never dials


class SocketBench(asyncio.Protocol):
    """The service on the loopback listener, for `telepresence bench --port-forward`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.session = BenchSession(self)

    # Channel
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def waiting(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport else 0

    def finish(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write_eof()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=SOURCE_AHEAD)

    def data_received(self, data: bytes) -> None:
        self.session.data(data)

    def eof_received(self) -> bool:
        self.session.eof()
        return True

    def resume_writing(self) -> None:
        self.session.writable()

    def connection_lost(self, exc: Exception | None) -> None:
        self.session._done = True
