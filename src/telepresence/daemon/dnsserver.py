"""The DNS server on 127.0.0.1: the asyncio shell around :class:`~.dns.Resolver`.

UDP and TCP on one port.  In "redirect" DNS mode nftables sends the queries for
the laptop's nameservers here; in "resolved" mode the helper sends TCP queries
to the TUN's DNS address here (UDP ones arrive through the TUN:
:class:`~telepresence.daemon.udp.UdpRelay`).  Every query is a named, tracked
task, at most :attr:`~.dns.DnsSettings.max_pending` at once.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
from collections.abc import Callable, Coroutine, Sequence
from ipaddress import IPv4Network
from types import TracebackType
from typing import Any, cast

from telepresence.daemon.dns import (
    ClusterAnswerHook,
    ClusterLookup,
    DnsObserver,
    DnsSettings,
    Resolver,
)
from telepresence.daemon.dnsanswers import take_frames, tcp_frame
from telepresence.daemon.dnsrules import NameRules
from telepresence.daemon.forwarder import UpstreamForwarder, UpstreamSocket
from telepresence.daemon.upstreams import Server

__all__ = ["DnsServer"]

log = logging.getLogger("telepresence.daemon.dns")

_DEFAULT_SETTINGS = DnsSettings()


class DnsServer:
    """DNS over UDP and TCP on ``host:port`` (port 0: any free port, the same
    for both), answering through a :class:`~.dns.Resolver`.

    Use ``async with DnsServer(...) as server`` or :meth:`start` /
    :meth:`close`; :attr:`port` is the bound port.

    ``rules`` and ``cluster_subnets`` are called for every query, so they may
    change while connected.  ``cluster_lookup`` asks the cluster's resolver
    (through the tunnel) for one absolute name.  ``upstreams`` are the laptop's
    original nameservers, in resolv.conf order, tried one after another
    (:attr:`upstreams` follows a changed list); every exchange uses a fresh
    socket from ``upstream_socket`` (marked by the network helper so that the
    redirect leaves it alone).  ``on_cluster_answer`` gets the IPv4 addresses of each
    fresh cluster answer (cached answers are not reported again), before the
    client sees them, so routes to addresses outside the routed subnets can be
    added in time.  ``observer`` is told the names of cluster answers and the
    queries that failed (for `status --flows`).
    """

    def __init__(
        self,
        *,
        rules: Callable[[], NameRules],
        cluster_subnets: Callable[[], Sequence[IPv4Network]],
        cluster_lookup: ClusterLookup,
        upstreams: Sequence[Server],
        upstream_socket: UpstreamSocket,
        on_cluster_answer: ClusterAnswerHook | None = None,
        observer: DnsObserver | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        settings: DnsSettings = _DEFAULT_SETTINGS,
    ) -> None:
        self.upstreams = UpstreamForwarder(
            servers=upstreams,
            upstream_socket=upstream_socket,
            total=settings.upstream_timeout,
            per_server=settings.upstream_server_timeout,
            hold_down=settings.upstream_hold_down,
        )
        self._host = host
        self._requested_port = port
        self._settings = settings
        self.resolver = Resolver(
            rules=rules,
            cluster_subnets=cluster_subnets,
            cluster_lookup=cluster_lookup,
            forward=self.upstreams.forward,
            on_cluster_answer=on_cluster_answer,
            observer=observer,
            settings=settings,
        )
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[_TcpConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._task_ids = itertools.count(1)
        self._port = 0
        self._closed = False

    @property
    def port(self) -> int:
        """The port bound for both UDP and TCP (0 before :meth:`start`)."""
        return self._port

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> int:
        """Bind UDP and TCP and start answering; return the bound port."""
        if self._udp is not None or self._closed:
            raise RuntimeError("DnsServer.start() called twice")
        loop = asyncio.get_running_loop()
        # With port 0, UDP picks a port and TCP must get the same one; another
        # process may hold that TCP port, so try a few UDP ports.
        attempts = 1 if self._requested_port else 20
        for attempt in range(attempts):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self._host, self._requested_port)
            )
            port = int(udp.get_extra_info("sockname")[1])
            try:
                self._tcp = await loop.create_server(
                    lambda: _TcpConnection(self), self._host, port, reuse_address=True
                )
            except OSError as exc:
                udp.close()
                if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                    raise
                continue
            self._udp = udp
            self._port = port
            break
        log.info("DNS server listening on %s:%d (udp, tcp)", self._host, self._port)
        return self._port

    async def close(self) -> None:
        """Stop listening, cancel every query in progress, close every socket."""
        if self._closed:
            return
        self._closed = True
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for connection in list(self._connections):
            connection.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.resolver.close()
        if self._tcp is not None:
            await self._tcp.wait_closed()

    def _spawn(self, coro: Coroutine[Any, Any, None], kind: str) -> bool:
        """Run one query's coroutine as a named, tracked task; False if refused."""
        if self._closed or len(self._tasks) >= self._settings.max_pending:
            coro.close()
            log.warning("DNS server busy: dropping a %s query", kind)
            return False
        task = asyncio.create_task(coro, name=f"dns-{kind}-query-{next(self._task_ids)}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return True

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("DNS task %s failed", task.get_name(), exc_info=exc)

    async def _reply_udp(self, wire: bytes, addr: tuple[str, int]) -> None:
        reply = await self.resolver.answer(wire, tcp=False)
        if reply is not None and self._udp is not None and not self._udp.is_closing():
            self._udp.sendto(reply, addr)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._server._spawn(self._server._reply_udp(data, addr), "udp")

    def error_received(self, exc: Exception) -> None:
        # ICMP errors from replies to vanished clients; nothing to do.
        log.debug("DNS UDP socket error: %r", exc)


class _TcpConnection(asyncio.Protocol):
    """One DNS-over-TCP client: length-framed queries, possibly pipelined,
    answered in whatever order they complete (RFC 7766)."""

    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._pending = 0
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's does not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        self._server._connections.add(self)
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        for frame in take_frames(self._buffer):
            if self._server._spawn(self._reply(frame), "tcp"):
                self._pending += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        self._transport = None

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def _reply(self, frame: bytes) -> None:
        try:
            reply = await self._server.resolver.answer(frame, tcp=True)
            if reply is not None and self._transport is not None:
                self._transport.write(tcp_frame(reply))
        finally:
            self._pending -= 1
            self._arm_idle_timer()

    def _arm_idle_timer(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        if self._transport is None:
            return
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(self._server._settings.tcp_idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        if self._transport is None:
            return
        if self._pending:
            self._arm_idle_timer()
        else:
            self._transport.close()
