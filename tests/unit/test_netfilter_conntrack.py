"""The conntrack flush by mark: the netlink message and the kernel's answer (no socket)."""

from __future__ import annotations

import errno
import struct

import pytest

from telepresence.netfilter.conntrack import ConntrackError, delete_request, parse_ack


def _attrs(body: bytes) -> dict[int, bytes]:
    out = {}
    while body:
        length, kind = struct.unpack_from("=HH", body)
        out[kind] = body[4:length]
        body = body[(length + 3) & ~3 :]
    return out


def test_the_request_deletes_by_mark_and_mask_and_asks_for_an_ack() -> None:
    message = delete_request(mark=0x1074, mask=0x1074, sequence=7)
    length, kind, flags, sequence, port = struct.unpack_from("=IHHII", message)
    assert (length, sequence, port) == (len(message), 7, 0)
    assert kind == 0x0102  # ctnetlink subsystem, IPCTNL_MSG_CT_DELETE
    assert flags == 0x1 | 0x4  # request, ack
    family, version, resource = struct.unpack_from("=BBH", message, 16)
    assert (family, version, resource) == (2, 0, 0)
    # No tuple: a flush, narrowed by the kernel to entries with (mark & mask) == mark.
    # Both in network byte order; a kernel that gets the mark without the mask (or has
    # no marks) refuses rather than flushing everything.
    assert _attrs(message[20:]) == {8: b"\x00\x00\x10\x74", 21: b"\x00\x00\x10\x74"}


@pytest.mark.parametrize("mark, mask", [(0, 0xFFFFFFFF), (0x1074, 0x1000), (1 << 32, 1 << 32)])
def test_a_mark_that_would_flush_too_much_is_refused(mark: int, mask: int) -> None:
    with pytest.raises(ValueError):
        delete_request(mark=mark, mask=mask)


def _error(code: int, sequence: int = 1) -> bytes:
    return struct.pack("=IHHII", 36, 2, 0, sequence, 0) + struct.pack("=i", code) + bytes(16)


def test_the_kernel_s_answer() -> None:
    parse_ack(_error(0))
    with pytest.raises(ConntrackError, match="not supported"):
        parse_ack(_error(-errno.EOPNOTSUPP))
    with pytest.raises(ConntrackError, match="no acknowledgement"):
        parse_ack(_error(0, sequence=2))  # another request's
    with pytest.raises(ConntrackError, match="no acknowledgement"):
        parse_ack(b"")
