"""A small, fixed pool of port-forward connections to the traffic manager, one session.

Every flow of the laptop rides one of these connections; a flow picks the least busy one.
Port-forward connections are expensive (a TLS WebSocket through the API server and the
kubelet), so their number stays fixed however many flows there are. When the manager goes
away (its pod was deleted, the API server dropped us) the pool finds the manager again and
re-joins, without the user doing anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from telepresence import versions
from telepresence.k8s.portforward import PortForward
from telepresence.tunnel.endpoint import Buffers, StreamHandler, Tunnel, TunnelStream
from telepresence.tunnel.frames import Dial
from telepresence.tunnel.messages import (
    INCOMPATIBLE,
    UNKNOWN_SESSION,
    Arrive,
    ArriveOk,
    ClusterInfo,
    ControlMessage,
    Depart,
    DnsAnswer,
    DnsLookup,
    Remain,
)
from telepresence.tunnel.protocol import Role

log = logging.getLogger("telepresence.pool")

HEARTBEAT = 5.0
# A link that has carried nothing, not even the manager's heartbeat echo, for this many
# heartbeats is dead: a port-forward whose pod is gone can stay open without a byte.
DEAD_AFTER_HEARTBEATS = 3
# Messages on a WebSocket are bounded so one large write never monopolises the socket.
MAX_MESSAGE = 256 * 1024


class PoolUnavailable(Exception):
    """No connection to the traffic manager right now."""


class IncompatibleManager(Exception):
    """The manager and this client share no protocol version; the message is the one line
    for the user, naming the fix. Retrying cannot help."""


class PortForwardTunnel:
    """A Tunnel over a port-forward WebSocket: a reader and a writer task."""

    def __init__(
        self,
        pf: PortForward,
        *,
        on_control: Callable[[ControlMessage], None],
        on_closed: Callable[[PortForwardTunnel, str], None],
        protocol: versions.ProtocolRange,
    ) -> None:
        self.pf = pf
        self.name = ""
        self._out: Buffers = []
        self._wake = asyncio.Event()
        self._on_closed = on_closed
        self.tunnel = Tunnel(
            Role.CLIENT,
            versions=protocol.as_tuple(),
            write=self._write,
            on_control=on_control,
            on_closed=lambda reason: on_closed(self, reason),
        )
        self.task: asyncio.Task[None] | None = None
        self.last_heard = time.monotonic()

    def _write(self, buffers: Buffers) -> None:
        self._out.extend(buffers)
        self._wake.set()

    def start(self, name: str) -> None:
        """Runs the link; ``name`` names its task and, in `status --flows`, the link."""
        self.name = name
        self.task = asyncio.create_task(self._run(), name=name)

    async def _run(self) -> None:
        writer = asyncio.create_task(self._writer(), name="tunnel-writer")
        reason = "port-forward closed"
        try:
            while True:
                data = await self.pf.receive()
                if not data:
                    break
                self.last_heard = time.monotonic()
                self.tunnel.data_received(data)
                if self.tunnel.closed:
                    break
        except Exception as e:  # the WebSocket or the API server failed us
            reason = f"port-forward failed: {e}"
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            self.tunnel.connection_lost(reason)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pf.close(), 2)

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            out, self._out = self._out, []
            # Send in bounded messages; the list is usually small frames plus payloads.
            batch: Buffers = []
            size = 0
            for buf in out:
                batch.append(buf)
                size += len(buf)
                if size >= MAX_MESSAGE:
                    await self.pf.send_buffers(batch)
                    batch, size = [], 0
            if batch:
                await self.pf.send_buffers(batch)

    def abandon(self, reason: str) -> None:
        """Drop a link that went silent; its reader may be blocked forever, so cancel it."""
        self.tunnel.connection_lost(reason)
        if self.task is not None:
            self.task.cancel()

    async def close(self) -> None:
        self.tunnel.close("laptop disconnecting")
        # Give the writer a moment to put GOAWAY on the wire before the socket goes.
        if self._out:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pf.send_buffers(self._out), 1)
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


@dataclass
class PoolStatus:
    connected: bool
    connections: int
    session_id: str
    manager_version: str
    protocol: int
    reconnects: int


class ManagerPool:
    def __init__(
        self,
        *,
        open_forward: Callable[[], Awaitable[PortForward]],
        size: int,
        client_name: str,
        install_id: str,
        on_cluster_info: Callable[[ClusterInfo], None],
        heartbeat: float = HEARTBEAT,
        version: str | None = None,
        protocol: versions.ProtocolRange | None = None,
        on_link_lost: Callable[[str, str], None] | None = None,
    ) -> None:
        self._open_forward = open_forward
        self.version = version or versions.package_version()
        self.protocol = protocol or versions.protocol_range()
        self.heartbeat = heartbeat
        self.size = size
        self.client_name = client_name
        self.install_id = install_id
        self._on_cluster_info = on_cluster_info
        #: Told (link name, reason) when a link closes while the pool is not closing.
        self._on_link_lost = on_link_lost
        self.tunnels: list[PortForwardTunnel] = []
        # Links are numbered for the whole session, so a name is never reused.
        self._link_ids = itertools.count(1)
        self.session_id = ""
        self.manager_version = ""
        # The protocol version agreed with the manager at the last Arrive.
        self.agreed_protocol = 0
        self.reconnects = 0
        self._arrived: asyncio.Future[ArriveOk] | None = None
        self._first_info: asyncio.Future[ClusterInfo] | None = None
        self._dns: dict[int, asyncio.Future[DnsAnswer]] = {}
        self._request_ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self._closing = False
        self._session_lost = False

    # --- lifecycle -------------------------------------------------------------------

    async def start(self, *, timeout: float = 60) -> ClusterInfo:
        """Joins the manager and returns the cluster info it sent."""
        info = await asyncio.wait_for(self._join(), timeout)
        self._tasks = [
            asyncio.create_task(self._heartbeat(), name="pool-heartbeat"),
            asyncio.create_task(self._keep_full(), name="pool-keeper"),
        ]
        return info

    async def _join(self) -> ClusterInfo:
        loop = asyncio.get_running_loop()
        self._arrived = loop.create_future()
        self._first_info = loop.create_future()
        first = await self._connect()
        first.tunnel.send_control(
            Arrive(
                self.client_name,
                self.install_id,
                self.version,
                protocol_min=self.protocol.min,
                protocol_max=self.protocol.max,
            )
        )
        ok = await self._arrived
        if not self.protocol.min <= ok.protocol <= self.protocol.max:
            # Only a broken manager answers so; a manager that predates ranges says 1.
            raise IncompatibleManager(
                f"the Traffic Manager {ok.manager_version} chose tunnel protocol "
                f"{ok.protocol}, which this client {self.version} does not speak "
                f"({self.protocol}); run `{versions.UPGRADE_COMMAND}`"
            )
        self.session_id = ok.session_id
        self.manager_version = ok.manager_version
        self.agreed_protocol = ok.protocol
        info = await self._first_info
        while len(self.tunnels) < self.size:
            extra = await self._connect()
            extra.tunnel.send_control(Remain(self.session_id))
        return info

    async def _connect(self) -> PortForwardTunnel:
        pf = await self._open_forward()
        t = PortForwardTunnel(
            pf,
            on_control=self._on_control,
            on_closed=self._tunnel_closed,
            protocol=self.protocol,
        )
        self.tunnels.append(t)
        t.start(name=f"tunnel-{next(self._link_ids)}")
        return t

    def _tunnel_closed(self, t: PortForwardTunnel, reason: str) -> None:
        if t in self.tunnels:
            self.tunnels.remove(t)
            if not self._closing:
                log.info("tunnel %s closed: %s", t.name, reason)
                if self._on_link_lost is not None:
                    self._on_link_lost(t.name, reason)
        if UNKNOWN_SESSION in reason:
            # A new manager that never saw our session: every tunnel must arrive again.
            self._session_lost = True
        if self._arrived is not None and not self._arrived.done():
            # Closed before ArriveOk: fail the join now rather than at its timeout.
            _, sep, why = reason.partition(INCOMPATIBLE)
            self._arrived.set_exception(
                IncompatibleManager(why) if sep else PoolUnavailable(reason)
            )
        self._changed.set()

    async def _keep_full(self) -> None:
        """Reopens lost connections; re-joins when the session is gone entirely."""
        backoff = 0.2
        while not self._closing:
            await self._changed.wait()
            self._changed.clear()
            while not self._closing and len(self.tunnels) < self.size:
                try:
                    if self._session_lost or not self.tunnels:
                        # The manager restarted or every link broke: arrive afresh.
                        log.info("re-joining the traffic manager")
                        self._session_lost = False
                        for stale in list(self.tunnels):
                            await stale.close()
                        self.tunnels.clear()
                        for fut in self._dns.values():
                            if not fut.done():
                                fut.set_exception(PoolUnavailable("reconnecting"))
                        self._dns.clear()
                        await asyncio.wait_for(self._join(), 60)
                        self.reconnects += 1
                    else:
                        extra = await self._connect()
                        extra.tunnel.send_control(Remain(self.session_id))
                    backoff = 0.2
                except IncompatibleManager as e:
                    # A teammate replaced the manager with one we cannot talk to.
                    log.warning("cannot re-join the traffic manager: %s", e)
                    await asyncio.sleep(5)
                except Exception as e:
                    log.info("reconnecting to the traffic manager failed: %s", e)
                    for t in list(self.tunnels):
                        if t.tunnel.closed:
                            self.tunnels.remove(t)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5)

    async def _heartbeat(self) -> None:
        """Remain on every link; the manager echoes it, so silence means a dead link."""
        while True:
            await asyncio.sleep(self.heartbeat)
            now = time.monotonic()
            for t in list(self.tunnels):
                if now - t.last_heard > self.heartbeat * DEAD_AFTER_HEARTBEATS:
                    log.info("tunnel silent for %.0fs: reconnecting", now - t.last_heard)
                    t.abandon("no heartbeat from the traffic manager")
                else:
                    t.tunnel.send_control(Remain(self.session_id))

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.tunnels and self.session_id:
            self.tunnels[0].tunnel.send_control(Depart(self.session_id))
        for t in list(self.tunnels):
            await t.close()
        self.tunnels.clear()

    # --- control messages ------------------------------------------------------------

    def _on_control(self, message: ControlMessage) -> None:
        if isinstance(message, ArriveOk):
            if self._arrived is not None and not self._arrived.done():
                self._arrived.set_result(message)
        elif isinstance(message, ClusterInfo):
            if self._first_info is not None and not self._first_info.done():
                self._first_info.set_result(message)
            self._on_cluster_info(message)
        elif isinstance(message, DnsAnswer):
            fut = self._dns.pop(message.request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(message)

    async def dns_lookup(self, qname: str, qtype: int, *, timeout: float = 4.0) -> DnsAnswer:
        if not self.tunnels:
            raise PoolUnavailable("not connected to the traffic manager")
        request_id = next(self._request_ids)
        fut: asyncio.Future[DnsAnswer] = asyncio.get_running_loop().create_future()
        self._dns[request_id] = fut
        self.tunnels[request_id % len(self.tunnels)].tunnel.send_control(
            DnsLookup(request_id, qname, qtype)
        )
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._dns.pop(request_id, None)

    # --- streams ---------------------------------------------------------------------

    def open_stream(self, dial: Dial, handler: StreamHandler) -> TunnelStream:
        live = [t for t in self.tunnels if not t.tunnel.closed]
        if not live:
            raise PoolUnavailable("not connected to the traffic manager")
        best = min(live, key=lambda t: len(t.tunnel.streams))
        return best.tunnel.open_stream(dial, handler)

    def link_name(self, stream: TunnelStream) -> str:
        """The name of the link a stream rides on ("" once the link is gone)."""
        for t in self.tunnels:
            if t.tunnel is stream.tunnel:
                return t.name
        return ""

    def status(self) -> PoolStatus:
        return PoolStatus(
            connected=bool(self.tunnels),
            connections=len(self.tunnels),
            session_id=self.session_id,
            manager_version=self.manager_version,
            protocol=self.agreed_protocol,
            reconnects=self.reconnects,
        )
