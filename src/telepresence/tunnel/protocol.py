"""Sans-I/O core of the tunnel multiplexer.

One ``Connection`` wraps one byte stream (a Kubernetes port-forward) and multiplexes
many flow-controlled streams plus control messages over it. It never touches a socket
or a clock: the I/O shell feeds it received bytes, calls its methods, writes out
whatever ``buffers_to_send`` returns and acts on the returned events. That keeps every
protocol rule testable byte for byte and the shell free of protocol logic.

Each stream has its own credit and there is no connection-wide window the sender must
respect, so a reader that stops consuming one stream holds only that stream's window and
cannot block any other. The shell must keep reading the transport regardless of how slow
any single stream's consumer is. Windows start small and grow as a stream is read, within
a budget for the whole connection (``credit.py``): that bounds the receive side's memory
per connection, not only per stream.
"""

from __future__ import annotations

from enum import Enum

import msgspec

from telepresence.tunnel.credit import ReceiveBudget
from telepresence.tunnel.events import (
    ConnectionClosed,
    ControlReceived,
    DataReceived,
    DialFailed,
    DialSucceeded,
    Event,
    LocalProtocolError,
    ProtocolError,
    StreamClosedError,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from telepresence.tunnel.frames import (
    DEFAULT_INITIAL_WINDOW,
    FLAG_FIN,
    FRAME_U32,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_DATAGRAM,
    MAX_FRAME_PAYLOAD,
    MAX_STREAM_ID,
    MAX_WINDOW,
    MIN_INITIAL_WINDOW,
    MIN_VERSION,
    PREFACE,
    PREFACE_VERSION_END,
    VERSION,
    Dial,
    DialError,
    ErrorCode,
    FrameType,
    IPProtocol,
    decode_dial,
    decode_dial_result,
    decode_goaway,
    decode_u32,
    encode_dial,
    encode_dial_result,
    encode_goaway,
    frame,
)
from telepresence.tunnel.messages import ControlMessage, decode_control, encode_control

__all__ = [
    "Connection",
    "ConnectionClosed",
    "ConnectionState",
    "ControlReceived",
    "DataReceived",
    "Dial",
    "DialError",
    "DialFailed",
    "DialSucceeded",
    "ErrorCode",
    "Event",
    "IPProtocol",
    "LocalProtocolError",
    "ProtocolError",
    "Role",
    "StreamClosedError",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "StreamState",
    "StreamTransition",
    "WindowUpdated",
    "initiator",
    "next_state",
]

Buffer = bytes | bytearray | memoryview


# --- pure helpers -------------------------------------------------------------------


class Role(Enum):
    CLIENT = "client"
    SERVER = "server"


def initiator(stream_id: int) -> Role:
    """Odd ids belong to the client and even ids to the server, so both sides can open
    streams without coordinating."""
    if stream_id <= 0:
        raise ValueError(f"stream id {stream_id} does not name a stream")
    return Role.CLIENT if stream_id & 1 else Role.SERVER


class StreamState(Enum):
    IDLE = "idle"
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"
    HALF_CLOSED_REMOTE = "half-closed (remote)"
    CLOSED = "closed"


class StreamTransition(Enum):
    OPEN = "open"
    SEND_FIN = "send FIN"
    RECV_FIN = "receive FIN"
    RESET = "reset"


_TRANSITIONS = {
    (StreamState.IDLE, StreamTransition.OPEN): StreamState.OPEN,
    (StreamState.OPEN, StreamTransition.SEND_FIN): StreamState.HALF_CLOSED_LOCAL,
    (StreamState.OPEN, StreamTransition.RECV_FIN): StreamState.HALF_CLOSED_REMOTE,
    (StreamState.HALF_CLOSED_REMOTE, StreamTransition.SEND_FIN): StreamState.CLOSED,
    (StreamState.HALF_CLOSED_LOCAL, StreamTransition.RECV_FIN): StreamState.CLOSED,
    (StreamState.OPEN, StreamTransition.RESET): StreamState.CLOSED,
    (StreamState.HALF_CLOSED_LOCAL, StreamTransition.RESET): StreamState.CLOSED,
    (StreamState.HALF_CLOSED_REMOTE, StreamTransition.RESET): StreamState.CLOSED,
}

_CAN_SEND = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE})
_CAN_RECEIVE = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL})


def next_state(state: StreamState, transition: StreamTransition) -> StreamState:
    try:
        return _TRANSITIONS[state, transition]
    except KeyError:
        raise LocalProtocolError(
            f"cannot {transition.value} a stream that is {state.value}"
        ) from None


# --- connection ---------------------------------------------------------------------


class ConnectionState(Enum):
    HANDSHAKING = "handshaking"
    """Our preface is queued but the peer's has not arrived; sends are queued and
    streams have no credit until it does."""
    OPEN = "open"
    CLOSED = "closed"
    """GOAWAY sent or received, or a protocol error: input is ignored, sends refused."""


class _Stream:
    __slots__ = (
        "dial_pending",
        "local",
        "pending_credit",
        "protocol",
        "recv_credit",
        "send_credit",
        "since_resize",
        "state",
        "unconsumed",
        "window",
    )

    def __init__(self, protocol: IPProtocol, *, local: bool, send: int, recv: int) -> None:
        self.state = next_state(StreamState.IDLE, StreamTransition.OPEN)
        self.protocol = protocol
        self.local = local
        # Until the accepting side sends DIAL_RESULT it may not send data.
        self.dial_pending = True
        self.send_credit = send
        # Credit still granted to the peer; unconsumed + pending_credit + recv_credit
        # equals `window` while the peer may still send.
        self.recv_credit = recv
        self.window = recv
        # Bytes consumed since `window` last changed: the evidence growth needs.
        self.since_resize = 0
        self.unconsumed = 0
        self.pending_credit = 0


# Per frame type, indexed by its value: flags it may carry, whether it belongs to
# stream 0, and the payload length it must have (None: variable).
_ALLOWED_FLAGS = (FLAG_FIN, 0, 0, 0, 0, 0, 0)
_CONNECTION_LEVEL = (False, False, False, False, False, True, True)
_EXACT_LENGTH = (None, None, None, 4, 4, None, None)


class Connection:
    """One end of one multiplexed byte stream.

    All methods only touch in-memory state; anything they want on the wire is appended
    to an output queue drained by ``buffers_to_send``/``data_to_send``. Call that after
    every method call and after ``receive_data``, including right after construction:
    the preface is already queued.
    """

    def __init__(
        self,
        role: Role,
        *,
        initial_window: int = DEFAULT_INITIAL_WINDOW,
        versions: tuple[int, int] = (MIN_VERSION, VERSION),
        budget: ReceiveBudget | None = None,
    ) -> None:
        """``versions`` is the range of protocol versions this side speaks. The preface
        announces its lowest, which is all a peer that predates ranges can check; the
        version actually used is agreed later, in Arrive/ArriveOk. Without a ``budget``
        every window stays at ``initial_window``."""
        if not MIN_INITIAL_WINDOW <= initial_window <= MAX_WINDOW:
            raise ValueError(
                f"initial_window must be within [{MIN_INITIAL_WINDOW}, {MAX_WINDOW}],"
                f" got {initial_window}"
            )
        if not 1 <= versions[0] <= versions[1] <= 0xFFFF:
            raise ValueError(f"invalid protocol version range {versions}")
        self.role = role
        self.versions = versions
        self.state = ConnectionState.HANDSHAKING
        self._initial_window = initial_window
        self._budget = budget
        self._peer_window = 0
        self._streams: dict[int, _Stream] = {}
        self._next_local_id = 1 if role is Role.CLIENT else 2
        self._last_peer_id = 0
        self._out: list[bytes | memoryview] = [PREFACE.pack(MAGIC, versions[0], initial_window)]
        # Receive side: `_head` holds a partial preface or frame header; `_frame` is the
        # parsed header whose payload is still being collected as `_pieces`.
        self._head = bytearray()
        self._frame: tuple[int, int, int, int] | None = None
        self._pieces: list[bytes | memoryview] = []
        self._got = 0

    # --- output ---------------------------------------------------------------------

    def buffers_to_send(self) -> list[bytes | memoryview]:
        """The pending output as separate buffers, for ``writelines``: payloads handed
        to ``send_data`` as bytes are passed through without a copy."""
        out, self._out = self._out, []
        return out

    def data_to_send(self) -> bytes:
        return b"".join(self.buffers_to_send())

    # --- input ----------------------------------------------------------------------

    def receive_data(self, data: Buffer) -> list[Event]:
        """Parse whatever frames ``data`` completes; partial frames are kept for the
        next call. Events come out only for complete frames, so any chunking of the
        same bytes yields the same events.

        Passing ``bytes`` lets payloads split across calls be joined with a single
        copy; other buffer types are copied first because the caller may reuse them.
        Raises ProtocolError when the peer misbehaves; the events of frames before the
        bad one in the same call are dropped with the connection.
        """
        if self.state is ConnectionState.CLOSED:
            return []
        events: list[Event] = []
        try:
            self._receive(data, events)
        except ProtocolError as exc:
            if self.state is ConnectionState.OPEN:
                self._out.append(frame(FrameType.GOAWAY, 0, 0, encode_goaway(exc.code, str(exc))))
            self._close()
            raise
        return events

    def _receive(self, data: Buffer, events: list[Event]) -> None:
        view = memoryview(data)
        end = len(view)
        pos = 0
        if self.state is ConnectionState.HANDSHAKING:
            pos = self._receive_preface(view, events)
            if self.state is ConnectionState.HANDSHAKING:
                return
        keep_views = type(data) is bytes
        head = self._head
        while True:
            if self._frame is None:
                avail = end - pos
                if head:
                    take = min(HEADER_SIZE - len(head), avail)
                    head += view[pos : pos + take]
                    pos += take
                    if len(head) < HEADER_SIZE:
                        return
                    ftype, flags, stream_id, length = HEADER.unpack(head)
                    head.clear()
                elif avail >= HEADER_SIZE:
                    ftype, flags, stream_id, length = HEADER.unpack_from(view, pos)
                    pos += HEADER_SIZE
                else:
                    head += view[pos:end]
                    return
                self._check_header(ftype, flags, stream_id, length)
                if end - pos < length:
                    self._frame = (ftype, flags, stream_id, length)
                    piece = view[pos:end]
                    self._pieces.append(piece if keep_views else piece.tobytes())
                    self._got = end - pos
                    return
                payload = view[pos : pos + length].tobytes()
                pos += length
            else:
                ftype, flags, stream_id, length = self._frame
                take = min(length - self._got, end - pos)
                piece = view[pos : pos + take]
                self._pieces.append(piece if keep_views else piece.tobytes())
                self._got += take
                pos += take
                if self._got < length:
                    return
                payload = b"".join(self._pieces)
                self._pieces.clear()
                self._frame = None
            _HANDLERS[ftype](self, flags, stream_id, payload, events)
            if self.state is ConnectionState.CLOSED:
                return

    def _receive_preface(self, view: memoryview, events: list[Event]) -> int:
        head = self._head
        take = min(PREFACE.size - len(head), len(view))
        head += view[:take]
        if len(head) >= len(MAGIC) and head[: len(MAGIC)] != MAGIC:
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR,
                f"peer does not speak the tunnel protocol: it sent {bytes(head)!r}",
            )
        if len(head) >= PREFACE_VERSION_END:
            # The peer's lowest version: above our highest, no version can be agreed.
            # Below our lowest, the peer may still speak ours; Arrive/ArriveOk decide.
            version = int.from_bytes(head[len(MAGIC) : PREFACE_VERSION_END], "big")
            if version > self.versions[1]:
                low, high = self.versions
                ours = f"version {high}" if low == high else f"versions {low}-{high}"
                raise ProtocolError(
                    ErrorCode.PROTOCOL_ERROR,
                    f"incompatible tunnel protocol: peer speaks version {version},"
                    f" this side speaks {ours}",
                )
        if len(head) < PREFACE.size:
            return take
        _, _, window = PREFACE.unpack(head)
        head.clear()
        if not MIN_INITIAL_WINDOW <= window <= MAX_WINDOW:
            raise ProtocolError(
                ErrorCode.FLOW_CONTROL_ERROR,
                f"peer announced an initial window of {window} bytes, outside"
                f" [{MIN_INITIAL_WINDOW}, {MAX_WINDOW}]",
            )
        self.state = ConnectionState.OPEN
        self._peer_window = window
        # Streams opened before the handshake were created without credit.
        for stream_id, stream in self._streams.items():
            stream.send_credit = window
            if stream.state in _CAN_SEND:
                events.append(WindowUpdated(stream_id, window))
        return take

    def _check_header(self, ftype: int, flags: int, stream_id: int, length: int) -> None:
        """Runs before the payload is buffered so an oversized or nonsensical frame is
        rejected without holding its bytes."""
        if ftype >= len(_ALLOWED_FLAGS):
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"unknown frame type {ftype:#04x}")
        name = FrameType(ftype).name
        if length > MAX_FRAME_PAYLOAD:
            raise ProtocolError(
                ErrorCode.FRAME_SIZE_ERROR,
                f"{name} frame of {length} bytes exceeds the {MAX_FRAME_PAYLOAD} byte limit",
            )
        if flags & ~_ALLOWED_FLAGS[ftype]:
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"{name} frame with undefined flags {flags:#04x}"
            )
        if (stream_id == 0) is not _CONNECTION_LEVEL[ftype]:
            where = "stream 0" if _CONNECTION_LEVEL[ftype] else "a non-zero stream"
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"{name} frame on stream {stream_id}, needs {where}"
            )
        expected = _EXACT_LENGTH[ftype]
        if expected is not None and length != expected:
            raise ProtocolError(
                ErrorCode.FRAME_SIZE_ERROR,
                f"{name} frame of {length} bytes, must be {expected}",
            )

    def _peer_stream(self, stream_id: int, ftype: FrameType) -> _Stream | None:
        """The stream a received frame is for, or None when the frame concerns a
        stream already closed: the peer may legitimately have sent it before learning
        of a reset or failed dial, so it is dropped rather than treated as an error."""
        stream = self._streams.get(stream_id)
        if stream is None and not self._was_opened(stream_id):
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR,
                f"{ftype.name} frame on stream {stream_id}, which was never opened",
            )
        return stream

    def _was_opened(self, stream_id: int) -> bool:
        if initiator(stream_id) is self.role:
            return stream_id < self._next_local_id
        return stream_id <= self._last_peer_id

    def _on_data(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        stream = self._peer_stream(stream_id, FrameType.DATA)
        if stream is None:
            return
        if stream.state not in _CAN_RECEIVE:
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"DATA on stream {stream_id} after the peer's FIN"
            )
        if stream.local and stream.dial_pending:
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"DATA on stream {stream_id} before DIAL_RESULT"
            )
        size = len(payload)
        if size > stream.recv_credit:
            raise ProtocolError(
                ErrorCode.FLOW_CONTROL_ERROR,
                f"peer sent {size} bytes on stream {stream_id}"
                f" with only {stream.recv_credit} bytes of credit",
            )
        fin = flags & FLAG_FIN
        if stream.protocol is IPProtocol.UDP:
            if fin and size:
                raise ProtocolError(
                    ErrorCode.PROTOCOL_ERROR,
                    f"FIN with a payload on UDP stream {stream_id}",
                )
            if not fin:
                events.append(DataReceived(stream_id, payload))
        elif size:
            events.append(DataReceived(stream_id, payload))
        stream.recv_credit -= size
        stream.unconsumed += size
        if fin:
            stream.state = next_state(stream.state, StreamTransition.RECV_FIN)
            stream.pending_credit = 0
            self._release(stream)
            events.append(StreamEnded(stream_id))
            if stream.state is StreamState.CLOSED:
                del self._streams[stream_id]

    def _on_open(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if initiator(stream_id) is self.role:
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR,
                f"peer opened stream {stream_id}, an id reserved for this side",
            )
        if stream_id <= self._last_peer_id:
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR,
                f"peer opened stream {stream_id} after stream {self._last_peer_id};"
                " ids must increase",
            )
        try:
            dial = decode_dial(payload)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"malformed OPEN frame: {exc}") from exc
        self._last_peer_id = stream_id
        self._streams[stream_id] = _Stream(
            dial.protocol, local=False, send=self._peer_window, recv=self._initial_window
        )
        events.append(StreamOpened(stream_id, dial))

    def _on_dial_result(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        stream = self._peer_stream(stream_id, FrameType.DIAL_RESULT)
        if stream is None:
            return
        if not (stream.local and stream.dial_pending):
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"unexpected DIAL_RESULT on stream {stream_id}"
            )
        try:
            error, message = decode_dial_result(payload)
        except ValueError as exc:
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"malformed DIAL_RESULT frame: {exc}"
            ) from exc
        if error is None:
            stream.dial_pending = False
            events.append(DialSucceeded(stream_id))
        else:
            self._drop(stream_id)
            events.append(DialFailed(stream_id, error, message))

    def _on_window_update(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        stream = self._peer_stream(stream_id, FrameType.WINDOW_UPDATE)
        if stream is None or stream.state not in _CAN_SEND:
            return  # credit for a direction we have finished with
        increment = decode_u32(payload)
        if increment == 0:
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE of 0 on stream {stream_id}"
            )
        stream.send_credit += increment
        if stream.send_credit > MAX_WINDOW:
            raise ProtocolError(
                ErrorCode.FLOW_CONTROL_ERROR,
                f"WINDOW_UPDATE raised stream {stream_id}'s window above {MAX_WINDOW}",
            )
        events.append(WindowUpdated(stream_id, stream.send_credit))

    def _on_reset(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        stream = self._peer_stream(stream_id, FrameType.RESET)
        if stream is None:
            return
        try:
            code = ErrorCode(decode_u32(payload))
        except ValueError as exc:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"malformed RESET frame: {exc}") from exc
        self._drop(stream_id)
        events.append(StreamReset(stream_id, code))

    def _on_control(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        try:
            message = decode_control(payload)
        except msgspec.DecodeError as exc:
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"malformed control message: {exc}"
            ) from exc
        events.append(ControlReceived(message))

    def _on_goaway(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        try:
            code, reason = decode_goaway(payload)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"malformed GOAWAY frame: {exc}") from exc
        self._close()
        events.append(ConnectionClosed(code, reason))

    def _release(self, stream: _Stream) -> None:
        """The stream will receive nothing more: its window growth goes back to the
        connection's budget."""
        if self._budget is not None and stream.window != self._initial_window:
            self._budget.release(stream.window, self._initial_window)
            stream.window = self._initial_window

    def _drop(self, stream_id: int) -> None:
        self._release(self._streams.pop(stream_id))

    def _close(self) -> None:
        self.state = ConnectionState.CLOSED
        for stream in self._streams.values():
            self._release(stream)
        self._streams.clear()
        self._head.clear()
        self._pieces.clear()
        self._frame = None

    # --- sending --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.state is ConnectionState.CLOSED:
            raise LocalProtocolError("the connection is closed")

    def _stream(self, stream_id: int) -> _Stream:
        """Look up a stream for a local action, telling "gone" (the peer reset it, or
        the connection closed) from "never existed": only the former is an expected
        race the shell should absorb."""
        stream = self._streams.get(stream_id)
        if stream is None:
            if self.state is ConnectionState.CLOSED:
                raise StreamClosedError(f"stream {stream_id} is gone: the connection is closed")
            if stream_id > 0 and self._was_opened(stream_id):
                raise StreamClosedError(f"stream {stream_id} is closed")
            raise LocalProtocolError(f"stream {stream_id} was never opened")
        return stream

    def _sendable(self, stream_id: int) -> _Stream:
        stream = self._stream(stream_id)
        if stream.state not in _CAN_SEND:
            raise LocalProtocolError(f"stream {stream_id} is {stream.state.value}")
        if not stream.local and stream.dial_pending:
            raise LocalProtocolError(f"stream {stream_id} must be accepted before sending")
        return stream

    def open_stream(self, dial: Dial) -> int:
        """Ask the peer to connect to ``dial``; returns the new stream id. Data may be
        sent at once (it waits in the peer's window until the dial completes); a
        DialSucceeded or DialFailed event follows."""
        self._check_open()
        stream_id = self._next_local_id
        if stream_id > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted; open a new connection")
        payload = encode_dial(dial)
        self._next_local_id += 2
        self._streams[stream_id] = _Stream(
            dial.protocol, local=True, send=self._peer_window, recv=self._initial_window
        )
        self._out.append(frame(FrameType.OPEN, 0, stream_id, payload))
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        """Report a successful dial for a stream the peer opened; only then may this
        side send on it."""
        stream = self._stream(stream_id)
        if stream.local or not stream.dial_pending:
            raise LocalProtocolError(f"stream {stream_id} has no dial awaiting a result")
        stream.dial_pending = False
        self._out.append(frame(FrameType.DIAL_RESULT, 0, stream_id, encode_dial_result(None, "")))

    def reject_stream(self, stream_id: int, error: DialError, message: str = "") -> None:
        """Report a failed dial; the stream is closed on both sides, and data the peer
        sent optimistically is discarded on arrival."""
        stream = self._stream(stream_id)
        if stream.local or not stream.dial_pending:
            raise LocalProtocolError(f"stream {stream_id} has no dial awaiting a result")
        self._drop(stream_id)
        payload = encode_dial_result(error, message)
        self._out.append(frame(FrameType.DIAL_RESULT, 0, stream_id, payload))

    def send_window(self, stream_id: int) -> int:
        """Bytes ``send_data`` would accept now; reading at most this much from the
        local socket means the shell never has to hold a remainder."""
        return self._sendable(stream_id).send_credit

    def send_data(self, stream_id: int, data: Buffer) -> int:
        """Queue as much of ``data`` as the peer's credit allows, cut into frames of at
        most MAX_FRAME_PAYLOAD bytes, and return how much was taken. The rest is the
        caller's to retry after a WindowUpdated event for this stream.

        ``bytes`` are queued by reference; other buffer types are copied, since the
        caller may reuse them before the output is written.
        """
        stream = self._sendable(stream_id)
        if stream.protocol is not IPProtocol.TCP:
            raise LocalProtocolError(f"stream {stream_id} carries datagrams; use send_datagram")
        size = min(len(data), stream.send_credit)
        if size == 0:
            return 0
        stream.send_credit -= size
        payload: bytes | memoryview
        if type(data) is not bytes:
            payload = memoryview(data)[:size].tobytes()
        elif size < len(data):
            payload = memoryview(data)[:size]
        else:
            payload = data
        out = self._out
        pack = HEADER.pack
        if size <= MAX_FRAME_PAYLOAD:
            out.append(pack(FrameType.DATA, 0, stream_id, size))
            out.append(payload)
            return size
        view = memoryview(payload)
        for offset in range(0, size, MAX_FRAME_PAYLOAD):
            chunk = view[offset : offset + MAX_FRAME_PAYLOAD]
            out.append(pack(FrameType.DATA, 0, stream_id, len(chunk)))
            out.append(chunk)
        return size

    def send_datagram(self, stream_id: int, datagram: Buffer) -> bool:
        """Queue one datagram on a UDP stream, or drop it and return False when the
        peer's credit cannot cover it: like a congested network, which UDP senders
        already tolerate, and better than queueing without bound."""
        stream = self._sendable(stream_id)
        if stream.protocol is not IPProtocol.UDP:
            raise LocalProtocolError(f"stream {stream_id} is a byte stream; use send_data")
        size = len(datagram)
        if size > MAX_DATAGRAM:
            raise LocalProtocolError(f"datagram of {size} bytes exceeds {MAX_DATAGRAM}")
        if size > stream.send_credit:
            return False
        stream.send_credit -= size
        self._out.append(HEADER.pack(FrameType.DATA, 0, stream_id, size))
        self._out.append(datagram if type(datagram) is bytes else bytes(datagram))
        return True

    def close_stream(self, stream_id: int) -> None:
        """Half-close: send FIN. The peer may keep sending until it closes too, which
        is what a proxied TCP shutdown(SHUT_WR) needs."""
        stream = self._sendable(stream_id)
        stream.state = next_state(stream.state, StreamTransition.SEND_FIN)
        self._out.append(HEADER.pack(FrameType.DATA, FLAG_FIN, stream_id, 0))
        if stream.state is StreamState.CLOSED:
            del self._streams[stream_id]  # FIN already received: credit released then

    def reset_stream(self, stream_id: int, code: ErrorCode = ErrorCode.CANCEL) -> None:
        """Abort both directions. Resetting a stream that is already gone does nothing,
        so teardown paths need not track who closed first."""
        try:
            self._stream(stream_id)
        except StreamClosedError:
            return
        self._drop(stream_id)
        self._out.append(FRAME_U32.pack(FrameType.RESET, 0, stream_id, 4, code))

    def consume(self, stream_id: int, size: int) -> None:
        """Declare ``size`` received bytes delivered to the application, returning them
        to the peer as credit. Credit is batched until it reaches a quarter of the
        stream's window, so a bulk transfer costs four WINDOW_UPDATEs per window; a
        quarter keeps the sender streaming, as three quarters of the window stay granted
        to a drained receiver. With a budget, each return may also grow the window. A
        stream that is gone is ignored: the application may still be draining data
        received before a reset."""
        try:
            stream = self._stream(stream_id)
        except StreamClosedError:
            return
        if not 0 <= size <= stream.unconsumed:
            raise LocalProtocolError(
                f"cannot consume {size} bytes on stream {stream_id},"
                f" {stream.unconsumed} were received and not yet consumed"
            )
        stream.unconsumed -= size
        if stream.state not in _CAN_RECEIVE:
            return  # the peer has sent FIN and needs no more credit
        stream.pending_credit += size
        if stream.pending_credit >= stream.window >> 2:
            increment = stream.pending_credit
            stream.pending_credit = 0
            if self._budget is not None and stream.protocol is IPProtocol.TCP:
                # Datagram streams keep their window: a dropped datagram is cheaper
                # than memory, and they carry little.
                stream.since_resize += increment
                window = self._budget.resize(stream.window, stream.since_resize)
                if window != stream.window:
                    increment += window - stream.window
                    stream.window = window
                    stream.since_resize = 0
            stream.recv_credit += increment
            self._out.append(FRAME_U32.pack(FrameType.WINDOW_UPDATE, 0, stream_id, 4, increment))

    def send_control(self, message: ControlMessage) -> None:
        self._check_open()
        payload = encode_control(message)
        if len(payload) > MAX_FRAME_PAYLOAD:
            raise LocalProtocolError(
                f"{type(message).__name__} encodes to {len(payload)} bytes,"
                f" over the {MAX_FRAME_PAYLOAD} byte frame limit"
            )
        self._out.append(frame(FrameType.CONTROL, 0, 0, payload))

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Send GOAWAY and stop: every stream is dropped and later input is ignored.
        Idempotent, so every teardown path may call it."""
        if self.state is ConnectionState.CLOSED:
            return
        self._out.append(frame(FrameType.GOAWAY, 0, 0, encode_goaway(code, reason)))
        self._close()

    # --- introspection --------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Received bytes held until they complete a preface, header or frame: never more
        than a header and MAX_FRAME_PAYLOAD, as a frame's length is checked first."""
        return len(self._head) + (self._got if self._frame is not None else 0)

    def stream_state(self, stream_id: int) -> StreamState:
        if stream_id <= 0:
            raise ValueError(f"stream id {stream_id} does not name a stream")
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream.state
        if self.state is ConnectionState.CLOSED or self._was_opened(stream_id):
            return StreamState.CLOSED
        return StreamState.IDLE


# Indexed by frame type; plain functions rather than bound methods stored on the
# instance, which would make every Connection a reference cycle.
_HANDLERS = (
    Connection._on_data,
    Connection._on_open,
    Connection._on_dial_result,
    Connection._on_window_update,
    Connection._on_reset,
    Connection._on_control,
    Connection._on_goaway,
)
