"""The wire protocol between the user daemon and the network helper.

One Unix stream socket, strictly request/response (the helper speaks first with
:class:`Hello`).  Every message is a frame: a 4-byte big-endian body length, a
1-byte count of file descriptors, then a msgpack body tagged with ``type``.
File descriptors travel with SCM_RIGHTS in the same ``sendmsg`` as the frame,
so the kernel delivers them no later than the frame's first byte; the count in
the header says how many of the received descriptors belong to the frame.

This module is sans-I/O: :func:`encode` gives bytes, :class:`FrameDecoder` is
fed bytes and descriptors and yields messages, so both ends and the tests share
one implementation and no socket is needed to test it.

Requests are what a hostile local user could send to a root process, so the
helper decodes them strictly: at most :data:`MAX_REQUEST` bytes, known types
and fields only, every field of its declared type.  Responses tolerate
unknown fields, so the helper can add a field with a default without a
version bump; any other incompatible change bumps :data:`VERSION`.

What the helper changes is its own choice (TUN name and address, table name,
socket mark, which nameservers to redirect; see :mod:`.policy`): requests
carry only what the daemon knows better, and can only narrow that choice.
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
    "MAX_REQUEST",
    "VERSION",
    "AddHostRoutes",
    "Error",
    "FrameDecoder",
    "Hello",
    "HostRoutesDone",
    "MalformedMessage",
    "Message",
    "NameserversDone",
    "Ok",
    "ProtocolError",
    "RefreshNameservers",
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
#: 3: :class:`RefreshNameservers` (an older helper would refuse it mid-session;
#: the bump makes a mismatched pair fail at connect with one line instead).
#: 4: the "resolved" DNS mode and :class:`SetLinkDomains` (an older daemon would take
#: a resolved-mode Setup for a redirect with no nameserver: cluster names would
#: silently not resolve).
VERSION = 4
#: Responses (a status with thousands of host routes) stay far below this.
MAX_FRAME = 4 * 1024 * 1024
#: Requests are a few kilobytes even with hundreds of subnets; a larger one means
#: a confused or hostile peer, and the root helper does not buffer it.
MAX_REQUEST = 64 * 1024
#: No response carries more than one descriptor; a few more leave room to grow.
MAX_FDS = 4

_HEADER = struct.Struct("!IB")


class ProtocolError(Exception):
    """The byte stream is not a valid sequence of frames; it cannot be resynchronised."""


class MalformedMessage(ProtocolError):
    """A well-delimited frame whose body is not a valid message (garbage, an unknown
    type or field, a wrong type): the frame was consumed and the next one can be read."""


# --- requests (daemon -> helper) ---------------------------------------------


class _Request(msgspec.Struct, frozen=True, kw_only=True, tag=True, forbid_unknown_fields=True):
    """Requests reach a root process: an unknown field is refused, not ignored."""


class Setup(_Request, frozen=True, kw_only=True):
    """Create the TUN device, its routes and the nftables table, in one step.

    ``subnets`` are routed exactly as given minus ``never_proxy``; the daemon
    has already taken out the API server's addresses (``api_server_ips``): a
    subnet that still covers one is refused, like one that covers loopback,
    link-local, multicast or the laptop's default gateway.  An overlap with a
    laptop route is refused unless it lies inside ``allow_conflicting_subnets``
    (the user's ``--allow-conflicting-subnets``, as given).  The TUN, table,
    mark and redirected nameservers are the helper's choice, not the
    request's.  Answered with :class:`SetupDone` and the TUN's file descriptor.
    """

    subnets: list[str]
    never_proxy: list[str] = []
    api_server_ips: list[str] = []
    allow_conflicting_subnets: list[str] = []
    dns_redirect_port: int
    proxy_port: int


class UpdateSubnets(_Request, frozen=True, kw_only=True):
    """Replace the routed subnets; only the difference is applied.  -> :class:`SubnetsDone`."""

    subnets: list[str]


class AddHostRoutes(_Request, frozen=True, kw_only=True):
    """Route single addresses (cluster DNS answers for external names).

    Answered with :class:`HostRoutesDone`.
    """

    ips: list[str]


class RemoveHostRoutes(_Request, frozen=True, kw_only=True):
    """Stop routing addresses added by :class:`AddHostRoutes`.  -> :class:`HostRoutesDone`."""

    ips: list[str]


class UpstreamSocket(_Request, frozen=True, kw_only=True):
    """A fresh UDP or TCP socket (IPv4 or IPv6) carrying the helper's mark, so the
    daemon's own upstream DNS queries are exempt from the DNS redirect.

    Answered with :class:`SocketReady` and the socket's descriptor.
    """

    kind: Literal["udp", "tcp"]
    family: Literal[4, 6] = 4


class RefreshNameservers(_Request, frozen=True, kw_only=True):
    """Re-read /etc/resolv.conf and move the DNS redirect to its nameservers.

    Sent by the daemon when it sees the file change (NetworkManager rewrote it
    after a network change).  It carries no address: the helper reads the file
    itself and decides what is redirected, exactly as at Setup, so the worst a
    caller can do is make the helper re-read a file.  Answered with
    :class:`NameserversDone`.
    """


class SetLinkDomains(_Request, frozen=True, kw_only=True):
    """Which names systemd-resolved sends to the DNS server on our TUN (``dns_mode``
    "resolved" only).

    The helper applies them to its own TUN link and nothing else: the request names no
    link, no server and no global setting.  ``routing``: domains whose names resolved
    routes to us (routing-only, ``~domain``); ``search``: domains that are also appended
    to single-label names (and route too).  Each is a plain DNS name (no ``~``, never
    the root); the helper refuses anything else.  Replaces the previous list.  Answered
    with :class:`LinkDomainsDone`.
    """

    routing: list[str]
    search: list[str] = []


class Status(_Request, frozen=True, kw_only=True):
    """What is applied, read back from the kernel.  -> :class:`StatusReply`."""


class Teardown(_Request, frozen=True, kw_only=True):
    """Undo everything (DNS redirect first), answer :class:`Ok`, then exit 0."""


Request = (
    Setup
    | UpdateSubnets
    | AddHostRoutes
    | RemoveHostRoutes
    | UpstreamSocket
    | RefreshNameservers
    | SetLinkDomains
    | Status
    | Teardown
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
    """``routed``: the subnets actually routed, after the never-proxy holes;
    ``nameservers``: the addresses whose port 53 is redirected (read by the helper
    from /etc/resolv.conf); ``mark``: the mark on upstream sockets.

    ``dns_mode``: "redirect" (port 53 of ``nameservers`` is redirected to the daemon)
    or "resolved" (systemd-resolved sends the link's domains to ``dns_address``, an
    address routed to the TUN whose UDP port 53 the daemon answers from the TUN;
    nothing is redirected and ``nameservers`` is empty)."""

    tun_name: str
    routed: list[str]
    nameservers: list[str] = []
    mark: int = 0
    dns_mode: Literal["redirect", "resolved"] = "redirect"
    dns_address: str = ""


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


class NameserversDone(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """``nameservers``: the addresses whose port 53 is redirected now, in resolv.conf
    order (the daemon forwards to these); ``changed``: whether this request moved
    the redirect; ``kept``: non-empty when the file had no usable nameserver and the
    previous list was kept, saying why."""

    nameservers: list[str]
    changed: bool = False
    kept: str = ""


class LinkDomainsDone(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The TUN link's domains as applied now, routing-only ones written ``~domain``."""

    domains: list[str]


class SocketReady(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    kind: Literal["udp", "tcp"]
    family: Literal[4, 6] = 4


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
    dns_mode: Literal["redirect", "resolved"] = "redirect"
    dns_address: str = ""
    link_domains: list[str] = []


Response = (
    Hello
    | Ok
    | Error
    | SetupDone
    | SubnetsDone
    | HostRoutesDone
    | NameserversDone
    | LinkDomainsDone
    | SocketReady
    | StatusReply
)
Message = Request | Response

_encoder = msgspec.msgpack.Encoder()
_any_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)
_request_decoder: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request)


def encode(message: Message, *, fds: int = 0) -> bytes:
    """One frame; ``fds`` is how many descriptors the caller sends along with it."""
    if not 0 <= fds <= MAX_FDS:
        raise ValueError(f"a frame carries 0..{MAX_FDS} descriptors, not {fds}")
    body = _encoder.encode(message)
    limit = MAX_REQUEST if isinstance(message, _Request) else MAX_FRAME
    if len(body) > limit:
        raise ValueError(f"message of {len(body)} bytes exceeds the {limit}-byte limit")
    return _HEADER.pack(len(body), fds) + body


class FrameDecoder:
    """Turns received bytes and descriptors into ``(message, fds)`` pairs.

    Descriptors are owned by the decoder until :meth:`next` hands them out
    with their frame; :meth:`close` closes any it still holds, so an error
    path never leaks them.  :meth:`for_requests` is the helper's strict one.
    """

    def __init__(self, *, max_body: int = MAX_FRAME, requests_only: bool = False) -> None:
        self._buffer = bytearray()
        self._fds: deque[int] = deque()
        self._max_body = max_body
        self._decoder: msgspec.msgpack.Decoder[Message] | msgspec.msgpack.Decoder[Request] = (
            _request_decoder if requests_only else _any_decoder
        )

    @classmethod
    def for_requests(cls) -> FrameDecoder:
        """Requests only, of at most :data:`MAX_REQUEST` bytes: what the root helper reads."""
        return cls(max_body=MAX_REQUEST, requests_only=True)

    def feed(self, data: bytes, fds: Iterable[int] = ()) -> None:
        self._fds.extend(fds)
        self._buffer += data

    @property
    def pending(self) -> bool:
        """Whether part of a frame (or a stray descriptor) is waiting."""
        return bool(self._buffer) or bool(self._fds)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out: once :meth:`next` returned None, at most
        one partial frame, as a frame's declared length is checked before its body waits."""
        return len(self._buffer)

    def next(self) -> tuple[Message, list[int]] | None:
        """The next complete message, or None until more bytes arrive."""
        if len(self._buffer) < _HEADER.size:
            return None
        length, nfds = _HEADER.unpack_from(self._buffer)
        if length > self._max_body:
            raise ProtocolError(
                f"message of {length} bytes refused: the limit is {self._max_body} bytes"
            )
        if nfds > MAX_FDS:
            raise ProtocolError(f"invalid frame header ({nfds} descriptors, at most {MAX_FDS})")
        end = _HEADER.size + length
        if len(self._buffer) < end:
            return None
        if len(self._fds) < nfds:
            raise ProtocolError(f"frame announces {nfds} descriptors, {len(self._fds)} arrived")
        body = bytes(self._buffer[_HEADER.size : end])
        del self._buffer[:end]
        fds = [self._fds.popleft() for _ in range(nfds)]
        try:
            message = self._decoder.decode(body)
        except msgspec.DecodeError as e:  # ValidationError is one too
            _close_all(fds)
            raise MalformedMessage(f"malformed message: {e}") from None
        except (UnicodeDecodeError, RecursionError) as e:
            # What msgspec raises for invalid UTF-8 in a string and deep nesting in a
            # field it skips (msgspec issue #714): malformed all the same.
            _close_all(fds)
            what = "invalid UTF-8" if isinstance(e, UnicodeDecodeError) else "nested too deeply"
            raise MalformedMessage(f"malformed message: {what}") from None
        return message, fds

    def close(self) -> None:
        _close_all(self._fds)
        self._fds.clear()
        self._buffer.clear()


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
