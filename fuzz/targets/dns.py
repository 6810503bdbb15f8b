"""The daemon's DNS server: any local process can send it anything, over UDP or TCP.

``Resolver.answer`` is driven as the server drives it, with in-memory fakes for the
cluster lookup and the upstream forward (no sockets); a TCP byte stream is split as the
server splits it (``take_frames``).  The input:

- one option byte: bit 0 TCP; bit 1 a hook takes the cluster's addresses; bits 2-3 the
  cluster answers with the message below (0, 3), cannot be asked (1) or fails (2);
  bit 4 upstream fails; bits 5-6 which name rules apply;
- two bytes, big-endian: the length of the cluster's answer, then that answer, as the
  traffic manager passes it through (DnsAnswer.message, parsed as the session parses it);
- the client's bytes: one datagram, or a TCP stream.

The contract:

- ``answer`` never raises, and nothing it does logs an error (it catches everything,
  so an error log is how an unexpected exception shows);
- no reply only for what ``decode_query`` drops: shorter than a header, or a response;
- a reply either is the upstream's reply, byte for byte, or parses as a response to the
  query, with its id, within the transport's limit: 65535 over TCP, over UDP 512 or the
  client's EDNS size up to the server's 1232;
- TCP framing gives back exactly the bytes it consumed, and holds at most one partial
  frame;
- no task outlives the resolver's ``close()``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from telepresence.daemon.dns import DnsSettings, Resolver
from telepresence.daemon.dnsanswers import MalformedQuery, decode_query, take_frames, tcp_frame
from telepresence.daemon.dnsrules import NameRules

__all__ = ["TestOneInput", "seeds"]

RULES = (
    NameRules(mapped_namespaces=frozenset({"ns", "default"}), search_namespaces=("ns", "default")),
    NameRules(
        all_namespaces=True,
        live_namespaces=frozenset({"ns"}),
        local_search_domains=("corp.example",),
        never_cluster_suffixes=("internal",),
    ),
    NameRules(cluster_domain="k8s.example.", search_namespaces=("a",)),
    NameRules(),
)
SUBNETS = (IPv4Network("10.96.0.0/12"), IPv4Network("10.244.0.0/16"))
SETTINGS = DnsSettings()
UPSTREAM = b"upstream:"
#: More pipelined TCP queries add nothing but time.
MAX_TCP_QUERIES = 8
_LENGTH = struct.Struct("!H")


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# dnspython imports a record type's module when it first meets the type; here, so that
# they are imported inside atheris' hook and report coverage too.
for _rdtype in dns.rdatatype.RdataType:
    for _rdclass in (dns.rdataclass.IN, dns.rdataclass.CH):
        dns.rdata.get_rdata_class(_rdclass, _rdtype)  # type: ignore[no-untyped-call]

_ERRORS = _Errors()
_LOG = logging.getLogger("telepresence.daemon.dns")


async def _session(options: int, cluster_wire: bytes, wires: list[bytes], tcp: bool) -> None:
    mode = (options >> 2) & 3
    seen: list[list[IPv4Address]] = []

    async def cluster_lookup(name: str, qtype: int) -> dns.message.Message | None:
        if mode == 1:
            return None
        if mode == 2:
            raise ConnectionError("tunnel down")
        return dns.message.from_wire(cluster_wire) if cluster_wire else None

    async def forward(wire: bytes, over_tcp: bool) -> bytes:
        if options & 16:
            raise OSError("network is unreachable")
        return UPSTREAM + wire

    def subnets() -> Sequence[IPv4Network]:
        return SUBNETS

    rules = RULES[(options >> 5) & 3]
    resolver = Resolver(
        rules=lambda: rules,
        cluster_subnets=subnets,
        cluster_lookup=cluster_lookup,
        forward=forward,
        on_cluster_answer=seen.append if options & 2 else None,
        settings=SETTINGS,
        clock=lambda: 0.0,
    )
    try:
        for wire in wires:
            _check(wire, await resolver.answer(wire, tcp=tcp), tcp=tcp)
    finally:
        await resolver.close()
    assert asyncio.all_tasks() == {asyncio.current_task()}
    for addresses in seen:
        assert all(isinstance(a, IPv4Address) for a in addresses), addresses


def _check(wire: bytes, reply: bytes | None, *, tcp: bool) -> None:
    try:
        query = decode_query(wire)
    except MalformedQuery as exc:
        assert reply == exc.reply
        return
    assert reply is not None
    if reply == UPSTREAM + wire:
        return
    if tcp:
        limit = 65535
    elif query.edns < 0:
        limit = 512
    else:
        limit = max(512, min(query.payload, SETTINGS.max_udp_payload))
    assert len(reply) <= limit, (len(reply), limit)
    response = dns.message.from_wire(reply)
    assert response.id == query.id
    assert response.flags & dns.flags.QR


def _tcp_frames(stream: bytes, rng: random.Random) -> list[bytes]:
    """Splits ``stream`` as the server does, fed in random pieces."""
    buffer = bytearray()
    frames: list[bytes] = []
    consumed = 0
    pos = 0
    while pos < len(stream):
        size = rng.choice((1, 2, 3, 100, 1500, 65536))
        buffer += stream[pos : pos + size]
        pos += size
        new = take_frames(buffer)
        framed = b"".join(map(tcp_frame, new))
        assert stream[consumed : consumed + len(framed)] == framed
        consumed += len(framed)
        assert stream[consumed:pos] == buffer
        assert len(buffer) < 2 + 65535
        frames += new
    return frames


def TestOneInput(data: bytes) -> None:
    if len(data) < 3:
        return
    options = data[0]
    (size,) = _LENGTH.unpack_from(data, 1)
    cluster_wire = data[3 : 3 + size]
    client = data[3 + size :]
    tcp = bool(options & 1)
    wires = _tcp_frames(client, random.Random(options))[:MAX_TCP_QUERIES] if tcp else [client]
    _ERRORS.records.clear()
    _LOG.addHandler(_ERRORS)
    try:
        asyncio.run(_session(options, cluster_wire, wires, tcp))
    finally:
        _LOG.removeHandler(_ERRORS)
    assert not _ERRORS.records, [r.getMessage() for r in _ERRORS.records]


# --- seeds ----------------------------------------------------------------------------


def _query(name: str, qtype: int = dns.rdatatype.A, **kwargs: object) -> bytes:
    q = dns.message.make_query(name, qtype, **kwargs)  # type: ignore[arg-type]
    q.id = 0x4242
    return q.to_wire()


def _cluster(name: str, *addresses: str, rcode: int = dns.rcode.NOERROR) -> bytes:
    response = dns.message.make_response(dns.message.make_query(name, dns.rdatatype.A))
    response.id = 0x0101
    response.set_rcode(dns.rcode.Rcode.make(rcode))
    if addresses:
        response.answer.append(dns.rrset.from_text_list(name, 5, "IN", "A", list(addresses)))
    if rcode == dns.rcode.NXDOMAIN:
        soa = "ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5"
        response.authority.append(dns.rrset.from_text("cluster.local.", 5, "IN", "SOA", soa))
    return response.to_wire(want_shuffle=False)  # dnspython shuffles by default


def _input(options: int, cluster: bytes, client: bytes) -> bytes:
    return bytes([options]) + _LENGTH.pack(len(cluster)) + cluster + client


def seeds() -> dict[str, bytes]:
    web = _cluster("web.ns.svc.cluster.local.", "10.96.0.7")
    many = _cluster("db.ns.svc.cluster.local.", *(f"10.244.0.{i}" for i in range(1, 60)))
    missing = _cluster("nope.ns.svc.cluster.local.", rcode=dns.rcode.NXDOMAIN)
    edns = {"use_edns": 0, "payload": 4096}
    cookie = dns.edns.GenericOption(dns.edns.COOKIE, b"\x01" * 8)
    queries = {
        "short-name": _query("web."),
        "namespace-name": _query("web.ns."),
        "svc-name": _query("web.ns.svc"),
        "cluster-name-aaaa": _query("web.ns.svc.cluster.local.", dns.rdatatype.AAAA),
        "srv": _query("_http._tcp.web.ns.", dns.rdatatype.SRV),
        "reverse": _query("7.0.96.10.in-addr.arpa.", dns.rdatatype.PTR),
        "public-name": _query("www.example.com.", dns.rdatatype.MX),
        "edns-cookie": _query("web.ns.", options=[cookie], **edns),
    }
    out = {}
    for name, wire in queries.items():
        out[f"udp-{name}"] = _input(0b0000010, web, wire)
        out[f"tcp-{name}"] = _input(0b0000011, web, tcp_frame(wire) + tcp_frame(wire))
    out["udp-large-answer"] = _input(0, many, _query("db.ns."))
    out["udp-large-answer-edns"] = _input(0, many, _query("db.ns.", **edns))
    out["tcp-large-answer"] = _input(1, many, tcp_frame(_query("db.ns.")))
    out["udp-nxdomain-then-upstream"] = _input(0, missing, _query("nope.ns."))
    out["udp-cluster-fails"] = _input(0b1000, web, _query("web.ns.svc.cluster.local."))
    out["udp-upstream-fails"] = _input(0b10000, web, _query("www.example.com."))
    out["udp-all-namespaces"] = _input(0b0100000, web, _query("web.ns."))
    two = dns.message.make_query("web.ns.", dns.rdatatype.A)
    two.question.append(
        dns.rrset.RRset(dns.name.from_text("db.ns."), dns.rdataclass.IN, dns.rdatatype.A)
    )
    two.id = 0x4343
    out["udp-two-questions-upstream-fails"] = _input(0b10000, web, two.to_wire())
    # Found by this fuzzer: an A record of a class other than IN failed the lookup.
    odd = dns.message.from_wire(web)
    odd.answer.append(dns.rrset.from_text("odd.", 5, "CLASS25090", "A", r"\# 4 0a600007"))
    out["regress-cluster-a-of-another-class"] = _input(2, odd.to_wire(), _query("web.ns."))
    # Found by review: the SERVFAIL for these questions did not fit in a UDP answer.
    overflow = dns.message.make_query("www.example.test.", dns.rdatatype.A)
    for i in range(8):
        qname = dns.name.from_text(f"{'q' * 60}.{'x' * 60}.n{i}.example.test.")
        overflow.question.append(dns.rrset.RRset(qname, dns.rdataclass.IN, dns.rdatatype.A))
    overflow.id = 0x4444
    out["regress-questions-overflow-udp"] = _input(0b10000, b"", overflow.to_wire())
    out["bad-short"] = _input(0, b"", b"\x12\x34\x01")
    out["bad-response"] = _input(0, b"", web)
    out["bad-truncated-question"] = _input(0, b"", _query("web.ns.")[:-3])
    out["bad-cluster-garbage"] = _input(0, b"\x00" * 20, _query("web.ns."))
    out["bad-tcp-partial"] = _input(1, web, tcp_frame(_query("web."))[:-1])
    return out
