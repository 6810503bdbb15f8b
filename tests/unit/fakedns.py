"""Tiny fake nameservers on loopback addresses for the DNS forwarding tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from telepresence.daemon.dns import DnsSettings
from telepresence.daemon.dnsserver import DnsServer

NAME = "www.example.test."
#: Short per-server wait, so the tests are quick; the default is 1 s.
SETTINGS = DnsSettings(upstream_timeout=1.5, upstream_server_timeout=0.3, upstream_hold_down=30)


@dataclass
class FakeNameserver:
    """Answers every A query with its own address (so a test sees who answered).

    ``mode``: "answer"; "silent" (reads and never answers, like a dead router
    behind a live link); "servfail"; "truncate" (TC over UDP, the answer over TCP).
    """

    host: str
    mode: str = "answer"
    queries: list[str] = field(default_factory=list)
    port: int = 0
    _udp: asyncio.DatagramTransport | None = None
    _tcp: asyncio.Server | None = None

    def reply(self, wire: bytes, *, tcp: bool) -> bytes | None:
        query = dns.message.from_wire(wire)
        self.queries.append("tcp" if tcp else "udp")
        if self.mode == "silent":
            return None
        response = dns.message.make_response(query)
        if self.mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif self.mode == "truncate" and not tcp:
            response.flags |= dns.flags.TC
        else:
            response.answer.append(
                dns.rrset.from_text(query.question[0].name, 60, "IN", "A", self.host)
            )
        return response.to_wire()

    async def start(self, port: int = 0) -> FakeNameserver:
        loop = asyncio.get_running_loop()
        server = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                answer = server.reply(data, tcp=False)
                if answer is not None:
                    self.transport.sendto(answer, addr)

        async def tcp_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                size = int.from_bytes(await reader.readexactly(2), "big")
                answer = server.reply(await reader.readexactly(size), tcp=True)
                if answer is None:
                    await reader.read()  # hold the connection, never answer
                else:
                    writer.write(len(answer).to_bytes(2, "big") + answer)
                    await writer.drain()
            writer.close()

        self._udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=(self.host, port))
        self.port = self._udp.get_extra_info("sockname")[1]
        self._tcp = await asyncio.start_server(tcp_client, self.host, self.port)
        return self

    def stop(self) -> None:
        """Gone: UDP gets ICMP port unreachable, TCP a reset."""
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


async def plain_socket(kind: str) -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)


async def no_cluster(name: str, qtype: int) -> dns.message.Message | None:
    raise AssertionError("nothing here is a cluster name")


async def ask(server: DnsServer, *, tcp: bool = False) -> tuple[str, float]:
    """Who answered (the A record's address) and how long it took."""
    loop = asyncio.get_running_loop()
    query = dns.message.make_query(NAME, dns.rdatatype.A)
    started = loop.time()
    if tcp:
        answer = await dns.asyncquery.tcp(query, "127.0.0.1", port=server.port, timeout=5)
    else:
        answer = await dns.asyncquery.udp(query, "127.0.0.1", port=server.port, timeout=5)
    elapsed = loop.time() - started
    if answer.rcode() != dns.rcode.NOERROR:
        return dns.rcode.to_text(answer.rcode()), elapsed
    return answer.answer[0][0].address, elapsed


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host`` right now (DNS servers bind both; a
    free UDP port's TCP twin may belong to another process)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP")
