"""The tunnel's asyncio shell, the laptop's pool and the manager's server, wired together
over loopback TCP (standing in for the port-forward byte stream)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from ipaddress import ip_network
from typing import cast

import pytest

from telepresence.daemon.pool import ManagerPool, PoolUnavailable
from telepresence.manager.dialer import POLICY_REFUSAL
from telepresence.manager.dialpolicy import DialPolicy
from telepresence.manager.server import Manager, TunnelConnection
from telepresence.tunnel.flows import SocketFlow
from telepresence.tunnel.frames import Dial, DialError, IPProtocol
from telepresence.tunnel.messages import ClusterInfo
from telepresence.tunnel.protocol import StreamEnded
from tests.unit.waiting import until

INFO = ClusterInfo(("10.96.0.0/16",), ("10.244.0.0/24",), "cluster.local", "10.96.0.10")


class TcpForward:
    """The PortForward interface over a plain TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        # Set to make this link go silent in both directions without closing, as a
        # port-forward does when its pod vanishes under it.
        self.hung = False

    async def receive(self) -> bytes:
        data = await self.reader.read(65536)
        while self.hung:
            await asyncio.Event().wait()
        return data

    async def send_buffers(self, buffers: list[bytes | memoryview]) -> None:
        if self.hung:
            return
        self.writer.writelines(buffers)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    writer.close()


#: Loopback stands in for the cluster here, so these tests open what the default refuses.
LOOPBACK_ALLOWED = DialPolicy(allow=[ip_network("127.0.0.0/8")])


class World:
    """The pool and one or more managers ("pods") on loopback; ``ready`` are the pods a
    new join may pick, newest last, as find_manager_pod does."""

    def __init__(self) -> None:
        self.manager = Manager(dns_lookup=self._lookup, dial_policy=LOOPBACK_ALLOWED)
        self.manager.set_cluster_info(INFO)
        self.forwards = 0
        self.ports: dict[str, int] = {}
        self.managers: dict[str, Manager] = {"mgr-a": self.manager}
        self.servers: list[asyncio.Server] = []
        self.ready: list[str] = ["mgr-a"]
        self.opened: list[str] = []

    async def _lookup(self, qname: str, qtype: int) -> bytes:
        return f"{qname}/{qtype}".encode()

    async def _serve(self, name: str, manager: Manager) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: TunnelConnection(manager), "127.0.0.1", 0)
        self.servers.append(server)
        self.ports[name] = server.sockets[0].getsockname()[1]

    async def add_manager(self, name: str) -> Manager:
        """A replacement pod; not ready (not picked) until added to ``ready``."""
        manager = Manager(dns_lookup=self._lookup, dial_policy=LOOPBACK_ALLOWED)
        manager.set_cluster_info(INFO)
        self.managers[name] = manager
        await self._serve(name, manager)
        return manager

    async def start(self) -> None:
        await self._serve("mgr-a", self.manager)
        self.manager_port = self.ports["mgr-a"]
        self.echo_server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        self.echo_port = self.echo_server.sockets[0].getsockname()[1]
        self.pool = ManagerPool(
            open_forward=self._open,
            # Short, so the silent-link tests are quick; not so short that a loaded
            # machine makes a busy link look dead.
            heartbeat=0.5,
            size=2,
            client_name="test",
            install_id="i",
            on_cluster_info=lambda info: None,
        )

    async def _open(self, pod: str | None, avoid: frozenset[str]) -> tuple[str, TcpForward]:
        if pod is None:
            candidates = [p for p in self.ready if p not in avoid]
            if not candidates:
                raise PoolUnavailable("no ready traffic manager pod")
            pod = candidates[-1]
        self.forwards += 1
        self.opened.append(pod)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.ports[pod])
        return pod, TcpForward(reader, writer)

    async def close(self) -> None:
        await self.pool.close()
        for server in self.servers:
            server.close()
        self.echo_server.close()


@pytest.fixture
async def world() -> AsyncIterator[World]:
    w = World()
    await w.start()
    yield w
    await w.close()


async def _splice(world: World, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A local TCP connection whose far end is spliced into a tunnel stream to
    127.0.0.1:port, as the transparent proxy does with a redirected connection."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    client = await asyncio.open_connection(*listener.getsockname())
    theirs, _ = await loop.sock_accept(listener)
    listener.close()
    flow = SocketFlow()
    flow.attach(world.pool.open_stream(Dial(IPProtocol.TCP, "127.0.0.1", port), flow))
    await loop.connect_accepted_socket(lambda: flow, theirs)
    return client


async def _echo_through(world: World, payload: bytes) -> bytes:
    """Sends `payload` to the echo server through the tunnel and returns what came back."""
    reader, writer = await _splice(world, world.echo_port)
    writer.write(payload)
    writer.write_eof()
    return await asyncio.wait_for(reader.read(-1), 10)


async def _rejoined(world: World, first_session: str) -> None:
    """Waits (15 s at most) for a new session the manager knows, on a full pool."""
    await until(
        lambda: (
            world.pool.session_id != first_session
            and world.pool.session_id in world.manager.sessions
            and len(world.pool.tunnels) == 2
        ),
        "a new session on a full pool",
        timeout=15,
    )


async def test_join_gets_cluster_info_and_a_full_pool(world: World) -> None:
    info = await world.pool.start()
    assert info == INFO
    assert len(world.pool.tunnels) == 2
    assert world.pool.session_id in world.manager.sessions


async def test_a_large_transfer_round_trips_intact(world: World) -> None:
    await world.pool.start()
    reader, writer = await _splice(world, world.echo_port)
    payload = os.urandom(8 * 1024 * 1024)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = await asyncio.wait_for(reader.read(-1), 30)
    await sender
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


async def test_a_refused_dial_resets_the_local_connection(world: World) -> None:
    await world.pool.start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    reader, _ = await _splice(world, port)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(1), 10)


async def test_many_flows_share_the_fixed_pool(world: World) -> None:
    await world.pool.start()

    async def one(i: int) -> bytes:
        reader, writer = await _splice(world, world.echo_port)
        writer.write(f"hello {i}".encode())
        writer.write_eof()
        return await asyncio.wait_for(reader.read(-1), 10)

    answers = await asyncio.gather(*(one(i) for i in range(100)))
    assert answers == [f"hello {i}".encode() for i in range(100)]
    assert world.forwards == 2


async def test_dns_lookups_are_answered_through_the_manager(world: World) -> None:
    await world.pool.start()
    answer = await world.pool.dns_lookup("web.default.svc.cluster.local.", 1)
    assert answer.message == b"web.default.svc.cluster.local./1"


async def test_the_pool_rejoins_when_every_connection_drops(world: World) -> None:
    await world.pool.start()
    first_session = world.pool.session_id
    # The manager restarts: all sessions are forgotten and connections cut.
    world.manager.sessions.clear()
    for t in list(world.pool.tunnels):
        await t.conn.close()  # type: ignore[attr-defined]

    await _rejoined(world, first_session)
    assert await _echo_through(world, b"again") == b"again"


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(b"echo:" + data, addr)


async def test_udp_datagrams_from_the_tun_reach_the_cluster_and_come_back(world: World) -> None:
    """A datagram socketpair stands in for the TUN: packets in, packets out."""
    from ipaddress import IPv4Address

    from telepresence.daemon.packets import Datagram, build, parse
    from telepresence.daemon.udp import UdpRelay

    await world.pool.start()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    tun, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    kernel.setblocking(False)
    relay = UdpRelay(world.pool, tun.fileno())
    relay.start()
    try:
        laptop = IPv4Address("198.18.255.254")
        for i in range(3):
            out = Datagram(laptop, 40000 + i, IPv4Address("127.0.0.1"), port, f"q{i}".encode())
            await loop.sock_sendall(kernel, build(out))
            reply = parse(await asyncio.wait_for(loop.sock_recv(kernel, 65535), 10))
            assert reply == Datagram(
                IPv4Address("127.0.0.1"), port, laptop, 40000 + i, f"echo:q{i}".encode()
            )
        assert len(relay.flows) == 3
    finally:
        relay.close()
        transport.close()
        tun.close()
        kernel.close()


class _Collector:
    """A StreamHandler that gathers what the peer sends."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = asyncio.Event()

    def stream_data(self, data: bytes) -> None:
        self.data += data

    def stream_eof(self) -> None:
        self.eof.set()

    def stream_reset(self) -> None:
        self.eof.set()

    def stream_writable(self) -> None:
        pass

    def dial_result(self, error: object, message: str) -> None:
        pass


async def test_data_sent_in_the_same_batch_as_the_open_is_not_lost(world: World) -> None:
    """The manager must attach the flow before its dial completes: bytes written right
    behind the OPEN arrive in the same read as the OPEN itself."""
    await world.pool.start()
    collector = _Collector()
    stream = world.pool.open_stream(Dial(IPProtocol.TCP, "127.0.0.1", world.echo_port), collector)
    stream.write(b"first bytes")
    stream.close()
    await asyncio.wait_for(collector.eof.wait(), 10)
    assert bytes(collector.data) == b"first bytes"


async def test_a_server_that_speaks_first_is_heard(world: World) -> None:
    """Banner protocols (SSH, SMTP, MySQL) write before reading: their first bytes can reach
    the manager before it has accepted the stream, and must wait, not vanish."""

    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hello\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(banner, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    await world.pool.start()
    try:
        for _ in range(20):
            reader, writer = await _splice(world, port)
            assert await asyncio.wait_for(reader.read(-1), 10) == b"220 hello\r\n"
            writer.close()
    finally:
        server.close()


async def test_the_pool_rejoins_a_restarted_manager_even_while_some_links_live(
    world: World,
) -> None:
    """A new manager rejects Remain for a session it never saw; the pool must then arrive
    again instead of reopening the lost link forever."""
    await world.pool.start()
    first_session = world.pool.session_id
    world.manager.sessions.clear()
    await world.pool.tunnels[0].conn.close()  # type: ignore[attr-defined]

    await _rejoined(world, first_session)
    assert await _echo_through(world, b"again") == b"again"


async def test_links_that_go_silent_are_dropped_and_the_pool_rejoins(world: World) -> None:
    """The manager pod vanished but the port-forwards stay open, carrying nothing: only the
    missing heartbeat echo tells the pool, which must then find the new manager."""
    await world.pool.start()
    first_session = world.pool.session_id
    world.manager.sessions.clear()
    for t in list(world.pool.tunnels):
        t.conn.hung = True  # type: ignore[attr-defined]

    await _rejoined(world, first_session)
    assert await _echo_through(world, b"alive") == b"alive"


class _DialRecorder(_Collector):
    def __init__(self) -> None:
        super().__init__()
        self.result: asyncio.Future[tuple[object, str]] = asyncio.get_running_loop().create_future()

    def dial_result(self, error: object, message: str) -> None:
        if not self.result.done():
            self.result.set_result((error, message))


@pytest.mark.parametrize("protocol", [IPProtocol.TCP, IPProtocol.UDP])
@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("169.254.169.254", "169.254.169.254 is link-local"),
        ("127.0.0.1", "the manager's own loopback"),
        ("::ffff:127.0.0.1", "the manager's own loopback"),
        ("0.0.0.0", "reaches the manager itself"),
    ],
)
async def test_the_default_policy_refuses_before_dialing(
    world: World, protocol: IPProtocol, address: str, why: str
) -> None:
    world.manager.dial_policy = DialPolicy()
    await world.pool.start()
    recorder = _DialRecorder()
    world.pool.open_stream(Dial(protocol, address, 80), recorder)
    error, message = await asyncio.wait_for(recorder.result, 10)
    assert error is DialError.FAILED
    assert message.startswith(f"{POLICY_REFUSAL}: ")
    assert why in message


async def test_an_allow_entry_opens_a_default_refused_range(world: World) -> None:
    world.manager.dial_policy = DialPolicy(allow=[ip_network("127.0.0.1/32")])
    await world.pool.start()
    assert await _echo_through(world, b"hello") == b"hello"


async def test_a_policy_refusal_resets_the_local_connection_at_once(world: World) -> None:
    world.manager.dial_policy = DialPolicy()
    await world.pool.start()
    reader, _ = await _splice(world, world.echo_port)  # the echo server is on 127.0.0.1
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(1), 10)


async def test_a_refused_udp_flow_is_logged_as_a_warning_with_the_reason(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    from ipaddress import IPv4Address

    from telepresence.daemon.packets import Datagram, build
    from telepresence.daemon.udp import UdpRelay

    world.manager.dial_policy = DialPolicy()
    await world.pool.start()
    loop = asyncio.get_running_loop()
    tun, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    kernel.setblocking(False)
    relay = UdpRelay(world.pool, tun.fileno())
    relay.start()
    try:
        with caplog.at_level(logging.INFO, logger="telepresence.dial"):
            out = Datagram(
                IPv4Address("198.18.255.254"), 40000, IPv4Address("169.254.169.254"), 53, b"q"
            )
            await loop.sock_sendall(kernel, build(out))

            await until(lambda: caplog.records, "the refused dial to be logged")
            record = caplog.records[0]
        assert record.levelno == logging.WARNING
        assert record.getMessage() == (
            "UDP 169.254.169.254:53: the cluster dial failed: refused by the manager's dial "
            "policy: 169.254.169.254 is link-local, where clouds serve instance metadata "
            "(allow it with TELEPRESENCE_DIAL_ALLOW)"
        )
        assert not relay.flows
    finally:
        relay.close()
        tun.close()
        kernel.close()


# --- a stopping manager: new flows move, open ones finish ---------------------------------


async def _open_echo(world: World) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await _splice(world, world.echo_port)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    return reader, writer


def _streams(manager: Manager) -> int:
    return sum(len(c.tunnel.streams) for c in manager.connections if c.tunnel is not None)


async def test_a_stopping_manager_hands_new_flows_to_its_replacement_and_finishes_the_old(
    world: World,
) -> None:
    await world.pool.start()
    old, new = world.manager, await world.add_manager("mgr-b")
    long_reader, long_writer = await _open_echo(world)  # a flow open on the old manager
    world.ready.append("mgr-b")  # the rollout's new pod is Ready

    old.drain(50)
    await until(
        lambda: (
            {t.pod for t in world.pool.healthy()} == {"mgr-b"} and len(world.pool.healthy()) == 2
        ),
        "the pool to join the replacement",
    )
    assert world.pool.session_id in new.sessions
    # New flows go to the replacement ...
    before = _streams(new)
    _reader, writer = await _open_echo(world)
    assert _streams(new) == before + 1
    writer.close()
    # ... while the flow opened before keeps working on the stopping one, to its end.
    long_writer.write(b"still here")
    assert await asyncio.wait_for(long_reader.readexactly(10), 10) == b"still here"
    long_writer.write_eof()
    assert await asyncio.wait_for(long_reader.read(-1), 10) == b""
    # Once idle, the old links close, and the stopping manager is free to exit early.
    assert await old.drained(deadline=asyncio.get_running_loop().time() + 10)
    assert all(t.pod == "mgr-b" for t in world.pool.tunnels)


async def test_until_a_replacement_is_ready_new_flows_still_use_the_stopping_manager(
    world: World,
) -> None:
    await world.pool.start()
    world.manager.drain(50)
    await until(lambda: not world.pool.healthy(), "the links to be marked draining")
    # One replica: no replacement yet. Connections must not fail meanwhile.
    for i in range(5):
        assert await _echo_through(world, f"during {i}".encode()) == f"during {i}".encode()
    await world.add_manager("mgr-b")
    world.ready.append("mgr-b")
    world.pool.manager_pods(stopping={"mgr-a"}, ready={"mgr-b"})
    await until(lambda: {t.pod for t in world.pool.healthy()} == {"mgr-b"}, "the pool to hand over")
    assert await _echo_through(world, b"after") == b"after"


async def test_the_pod_watch_moves_new_flows_even_when_the_old_links_hang(world: World) -> None:
    """A deletion timestamp in the API is known before any heartbeat is missed, and a
    port-forward that hangs could not carry the manager's Draining anyway."""
    world.pool.heartbeat = 60  # the heartbeat must not be what notices
    await world.pool.start()
    for t in world.pool.tunnels:
        t.conn.hung = True  # type: ignore[attr-defined]
    await world.add_manager("mgr-b")
    world.ready.append("mgr-b")
    world.pool.manager_pods(stopping={"mgr-a"}, ready={"mgr-b"})
    await until(
        lambda: {t.pod for t in world.pool.healthy()} == {"mgr-b"},
        "the pool to join the replacement",
        timeout=5,
    )
    assert await _echo_through(world, b"moved") == b"moved"


async def test_a_laptop_at_protocol_1_is_never_sent_draining(world: World) -> None:
    """An older laptop could not decode it; it sees its links close when the manager exits."""
    from telepresence.versions import ProtocolRange

    world.pool.protocol = ProtocolRange(1, 1)
    await world.pool.start()
    assert world.manager.sessions[world.pool.session_id].protocol == 1
    world.manager.drain(50)
    assert await _echo_through(world, b"old laptop") == b"old laptop"
    assert world.pool.healthy(), "no Draining reached a protocol-1 session"


async def test_a_stopping_manager_gives_up_waiting_at_its_deadline(world: World) -> None:
    await world.pool.start()
    world.manager.drain(50)  # no replacement: the links stay
    loop = asyncio.get_running_loop()
    assert not await world.manager.drained(deadline=loop.time() + 0.3)
    assert world.manager.connections


async def test_a_program_that_resets_as_the_cluster_side_finishes_ends_only_its_own_flow(
    world: World,
) -> None:
    """The race seen under a rollout: the program resets its socket (SO_LINGER 0) and the
    cluster side's FIN arrives before asyncio has noticed. Half-closing that socket fails
    (ENOTCONN); that must end this flow alone, not the link and every flow on it."""
    await world.pool.start()
    survivor_reader, survivor_writer = await _splice(world, world.echo_port)
    survivor_writer.write(b"before")
    assert await asyncio.wait_for(survivor_reader.readexactly(6), 10) == b"before"

    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    theirs, _ = listener.accept()
    listener.close()
    theirs.setblocking(False)
    flow = SocketFlow()
    stream = world.pool.open_stream(Dial(IPProtocol.TCP, "127.0.0.1", world.echo_port), flow)
    flow.attach(stream)
    await loop.connect_accepted_socket(lambda: flow, theirs)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()  # RST, which the kernel applies to `theirs` at once on loopback
    tunnel = stream.tunnel
    tunnel._dispatch(StreamEnded(stream.id))  # the FIN, before the loop runs again
    assert stream.closed
    assert not tunnel.closed

    survivor_writer.write(b"after")
    assert await asyncio.wait_for(survivor_reader.readexactly(5), 10) == b"after"


async def test_a_failing_flow_handler_resets_its_stream_and_spares_the_link(
    world: World,
) -> None:
    await world.pool.start()
    survivor_reader, survivor_writer = await _splice(world, world.echo_port)

    class Broken(SocketFlow):
        def stream_data(self, data: bytes) -> None:
            raise RuntimeError("a bug in one flow")

    broken = Broken()
    stream = world.pool.open_stream(Dial(IPProtocol.TCP, "127.0.0.1", world.echo_port), broken)
    broken.attach(stream)
    stream.write(b"echo me")  # the echo comes back and the handler raises
    await until(lambda: stream.closed, "the broken flow's stream to be reset", timeout=10)
    assert not stream.tunnel.closed
    survivor_writer.write(b"still here")
    assert await asyncio.wait_for(survivor_reader.readexactly(10), 10) == b"still here"
