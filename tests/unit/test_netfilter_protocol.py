"""Framing and message encoding of the helper protocol, without sockets."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from telepresence.netfilter import protocol
from telepresence.netfilter.protocol import (
    Error,
    FrameDecoder,
    Hello,
    HostRoutesDone,
    NameserversDone,
    ProtocolError,
    RefreshNameservers,
    Setup,
    SetupDone,
    Status,
    StatusReply,
    UpstreamSocket,
    encode,
)

SETUP = Setup(subnets=["10.96.0.0/16"], dns_redirect_port=1053, proxy_port=1234)
MESSAGES: list[protocol.Message] = [
    SETUP,
    Status(),
    UpstreamSocket(kind="udp"),
    Hello(version=protocol.VERSION, pid=42),
    Error(message="no"),
    SetupDone(tun_name="tel0", routed=["10.96.0.0/16"]),
    HostRoutesDone(hosts=["203.0.113.2"], skipped=["192.0.2.1: never proxied"]),
    StatusReply(configured=False, helper_pid=1),
    RefreshNameservers(),
    NameserversDone(nameservers=["192.0.2.1", "192.0.2.2"], changed=True),
    NameserversDone(nameservers=["192.0.2.1"], kept="resolv.conf lists no IPv4 nameserver"),
]


def decode_all(decoder: FrameDecoder) -> list[tuple[protocol.Message, list[int]]]:
    out = []
    while (item := decoder.next()) is not None:
        out.append(item)
    return out


def test_round_trip_of_every_message_kind() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"".join(encode(m) for m in MESSAGES))
    assert [m for m, _ in decode_all(decoder)] == MESSAGES
    assert not decoder.pending


def test_setup_carries_nothing_the_helper_chooses() -> None:
    fields = set(Setup.__struct_fields__)
    assert fields == {
        "subnets",
        "never_proxy",
        "api_server_ips",
        "allow_conflicting_subnets",
        "dns_redirect_port",
        "proxy_port",
    }


@given(st.lists(st.integers(min_value=1, max_value=50), min_size=1))
def test_frames_survive_any_split_of_the_byte_stream(cuts: list[int]) -> None:
    data = b"".join(encode(m) for m in MESSAGES)
    decoder = FrameDecoder()
    received: list[protocol.Message] = []
    pos = 0
    for cut in cuts * (len(data) // sum(cuts) + 1):
        decoder.feed(data[pos : pos + cut])
        pos += cut
        received += [m for m, _ in decode_all(decoder)]
        if pos >= len(data):
            break
    assert received == MESSAGES


def test_descriptors_are_handed_out_with_the_frame_that_announces_them() -> None:
    r1, w1 = os.pipe()
    decoder = FrameDecoder()
    decoder.feed(encode(Status()) + encode(SetupDone(tun_name="t", routed=[]), fds=2), [r1, w1])
    (first, fds1), (second, fds2) = decode_all(decoder)
    assert (first, fds1) == (Status(), [])
    assert isinstance(second, SetupDone) and fds2 == [r1, w1]
    os.close(r1)
    os.close(w1)


def test_missing_descriptors_are_a_protocol_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode(Status(), fds=1))
    with pytest.raises(ProtocolError, match="announces 1 descriptors"):
        decoder.next()


def test_close_closes_descriptors_nobody_took() -> None:
    r, w = os.pipe()
    decoder = FrameDecoder()
    decoder.feed(b"\x00", [r])
    decoder.close()
    with pytest.raises(OSError):
        os.fstat(r)
    os.close(w)


def test_malformed_and_oversized_frames_are_rejected() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00\x00\x03\x00abc")
    with pytest.raises(ProtocolError, match="malformed"):
        decoder.next()
    decoder = FrameDecoder()
    decoder.feed((protocol.MAX_FRAME + 1).to_bytes(4, "big") + b"\x00")
    with pytest.raises(ProtocolError, match="refused: the limit is"):
        decoder.next()


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + b"\x00" + body


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"type": "Status", "extra": 1}, "unknown field `extra`"),
        ({"type": "UpstreamSocket", "kind": "raw"}, "Invalid enum value 'raw'"),
        ({"type": "UpstreamSocket", "kind": "udp", "family": 17}, "Invalid enum value 17"),
        ({"type": "UpstreamSocket", "kind": "udp", "mark": 0xCA6C}, "unknown field `mark`"),
        ({"type": "Setup", "subnets": "10.0.0.0/8", "dns_redirect_port": 1, "proxy_port": 2},
         "Expected `array`, got `str`"),
        ({"type": "Setup", "subnets": [], "dns_redirect_port": 1, "proxy_port": 2,
          "dns_nameservers": ["192.0.2.1"]}, "unknown field `dns_nameservers`"),
        ({"type": "Hello", "version": 2, "pid": 1}, "Invalid value 'Hello'"),
        ({"type": "FormatDisk"}, "Invalid value 'FormatDisk'"),
        ({"type": "RefreshNameservers", "nameservers": ["192.0.2.1"]},
         "unknown field `nameservers`"),
        ({"type": "NameserversDone", "nameservers": []}, "Invalid value 'NameserversDone'"),
    ],
)  # fmt: skip
def test_the_helper_decodes_requests_strictly(body: dict[str, object], message: str) -> None:
    import msgspec

    decoder = FrameDecoder.for_requests()
    decoder.feed(frame(msgspec.msgpack.encode(body)) + encode(Status()))
    with pytest.raises(protocol.MalformedMessage, match=message):
        decoder.next()
    assert decoder.next() == (Status(), [])  # still in step: the bad frame was consumed


# Found by the helper fuzzer (fuzz/targets/helper.py): msgspec raised UnicodeDecodeError
# (and RecursionError), which escaped next() and ended the helper's session.
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x82\xa4type\xb0RemoveHostRoutes\xa3ips\x91\xa4203\xff", "(?i)invalid utf-8"),
        # Skipped before the tag says which request it is, as msgspec must.
        (b"\x82\xa1x" + b"\x91" * 60_000 + b"\x01\xa4type\xa6Status", "nested"),
    ],
    ids=["utf-8", "deep"],
)
def test_undecodable_strings_and_deep_nesting_are_malformed_messages(
    body: bytes, message: str
) -> None:
    r, w = os.pipe()
    decoder = FrameDecoder.for_requests()
    decoder.feed(len(body).to_bytes(4, "big") + b"\x01" + body + encode(Status()), [r])
    with pytest.raises(protocol.MalformedMessage, match=message):
        decoder.next()
    with pytest.raises(OSError):
        os.fstat(r)  # the frame's descriptor was closed with it
    assert decoder.next() == (Status(), [])
    os.close(w)


def test_the_helper_refuses_requests_over_64_kib() -> None:
    decoder = FrameDecoder.for_requests()
    decoder.feed((protocol.MAX_REQUEST + 1).to_bytes(4, "big") + b"\x00")
    with pytest.raises(ProtocolError, match="65537 bytes refused: the limit is 65536"):
        decoder.next()
    with pytest.raises(ValueError, match="65536-byte limit"):
        encode(Setup(subnets=["10.0.0.0/8"] * 7000, dns_redirect_port=1, proxy_port=2))


def test_unknown_request_type_is_rejected() -> None:
    import msgspec

    body = msgspec.msgpack.encode({"type": "FormatDisk"})
    decoder = FrameDecoder()
    decoder.feed(len(body).to_bytes(4, "big") + b"\x00" + body)
    with pytest.raises(ProtocolError):
        decoder.next()


def test_encode_refuses_too_many_descriptors() -> None:
    with pytest.raises(ValueError):
        encode(Status(), fds=protocol.MAX_FDS + 1)


def test_refresh_carries_no_address_and_its_answer_tolerates_new_fields() -> None:
    import msgspec

    assert RefreshNameservers.__struct_fields__ == ()
    decoder = FrameDecoder()
    decoder.feed(frame(msgspec.msgpack.encode(
        {"type": "NameserversDone", "nameservers": ["192.0.2.1"], "later": 1}
    )))  # fmt: skip
    assert decoder.next() == (NameserversDone(nameservers=["192.0.2.1"]), [])
    assert protocol.VERSION == 4
