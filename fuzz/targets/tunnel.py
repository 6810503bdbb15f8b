"""The tunnel: frame decoding and the connection state machine, fed the peer's bytes.

Both ends run this code, the daemon as the client and the traffic manager as the server.
The input is one option byte (bit 0: which end we are; the rest seeds how the bytes are
split and whether they arrive as ``bytes`` or ``bytearray``), then the peer's byte stream.
Before it arrives, our end has opened a TCP and a UDP stream, so the peer's answers to
them (DIAL_RESULT, DATA, WINDOW_UPDATE on our streams) are reachable.

The contract (``Connection.receive_data`` and the module docstring):

- only :class:`ProtocolError` escapes; afterwards the connection is closed and ignores
  further input;
- any split of the same bytes gives the same events, or an error with the same code (the
  events of the call that raises are dropped with the connection, and the message may
  quote fewer of the bytes that were there when it was raised);
- what is buffered is at most one partial frame: a header plus MAX_FRAME_PAYLOAD,
  whatever length a header declares;
- a control message read re-encodes to itself;
- answering the events as the shells do (accept or reject a dial, consume and echo data,
  close after FIN) raises nothing but :class:`StreamClosedError`, the expected race.
"""

from __future__ import annotations

import random
import struct

from telepresence.tunnel.frames import (
    HEADER_SIZE,
    MAGIC,
    MAX_FRAME_PAYLOAD,
    MAX_WINDOW,
    PREFACE,
    FrameType,
    encode_goaway,
    frame,
)
from telepresence.tunnel.messages import (
    Arrive,
    ArriveOk,
    ClusterInfo,
    Depart,
    DnsAnswer,
    DnsLookup,
    Remain,
    decode_control,
    encode_control,
)
from telepresence.tunnel.protocol import (
    Connection,
    ConnectionClosed,
    ConnectionState,
    ControlReceived,
    DataReceived,
    Dial,
    DialError,
    ErrorCode,
    Event,
    IPProtocol,
    ProtocolError,
    Role,
    StreamClosedError,
    StreamEnded,
    StreamOpened,
    StreamState,
)

__all__ = ["TestOneInput", "seeds"]

#: What our end dials before the peer's bytes arrive: ids 1 and 3 (client) or 2 and 4.
OUR_DIALS = (
    Dial(IPProtocol.TCP, "10.96.0.10", 80),
    Dial(IPProtocol.UDP, "10.96.0.10", 53),
)
_BOUND = max(PREFACE.size, HEADER_SIZE) + MAX_FRAME_PAYLOAD
_CHUNKS = (1, 2, 3, 5, 9, 10, 11, 64, 1000, 70_000)


def _ours(role: Role) -> tuple[Connection, dict[int, IPProtocol]]:
    """Our end, with OUR_DIALS opened, and the protocol of each stream it knows."""
    conn = Connection(role)
    protocols = {conn.open_stream(dial): dial.protocol for dial in OUR_DIALS}
    conn.data_to_send()
    return conn, protocols


def _split(data: bytes, rng: random.Random) -> list[bytes]:
    chunks = []
    pos = 0
    while pos < len(data):
        size = rng.choice(_CHUNKS)
        chunks.append(data[pos : pos + size])
        pos += size
    return chunks


def _feed(
    role: Role, chunks: list[bytes], *, as_bytearray: bool = False, react: bool = False
) -> tuple[list[Event], str | None]:
    """The events, and the code of the error that ended the input (None if none did)."""
    conn, protocols = _ours(role)
    events: list[Event] = []
    for chunk in chunks:
        try:
            new = conn.receive_data(bytearray(chunk) if as_bytearray else chunk)
        except ProtocolError as exc:
            assert conn.state is ConnectionState.CLOSED
            assert conn.receive_data(b"\0" * HEADER_SIZE) == []
            return events, exc.code.name
        assert conn.buffered <= _BOUND, conn.buffered
        events += new
        if react:
            _react(conn, new, protocols)
        conn.data_to_send()
    return events, None


_SENDING = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)


def _react(conn: Connection, events: list[Event], protocols: dict[int, IPProtocol]) -> None:
    """What the daemon's and the manager's shells do with each event."""
    for event in events:
        try:
            if isinstance(event, StreamOpened):
                protocols[event.stream_id] = event.dial.protocol
                if event.stream_id % 4 < 2:
                    conn.accept_stream(event.stream_id)
                else:
                    conn.reject_stream(event.stream_id, DialError.REFUSED, "refused")
            elif isinstance(event, DataReceived):
                sid = event.stream_id
                conn.consume(sid, len(event.data))
                if conn.stream_state(sid) in _SENDING:
                    if protocols[sid] is IPProtocol.TCP:
                        conn.send_data(sid, event.data[: conn.send_window(sid)])
                    else:
                        conn.send_datagram(sid, event.data)
            elif isinstance(event, StreamEnded):
                if conn.stream_state(event.stream_id) is StreamState.HALF_CLOSED_REMOTE:
                    conn.close_stream(event.stream_id)
            elif isinstance(event, ControlReceived):
                message = event.message
                assert decode_control(encode_control(message)) == message
            elif isinstance(event, ConnectionClosed):
                assert conn.state is ConnectionState.CLOSED
        except StreamClosedError:
            pass  # reset or rejected earlier in the same batch: the expected race


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    options, stream = data[0], data[1:]
    role = Role.SERVER if options & 1 else Role.CLIENT
    whole = _feed(role, [stream])
    chunks = _split(stream, random.Random(options))
    split = _feed(role, chunks, as_bytearray=bool(options & 2))
    if whole[1] is None:
        assert split == whole, (whole, split)
    else:
        assert split[1] == whole[1], (whole, split)
    _feed(role, chunks, react=True)


# --- seeds ----------------------------------------------------------------------------

_CONTROLS = (
    Arrive("laptop", "6c1f", "0.1.0", protocol_min=1, protocol_max=1),
    ArriveOk("b2c3", "0.1.0"),
    Remain("b2c3"),
    Depart("b2c3"),
    ClusterInfo(("10.96.0.0/12",), ("10.244.0.0/16",), "cluster.local", "10.96.0.10"),
    DnsLookup(7, "web.ns.svc.cluster.local.", 1),
    DnsAnswer(7, 0, b"\x00\x07\x81\x80" + bytes(8)),
    DnsAnswer(8, 2),
)


def _peer_bytes(role: Role) -> bytes:
    """A conversation as a real peer of ``role`` writes it: the answers to our two dials
    (accepted, with data and FIN both ways; the UDP one with a datagram, then reset), a
    stream the peer opens itself, window updates and every control message."""
    ours = Connection(role)
    peer = Connection(Role.SERVER if role is Role.CLIENT else Role.CLIENT)
    ids = [ours.open_stream(dial) for dial in OUR_DIALS]
    out = []
    for event in peer.receive_data(ours.data_to_send()):
        if isinstance(event, StreamOpened):
            peer.accept_stream(event.stream_id)
    tcp, udp = ids
    peer.send_data(tcp, b"HTTP/1.1 200 OK\r\n\r\nhello")
    peer.send_datagram(udp, b"\x12\x34\x81\x80" + bytes(8))
    for message in _CONTROLS:
        peer.send_control(message)
    theirs = peer.open_stream(Dial(IPProtocol.TCP, "192.0.2.7", 8080))
    peer.send_data(theirs, b"GET / HTTP/1.1\r\n\r\n")
    peer.close_stream(tcp)
    peer.reset_stream(udp)
    out.append(peer.data_to_send())
    ours.receive_data(b"".join(out))
    ours.send_data(tcp, b"x" * 100_000)
    ours.close_stream(tcp)
    for event in peer.receive_data(ours.data_to_send()):
        if isinstance(event, DataReceived):
            peer.consume(event.stream_id, len(event.data))
    peer.close(ErrorCode.NO_ERROR, "bye")
    out.append(peer.data_to_send())
    return b"".join(out)


def _preface(*, version: int = 1, window: int = 256 * 1024) -> bytes:
    return PREFACE.pack(MAGIC, version, window)


def seeds() -> dict[str, bytes]:
    out = {}
    for role, option in ((Role.CLIENT, 0), (Role.SERVER, 1)):
        side = role.value
        out[f"conversation-{side}"] = bytes([option]) + _peer_bytes(role)
        out[f"conversation-{side}-split"] = bytes([option | 0x12]) + _peer_bytes(role)
        out[f"preface-only-{side}"] = bytes([option]) + _preface()
    ours_tcp = 1  # the client's first stream
    bad = {
        "http-not-tunnel": b"GET / HTTP/1.1\r\n",
        "future-version": _preface(version=9),
        "window-too-small": _preface(window=1024),
        "oversized-frame": _preface() + struct.pack(">BBII", 0, 0, 1, 2**32 - 1),
        "unknown-frame-type": _preface() + b"\x09" + bytes(9),
        "data-before-dial-result": _preface() + frame(FrameType.DATA, 0, ours_tcp, b"early"),
        "window-overflow": _preface()
        + frame(FrameType.DIAL_RESULT, 0, ours_tcp, b"\0")
        + frame(FrameType.WINDOW_UPDATE, 0, ours_tcp, struct.pack(">I", MAX_WINDOW)),
        "open-reserved-id": _preface()
        + frame(FrameType.OPEN, 0, 1, b"\x06\x00\x50\x0a\x00\x00\x01"),
        "control-garbage": _preface() + frame(FrameType.CONTROL, 0, 0, b"\xc1"),
        "goaway-unknown-code": _preface() + frame(FrameType.GOAWAY, 0, 0, b"\0\0\0\x63"),
        "goaway-bad-utf8": _preface()
        + frame(FrameType.GOAWAY, 0, 0, encode_goaway(ErrorCode.NO_ERROR, "")[:4] + b"\xff"),
    }
    out.update({f"bad-{name}": b"\0" + raw for name, raw in bad.items()})
    # Found by this fuzzer: msgspec's UnicodeDecodeError and RecursionError escaped.
    remain = b"\x82\xa4type\xa6remain\xaasession_id"
    regress = {
        "control-invalid-utf8": remain + b"\xa1\xff",
        "control-deep-unknown-field": b"\x83" + remain[1:] + b"\xa1s\xa1x" + b"\x91" * 3000,
    }
    for name, payload in regress.items():
        out[f"regress-{name}"] = b"\0" + _preface() + frame(FrameType.CONTROL, 0, 0, payload)
    return out
