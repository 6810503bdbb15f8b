"""DNS answered on the TUN ("resolved" mode): a datagram socketpair stands in for the TUN,
a fake pool records any tunnel flow, and an answerer function stands in for the resolver."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any, cast

import pytest

from telepresence.daemon.packets import Datagram, build, parse
from telepresence.daemon.pool import ManagerPool
from telepresence.daemon.udp import Dispatch, LocalDns, UdpRelay, dispatch
from telepresence.tunnel.frames import Dial

DNS_ADDRESS = IPv4Address("198.18.255.253")
ASKER = IPv4Address("198.18.255.254")
CLUSTER = IPv4Address("10.96.0.10")


class FakeStream:
    closed = False
    id = 1

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send_datagram(self, payload: bytes) -> None:
        self.sent.append(payload)

    def reset(self) -> None:
        self.closed = True


@dataclass
class FakePool:
    """Records the flows the relay opens into the tunnel."""

    dials: list[Dial] = field(default_factory=list)
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    def open_stream(self, dial: Dial, handler: Any) -> FakeStream:
        self.dials.append(dial)
        self.opened.set()
        return FakeStream()

    def link_name(self, stream: FakeStream) -> str:
        return "tunnel-1"


@dataclass
class Tun:
    relay: UdpRelay
    pool: FakePool
    kernel: socket.socket

    def send(self, d: Datagram) -> None:
        """Synchronous, so datagrams sent back to back are read in one go by the relay."""
        self.kernel.send(build(d))

    async def receive(self) -> Datagram:
        loop = asyncio.get_running_loop()
        packet = await asyncio.wait_for(loop.sock_recv(self.kernel, 65535), 5)
        d = parse(packet)
        assert d is not None
        return d

    def nothing_written(self) -> bool:
        try:
            self.kernel.recv(65535)
        except BlockingIOError:
            return True
        return False


Answerer = Callable[[bytes], Awaitable[bytes | None]]


async def echo(wire: bytes) -> bytes | None:
    return b"answer:" + wire


def query(payload: bytes, *, sport: int = 40000, dport: int = 53) -> Datagram:
    return Datagram(ASKER, sport, DNS_ADDRESS, dport, payload)


@pytest.fixture
async def make_tun() -> AsyncIterator[Callable[..., Tun]]:
    made: list[tuple[Tun, socket.socket]] = []

    def make(answer: Answerer = echo, *, max_pending: int = 1024) -> Tun:
        tun_end, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        kernel.setblocking(False)
        pool = FakePool()
        local = LocalDns(address=DNS_ADDRESS, answer=answer, max_pending=max_pending)
        relay = UdpRelay(cast(ManagerPool, pool), tun_end.fileno(), local_dns=local)
        relay.start()
        tun = Tun(relay, pool, kernel)
        made.append((tun, tun_end))
        return tun

    yield make
    for tun, tun_end in made:
        tun.relay.close()
        tun_end.close()
        tun.kernel.close()


def test_dispatch() -> None:
    local = LocalDns(address=DNS_ADDRESS, answer=echo)
    assert dispatch(query(b"q"), local) is Dispatch.LOCAL_DNS
    assert dispatch(query(b"q", dport=5353), local) is Dispatch.DROP
    to_cluster = Datagram(ASKER, 40000, CLUSTER, 53, b"q")
    assert dispatch(to_cluster, local) is Dispatch.TUNNEL
    assert dispatch(query(b"q"), None) is Dispatch.TUNNEL  # "redirect" mode: no local DNS


async def test_a_query_is_answered_from_the_dns_address_to_the_asker(
    make_tun: Callable[..., Tun],
) -> None:
    tun = make_tun()
    tun.send(query(b"q1", sport=41000))
    assert await tun.receive() == Datagram(DNS_ADDRESS, 53, ASKER, 41000, b"answer:q1")
    assert tun.pool.dials == [] and tun.relay.flows == {}


async def test_other_ports_of_the_dns_address_are_dropped_and_never_tunnelled(
    make_tun: Callable[..., Tun],
) -> None:
    tun = make_tun()
    tun.send(query(b"not dns", dport=5353))
    tun.send(query(b"q"))
    # Read in order: by the time the query is answered, the other datagram was handled.
    assert (await tun.receive()).payload == b"answer:q"
    assert tun.nothing_written()
    assert tun.pool.dials == [] and tun.relay.flows == {}
    # Any other address is still a flow to the cluster.
    tun.send(Datagram(ASKER, 40001, CLUSTER, 53, b"to the cluster"))
    await asyncio.wait_for(tun.pool.opened.wait(), 5)
    assert [(d.address, d.port) for d in tun.pool.dials] == [(str(CLUSTER), 53)]
    # The same callback registered the flow and put it in the book.
    assert list(tun.relay.flows) == [(ASKER, 40001, CLUSTER, 53)]
    assert [f["destination"] for f in tun.relay.book.snapshot()["flows"]] == [f"{CLUSTER}:53"]


async def test_no_answer_means_no_datagram(make_tun: Callable[..., Tun]) -> None:
    async def answer(wire: bytes) -> bytes | None:
        return None if wire == b"drop me" else wire

    tun = make_tun(answer)
    tun.send(query(b"drop me", sport=1))
    tun.send(query(b"keep me", sport=2))
    reply = await tun.receive()
    assert (reply.dport, reply.payload) == (2, b"keep me")
    assert tun.nothing_written()


async def test_queries_in_progress_are_bounded(
    make_tun: Callable[..., Tun], caplog: pytest.LogCaptureFixture
) -> None:
    gate = asyncio.Event()
    started = asyncio.Event()

    async def slow(wire: bytes) -> bytes | None:
        started.set()
        await gate.wait()
        return wire

    tun = make_tun(slow, max_pending=1)
    with caplog.at_level(logging.WARNING, logger="telepresence.udp"):
        tun.send(query(b"first", sport=1))
        tun.send(query(b"second", sport=2))
        await asyncio.wait_for(started.wait(), 5)
    assert len(tun.relay.dns_queries) == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"DNS on the TUN busy: dropping a query from {ASKER}:2"
    ]
    gate.set()
    assert (await tun.receive()).payload == b"first"
    tun.send(query(b"third", sport=3))  # the slot is free again
    assert (await tun.receive()).payload == b"third"
    assert tun.nothing_written()


async def test_close_cancels_the_queries_in_progress(make_tun: Callable[..., Tun]) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck(wire: bytes) -> bytes | None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return wire

    tun = make_tun(stuck)
    tun.send(query(b"q"))
    await asyncio.wait_for(started.wait(), 5)
    tasks = set(tun.relay.dns_queries)
    assert [t.get_name() for t in tasks] == ["tun-dns-query-1"]
    tun.relay.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert cancelled.is_set() and all(t.cancelled() for t in tasks)
    assert not tun.relay.dns_queries
    assert tun.nothing_written()
