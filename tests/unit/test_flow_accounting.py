"""The proxy and the UDP relay keep their flows in the session's book (`status --flows`):
bytes each way, state, link; refused dials, resets and lost links as errors. The real
pool and manager over loopback (tests/unit/test_tunnel_loopback.py's World); the proxy's
SO_ORIGINAL_DST is replaced, since no nftables redirect brings connections to it here."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import cast

import pytest

from telepresence.daemon import proxy as proxy_module
from telepresence.daemon.flowbook import FlowBook
from telepresence.daemon.packets import Datagram, build, parse
from telepresence.daemon.pool import ManagerPool
from telepresence.daemon.proxy import TransparentProxy
from telepresence.daemon.udp import UdpRelay
from telepresence.manager.dialpolicy import DialPolicy
from tests.unit.test_tunnel_loopback import World
from tests.unit.waiting import until

LAPTOP = IPv4Address("198.18.255.254")


@dataclass
class Laptop:
    world: World
    book: FlowBook
    proxy: TransparentProxy
    port: int
    #: Where the next connection to the proxy "was going" (its SO_ORIGINAL_DST).
    target: list[int]

    async def connect(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.target[0] = port
        return await asyncio.open_connection("127.0.0.1", self.port)


@pytest.fixture
async def laptop(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Laptop]:
    book = FlowBook()
    world = World()
    await world.start()
    world.pool = ManagerPool(
        open_forward=world._open,
        heartbeat=0.1,
        size=2,
        client_name="test",
        install_id="i",
        on_cluster_info=lambda info: None,
        on_link_lost=book.link_lost,
    )
    await world.pool.start()
    target = [0]
    monkeypatch.setattr(proxy_module, "original_destination", lambda sock: ("127.0.0.1", target[0]))
    proxy = TransparentProxy(world.pool, book=book)
    port = await proxy.start()
    yield Laptop(world, book, proxy, port, target)
    await proxy.close()
    await world.close()


async def serve(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], object],
) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    return server, server.sockets[0].getsockname()[1]


async def test_a_tcp_flow_counts_its_bytes_and_leaves_the_book_when_done(laptop: Laptop) -> None:
    reader, writer = await laptop.connect(laptop.world.echo_port)
    writer.write(b"x" * 1000)
    assert await asyncio.wait_for(reader.readexactly(1000), 10) == b"x" * 1000
    # Counted before the bytes reach the program, so they are counted now.
    (flow,) = laptop.book.snapshot()["flows"]
    host, port = writer.get_extra_info("sockname")
    assert flow["protocol"] == "tcp"
    assert flow["source"] == f"{host}:{port}"
    assert flow["destination"] == f"127.0.0.1:{laptop.world.echo_port}"
    assert (flow["sent"], flow["received"], flow["state"]) == (1000, 1000, "open")
    assert flow["link"] in {t.name for t in laptop.world.pool.tunnels}
    assert flow["link"].startswith("tunnel-") and flow["stream"] > 0
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 10) == b""  # the echo server ended too
    assert laptop.book.snapshot() == {"flows": [], "flows_open": 0, "errors": []}
    writer.close()


async def test_a_half_closed_flow_says_which_side_finished(laptop: Laptop) -> None:
    release = asyncio.Event()

    async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.write(b"bye")
        await writer.drain()
        await release.wait()
        writer.close()

    server, port = await serve(reply_after_eof)
    try:
        reader, writer = await laptop.connect(port)
        writer.write(b"request")
        writer.write_eof()
        assert await asyncio.wait_for(reader.readexactly(3), 10) == b"bye"
        (flow,) = laptop.book.snapshot()["flows"]
        assert (flow["sent"], flow["received"]) == (7, 3)
        assert flow["state"] == "half-closed-by-laptop"
        release.set()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert laptop.book.snapshot()["flows"] == []
        writer.close()
    finally:
        server.close()


async def test_a_refused_dial_is_a_recent_error_and_no_flow(laptop: Laptop) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    for _ in range(2):
        reader, writer = await laptop.connect(port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 10)
        writer.close()
    snapshot = laptop.book.snapshot()
    assert snapshot["flows"] == []
    (error,) = snapshot["errors"]
    assert (error["kind"], error["protocol"], error["destination"]) == (
        "refused",
        "tcp",
        f"127.0.0.1:{port}",
    )
    assert (error["message"], error["count"]) == ("connection refused", 2)


async def test_a_reset_from_the_cluster_side_is_a_recent_error(laptop: Laptop) -> None:
    async def reset_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server, port = await serve(reset_at_once)
    try:
        reader, writer = await laptop.connect(port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 10)
        writer.close()
        (error,) = laptop.book.snapshot()["errors"]
        assert (error["kind"], error["destination"]) == ("reset", f"127.0.0.1:{port}")
        assert error["message"] == "reset from the cluster side"
        assert laptop.book.snapshot()["flows"] == []
    finally:
        server.close()


async def test_a_lost_link_is_one_error_not_one_per_flow(laptop: Laptop) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server, port = await serve(silent)
    try:
        clients = [await laptop.connect(port) for _ in range(4)]
        await until(
            lambda: [f["state"] for f in laptop.book.snapshot()["flows"]] == ["open"] * 4,
            "four open flows",
        )
        link = laptop.book.snapshot()["flows"][0]["link"]
        (tunnel,) = [t for t in laptop.world.pool.tunnels if t.name == link]
        await tunnel.conn.close()  # type: ignore[attr-defined]
        await until(
            lambda: all(f["link"] != link for f in laptop.book.snapshot()["flows"]),
            "the flows of the lost link to end",
        )
        (error,) = laptop.book.snapshot()["errors"]
        assert (error["kind"], error["protocol"], error["destination"]) == (
            "reset",
            "tunnel",
            link,
        )
        assert "port-forward closed" in error["message"]
        for _, writer in clients:
            writer.close()
    finally:
        server.close()


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(b"echo:" + data, addr)


async def test_udp_flows_count_their_datagrams_and_leave_with_the_relay(laptop: Laptop) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    tun, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    kernel.setblocking(False)
    relay = UdpRelay(laptop.world.pool, tun.fileno(), book=laptop.book)
    relay.start()
    try:
        for payload in (b"one", b"three"):
            out = Datagram(LAPTOP, 40000, IPv4Address("127.0.0.1"), port, payload)
            await loop.sock_sendall(kernel, build(out))
            reply = parse(await asyncio.wait_for(loop.sock_recv(kernel, 65535), 10))
            assert reply is not None and reply.payload == b"echo:" + payload
        (flow,) = laptop.book.snapshot()["flows"]
        assert flow["protocol"] == "udp" and flow["source"] == f"{LAPTOP}:40000"
        assert flow["destination"] == f"127.0.0.1:{port}"
        assert (flow["sent"], flow["received"], flow["state"]) == (8, 18, "open")
        assert flow["link"].startswith("tunnel-") and flow["stream"] > 0
    finally:
        relay.close()
        transport.close()
        tun.close()
        kernel.close()
    assert laptop.book.snapshot()["flows"] == []


async def test_a_refused_udp_dial_is_a_recent_error(laptop: Laptop) -> None:
    laptop.world.manager.dial_policy = DialPolicy()  # refuses the manager's own loopback
    loop = asyncio.get_running_loop()
    tun, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    kernel.setblocking(False)
    relay = UdpRelay(laptop.world.pool, tun.fileno(), book=laptop.book)
    relay.start()
    try:
        out = Datagram(LAPTOP, 40000, IPv4Address("127.0.0.1"), 53, b"q")
        await loop.sock_sendall(kernel, build(out))
        await until(lambda: laptop.book.snapshot()["errors"], "the refused dial")
        (error,) = laptop.book.snapshot()["errors"]
        assert (error["kind"], error["protocol"], error["destination"]) == (
            "dial-failed",
            "udp",
            "127.0.0.1:53",
        )
        assert "the manager's own loopback" in error["message"]
        assert laptop.book.snapshot()["flows"] == [] and not relay.flows
    finally:
        relay.close()
        tun.close()
        kernel.close()
