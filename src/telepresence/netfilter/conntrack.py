"""Forgetting the connections the helper redirected: a conntrack flush by mark, over netlink.

The kernel decides NAT once per connection and keeps the decision in the connection's
conntrack entry, for 30 to 120 s after a DNS exchange. Deleting the nft table stops new
redirects but not those entries: a later query that reuses such an entry's source port
(glibc picks them at random) would still go to the DNS server port of a session that has
ended, and fail with "port unreachable" — after `telepresence quit` on a laptop whose
other NAT rules (Docker's) keep NAT hooks registered, and after reconnecting on any
laptop. So the table's redirect rules also put the helper's mark on the connection (``ct
mark``), and teardown deletes exactly the entries that carry it.

The message is ctnetlink's IPCTNL_MSG_CT_DELETE without a tuple, filtered by mark and mask;
the kernel deletes only entries with ``ct mark & mask == mark``. A kernel without conntrack
marks refuses the filter rather than flushing everything (and could not have created the
table's ``ct mark`` statement in the first place). Building and reading the messages is
pure; only :func:`forget_marked` touches a socket.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

__all__ = ["ConntrackError", "delete_request", "forget_marked", "parse_ack"]

NETLINK_NETFILTER = getattr(socket, "NETLINK_NETFILTER", 12)
_NFNL_SUBSYS_CTNETLINK = 1
_IPCTNL_MSG_CT_DELETE = 2
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLMSG_ERROR = 2
_CTA_MARK = 8
_CTA_MARK_MASK = 21
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_NFGENMSG = struct.Struct("=BBH")  # family, version, resource id (big-endian, 0 here)
_ATTR = struct.Struct("=HH")  # nlattr: length, type
_U32_BE = struct.Struct(">I")


class ConntrackError(Exception):
    """The kernel refused the flush (the message names the errno)."""


def _attr(kind: int, value: int) -> bytes:
    return _ATTR.pack(_ATTR.size + _U32_BE.size, kind) + _U32_BE.pack(value)


def delete_request(*, mark: int, mask: int, sequence: int = 1) -> bytes:
    """The netlink message that deletes every IPv4 and IPv6 conntrack entry whose mark,
    masked with ``mask``, equals ``mark``."""
    if not 0 < mark <= 0xFFFFFFFF or mark & mask != mark:
        raise ValueError(f"mark 0x{mark:x} must be non-zero and inside mask 0x{mask:x}")
    body = _NFGENMSG.pack(socket.AF_INET, 0, 0) + _attr(_CTA_MARK, mark)
    body += _attr(_CTA_MARK_MASK, mask)
    kind = (_NFNL_SUBSYS_CTNETLINK << 8) | _IPCTNL_MSG_CT_DELETE
    return (
        _HEADER.pack(_HEADER.size + len(body), kind, _NLM_F_REQUEST | _NLM_F_ACK, sequence, 0)
        + body
    )


def parse_ack(data: bytes, *, sequence: int = 1) -> None:
    """Returns if ``data`` holds the kernel's positive acknowledgement of ``sequence``;
    raises :class:`ConntrackError` with the kernel's errno otherwise."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _flags, seq, _port = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            break
        if kind == _NLMSG_ERROR and seq == sequence and length >= _HEADER.size + 4:
            (code,) = struct.unpack_from("=i", data, offset + _HEADER.size)
            if code == 0:
                return
            name = errno.errorcode.get(-code, str(-code))
            raise ConntrackError(
                f"the kernel refused the conntrack flush: {name} ({os.strerror(-code)})"
            )
        offset += (length + 3) & ~3
    raise ConntrackError("no acknowledgement of the conntrack flush from the kernel")


def forget_marked(mark: int, *, mask: int | None = None, timeout: float = 2.0) -> None:
    """Deletes the conntrack entries that carry ``mark`` (CAP_NET_ADMIN needed)."""
    request = delete_request(mark=mark, mask=mark if mask is None else mask)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        sock.send(request)
        try:
            parse_ack(sock.recv(65536))
        except TimeoutError:
            raise ConntrackError("no answer from the kernel to the conntrack flush") from None
