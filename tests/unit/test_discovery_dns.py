"""The manager's DNS lookups, against scripted DNS servers on loopback (UDP and TCP on one
port, as a real nameserver listens)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from telepresence.manager.dnsresolver import ClusterResolver, DnsUnavailable, lookup
from tests.unit.fakedns import free_port

Handler = Callable[[dns.message.Message, str], dns.message.Message | None]


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.handler(dns.message.from_wire(data), "udp")
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply.to_wire(max_size=65535), addr)


@asynccontextmanager
async def dns_server(address: str, port: int, handler: Handler) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()

    async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (size,) = struct.unpack("!H", await reader.readexactly(2))
        reply = handler(dns.message.from_wire(await reader.readexactly(size)), "tcp")
        if reply is not None:
            wire = reply.to_wire(max_size=65535)
            writer.write(struct.pack("!H", len(wire)) + wire)
            await writer.drain()
        writer.close()

    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Udp(handler), local_addr=(address, port)
    )
    server = await asyncio.start_server(tcp, address, port)
    try:
        yield
    finally:
        transport.close()
        server.close()
        await server.wait_closed()


def answer(query: dns.message.Message, *addresses: str, ttl: int = 30) -> dns.message.Message:
    reply = dns.message.make_response(query)
    question = query.question[0]
    reply.answer.append(dns.rrset.from_text_list(question.name, ttl, "IN", "A", list(addresses)))
    return reply


def failing(query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    return reply


@pytest.fixture
def port() -> int:
    return free_port()


async def test_an_answer_comes_back_in_wire_format_with_its_ttl(port: int) -> None:
    seen: list[str] = []

    def handler(q: dns.message.Message, transport: str) -> dns.message.Message:
        seen.append(q.question[0].name.to_text())
        return answer(q, "10.96.12.34", ttl=17)

    async with dns_server("127.0.0.1", port, handler):
        resolver = ClusterResolver(nameservers=["127.0.0.1"], port=port, timeout=1)
        wire = await resolver.lookup("web.default.svc.cluster.local", dns.rdatatype.A)
    response = dns.message.from_wire(wire)
    assert seen == ["web.default.svc.cluster.local."]  # fully qualified, no search list
    assert response.rcode() == dns.rcode.NOERROR
    (rrset,) = response.answer
    assert [r.to_text() for r in rrset] == ["10.96.12.34"]
    assert rrset.ttl == 17


async def test_nxdomain_is_an_answer_not_an_error(port: int) -> None:
    async with dns_server("127.0.0.1", port, lambda q, _: failing(q, dns.rcode.NXDOMAIN)):
        resolver = ClusterResolver(nameservers=["127.0.0.1"], port=port, timeout=1)
        wire = await resolver.lookup("nope.default.svc.cluster.local.", dns.rdatatype.AAAA)
    assert dns.message.from_wire(wire).rcode() == dns.rcode.NXDOMAIN


async def test_a_truncated_udp_answer_is_asked_again_over_tcp(port: int) -> None:
    many = [f"10.244.0.{i}" for i in range(1, 61)]  # 60 A records: > 512 bytes

    def handler(q: dns.message.Message, transport: str) -> dns.message.Message:
        if transport == "udp":
            reply = dns.message.make_response(q)
            reply.flags |= dns.flags.TC
            return reply
        return answer(q, *many)

    async with dns_server("127.0.0.1", port, handler):
        resolver = ClusterResolver(nameservers=["127.0.0.1"], port=port, timeout=1)
        wire = await resolver.lookup("big.default.svc.cluster.local", dns.rdatatype.A)
    response = dns.message.from_wire(wire)
    assert len(response.answer[0]) == 60
    assert not response.flags & dns.flags.TC


async def test_a_silent_or_failing_nameserver_gives_way_to_the_next(port: int) -> None:
    async with (
        dns_server("127.0.0.1", port, lambda q, _: None),  # never answers
        dns_server("127.0.0.2", port, lambda q, _: failing(q, dns.rcode.SERVFAIL)),
        dns_server("127.0.0.3", port, lambda q, _: answer(q, "10.96.0.1")),
    ):
        resolver = ClusterResolver(
            nameservers=["127.0.0.1", "127.0.0.2", "127.0.0.3"], port=port, timeout=0.2
        )
        wire = await resolver.lookup("kubernetes.default.svc.cluster.local", dns.rdatatype.A)
    assert dns.message.from_wire(wire).answer[0][0].to_text() == "10.96.0.1"


async def test_servfail_everywhere_is_passed_on(port: int) -> None:
    async with dns_server("127.0.0.1", port, lambda q, _: failing(q, dns.rcode.SERVFAIL)):
        resolver = ClusterResolver(nameservers=["127.0.0.1"], port=port, timeout=1)
        wire = await resolver.lookup("x.cluster.local", dns.rdatatype.A)
    assert dns.message.from_wire(wire).rcode() == dns.rcode.SERVFAIL


async def test_no_answer_at_all_is_a_clear_error(port: int) -> None:
    async with dns_server("127.0.0.1", port, lambda q, _: None):
        resolver = ClusterResolver(nameservers=["127.0.0.1"], port=port, timeout=0.2)
        with pytest.raises(DnsUnavailable) as info:
            await resolver.lookup("x.cluster.local", dns.rdatatype.SRV)
    message = str(info.value)
    assert "x.cluster.local. SRV" in message
    assert "127.0.0.1: no answer in 0.2s" in message


async def test_the_nameservers_come_from_resolv_conf(tmp_path: Path, port: int) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("search svc.cluster.local cluster.local\nnameserver 127.0.0.1\n")
    resolver = ClusterResolver.from_resolv_conf(conf, timeout=1)
    assert resolver.nameservers == ("127.0.0.1",)
    resolver.port = port
    async with dns_server("127.0.0.1", port, lambda q, _: answer(q, "10.96.0.10")):
        wire = await lookup("kube-dns.kube-system.svc.cluster.local", 1, resolver=resolver)
    assert dns.message.from_wire(wire).answer[0][0].to_text() == "10.96.0.10"
    conf.write_text("search cluster.local\n")
    with pytest.raises(DnsUnavailable, match="no nameserver"):
        await ClusterResolver.from_resolv_conf(conf).lookup("x.cluster.local", 1)
