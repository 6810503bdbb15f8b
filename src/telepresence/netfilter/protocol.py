"""The wire protocol between the user daemon and the network helper.

One Unix stream socket, strictly request/response (the helper speaks first with
:class:`Hello`).  Every message is a frame: a 4-byte big-endian body length, a
1-byte count of file descriptors, then a msgpack body tagged with ``type``.
File descriptors travel with SCM_RIGHTS in the same ``sendmsg`` as the frame,
so the kernel delivers them no later than the frame's first byte; the count in
the header says how many of the received descriptors belong to the frame.

This module is sans-I/O: :func:`encode` gives bytes, :class:`FrameDecoder` is
fed bytes and descriptors and yields messages, so both ends and the tests share
one implementation and no socket is needed to test it.  Unknown *fields* are
ignored, so a field with a default can be added without a version bump;
anything else incompatible bumps :data:`VERSION`.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections import deque
from collections.abc import Iterable
from typing import Literal

import msgspec

__all__ = [
    "MAX_FDS",
    "MAX_FRAME",
    "VERSION",
    "AddHostRoutes",
    "Error",
    "FrameDecoder",
    "Hello",
    "HostRoutesDone",
    "Message",
    "Ok",
    "ProtocolError",
    "RemoveHostRoutes",
    "Request",
    "Response",
    "Setup",
    "SetupDone",
    "SocketReady",
    "Status",
    "StatusReply",
    "SubnetsDone",
    "Teardown",
    "UpdateSubnets",
    "UpstreamSocket",
    "encode",
]

#: Bumped on any change an older peer could misread; checked from :class:`Hello`.
VERSION = 1
#: Requests are a few kilobytes even with thousands of host routes; a larger
#: frame means a confused or hostile peer, not a big request.
MAX_FRAME = 4 * 1024 * 1024
#: No response carries more than one descriptor; a few more leave room to grow.
MAX_FDS = 4

_HEADER = struct.Struct("!IB")


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame of this protocol."""


# --- requests (daemon -> helper) ---------------------------------------------


class Setup(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Create the TUN device, its routes and the nftables table, in one step.

    ``subnets`` are routed after removing ``never_proxy``, each of
    ``api_server_ips`` and loopback (the helper enforces it again, so a
    daemon bug cannot route the tunnel's own transport into itself).
    ``allow_conflicting`` allows every overlap with the laptop's routes;
    ``allow_conflicting_subnets`` only overlaps inside the given CIDRs.
    An empty ``dns_nameservers`` sets up no DNS redirect.  Answered with
    :class:`SetupDone` and the TUN's file descriptor.
    """

    tun_name: str = "tel0"
    tun_address: str = "198.18.255.254"
    subnets: list[str]
    never_proxy: list[str] = []
    api_server_ips: list[str] = []
    dns_nameservers: list[str] = []
    dns_redirect_port: int
    proxy_port: int
    mark: int
    allow_conflicting: bool = False
    allow_conflicting_subnets: list[str] = []
    nft_table: str = "telepresence"


class UpdateSubnets(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Replace the routed subnets; only the difference is applied.  -> :class:`SubnetsDone`."""

    subnets: list[str]


class AddHostRoutes(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Route single addresses (cluster DNS answers for external names).

    Answered with :class:`HostRoutesDone`.
    """

    ips: list[str]


class RemoveHostRoutes(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Stop routing addresses added by :class:`AddHostRoutes`.  -> :class:`HostRoutesDone`."""

    ips: list[str]


class UpstreamSocket(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A fresh IPv4 socket carrying the Setup mark, exempt from the DNS redirect.

    Answered with :class:`SocketReady` and the socket's descriptor.
    """

    kind: Literal["udp", "tcp"]


class Status(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """What is applied, read back from the kernel.  -> :class:`StatusReply`."""


class Teardown(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Undo everything (DNS redirect first), answer :class:`Ok`, then exit 0."""


Request = (
    Setup | UpdateSubnets | AddHostRoutes | RemoveHostRoutes | UpstreamSocket | Status | Teardown
)


# --- responses (helper -> daemon) --------------------------------------------


class Hello(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Sent by the helper once connected, before any request."""

    version: int
    pid: int


class Ok(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    pass


class Error(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A request failed; ``message`` is one line that says what to do.

    The helper undid whatever the failed request had changed before answering.
    """

    message: str


class SetupDone(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """``routed``: the subnets actually routed, after the never-proxy holes."""

    tun_name: str
    routed: list[str]


class SubnetsDone(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    routed: list[str]


class HostRoutesDone(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """``hosts``: every address routed now, after the request was applied.

    Addresses that must not be routed (API server, never-proxy, loopback, or
    overlapping a laptop route without permission) are left out rather than
    refused, so one DNS answer cannot fail the others; ``skipped`` says why,
    one line per address.
    """

    hosts: list[str]
    skipped: list[str] = []


class SocketReady(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    kind: Literal["udp", "tcp"]


class StatusReply(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """``routes``: destinations on the TUN as the kernel reports them;
    ``dns_redirects``: ``"198.51.100.53:53 -> 127.0.0.1:1053"`` lines."""

    configured: bool
    helper_pid: int
    tun_name: str = ""
    tun_address: str = ""
    tun_present: bool = False
    routes: list[str] = []
    hosts: list[str] = []
    nft_table: str = ""
    nft_table_present: bool = False
    dns_redirects: list[str] = []
    proxy_port: int = 0
    mark: int = 0


Response = Hello | Ok | Error | SetupDone | SubnetsDone | HostRoutesDone | SocketReady | StatusReply
Message = Request | Response

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


def encode(message: Message, *, fds: int = 0) -> bytes:
    """One frame; ``fds`` is how many descriptors the caller sends along with it."""
    if not 0 <= fds <= MAX_FDS:
        raise ValueError(f"a frame carries 0..{MAX_FDS} descriptors, not {fds}")
    body = _encoder.encode(message)
    if len(body) > MAX_FRAME:
        raise ValueError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return _HEADER.pack(len(body), fds) + body


class FrameDecoder:
    """Turns received bytes and descriptors into ``(message, fds)`` pairs.

    Descriptors are owned by the decoder until :meth:`next` hands them out
    with their frame; :meth:`close` closes any it still holds, so an error
    path never leaks them.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fds: deque[int] = deque()

    def feed(self, data: bytes, fds: Iterable[int] = ()) -> None:
        self._fds.extend(fds)
        self._buffer += data

    @property
    def pending(self) -> bool:
        """Whether part of a frame (or a stray descriptor) is waiting."""
        return bool(self._buffer) or bool(self._fds)

    def next(self) -> tuple[Message, list[int]] | None:
        """The next complete message, or None until more bytes arrive."""
        if len(self._buffer) < _HEADER.size:
            return None
        length, nfds = _HEADER.unpack_from(self._buffer)
        if length > MAX_FRAME or nfds > MAX_FDS:
            raise ProtocolError(f"invalid frame header (length {length}, {nfds} descriptors)")
        end = _HEADER.size + length
        if len(self._buffer) < end:
            return None
        if len(self._fds) < nfds:
            raise ProtocolError(f"frame announces {nfds} descriptors, {len(self._fds)} arrived")
        body = bytes(self._buffer[_HEADER.size : end])
        del self._buffer[:end]
        fds = [self._fds.popleft() for _ in range(nfds)]
        try:
            message = _decoder.decode(body)
        except msgspec.DecodeError as e:
            _close_all(fds)
            raise ProtocolError(f"malformed message: {e}") from None
        return message, fds

    def close(self) -> None:
        _close_all(self._fds)
        self._fds.clear()
        self._buffer.clear()


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
