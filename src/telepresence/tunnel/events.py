"""What the tunnel state machine reports: its exceptions and the events ``receive_data``
returns. Apart from ``protocol.py`` so the shell and the tests can read the vocabulary
without the state machine; ``protocol`` re-exports every name here."""

from __future__ import annotations

import msgspec

from telepresence.tunnel.frames import Dial, DialError, ErrorCode
from telepresence.tunnel.messages import ControlMessage

# --- errors -------------------------------------------------------------------------


class ProtocolError(Exception):
    """The peer broke the protocol. The connection is finished: a GOAWAY carrying
    ``code`` and the message is already queued (unless the handshake itself failed,
    when the peer could not parse it), so the shell should flush and close."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(Exception):
    """The caller asked for something the protocol forbids; nothing was sent and the
    connection is unaffected."""


class StreamClosedError(LocalProtocolError):
    """The stream is already gone, typically reset by the peer while the caller's own
    work (a dial, a pending write) was in progress. Separate so the shell can treat
    this expected race as routine."""


# --- events -------------------------------------------------------------------------


class StreamOpened(msgspec.Struct, frozen=True):
    """The peer wants ``dial`` connected; answer with accept_stream or reject_stream."""

    stream_id: int
    dial: Dial


class DialSucceeded(msgspec.Struct, frozen=True):
    stream_id: int


class DialFailed(msgspec.Struct, frozen=True):
    """The stream is closed; the local end of the flow should be refused right away."""

    stream_id: int
    error: DialError
    message: str


class DataReceived(msgspec.Struct, frozen=True):
    """On a UDP stream each event is exactly one datagram. Hand ``len(data)`` to
    ``consume`` once it has left the application's buffers, or the peer stalls."""

    stream_id: int
    data: bytes


class StreamEnded(msgspec.Struct, frozen=True):
    """The peer half-closed: no more data will come, but we may still send."""

    stream_id: int


class StreamReset(msgspec.Struct, frozen=True):
    stream_id: int
    code: ErrorCode


class WindowUpdated(msgspec.Struct, frozen=True):
    """A stream that may have been out of credit can be written again."""

    stream_id: int
    window: int


class ControlReceived(msgspec.Struct, frozen=True):
    message: ControlMessage


class ConnectionClosed(msgspec.Struct, frozen=True):
    """The peer sent GOAWAY; nothing after it is processed."""

    code: ErrorCode
    reason: str


Event = (
    StreamOpened
    | DialSucceeded
    | DialFailed
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowUpdated
    | ControlReceived
    | ConnectionClosed
)
