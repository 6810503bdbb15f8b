"""DNS messages for the daemon's resolver: every protocol decision, as pure functions.

:func:`decode_query` parses (or says what FORMERR to send), :func:`plan_query`
routes through :mod:`.dnsrules`, :func:`cluster_response` shapes the cluster's
answer for the client, :func:`encode_response` fits it to the transport and
:func:`take_frames` splits DNS-over-TCP framing.  No sockets, no clock, no
asyncio: :class:`~telepresence.daemon.dns.Resolver` strings them together.

Shape of cluster answers
------------------------

The client asked ``web.ns``; the cluster answered for
``web.ns.svc.cluster.local.``.  We rewrite the owner names of records owned by
the cluster name to the name exactly as the client asked it (same case, for
resolvers that randomise case), as Telepresence does.  The alternative, a
synthesised CNAME ``web.ns. -> web.ns.svc.cluster.local.``, would publish a
name the client never asked about: caching resolvers downstream would then
want to revalidate it on their own, and a later query for it would take a
different route.  Records owned by other names (the targets of a CNAME chain
for an ExternalName service, the A records of SRV targets) stay as they are;
they form a consistent chain from the asked name.  The cluster's SOA is
returned only when it is an ancestor of the asked name: an SOA for
``cluster.local`` in the answer for ``nope.ns`` would be out of bailiwick.
Every TTL is clamped to the cache's lifetime for the answer (at most 5 s), so
that nothing downstream keeps a cluster address after we stop answering.

AAAA queries for cluster names are answered from the cluster's *A* answer:
the tunnel carries IPv4 only, so an IPv6 address would be unreachable, and a
name with addresses must not be reported as non-existent.  The answer is
NOERROR with an empty answer section (NODATA), or NXDOMAIN if the cluster
does not have the name.  Asking for A also means the AAAA query glibc sends
together with A shares one cluster round trip and one cache entry.

A cluster name counts as found when the cluster says NOERROR, with or without
records of the asked type, as :class:`~telepresence.daemon.dnsrules.Action`
specifies: if a namespace ``dev`` has a service ``example``, ``example.dev``
is that service for every query type, and an MX query must not pull in the
public domain's records next to the cluster's addresses.

UDP answers larger than 512 bytes (or the client's EDNS payload size) are
sent with TC set, so the client retries over TCP, where the whole answer fits.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from telepresence.daemon.dnscache import CachedAnswer
from telepresence.daemon.dnsrules import Action, NameRules, Reason, Route, route_query

__all__ = [
    "MAX_TCP_SIZE",
    "MalformedQuery",
    "Outcome",
    "classify",
    "cluster_addresses",
    "cluster_qtype",
    "cluster_response",
    "decode_query",
    "describe",
    "encode_response",
    "error_response",
    "formerr_reply",
    "plan_query",
    "take_frames",
    "tcp_frame",
    "type_text",
    "udp_size_limit",
]

#: The largest DNS message: TCP's 2-byte length prefix (RFC 1035 section 4.2.2).
MAX_TCP_SIZE = 65535

_HEADER = struct.Struct("!HH")
_LENGTH = struct.Struct("!H")
_MIN_UDP_SIZE = 512


class MalformedQuery(Exception):
    """A query we cannot parse; ``reply`` is the FORMERR to send, if any."""

    def __init__(self, reply: bytes | None) -> None:
        super().__init__("malformed DNS query")
        self.reply = reply


def formerr_reply(wire: bytes) -> bytes | None:
    """A bare FORMERR answer echoing the query's id, opcode and RD flag.

    None when ``wire`` has no complete header (nothing to echo) or is itself
    a response (answering responses could set two servers ping-ponging).
    """
    if len(wire) < 12:
        return None
    qid, flags = _HEADER.unpack_from(wire)
    if flags & dns.flags.QR:
        return None
    echoed = flags & (0x7800 | dns.flags.RD)  # opcode bits and RD
    return _HEADER.pack(qid, dns.flags.QR | echoed | dns.rcode.FORMERR) + bytes(8)


def decode_query(wire: bytes) -> dns.message.Message:
    """Parse a client's query; raise :class:`MalformedQuery` if it is not one."""
    if len(wire) < 12 or _HEADER.unpack_from(wire)[1] & dns.flags.QR:
        raise MalformedQuery(None)
    try:
        return dns.message.from_wire(wire)
    except Exception as exc:  # dnspython raises many types for bad input
        raise MalformedQuery(formerr_reply(wire)) from exc


_PASS_THROUGH = Route(Action.UPSTREAM, Reason.NO_MATCH)


def plan_query(
    query: dns.message.Message,
    rules: NameRules,
    *,
    cluster_subnets: Iterable[IPv4Network] = (),
) -> Route:
    """Where ``query`` goes.  Only standard one-question IN queries can go to
    the cluster; everything else (NOTIFY, UPDATE, CHAOS ``version.bind``, a
    cookie-only query without question) passes upstream untouched."""
    if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
        return _PASS_THROUGH
    question = query.question[0]
    if question.rdclass != dns.rdataclass.IN:
        return _PASS_THROUGH
    return route_query(
        question.name.to_text(), question.rdtype, rules, cluster_subnets=cluster_subnets
    )


def cluster_qtype(qtype: int) -> int:
    """The type to ask the cluster for: A in place of AAAA (see module docstring)."""
    return dns.rdatatype.A if qtype == dns.rdatatype.AAAA else qtype


class Outcome(enum.Enum):
    """What one cluster answer says about the name."""

    FOUND = "found"  # NOERROR: the cluster has the name (maybe no records of this type)
    MISSING = "missing"  # NXDOMAIN
    FAILED = "failed"  # no answer, or SERVFAIL/REFUSED/...: we know nothing


def classify(answer: dns.message.Message | None) -> Outcome:
    if answer is None:
        return Outcome.FAILED
    rcode = answer.rcode()
    if rcode == dns.rcode.NOERROR:
        return Outcome.FOUND
    if rcode == dns.rcode.NXDOMAIN:
        return Outcome.MISSING
    return Outcome.FAILED


def cluster_addresses(answer: dns.message.Message) -> list[IPv4Address]:
    """The IPv4 addresses in an answer (answer and additional sections).  Class IN
    only: an A record of another class is not an address (CHAOS A holds a number, an
    unknown class opaque bytes)."""
    return [
        IPv4Address(rdata.address)
        for rrset in (*answer.answer, *answer.additional)
        if rrset.rdtype == dns.rdatatype.A and rrset.rdclass == dns.rdataclass.IN
        for rdata in rrset
    ]


def _response(query: dns.message.Message, *, max_udp_payload: int) -> dns.message.Message:
    return dns.message.make_response(query, recursion_available=True, our_payload=max_udp_payload)


def error_response(
    query: dns.message.Message, rcode: dns.rcode.Rcode, *, max_udp_payload: int = 1232
) -> dns.message.Message:
    """An empty answer to ``query`` with ``rcode`` (SERVFAIL, FORMERR, ...)."""
    response = _response(query, max_udp_payload=max_udp_payload)
    response.set_rcode(rcode)
    return response


def _clamped(rrset: dns.rrset.RRset, *, name: dns.name.Name, ttl: int) -> dns.rrset.RRset:
    return dns.rrset.from_rdata_list(name, min(rrset.ttl, ttl), list(rrset))


def cluster_response(
    query: dns.message.Message,
    *,
    cluster_name: dns.name.Name,
    answer: CachedAnswer,
    max_udp_payload: int = 1232,
) -> dns.message.Message:
    """The answer to ``query`` made from the cluster's answer for ``cluster_name``.

    Owner names equal to ``cluster_name`` become the asked name, exactly as
    asked; TTLs are clamped to ``answer.ttl``; AAAA queries (answered from the
    cluster's A answer) get NODATA; see the module docstring for why.
    """
    question = query.question[0]
    asked = question.name
    message = answer.message
    response = _response(query, max_udp_payload=max_udp_payload)
    response.set_rcode(message.rcode())

    def owner(name: dns.name.Name) -> dns.name.Name:
        return asked if name == cluster_name else name

    if message.rcode() == dns.rcode.NOERROR and question.rdtype != dns.rdatatype.AAAA:
        response.answer = [
            _clamped(rrset, name=owner(rrset.name), ttl=answer.ttl)
            for rrset in message.answer
            if len(rrset)
        ]
        response.additional = [
            _clamped(rrset, name=owner(rrset.name), ttl=answer.ttl)
            for rrset in message.additional
            if len(rrset)
        ]
    if not response.answer:
        # Negative answer: keep an SOA only if it is in bailiwick for the
        # asked name, i.e. when the client asked the cluster name itself.
        response.authority = [
            _clamped(rrset, name=rrset.name, ttl=answer.ttl)
            for rrset in message.authority
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset) and asked.is_subdomain(rrset.name)
        ]
    return response


def udp_size_limit(query: dns.message.Message, *, max_udp_payload: int) -> int:
    """The largest UDP answer ``query``'s sender accepts: 512 without EDNS,
    else its advertised size, within [512, ``max_udp_payload``]."""
    if query.edns < 0:
        return _MIN_UDP_SIZE
    return max(_MIN_UDP_SIZE, min(query.payload, max_udp_payload))


def encode_response(response: dns.message.Message, *, max_size: int) -> bytes:
    """Wire bytes of ``response`` within ``max_size``.

    If it does not fit, the additional section goes first (no TC needed:
    RFC 2181 section 9); if it still does not fit, answer and authority go
    too and TC is set, so the client asks again over TCP.  A question section
    can be too large by itself (a query may ask several questions, up to the
    size of the datagram): then it goes too, leaving the header, and TC.  May
    empty sections of ``response``.
    """
    try:
        return response.to_wire(max_size=max_size)
    except dns.exception.TooBig:
        pass
    if response.additional:
        response.additional = []
        try:
            return response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            pass
    response.answer = []
    response.authority = []
    response.flags |= dns.flags.TC
    try:
        return response.to_wire(max_size=max_size)
    except dns.exception.TooBig:
        pass
    response.question = []
    return response.to_wire(max_size=max_size)


def tcp_frame(message: bytes) -> bytes:
    """``message`` with the 2-byte length prefix of DNS over TCP."""
    return _LENGTH.pack(len(message)) + message


def take_frames(buffer: bytearray) -> list[bytes]:
    """Remove and return every complete length-prefixed message in ``buffer``
    (DNS over TCP framing, RFC 1035 section 4.2.2)."""
    frames = []
    while len(buffer) >= 2:
        (size,) = _LENGTH.unpack_from(buffer)
        if len(buffer) < 2 + size:
            break
        frames.append(bytes(buffer[2 : 2 + size]))
        del buffer[: 2 + size]
    return frames


def type_text(qtype: int) -> str:
    """``A``, ``SRV``, ... for logs and task names."""
    return dns.rdatatype.to_text(dns.rdatatype.RdataType.make(qtype))


def describe(query: dns.message.Message) -> str:
    """The question of ``query``, for logs."""
    if len(query.question) != 1:
        return f"query {query.id} ({len(query.question)} questions)"
    question = query.question[0]
    return f"{question.name} {dns.rdatatype.to_text(question.rdtype)}"
