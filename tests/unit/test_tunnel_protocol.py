"""Playbook tests for the tunnel protocol: exact bytes in, exact events and bytes out."""

from __future__ import annotations

import struct

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from telepresence.tunnel.frames import (
    MAX_FRAME_PAYLOAD,
    MIN_INITIAL_WINDOW,
    FrameType,
    decode_dial,
    encode_dial,
)
from telepresence.tunnel.messages import (
    Arrive,
    ArriveOk,
    ClusterInfo,
    ControlMessage,
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
    DialFailed,
    DialSucceeded,
    ErrorCode,
    IPProtocol,
    LocalProtocolError,
    ProtocolError,
    Role,
    StreamClosedError,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamState,
    StreamTransition,
    WindowUpdated,
    initiator,
    next_state,
)

WINDOW = 256 * 1024
PREFACE_V1 = b"\xfeTPX\x00\x01\x00\x04\x00\x00"  # magic, version 1, window 262144
TCP_DIAL = Dial(IPProtocol.TCP, "10.0.0.1", 80)
UDP_DIAL = Dial(IPProtocol.UDP, "fd00::53", 53)


def hdr(ftype: int, flags: int, stream_id: int, length: int) -> bytes:
    return struct.pack(">BBII", ftype, flags, stream_id, length)


def pair(**kwargs: int) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT, **kwargs)
    server = Connection(Role.SERVER, **kwargs)
    assert server.receive_data(client.data_to_send()) == []
    assert client.receive_data(server.data_to_send()) == []
    return client, server


def transfer(src: Connection, dst: Connection) -> list[object]:
    return list(dst.receive_data(src.data_to_send()))


def open_accepted(
    client: Connection, server: Connection, dial: Dial = TCP_DIAL
) -> tuple[int, list[object]]:
    stream_id = client.open_stream(dial)
    assert transfer(client, server) == [StreamOpened(stream_id, dial)]
    server.accept_stream(stream_id)
    return stream_id, transfer(server, client)


# --- handshake ------------------------------------------------------------------------


def test_preface_is_queued_on_construction() -> None:
    assert Connection(Role.CLIENT).data_to_send() == PREFACE_V1
    small = Connection(Role.SERVER, initial_window=MIN_INITIAL_WINDOW)
    assert small.data_to_send() == b"\xfeTPX\x00\x01\x00\x02\x00\x00"


def test_handshake_opens_the_connection_byte_by_byte() -> None:
    conn = Connection(Role.CLIENT)
    for byte in PREFACE_V1[:-1]:
        assert conn.receive_data(bytes([byte])) == []
        assert conn.state is ConnectionState.HANDSHAKING
    assert conn.receive_data(PREFACE_V1[-1:]) == []
    assert conn.state is ConnectionState.OPEN


def test_version_mismatch_names_both_versions() -> None:
    conn = Connection(Role.CLIENT)
    conn.data_to_send()
    with pytest.raises(ProtocolError, match="peer speaks version 4, this side speaks versions 1-3"):
        conn.receive_data(b"\xfeTPX\x00\x04")  # reported before the rest of the preface
    assert conn.state is ConnectionState.CLOSED
    assert conn.data_to_send() == b""  # no GOAWAY a v4 peer might misread


def test_wrong_magic_is_reported_with_the_bytes_seen() -> None:
    conn = Connection(Role.SERVER)
    with pytest.raises(ProtocolError, match=r"does not speak the tunnel protocol.*HTTP"):
        conn.receive_data(b"HTTP/1.1 400 Bad Request\r\n")


def test_tiny_peer_window_is_rejected() -> None:
    conn = Connection(Role.CLIENT)
    with pytest.raises(ProtocolError, match="initial window of 1024") as info:
        conn.receive_data(b"\xfeTPX\x00\x01\x00\x00\x04\x00")
    assert info.value.code is ErrorCode.FLOW_CONTROL_ERROR


def test_initial_window_is_validated_locally() -> None:
    with pytest.raises(ValueError, match="initial_window"):
        Connection(Role.CLIENT, initial_window=MIN_INITIAL_WINDOW - 1)


def test_preface_and_frames_in_one_chunk() -> None:
    server = Connection(Role.SERVER)
    client = Connection(Role.CLIENT)
    client.send_control(Remain("s-1"))
    assert server.receive_data(client.data_to_send()) == [ControlReceived(Remain("s-1"))]


def test_stream_opened_before_handshake_becomes_writable_with_it() -> None:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    stream_id = client.open_stream(TCP_DIAL)
    assert client.send_data(stream_id, b"early") == 0
    assert client.receive_data(server.data_to_send()) == [WindowUpdated(stream_id, WINDOW)]
    assert client.send_data(stream_id, b"early") == 5


# --- streams --------------------------------------------------------------------------


def test_open_accept_data_exact_bytes() -> None:
    client, server = pair()
    assert client.open_stream(TCP_DIAL) == 1
    wire = client.data_to_send()
    assert wire == hdr(1, 0, 1, 7) + b"\x06\x00\x50\x0a\x00\x00\x01"
    assert server.receive_data(wire) == [StreamOpened(1, TCP_DIAL)]

    server.accept_stream(1)
    wire = server.data_to_send()
    assert wire == hdr(2, 0, 1, 1) + b"\x00"
    assert client.receive_data(wire) == [DialSucceeded(1)]

    assert client.send_data(1, b"ping") == 4
    wire = client.data_to_send()
    assert wire == hdr(0, 0, 1, 4) + b"ping"
    assert server.receive_data(wire) == [DataReceived(1, b"ping")]

    assert server.send_data(1, b"pong") == 4
    assert transfer(server, client) == [DataReceived(1, b"pong")]
    assert client.open_stream(UDP_DIAL) == 3


def test_server_opened_streams_use_even_ids() -> None:
    client, server = pair()
    assert server.open_stream(TCP_DIAL) == 2
    assert transfer(server, client) == [StreamOpened(2, TCP_DIAL)]
    assert initiator(2) is Role.SERVER
    assert initiator(1) is Role.CLIENT


def test_optimistic_data_waits_in_the_window_until_the_dial_completes() -> None:
    client, server = pair()
    stream_id = client.open_stream(TCP_DIAL)
    assert client.send_data(stream_id, b"GET / HTTP/1.1\r\n\r\n") == 18
    assert transfer(client, server) == [
        StreamOpened(stream_id, TCP_DIAL),
        DataReceived(stream_id, b"GET / HTTP/1.1\r\n\r\n"),
    ]


def test_half_close_in_both_directions() -> None:
    client, server = pair()
    stream_id, _ = open_accepted(client, server)
    client.close_stream(stream_id)
    wire = client.data_to_send()
    assert wire == hdr(0, 0x01, stream_id, 0)
    assert server.receive_data(wire) == [StreamEnded(stream_id)]
    assert client.stream_state(stream_id) is StreamState.HALF_CLOSED_LOCAL
    assert server.stream_state(stream_id) is StreamState.HALF_CLOSED_REMOTE

    assert server.send_data(stream_id, b"response") == 8
    server.close_stream(stream_id)
    assert transfer(server, client) == [
        DataReceived(stream_id, b"response"),
        StreamEnded(stream_id),
    ]
    assert client.stream_state(stream_id) is StreamState.CLOSED
    assert server.stream_state(stream_id) is StreamState.CLOSED
    with pytest.raises(StreamClosedError):
        client.send_data(stream_id, b"late")


def test_large_write_is_fragmented_without_copying() -> None:
    client, server = pair()
    stream_id, _ = open_accepted(client, server)
    payload = bytes(range(256)) * 600  # 153600 bytes
    assert client.send_data(stream_id, payload) == len(payload)
    buffers = client.buffers_to_send()
    sizes = [len(b) for b in buffers]
    assert sizes == [10, MAX_FRAME_PAYLOAD, 10, MAX_FRAME_PAYLOAD, 10, 153600 - 2 * 65536]
    assert all(isinstance(b, memoryview) and b.obj is payload for b in buffers[1::2])
    events = server.receive_data(b"".join(buffers))
    assert [len(e.data) for e in events if isinstance(e, DataReceived)] == [65536, 65536, 22528]
    assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == payload


def test_whole_bytes_payload_is_queued_by_reference_and_others_copied() -> None:
    client, server = pair()
    stream_id, _ = open_accepted(client, server)
    payload = b"x" * 100
    client.send_data(stream_id, payload)
    assert client.buffers_to_send()[1] is payload
    mutable = bytearray(b"abc")
    client.send_data(stream_id, mutable)
    mutable[:] = b"zzz"
    assert transfer(client, server) == [DataReceived(stream_id, b"abc")]


def test_credit_limits_sending_and_consume_grants_it_back_in_batches() -> None:
    client, server = pair()
    stream_id, _ = open_accepted(client, server)
    assert client.send_window(stream_id) == WINDOW
    assert client.send_data(stream_id, b"a" * (WINDOW + 10)) == WINDOW
    assert client.send_data(stream_id, b"b") == 0
    transfer(client, server)

    server.consume(stream_id, WINDOW // 4 - 1)
    assert server.data_to_send() == b""  # below the threshold: no frame for crumbs
    server.consume(stream_id, 1)
    wire = server.data_to_send()
    assert wire == hdr(3, 0, stream_id, 4) + struct.pack(">I", WINDOW // 4)
    assert client.receive_data(wire) == [WindowUpdated(stream_id, WINDOW // 4)]
    assert client.send_window(stream_id) == WINDOW // 4


def test_consume_more_than_received_is_refused() -> None:
    client, server = pair()
    stream_id, _ = open_accepted(client, server)
    client.send_data(stream_id, b"abc")
    transfer(client, server)
    with pytest.raises(LocalProtocolError, match="3 were received"):
        server.consume(stream_id, 4)


def test_no_credit_is_granted_after_the_peer_finished_sending() -> None:
    client, server = pair()
    stream_id, _ = open_accepted(client, server)
    client.send_data(stream_id, b"a" * WINDOW)
    client.close_stream(stream_id)
    transfer(client, server)
    server.consume(stream_id, WINDOW)
    assert server.data_to_send() == b""


def test_stalled_stream_does_not_block_another() -> None:
    client, server = pair(initial_window=MIN_INITIAL_WINDOW)
    stalled, _ = open_accepted(client, server)
    busy, _ = open_accepted(client, server)
    assert client.send_data(stalled, b"s" * 10**6) == MIN_INITIAL_WINDOW
    transfer(client, server)  # never consumed

    todo = memoryview(b"b" * 4 * 10**6)
    received = 0
    for _ in range(100):  # ~32 window round trips are needed; more means no progress
        if not todo:
            break
        sent = client.send_data(busy, todo)
        todo = todo[sent:]
        for event in transfer(client, server):
            assert isinstance(event, DataReceived)
            assert event.stream_id == busy
            received += len(event.data)
            server.consume(busy, len(event.data))
        transfer(server, client)
    assert received == 4 * 10**6
    assert client.send_window(stalled) == 0


def test_dial_failure_closes_the_stream_and_drops_late_data() -> None:
    client, server = pair()
    stream_id = client.open_stream(TCP_DIAL)
    transfer(client, server)
    client.send_data(stream_id, b"optimistic")
    server.reject_stream(stream_id, DialError.REFUSED, "connection refused")
    wire = server.data_to_send()
    assert wire == hdr(2, 0, stream_id, 19) + b"\x01connection refused"
    assert client.receive_data(wire) == [
        DialFailed(stream_id, DialError.REFUSED, "connection refused")
    ]
    assert transfer(client, server) == []  # in flight when the dial failed
    with pytest.raises(StreamClosedError):
        client.send_data(stream_id, b"more")
    assert client.stream_state(stream_id) is StreamState.CLOSED


def test_reset_is_idempotent_and_races_are_stream_closed_errors() -> None:
    client, server = pair()
    stream_id = client.open_stream(TCP_DIAL)
    transfer(client, server)
    client.reset_stream(stream_id)
    wire = client.data_to_send()
    assert wire == hdr(4, 0, stream_id, 4) + struct.pack(">I", ErrorCode.CANCEL)
    assert server.receive_data(wire) == [StreamReset(stream_id, ErrorCode.CANCEL)]
    with pytest.raises(StreamClosedError):
        server.accept_stream(stream_id)  # the dial finished after the reset
    server.reset_stream(stream_id)
    server.consume(stream_id, 0)
    assert server.data_to_send() == b""


def test_frames_for_a_reset_stream_are_ignored() -> None:
    client, server = pair()
    stream_id, _ = open_accepted(client, server)
    server.send_data(stream_id, b"in flight")
    server.close_stream(stream_id)
    client.reset_stream(stream_id, ErrorCode.INTERNAL_ERROR)
    assert transfer(server, client) == []
    assert transfer(client, server) == [StreamReset(stream_id, ErrorCode.INTERNAL_ERROR)]


def test_simultaneous_resets_cross_harmlessly() -> None:
    client, server = pair()
    stream_id, _ = open_accepted(client, server)
    client.reset_stream(stream_id)
    server.reset_stream(stream_id, ErrorCode.INTERNAL_ERROR)
    assert transfer(client, server) == []
    assert transfer(server, client) == []


def test_credit_after_our_fin_is_ignored() -> None:
    client, server = pair()
    stream_id, _ = open_accepted(client, server)
    client.close_stream(stream_id)
    update = hdr(3, 0, stream_id, 4) + struct.pack(">I", 1000)
    assert client.receive_data(update) == []


def test_stream_ids_run_out() -> None:
    client, _ = pair()
    client._next_local_id = 2**32 + 1  # as if 2**31 streams had been opened
    with pytest.raises(LocalProtocolError, match="exhausted"):
        client.open_stream(TCP_DIAL)


def test_long_reasons_are_truncated_on_a_character_boundary() -> None:
    client, server = pair()
    client.close(ErrorCode.INTERNAL_ERROR, "é" * MAX_FRAME_PAYLOAD)
    [event] = transfer(client, server)
    assert isinstance(event, ConnectionClosed)
    assert event.reason == "é" * ((MAX_FRAME_PAYLOAD - 4) // 2)


def test_udp_stream_preserves_datagram_boundaries() -> None:
    client, server = pair()
    stream_id, _ = open_accepted(client, server, UDP_DIAL)
    assert client.send_datagram(stream_id, b"")
    assert client.send_datagram(stream_id, bytearray(b"query"))
    client.close_stream(stream_id)
    assert transfer(client, server) == [
        DataReceived(stream_id, b""),
        DataReceived(stream_id, b"query"),
        StreamEnded(stream_id),
    ]
    with pytest.raises(LocalProtocolError, match="send_datagram"):
        server.send_data(stream_id, b"x")
    with pytest.raises(LocalProtocolError, match="exceeds"):
        server.send_datagram(stream_id, b"x" * 65536)


def test_datagrams_beyond_credit_are_dropped() -> None:
    client, server = pair(initial_window=MIN_INITIAL_WINDOW)
    stream_id, _ = open_accepted(client, server, UDP_DIAL)
    assert client.send_datagram(stream_id, b"x" * 65535)
    assert client.send_datagram(stream_id, b"x" * 65535)
    assert not client.send_datagram(stream_id, b"x" * 3)
    assert client.send_datagram(stream_id, b"x" * 2)
    client.data_to_send()
    tcp_stream, _ = open_accepted(client, server)
    with pytest.raises(LocalProtocolError, match="send_data"):
        client.send_datagram(tcp_stream, b"x")


def test_control_messages_travel_on_stream_zero() -> None:
    client, server = pair()
    client.send_control(Arrive("laptop", "install-1", "0.1.0"))
    wire = client.data_to_send()
    assert wire[:6] == hdr(5, 0, 0, 0)[:6]
    assert server.receive_data(wire) == [ControlReceived(Arrive("laptop", "install-1", "0.1.0"))]
    info = ClusterInfo(("10.96.0.0/12",), ("10.244.0.0/16",), "cluster.local", "10.96.0.10")
    server.send_control(ArriveOk("session-1", "0.1.0"))
    server.send_control(info)
    assert transfer(server, client) == [
        ControlReceived(ArriveOk("session-1", "0.1.0")),
        ControlReceived(info),
    ]


def test_oversized_control_message_is_refused_locally() -> None:
    client, _ = pair()
    with pytest.raises(LocalProtocolError, match="DnsAnswer encodes to"):
        client.send_control(DnsAnswer(1, 0, b"x" * MAX_FRAME_PAYLOAD))


def test_goaway_closes_the_connection() -> None:
    client, server = pair()
    stream_id, _ = open_accepted(client, server)
    client.close(ErrorCode.NO_ERROR, "bye")
    wire = client.data_to_send()
    assert wire == hdr(6, 0, 0, 7) + b"\x00\x00\x00\x00bye"
    assert server.receive_data(wire + b"trailing garbage") == [
        ConnectionClosed(ErrorCode.NO_ERROR, "bye")
    ]
    assert server.state is ConnectionState.CLOSED
    assert server.receive_data(b"more garbage") == []
    with pytest.raises(StreamClosedError):
        server.send_data(stream_id, b"x")
    with pytest.raises(LocalProtocolError, match="connection is closed"):
        server.open_stream(TCP_DIAL)
    server.close()
    server.reset_stream(stream_id)
    assert server.data_to_send() == b""
    assert server.stream_state(stream_id) is StreamState.CLOSED


# --- local misuse ---------------------------------------------------------------------


def test_acceptor_must_accept_before_sending() -> None:
    client, server = pair()
    stream_id = client.open_stream(TCP_DIAL)
    transfer(client, server)
    with pytest.raises(LocalProtocolError, match="accepted before sending"):
        server.send_data(stream_id, b"x")
    with pytest.raises(LocalProtocolError, match="accepted before sending"):
        server.close_stream(stream_id)
    server.accept_stream(stream_id)
    with pytest.raises(LocalProtocolError, match="no dial awaiting"):
        server.accept_stream(stream_id)
    with pytest.raises(LocalProtocolError, match="no dial awaiting"):
        client.reject_stream(stream_id, DialError.FAILED)


def test_unknown_streams_are_not_mistaken_for_closed_ones() -> None:
    client, _ = pair()
    with pytest.raises(LocalProtocolError, match="never opened") as info:
        client.send_data(7, b"x")
    assert not isinstance(info.value, StreamClosedError)
    assert client.stream_state(7) is StreamState.IDLE
    with pytest.raises(ValueError, match="does not name a stream"):
        client.stream_state(0)


def test_sending_after_own_fin_is_refused() -> None:
    client, server = pair()
    stream_id, _ = open_accepted(client, server)
    client.close_stream(stream_id)
    with pytest.raises(LocalProtocolError, match="half-closed"):
        client.send_data(stream_id, b"x")
    with pytest.raises(LocalProtocolError, match="half-closed"):
        client.close_stream(stream_id)


def test_bad_dial_target_is_a_value_error() -> None:
    client, _ = pair()
    with pytest.raises(ValueError):
        client.open_stream(Dial(IPProtocol.TCP, "example.com", 80))
    with pytest.raises(ValueError, match="port"):
        client.open_stream(Dial(IPProtocol.TCP, "10.0.0.1", 0))
    assert client.data_to_send() == b""


def test_stream_state_machine() -> None:
    s = StreamState
    t = StreamTransition
    assert next_state(s.IDLE, t.OPEN) is s.OPEN
    assert next_state(s.OPEN, t.SEND_FIN) is s.HALF_CLOSED_LOCAL
    assert next_state(s.HALF_CLOSED_LOCAL, t.RECV_FIN) is s.CLOSED
    assert next_state(s.OPEN, t.RECV_FIN) is s.HALF_CLOSED_REMOTE
    assert next_state(s.HALF_CLOSED_REMOTE, t.SEND_FIN) is s.CLOSED
    for state in (s.OPEN, s.HALF_CLOSED_LOCAL, s.HALF_CLOSED_REMOTE):
        assert next_state(state, t.RESET) is s.CLOSED
    with pytest.raises(LocalProtocolError, match="cannot send FIN a stream that is closed"):
        next_state(s.CLOSED, t.SEND_FIN)
    with pytest.raises(LocalProtocolError):
        next_state(s.HALF_CLOSED_LOCAL, t.SEND_FIN)
    with pytest.raises(LocalProtocolError):
        next_state(s.IDLE, t.RESET)
    with pytest.raises(ValueError):
        initiator(0)


# --- peer misbehaviour ----------------------------------------------------------------


OPEN_1 = hdr(1, 0, 1, 7) + b"\x06\x00\x50\x0a\x00\x00\x01"
ACCEPT_1 = hdr(2, 0, 1, 1) + b"\x00"


def server_fed(wire: bytes, *, window: int = WINDOW) -> Connection:
    """A server whose client preface (announcing ``window``) arrived, then ``wire``."""
    server = Connection(Role.SERVER, initial_window=window)
    server.data_to_send()
    server.receive_data(b"\xfeTPX\x00\x01" + struct.pack(">I", window) + wire)
    return server


def client_with_stream() -> Connection:
    client, _ = pair()
    client.open_stream(TCP_DIAL)
    client.data_to_send()
    return client


def control_frame(payload: bytes) -> bytes:
    return hdr(5, 0, 0, len(payload)) + payload


# A Remain whose session id is not UTF-8, and one with an unknown field nested deeper
# than msgspec's recursion limit.
BAD_UTF8 = b"\x82\xa4type\xa6remain\xaasession_id\xa1\xff"
DEEP = b"\x83\xa4type\xa6remain\xaasession_id\xa1s\xa1x" + b"\x91" * 60_000 + b"\x01"


@pytest.mark.parametrize(
    ("wire", "code", "match"),
    [
        (hdr(7, 0, 0, 0), ErrorCode.PROTOCOL_ERROR, "unknown frame type 0x07"),
        (hdr(0, 0, 1, MAX_FRAME_PAYLOAD + 1), ErrorCode.FRAME_SIZE_ERROR, "DATA frame of 65537"),
        (hdr(1, 1, 1, 7), ErrorCode.PROTOCOL_ERROR, "OPEN frame with undefined flags 0x01"),
        (hdr(5, 0, 1, 0), ErrorCode.PROTOCOL_ERROR, "CONTROL frame on stream 1, needs stream 0"),
        (hdr(0, 0, 0, 0), ErrorCode.PROTOCOL_ERROR, "DATA frame on stream 0"),
        (hdr(3, 0, 1, 3), ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE frame of 3 bytes, must be 4"),
        (hdr(0, 0, 1, 1) + b"x", ErrorCode.PROTOCOL_ERROR, "stream 1, which was never opened"),
        (OPEN_1 + OPEN_1, ErrorCode.PROTOCOL_ERROR, "ids must increase"),
        (hdr(1, 0, 2, 7) + OPEN_1[10:], ErrorCode.PROTOCOL_ERROR, "reserved for this side"),
        (hdr(1, 0, 1, 3) + b"\x06\x00\x50", ErrorCode.PROTOCOL_ERROR, "malformed OPEN"),
        (hdr(1, 0, 1, 7) + b"\x07\x00\x50\x0a\x00\x00\x01", ErrorCode.PROTOCOL_ERROR, "OPEN"),
        (hdr(1, 0, 1, 7) + b"\x06\x00\x00\x0a\x00\x00\x01", ErrorCode.PROTOCOL_ERROR, "port 0"),
        (OPEN_1 + hdr(0, 1, 1, 0) + hdr(0, 0, 1, 1) + b"x", ErrorCode.PROTOCOL_ERROR, "FIN"),
        (OPEN_1 + hdr(3, 0, 1, 4) + b"\0\0\0\0", ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0"),
        (OPEN_1 + hdr(4, 0, 1, 4) + b"\0\0\0\x63", ErrorCode.PROTOCOL_ERROR, "malformed RESET"),
        (OPEN_1 + ACCEPT_1, ErrorCode.PROTOCOL_ERROR, "unexpected DIAL_RESULT"),
        (hdr(5, 0, 0, 1) + b"\xc1", ErrorCode.PROTOCOL_ERROR, "malformed control message"),
        (hdr(5, 0, 0, 1) + b"\x80", ErrorCode.PROTOCOL_ERROR, "malformed control message"),
        (hdr(6, 0, 0, 2) + b"\0\0", ErrorCode.PROTOCOL_ERROR, "malformed GOAWAY"),
        # Found by the tunnel fuzzer: msgspec raised UnicodeDecodeError and RecursionError
        # for these, which escaped receive_data (fuzz/README.md).
        (control_frame(BAD_UTF8), ErrorCode.PROTOCOL_ERROR, "malformed control message"),
        (control_frame(DEEP), ErrorCode.PROTOCOL_ERROR, "malformed control message"),
    ],
)
def test_peer_violations_raise_and_send_goaway(wire: bytes, code: ErrorCode, match: str) -> None:
    server = Connection(Role.SERVER)
    server.data_to_send()
    server.receive_data(PREFACE_V1)
    with pytest.raises(ProtocolError, match=match) as info:
        server.receive_data(wire)
    assert info.value.code is code
    out = server.data_to_send()
    assert out[:2] == bytes([FrameType.GOAWAY, 0])
    assert struct.unpack_from(">I", out, 10)[0] == code
    assert match.split()[0] in out[14:].decode()
    assert server.state is ConnectionState.CLOSED
    assert server.receive_data(b"anything") == []


def test_oversize_frame_is_rejected_from_its_header_alone() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        server_fed(OPEN_1 + hdr(0, 0, 1, 10**9))


def test_flow_control_violation() -> None:
    chunk = hdr(0, 0, 1, MAX_FRAME_PAYLOAD) + b"x" * MAX_FRAME_PAYLOAD
    server_fed(OPEN_1 + chunk + chunk, window=MIN_INITIAL_WINDOW)  # exactly the window
    with pytest.raises(ProtocolError, match="peer sent 1 bytes on stream 1 with only 0") as info:
        server_fed(OPEN_1 + chunk + chunk + hdr(0, 0, 1, 1) + b"x", window=MIN_INITIAL_WINDOW)
    assert info.value.code is ErrorCode.FLOW_CONTROL_ERROR


def test_window_overflow_is_a_flow_control_error() -> None:
    client = client_with_stream()
    client.receive_data(ACCEPT_1)
    with pytest.raises(ProtocolError, match="above") as info:
        client.receive_data(hdr(3, 0, 1, 4) + struct.pack(">I", 2**31 - 1))
    assert info.value.code is ErrorCode.FLOW_CONTROL_ERROR


def test_data_before_dial_result_is_a_protocol_error() -> None:
    client = client_with_stream()
    with pytest.raises(ProtocolError, match="before DIAL_RESULT"):
        client.receive_data(hdr(0, 0, 1, 2) + b"hi")


def test_fin_with_payload_on_udp_is_a_protocol_error() -> None:
    client, server = pair()
    stream_id, _ = open_accepted(client, server, UDP_DIAL)
    with pytest.raises(ProtocolError, match="FIN with a payload on UDP"):
        client.receive_data(hdr(0, 1, stream_id, 1) + b"x")


def test_malformed_dial_result() -> None:
    client = client_with_stream()
    with pytest.raises(ProtocolError, match="malformed DIAL_RESULT"):
        client.receive_data(hdr(2, 0, 1, 0))


# --- codecs ---------------------------------------------------------------------------


@given(
    protocol=st.sampled_from(IPProtocol),
    address=st.ip_addresses(),
    port=st.integers(1, 65535),
)
def test_dial_round_trip(protocol: IPProtocol, address: object, port: int) -> None:
    dial = Dial(protocol, str(address), port)
    assert decode_dial(encode_dial(dial)) == dial


control_messages = st.one_of(
    st.builds(Arrive),
    st.builds(ArriveOk),
    st.builds(Remain),
    st.builds(Depart),
    st.builds(
        ClusterInfo,
        service_subnets=st.lists(st.text()).map(tuple),
        pod_subnets=st.lists(st.text()).map(tuple),
    ),
    st.builds(DnsLookup, request_id=st.integers(0, 2**32), qtype=st.integers(0, 65535)),
    st.builds(DnsAnswer, request_id=st.integers(0, 2**32), rcode=st.integers(0, 4095)),
)


@given(control_messages)
def test_control_message_round_trip(message: ControlMessage) -> None:
    assert decode_control(encode_control(message)) == message


@pytest.mark.parametrize(
    ("payload", "match"), [(BAD_UTF8, "(?i)utf-8"), (DEEP, "nested")], ids=["utf-8", "deep"]
)
def test_malformed_control_messages_raise_decode_error_only(payload: bytes, match: str) -> None:
    with pytest.raises(msgspec.DecodeError, match=match):
        decode_control(payload)


def test_control_messages_ignore_unknown_fields() -> None:
    raw = msgspec.msgpack.encode({"type": "remain", "session_id": "s", "added_later": 1})
    assert decode_control(raw) == Remain("s")
