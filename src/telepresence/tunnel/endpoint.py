"""The asyncio shell around one protocol `Connection`: events to callbacks, output to a writer.

It knows nothing about what carries the bytes (a port-forward WebSocket on the laptop, a
TCP connection in the manager): the owner feeds `data_received` and supplies `write`.
Streams get a small handler interface instead of asyncio Streams, so the data path is
callbacks end to end (no task per read, no extra copies).
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol

from telepresence.tunnel.credit import ReceiveBudget
from telepresence.tunnel.frames import (
    DEFAULT_INITIAL_WINDOW,
    MIN_VERSION,
    VERSION,
    Dial,
    DialError,
    ErrorCode,
    IPProtocol,
)
from telepresence.tunnel.messages import ControlMessage
from telepresence.tunnel.protocol import Connection as ProtocolConnection
from telepresence.tunnel.protocol import (
    ConnectionClosed,
    ControlReceived,
    DataReceived,
    DialFailed,
    DialSucceeded,
    LocalProtocolError,
    ProtocolError,
    Role,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)

log = logging.getLogger("telepresence.tunnel")

Buffers = list[bytes | memoryview]

#: Every stream's receive window starts here, so a flow that is never read holds little,
#: and a response of a few hundred KiB still arrives in one round trip.
STREAM_INITIAL_WINDOW = DEFAULT_INITIAL_WINDOW
#: ... and grows, doubling once a stream has consumed four windows, up to this. The path
#: through the API server and the kubelet has a round trip of a few milliseconds under
#: load: a fixed 256 KiB window capped a download near 90 MiB/s, and 2 MiB covered that
#: bandwidth-delay product, so a bulk flow gets twice that.
STREAM_MAX_WINDOW = 4 * 1024 * 1024
#: The most all of one connection's windows together grow above their start: the receive
#: side's memory bound for the connection is this plus STREAM_INITIAL_WINDOW per open
#: stream (tunnel/credit.py). Eight streams at their full window.
RECEIVE_BUDGET = 32 * 1024 * 1024


class StreamHandler(Protocol):
    """What a stream's owner is told. Every method is called from the event loop."""

    def stream_data(self, data: bytes) -> None: ...
    def stream_eof(self) -> None: ...
    def stream_reset(self) -> None: ...
    def stream_writable(self) -> None: ...
    def dial_result(self, error: DialError | None, message: str) -> None: ...


class TunnelStream:
    """One flow inside a tunnel. Writes beyond the peer's credit wait here, in order."""

    def __init__(
        self, tunnel: Tunnel, stream_id: int, protocol: IPProtocol, *, ready: bool
    ) -> None:
        self.tunnel = tunnel
        self.id = stream_id
        self.protocol = protocol
        # A stream the peer opened may not carry data until we accept it; the dialled
        # socket can answer before that, so its first bytes wait in `_pending`.
        self.ready = ready
        self.handler: StreamHandler | None = None
        self._pending: deque[bytes | memoryview] = deque()
        self._pending_size = 0
        self._fin_pending = False
        #: The owner is done both ways but bytes still wait for the peer's credit: the
        #: stream is dropped once they and the FIN have gone.
        self._finished = False
        self.closed = False

    @property
    def buffered(self) -> int:
        """Bytes accepted from the local side but not yet granted credit by the peer."""
        return self._pending_size

    def write(self, data: bytes) -> None:
        if self.closed or not data:
            return
        conn = self.tunnel.conn
        if self.ready and not self._pending:
            try:
                taken = conn.send_data(self.id, data)
            except LocalProtocolError:
                return
            if taken < len(data):
                rest = memoryview(data)[taken:]
                self._pending.append(rest)
                self._pending_size += len(rest)
        else:
            self._pending.append(data)
            self._pending_size += len(data)
        self.tunnel.flush()

    def send_datagram(self, data: bytes) -> bool:
        if self.closed:
            return False
        try:
            sent = self.tunnel.conn.send_datagram(self.id, data)
        except LocalProtocolError:
            return False
        self.tunnel.flush()
        return sent

    def consumed(self, size: int) -> None:
        """The application delivered `size` bytes: return them to the peer as credit."""
        if size and not self.closed:
            try:
                self.tunnel.conn.consume(self.id, size)
            except LocalProtocolError:
                return
            self.tunnel.flush()

    def close(self) -> None:
        """Half-close once everything written so far has been sent."""
        if self.closed:
            return
        if self._pending:
            self._fin_pending = True
            return
        with contextlib.suppress(LocalProtocolError):
            self.tunnel.conn.close_stream(self.id)
        self.tunnel.flush()

    def reset(self, code: ErrorCode = ErrorCode.CANCEL) -> None:
        if self.closed:
            return
        self.closed = True
        self._pending.clear()
        self._pending_size = 0
        self.tunnel.conn.reset_stream(self.id, code)
        self.tunnel._forget(self.id)
        self.tunnel.flush()

    def accept(self) -> None:
        try:
            self.tunnel.conn.accept_stream(self.id)
        except LocalProtocolError:
            self.tunnel.flush()
            return
        self.ready = True
        self._window_opened()

    def reject(self, error: DialError, message: str) -> None:
        self.closed = True
        with contextlib.suppress(LocalProtocolError):
            self.tunnel.conn.reject_stream(self.id, error, message)
        self.tunnel._forget(self.id)
        self.tunnel.flush()

    def _window_opened(self) -> None:
        if not self.ready:
            return
        conn = self.tunnel.conn
        while self._pending:
            head = self._pending[0]
            try:
                taken = conn.send_data(self.id, head)
            except LocalProtocolError:
                self._pending.clear()
                self._pending_size = 0
                self._fin_pending = False
                if self._finished:
                    self._drop_if_sent()
                return
            self._pending_size -= taken
            if taken < len(head):
                self._pending[0] = memoryview(head)[taken:]
                break
            self._pending.popleft()
        if not self._pending and self._fin_pending:
            self._fin_pending = False
            with contextlib.suppress(LocalProtocolError):
                conn.close_stream(self.id)
        self.tunnel.flush()
        if self._finished:
            self._drop_if_sent()
        elif self.handler is not None:
            self.handler.stream_writable()

    def finish(self) -> None:
        """Both directions are done for the stream's owner; the tunnel drops the stream
        once what it wrote has left. Bytes still waiting for the peer's credit, and the
        FIN behind them, are sent first: a server that answers a half-closed request and
        closes at once must not lose the end of its answer."""
        self._finished = True
        self._drop_if_sent()

    def _drop_if_sent(self) -> None:
        if self._pending or self._fin_pending:
            return
        self.closed = True
        self.tunnel._forget(self.id)


class Tunnel:
    """One multiplexed connection. `write` receives buffers to put on the wire."""

    def __init__(
        self,
        role: Role,
        *,
        write: Callable[[Buffers], None],
        on_open: Callable[[TunnelStream, Dial], None] | None = None,
        on_control: Callable[[ControlMessage], None] | None = None,
        on_closed: Callable[[str], None] | None = None,
        initial_window: int = STREAM_INITIAL_WINDOW,
        budget: ReceiveBudget | None = None,
        versions: tuple[int, int] | None = None,
    ) -> None:
        """Without a ``budget``, the connection gets its own RECEIVE_BUDGET."""
        if budget is None:
            budget = ReceiveBudget(limit=RECEIVE_BUDGET, max_window=STREAM_MAX_WINDOW)
        self.conn = ProtocolConnection(
            role,
            initial_window=initial_window,
            budget=budget,
            versions=versions or (MIN_VERSION, VERSION),
        )
        self._write = write
        self._on_open = on_open
        self._on_control = on_control
        self._on_closed = on_closed
        self.streams: dict[int, TunnelStream] = {}
        self.closed = False
        self.flush()

    def flush(self) -> None:
        buffers = self.conn.buffers_to_send()
        if buffers:
            self._write(buffers)

    def _forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)

    def open_stream(self, dial: Dial, handler: StreamHandler) -> TunnelStream:
        stream_id = self.conn.open_stream(dial)
        stream = TunnelStream(self, stream_id, dial.protocol, ready=True)
        stream.handler = handler
        self.streams[stream_id] = stream
        self.flush()
        return stream

    def send_control(self, message: ControlMessage) -> None:
        if self.closed:
            return
        self.conn.send_control(message)
        self.flush()

    def data_received(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            return
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as e:
            log.warning("tunnel protocol error: %s", e)
            self.flush()
            self.connection_lost(f"protocol error: {e}")
            return
        for event in events:
            try:
                self._dispatch(event)
            except Exception:
                self._handler_failed(event)
        self.flush()

    def _handler_failed(self, event: object) -> None:
        """One flow's failure must not end the connection and every other flow on it:
        reset that stream alone (a bug, so logged with its traceback)."""
        log.exception("handling %s failed; resetting its stream", type(event).__name__)
        stream_id = getattr(event, "stream_id", 0)
        stream = self.streams.get(stream_id) if stream_id else None
        if stream is not None and not self.closed:
            stream.reset(ErrorCode.INTERNAL_ERROR)
            if stream.handler is not None:
                with contextlib.suppress(Exception):
                    stream.handler.stream_reset()

    def _dispatch(self, event: object) -> None:
        if isinstance(event, DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.handler is not None:
                stream.handler.stream_data(event.data)
            else:
                self.conn.consume(event.stream_id, len(event.data))
        elif isinstance(event, WindowUpdated):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._window_opened()
        elif isinstance(event, StreamOpened):
            stream = TunnelStream(self, event.stream_id, event.dial.protocol, ready=False)
            self.streams[event.stream_id] = stream
            if self._on_open is None:
                stream.reject(DialError.REFUSED, "this side accepts no streams")
            else:
                self._on_open(stream, event.dial)
        elif isinstance(event, DialSucceeded):
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.handler is not None:
                stream.handler.dial_result(None, "")
        elif isinstance(event, DialFailed):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                stream.closed = True
                if stream.handler is not None:
                    stream.handler.dial_result(event.error, event.message)
        elif isinstance(event, StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.handler is not None:
                stream.handler.stream_eof()
        elif isinstance(event, StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                stream.closed = True
                if stream.handler is not None:
                    stream.handler.stream_reset()
        elif isinstance(event, ControlReceived):
            if self._on_control is not None:
                self._on_control(event.message)
        elif isinstance(event, ConnectionClosed):
            self.connection_lost(f"peer closed the tunnel: {event.reason or event.code.name}")

    def close(self, reason: str = "") -> None:
        if not self.closed:
            self.conn.close(ErrorCode.NO_ERROR, reason)
            self.flush()
        self.connection_lost(reason or "closed")

    def connection_lost(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.closed = True
            if stream.handler is not None:
                stream.handler.stream_reset()
        if self._on_closed is not None:
            self._on_closed(reason)
