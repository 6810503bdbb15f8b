"""The root helper's requests: the frames a (possibly hostile) local peer writes to it, and
the policy checks the helper applies to each request it decodes.

The input: one option byte (bits 0-2: how many descriptors arrive with the first bytes;
bits 3-6 seed how the bytes are split; bit 7: the rest is one message body, which gets
a header announcing those descriptors, so that mutations of a request's fields are not
all lost to a broken frame length), then the byte stream.  Frames are read as the
helper's loop reads them (``FrameDecoder.for_requests()``: feed, then ``next()`` until
None; a malformed message is refused and reading goes on, a broken frame ends the
connection); each request is checked by the pure functions the helper applies to it
(``policy``, ``dnspolicy``), against a fixed laptop, never the real network.

The contract:

- ``next()`` raises ``MalformedMessage`` or ``ProtocolError`` and nothing else;
- after ``next()`` returned None, what is buffered is at most one partial frame of at
  most MAX_REQUEST bytes, whatever length a header declares;
- only requests are decoded;
- every descriptor is either handed out, open, with its frame, or closed by the decoder
  (on a malformed frame, or at ``close()``): none leaks;
- a policy check raises ``Refused`` and nothing else, with a one-line message.
"""

from __future__ import annotations

import os
import random
import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import msgspec

from telepresence.netfilter import policy
from telepresence.netfilter.dnspolicy import link_domains
from telepresence.netfilter.protocol import (
    MAX_FDS,
    MAX_REQUEST,
    AddHostRoutes,
    FrameDecoder,
    MalformedMessage,
    Message,
    ProtocolError,
    RefreshNameservers,
    RemoveHostRoutes,
    Request,
    SetLinkDomains,
    Setup,
    Status,
    Teardown,
    UpdateSubnets,
    UpstreamSocket,
    encode,
)
from telepresence.netfilter.routes import LaptopNetwork

__all__ = ["TestOneInput", "seeds"]

_HEADER = struct.Struct("!IB")
#: A laptop on a home network with a full-tunnel VPN's rule mark.
NETWORK = LaptopNetwork(
    routes=[
        (IPv4Network("0.0.0.0/0"), "wlan0"),
        (IPv4Network("192.168.1.0/24"), "wlan0"),
        (IPv4Network("172.17.0.0/16"), "docker0"),
        (IPv6Network("fd00::/64"), "wlan0"),
    ],
    gateways=[IPv4Address("192.168.1.1")],
    rule_marks=[(0xCA6C, 0xFFFFFFFF)],
)
NAMESERVERS = [IPv4Address("192.168.1.1")]
SETUP = Setup(
    subnets=["10.96.0.0/12", "10.244.0.0/16"],
    never_proxy=["10.96.0.1/32"],
    api_server_ips=["192.0.2.1"],
    allow_conflicting_subnets=["172.17.0.0/16"],
    dns_redirect_port=1053,
    proxy_port=1080,
)
#: The session later requests are checked against.
PLAN = policy.plan_setup(SETUP, network=NETWORK, nameservers=NAMESERVERS)


def check_request(request: Request) -> None:
    """What the helper checks before it changes anything (state.py, routestate.py,
    dnsstate.py), minus the changes."""
    try:
        if isinstance(request, Setup):
            policy.plan_setup(request, network=NETWORK, nameservers=NAMESERVERS)
            policy.plan_setup(
                request, network=NETWORK, nameservers=[], link_dns=policy.LINK_DNS_ADDRESS
            )
        elif isinstance(request, UpdateSubnets):
            requested = policy.parse_ipv4_subnets(request.subnets)
            PLAN.check_subnets(requested, gateways=NETWORK.gateways)
            nets = PLAN.routed(requested)
            PLAN.check_conflicts(sorted(set(nets)), NETWORK.routes)
        elif isinstance(request, AddHostRoutes):
            for ip in dict.fromkeys(policy.parse_addresses(request.ips, what="host address")):
                reason = policy.host_refusal(
                    ip, PLAN, gateways=NETWORK.gateways, existing=NETWORK.routes
                )
                assert reason is None or "\n" not in reason, reason
        elif isinstance(request, RemoveHostRoutes):
            policy.parse_addresses(request.ips, what="host address")
        elif isinstance(request, SetLinkDomains):
            link_domains(routing=request.routing, search=request.search)
        elif isinstance(request, UpstreamSocket):
            assert request.kind in ("udp", "tcp") and request.family in (4, 6)
        else:
            assert isinstance(request, RefreshNameservers | Status | Teardown), request
    except policy.Refused as exc:
        assert "\n" not in str(exc), str(exc)


def _split(data: bytes, rng: random.Random) -> list[bytes]:
    chunks = []
    pos = 0
    while pos < len(data):
        size = rng.choice((1, 4, 5, 6, 100, 4096, 65536))
        chunks.append(data[pos : pos + size])
        pos += size
    return chunks or [b""]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    options, stream = data[0], data[1:]
    if options & 0x80:
        stream = _HEADER.pack(len(stream), options & 7) + stream
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(options & 7)]
    handed: list[int] = []
    decoder = FrameDecoder.for_requests()
    try:
        for index, chunk in enumerate(_split(stream, random.Random((options >> 3) & 15))):
            decoder.feed(chunk, fds if index == 0 else ())
            while True:
                try:
                    item = decoder.next()
                except MalformedMessage:
                    continue
                if item is None:
                    break
                message, frame_fds = item
                assert all(_is_open(fd) for fd in frame_fds), frame_fds
                assert len(frame_fds) <= MAX_FDS
                handed += frame_fds
                assert isinstance(message, Request), message
                check_request(message)
            assert decoder.buffered < _HEADER.size + MAX_REQUEST, decoder.buffered
    except ProtocolError:
        pass
    finally:
        for fd in handed:
            os.close(fd)
        decoder.close()
    leaked = [fd for fd in fds if _is_open(fd)]
    assert not leaked, leaked


# --- seeds ----------------------------------------------------------------------------


def _frame(message: Message, *, fds: int = 0, options: int = 0) -> bytes:
    return bytes([options | fds]) + encode(message, fds=fds)


def seeds() -> dict[str, bytes]:
    requests: dict[str, Request] = {
        "setup": SETUP,
        "setup-minimal": Setup(subnets=["10.96.0.0/12"], dns_redirect_port=1053, proxy_port=1080),
        "update-subnets": UpdateSubnets(subnets=["10.96.0.0/12", "10.100.0.5"]),
        "add-host-routes": AddHostRoutes(ips=["10.244.3.7", "203.0.113.9", "fd00::1"]),
        "remove-host-routes": RemoveHostRoutes(ips=["203.0.113.9"]),
        "upstream-socket": UpstreamSocket(kind="udp", family=6),
        "refresh-nameservers": RefreshNameservers(),
        "set-link-domains": SetLinkDomains(routing=["cluster.local", "ns"], search=["ns.svc"]),
        "status": Status(),
        "teardown": Teardown(),
    }
    out = {name: _frame(message) for name, message in requests.items()}
    enc = msgspec.msgpack.encode
    out.update({f"body-{name}": b"\x80" + enc(message) for name, message in requests.items()})
    out["setup-with-fds"] = _frame(SETUP, fds=2)
    out["pipelined-split"] = bytes([0x18]) + b"".join(
        encode(m) for m in (SETUP, Status(), UpdateSubnets(subnets=[]), Teardown())
    )
    bad = {
        "huge-length": _HEADER.pack(2**32 - 1, 0),
        "just-too-long": _HEADER.pack(MAX_REQUEST + 1, 0) + bytes(16),
        "too-many-fds": _HEADER.pack(1, MAX_FDS + 1) + b"\xc0",
        "fds-missing": _HEADER.pack(1, 2) + b"\xc0",
        "garbage-body": _HEADER.pack(3, 0) + b"\xc1\xc1\xc1",
        "response-not-request": _body_frame(enc({"type": "Ok"})),
        "unknown-field": _body_frame(enc({"type": "Status", "more": 1})),
        "setup-ipv6-and-reserved": _body_frame(
            enc(
                {
                    "type": "Setup",
                    "subnets": ["fd00::/64", "127.0.0.0/8", "0.0.0.0/0"],
                    "dns_redirect_port": 53,
                    "proxy_port": 70000,
                }
            )
        ),
        "link-domains-root": _body_frame(enc({"type": "SetLinkDomains", "routing": ["."]})),
    }
    out.update({f"bad-{name}": b"\x01" + raw for name, raw in bad.items()})
    # Found by this fuzzer: msgspec's UnicodeDecodeError (and RecursionError) escaped.
    regress = {
        "invalid-utf8": b"\x82\xa4type\xb0RemoveHostRoutes\xa3ips\x91\xa4203\xff",
        "deep-before-the-tag": b"\x82\xa1x" + b"\x91" * 3000 + b"\x01\xa4type\xa6Status",
    }
    out.update({f"regress-{n}": b"\x01" + _body_frame(body) for n, body in regress.items()})
    # Found by review: subtracting holes grew with their square (a few thousand took
    # minutes); as many as fit in an input here.
    never = [f"10.{i % 256}.{i // 256}.{i * 7 % 256}" for i in range(250)]
    many_holes = Setup(
        subnets=["10.0.0.0/8"], never_proxy=never, dns_redirect_port=1053, proxy_port=1080
    )
    out["regress-setup-many-never-proxy"] = b"\x80" + enc(many_holes)
    return out


def _body_frame(body: bytes) -> bytes:
    return _HEADER.pack(len(body), 0) + body
