"""Wire format of the tunnel multiplexer: constants, frame header and payload codecs.

Kept apart from the state machine so the byte layout can be read (and tested) in one
place; docs/protocol.md is the prose version of this module. Decoders raise
``ValueError`` on malformed input and leave it to the caller to decide whose fault it
is (a peer's malformed frame is a protocol error, a caller's bad argument is not).
"""

from __future__ import annotations

import ipaddress
import struct
from enum import IntEnum

import msgspec

MAGIC = b"\xfeTPX"
"""Starts every preface. 0xFE cannot begin HTTP, TLS or SSH traffic, so a port-forward
that lands on the wrong container port is diagnosed at the first bytes."""

VERSION = 3
"""The highest protocol version this code speaks; a new one for any change a peer of the
previous version could not parse. 2: the manager's ``Draining`` control message. 3: the
direct transport's ``DirectRequest`` and ``DirectGrant``."""
MIN_VERSION = 1
"""The lowest version this code still speaks. Peers agree on the highest version in both
ranges when the laptop arrives (docs/protocol.md, *Versioning*)."""

PREFACE = struct.Struct(">4sHI")
"""magic, the sender's lowest version, initial window. The first six bytes keep this
layout in every version, so a mismatch is always reported as such and never as garbage."""
PREFACE_VERSION_END = 6

HEADER = struct.Struct(">BBII")
"""type, flags, stream id, payload length."""
HEADER_SIZE = HEADER.size

FRAME_U32 = struct.Struct(">BBIII")
"""A header followed by a single u32 payload (WINDOW_UPDATE, RESET), packed in one go."""

MAX_FRAME_PAYLOAD = 64 * 1024
"""Bounds the head-of-line delay one stream's large write imposes on the others and the
memory a single partial frame can pin."""

MAX_DATAGRAM = 0xFFFF
"""Largest UDP payload an IP packet can carry; every datagram fits one frame."""

MAX_WINDOW = 2**31 - 1
MIN_INITIAL_WINDOW = 2 * MAX_FRAME_PAYLOAD
"""Large enough that, with the update threshold at a quarter of the window, a drained
receiver always leaves room for a maximal datagram; smaller windows could wedge UDP."""
DEFAULT_INITIAL_WINDOW = 256 * 1024
MAX_STREAM_ID = 0xFFFFFFFF

FLAG_FIN = 0x01


class FrameType(IntEnum):
    DATA = 0x0
    OPEN = 0x1
    DIAL_RESULT = 0x2
    WINDOW_UPDATE = 0x3
    RESET = 0x4
    CONTROL = 0x5
    GOAWAY = 0x6


class ErrorCode(IntEnum):
    """Carried by RESET and GOAWAY. Unknown values are a protocol error: the set only
    changes together with VERSION."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    FLOW_CONTROL_ERROR = 2
    FRAME_SIZE_ERROR = 3
    INTERNAL_ERROR = 4
    CANCEL = 5
    REFUSED = 6


class DialError(IntEnum):
    """Why the accepting side could not reach the destination (0 on the wire means
    success). Distinct reasons let the laptop mimic what a local dial would report,
    e.g. answer a refused TCP connection with RST rather than a timeout."""

    REFUSED = 1
    UNREACHABLE = 2
    TIMEOUT = 3
    FAILED = 4


class IPProtocol(IntEnum):
    """IANA protocol numbers, so the value on the wire reads like an IP header field."""

    TCP = 6
    UDP = 17


class Dial(msgspec.Struct, frozen=True):
    """Destination an OPEN frame asks the peer to connect to.

    The address is an IP literal: name resolution happens before the laptop ever sees a
    packet for the destination, so the tunnel never needs to carry host names.
    """

    protocol: IPProtocol
    address: str
    port: int


_DIAL_HEAD = struct.Struct(">BH")
_DIAL_RESULT_HEAD = struct.Struct(">B")
_U32 = struct.Struct(">I")


def encode_dial(dial: Dial) -> bytes:
    """Raises ValueError for a non-IP address or out-of-range port."""
    if not 0 < dial.port <= 0xFFFF:
        raise ValueError(f"port {dial.port} out of range")
    return _DIAL_HEAD.pack(dial.protocol, dial.port) + ipaddress.ip_address(dial.address).packed


def decode_dial(payload: bytes) -> Dial:
    if len(payload) not in (_DIAL_HEAD.size + 4, _DIAL_HEAD.size + 16):
        raise ValueError(f"OPEN payload of {len(payload)} bytes is neither IPv4 nor IPv6")
    proto, port = _DIAL_HEAD.unpack_from(payload)
    if port == 0:
        raise ValueError("OPEN for port 0")
    address = ipaddress.ip_address(payload[_DIAL_HEAD.size :])
    return Dial(IPProtocol(proto), str(address), port)


def _utf8(text: str, limit: int) -> bytes:
    """Truncate on a character boundary so the peer's strict decoder never trips."""
    raw = text.encode()
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode()


def encode_dial_result(error: DialError | None, message: str) -> bytes:
    code = 0 if error is None else int(error)
    limit = MAX_FRAME_PAYLOAD - _DIAL_RESULT_HEAD.size
    return _DIAL_RESULT_HEAD.pack(code) + _utf8(message, limit)


def decode_dial_result(payload: bytes) -> tuple[DialError | None, str]:
    if not payload:
        raise ValueError("empty DIAL_RESULT payload")
    code = payload[0]
    return (None if code == 0 else DialError(code)), payload[1:].decode()


def encode_goaway(code: ErrorCode, reason: str) -> bytes:
    return _U32.pack(code) + _utf8(reason, MAX_FRAME_PAYLOAD - _U32.size)


def decode_goaway(payload: bytes) -> tuple[ErrorCode, str]:
    if len(payload) < _U32.size:
        raise ValueError(f"GOAWAY payload of {len(payload)} bytes is too short")
    (code,) = _U32.unpack_from(payload)
    return ErrorCode(code), payload[_U32.size :].decode()


def decode_u32(payload: bytes) -> int:
    """For the fixed four-byte payloads of WINDOW_UPDATE and RESET; the header check
    has already enforced the length."""
    value: int = _U32.unpack(payload)[0]
    return value


def frame(ftype: FrameType, flags: int, stream_id: int, payload: bytes) -> bytes:
    """Header and payload as one buffer; for small frames, where a second buffer in the
    write list would cost more than the copy."""
    return HEADER.pack(ftype, flags, stream_id, len(payload)) + payload
