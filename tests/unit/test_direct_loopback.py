"""The direct transport over loopback: the manager's TLS listener, the laptop's route, and
the pool choosing between direct and port-forward links (the port-forward byte stream is
plain TCP here, as in test_tunnel_loopback)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

import pytest

from telepresence.daemon.direct import DirectConnection, DirectRoute, DirectUnavailable, Endpoint
from telepresence.daemon.directcreds import DirectCredentials, mint
from telepresence.daemon.managerlink import DIRECT, PORT_FORWARD, ManagerLink
from telepresence.daemon.pool import ManagerPool
from telepresence.manager.directlisten import DirectListener
from telepresence.manager.server import TunnelConnection
from telepresence.tunnel.frames import Dial, IPProtocol
from telepresence.tunnel.messages import Arrive, ControlMessage
from telepresence.versions import ProtocolRange
from tests.unit.test_tunnel_loopback import World, _echo_through
from tests.unit.waiting import until


class DirectWorld(World):
    """World's manager with a direct listener on loopback TLS, and a route to it."""

    async def start(self, *, listener: bool = True, protocol: ProtocolRange | None = None) -> None:
        await super().start()
        if protocol is not None:
            self.pool = ManagerPool(
                open_forward=self._open,
                heartbeat=0.5,
                size=2,
                client_name="test",
                install_id="i",
                on_cluster_info=lambda info: None,
                protocol=protocol,
            )
        self.listener = DirectListener()
        self.direct_server = await asyncio.get_running_loop().create_server(
            lambda: TunnelConnection(self.manager, direct=True),
            "127.0.0.1",
            0,
            ssl=self.listener.context,
        )
        self.direct_port = self.direct_server.sockets[0].getsockname()[1]
        if listener:
            self.manager.direct = self.listener
            self.manager.direct_port = self.direct_port
        self.located: list[tuple[str, int]] = []
        self.route = DirectRoute(self.pool, self._locate, check_every=0.1)
        self.route_task: asyncio.Task[None] | None = None

    async def _locate(self, pod: str, port: int) -> list[Endpoint]:
        self.located.append((pod, port))
        return [Endpoint("127.0.0.1", self.direct_port, "loopback")]

    async def join(self) -> None:
        await self.pool.start()
        self.route_task = asyncio.create_task(self.route.run())

    async def go_direct(self) -> DirectCredentials:
        """Joins, waits for the route's two direct links, returns its credentials."""
        await self.join()
        await until(lambda: self.route.live_links() == 2, "two direct links", timeout=10)
        assert self.route._granted is not None
        return self.route._granted[1]

    def break_direct(self) -> None:
        """The direct path goes away (a firewall, a node gone): its listener and links."""
        self.direct_server.close()
        for conn in list(self.manager.connections):
            if conn.direct and conn.transport is not None:
                conn.transport.abort()

    async def close(self) -> None:
        if self.route_task is not None:
            self.route_task.cancel()
        await super().close()
        self.direct_server.close()


@pytest.fixture
async def direct_world() -> AsyncIterator[DirectWorld]:
    w = DirectWorld()
    await w.start()
    yield w
    await w.close()


def _direct_links(w: DirectWorld) -> list[ManagerLink]:
    return [t for t in w.pool.healthy() if t.transport == DIRECT]


async def test_new_flows_take_the_direct_links_once_granted(direct_world: DirectWorld) -> None:
    w = direct_world
    await w.go_direct()
    # Granted over port-forward, for the pod the session's port-forward links reach.
    assert w.located == [("mgr-a", w.direct_port)]
    assert len(w.listener) == 1
    # The port-forward links stay, ready for a fallback.
    assert len([t for t in w.pool.healthy() if t.transport == PORT_FORWARD]) == 2
    stream = w.pool.open_stream(Dial(IPProtocol.TCP, "127.0.0.1", w.echo_port), _Ignore())
    assert w.pool.link_name(stream).startswith("direct-")
    stream.reset()
    payload = bytes(range(256)) * 4096
    assert await _echo_through(w, payload) == payload
    assert w.route.describe() == f"direct (127.0.0.1:{w.direct_port}, loopback)"
    # The manager's side: those links are TLS and in the laptop's session.
    direct = [c for c in w.manager.connections if c.direct]
    assert len(direct) == 2
    assert all(c.session is not None and c.session.id == w.pool.session_id for c in direct)


async def test_new_flows_fall_back_to_port_forward_when_the_direct_path_breaks(
    direct_world: DirectWorld,
) -> None:
    w = direct_world
    await w.go_direct()
    w.break_direct()
    await until(lambda: not _direct_links(w), "the direct links gone", timeout=10)
    payload = b"still here" * 1000
    assert await _echo_through(w, payload) == payload
    await until(
        lambda: w.route.describe().startswith("port-forward (direct: 127.0.0.1:"),
        "status naming the failed endpoint",
        timeout=10,
    )
    # The session itself never noticed: no re-join.
    assert w.pool.reconnects == 0


async def test_a_session_end_revokes_its_credentials(direct_world: DirectWorld) -> None:
    w = direct_world
    creds = await w.go_direct()
    w.route_task and w.route_task.cancel()
    await w.pool.close()
    await until(lambda: len(w.listener) == 0, "credentials forgotten", timeout=5)
    with pytest.raises(DirectUnavailable):
        await DirectConnection.open(Endpoint("127.0.0.1", w.direct_port, "test"), creds)


async def test_the_listener_admits_only_a_registered_sessions_credentials(
    direct_world: DirectWorld,
) -> None:
    w = direct_world
    creds = await w.go_direct()
    here = Endpoint("127.0.0.1", w.direct_port, "test")

    # Plain TCP (what a port scan or a pod in the cluster sends): no tunnel, just closed.
    reader, writer = await asyncio.open_connection("127.0.0.1", w.direct_port)
    writer.write(b"\xfeTPX\x00\x01" + bytes(4))
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()

    # Credentials of another laptop that never registered them: no such server name.
    with pytest.raises(DirectUnavailable):
        await DirectConnection.open(here, mint())

    # The session's server name, but a client certificate the session did not register.
    stranger = mint()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=creds.server_cert)
    from telepresence.directtls import load_chain

    load_chain(ctx, stranger.client_cert, stranger.client_key)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", w.direct_port, ssl=ctx, server_hostname=creds.server_name
    )
    # TLS 1.3: the client finishes first; the server's verdict arrives as an alert.
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        data = await asyncio.wait_for(reader.read(), 10)
        assert data == b""
        raise ConnectionResetError("closed without a word")
    writer.close()
    assert len([c for c in w.manager.connections if c.direct]) == 2


async def test_a_direct_link_cannot_arrive_as_a_new_session(direct_world: DirectWorld) -> None:
    w = direct_world
    creds = await w.go_direct()
    conn = await DirectConnection.open(Endpoint("127.0.0.1", w.direct_port, "test"), creds)
    closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_closed(_: ManagerLink, reason: str) -> None:
        if not closed.done():
            closed.set_result(reason)

    def on_control(_: ManagerLink, message: ControlMessage) -> None:
        pass

    link = ManagerLink(
        conn,
        pod="mgr-a",
        on_control=on_control,
        on_closed=on_closed,
        protocol=w.pool.protocol,
        transport=DIRECT,
    )
    link.start("intruder")
    link.tunnel.send_control(Arrive("intruder", "x", "0.1.0", protocol_min=1, protocol_max=3))
    reason = await asyncio.wait_for(closed, 10)
    assert "belongs to the session of its credentials" in reason
    assert len(w.manager.sessions) == 1


async def test_a_manager_without_a_listener_leaves_the_session_on_port_forward() -> None:
    w = DirectWorld()
    await w.start(listener=False)
    try:
        await w.join()
        await until(
            lambda: "has no direct listener" in w.route.describe(), "the refusal", timeout=10
        )
        assert w.route.describe().startswith("port-forward (direct: the traffic manager refused")
        assert await _echo_through(w, b"x" * 100) == b"x" * 100
    finally:
        await w.close()


async def test_a_manager_before_protocol_3_is_not_asked() -> None:
    w = DirectWorld()
    await w.start(protocol=ProtocolRange(1, 2))
    try:
        await w.join()
        await until(lambda: "does not offer it" in w.route.describe(), "the reason", timeout=10)
        assert w.pool.agreed_protocol == 2
        assert len(w.listener) == 0 and not w.located
    finally:
        await w.close()


class _Ignore:
    def stream_data(self, data: bytes) -> None:
        pass

    def stream_eof(self) -> None:
        pass

    def stream_reset(self) -> None:
        pass

    def stream_writable(self) -> None:
        pass

    def dial_result(self, error: object, message: str) -> None:
        pass
