"""The traffic manager's network side: tunnels from laptops, sessions, dials, DNS.

Each port-forward from a laptop arrives as one TCP connection on the tunnel port and
carries one multiplexed `Tunnel`. A laptop keeps a small pool of them; they share one
session, identified by the session id the first `Arrive` got back. A session may also
send links over the direct transport (`directlisten.py`): TLS connections that arrive
already bound to it, and may do nothing but join it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from telepresence import versions
from telepresence.manager import dialer
from telepresence.manager.dialpolicy import DialPolicy
from telepresence.manager.directlisten import DirectCredentialError, DirectListener
from telepresence.tunnel.endpoint import Buffers, Tunnel, TunnelStream
from telepresence.tunnel.frames import Dial, DialError
from telepresence.tunnel.messages import (
    INCOMPATIBLE,
    UNKNOWN_SESSION,
    Arrive,
    ArriveOk,
    ClusterInfo,
    ControlMessage,
    Depart,
    DirectGrant,
    DirectRequest,
    DnsAnswer,
    DnsLookup,
    Draining,
    Remain,
)
from telepresence.tunnel.protocol import Role

log = logging.getLogger("telepresence.manager")

# A laptop sends Remain every few seconds; after this much silence its session is gone.
SESSION_TTL = 30.0
#: The first protocol version whose laptops understand Draining.
DRAINING_PROTOCOL = 2


DnsLookupFn = Callable[[str, int], Awaitable[bytes]]


@dataclass
class Session:
    id: str
    name: str
    install_id: str
    last_seen: float
    tunnels: set[TunnelConnection] = field(default_factory=set)
    client_version: str = ""
    #: The tunnel protocol version agreed at Arrive; every tunnel of the session uses it.
    protocol: int = 1


class TunnelConnection(asyncio.Protocol):
    """One laptop link carrying a Tunnel: a port-forward's TCP connection, or (``direct``)
    a TLS connection of the direct transport."""

    def __init__(self, manager: Manager, *, direct: bool = False) -> None:
        self.manager = manager
        self.direct = direct
        #: A direct link's session, fixed by the credentials its handshake used.
        self.bound_session: str | None = None
        self.transport: asyncio.Transport | None = None
        self.tunnel: Tunnel | None = None
        self.session: Session | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.direct:
            listener = self.manager.direct
            ssl_object = transport.get_extra_info("ssl_object")
            self.bound_session = listener.session_of(ssl_object) if listener else None
            if self.bound_session is None:
                # Its session ended between the handshake and now.
                transport.abort()
                return
        self.manager.connection_opened(self)
        self.tunnel = Tunnel(
            Role.SERVER,
            versions=self.manager.protocol.as_tuple(),
            write=self._write,
            on_open=self._on_open,
            on_control=self._on_control,
            on_closed=self._on_closed,
        )

    def _write(self, buffers: Buffers) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(buffers)

    def data_received(self, data: bytes) -> None:
        assert self.tunnel is not None
        self.tunnel.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tunnel is not None:
            self.tunnel.connection_lost("laptop connection closed")

    def _on_closed(self, reason: str) -> None:
        self.manager.connection_closed(self)
        if self.session is not None:
            self.session.tunnels.discard(self)
        for task in self.tasks:
            task.cancel()
        if self.transport is not None:
            self.transport.close()

    def close(self, reason: str) -> None:
        if self.tunnel is not None:
            self.tunnel.close(reason)

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    # --- control ---------------------------------------------------------------------

    def _on_control(self, message: ControlMessage) -> None:
        assert self.tunnel is not None
        m = self.manager
        if self.direct and not self._direct_may(message):
            return
        if isinstance(message, Arrive):
            try:
                self.session = m.arrive(message, self)
            except versions.IncompatibleVersions as e:
                log.info("refusing %s (client %s): %s", message.name, message.version, e)
                self.close(f"{INCOMPATIBLE}{e}")
                return
            self.tunnel.send_control(
                ArriveOk(self.session.id, m.version, protocol=self.session.protocol)
            )
            if m.cluster_info is not None:
                self.tunnel.send_control(m.cluster_info)
            m._tell_draining(self.session)
        elif isinstance(message, Remain):
            session = m.sessions.get(message.session_id)
            if session is None:
                # Expired, or this manager restarted: the laptop must arrive again.
                self.close(UNKNOWN_SESSION)
                return
            session.last_seen = time.monotonic()
            session.tunnels.add(self)
            self.session = session
            # The echo lets the laptop tell a live link from one that silently died.
            self.tunnel.send_control(Remain(session.id))
            if m.draining is not None and session.protocol >= DRAINING_PROTOCOL:
                self.tunnel.send_control(m.draining)
        elif isinstance(message, Depart):
            m.depart(message.session_id)
        elif isinstance(message, DnsLookup):
            self._spawn(self._lookup(message), f"dns:{message.qname}")
        elif isinstance(message, DirectRequest):
            self.tunnel.send_control(self._grant(message))
        else:
            log.debug("ignoring %s from a laptop", type(message).__name__)

    def _direct_may(self, message: ControlMessage) -> bool:
        """A direct link is its session's and nothing else: it joins with Remain of that
        session, never arrives anew or speaks for another."""
        if isinstance(message, Arrive) or (
            isinstance(message, Remain | Depart) and message.session_id != self.bound_session
        ):
            log.info("closing a direct link that spoke for another session")
            self.close("a direct link belongs to the session of its credentials")
            return False
        return not isinstance(message, DirectRequest)

    def _grant(self, message: DirectRequest) -> DirectGrant:
        m = self.manager
        if self.session is None:
            return DirectGrant(error="no session: send Arrive or Remain first")
        if m.direct is None:
            return DirectGrant(error="this traffic manager has no direct listener")
        try:
            m.direct.register(self.session.id, message)
        except DirectCredentialError as e:
            log.info("session %s: direct transport refused: %s", self.session.id, e)
            return DirectGrant(error=str(e))
        log.info("session %s may use the direct transport", self.session.id)
        return DirectGrant(port=m.direct_port)

    async def _lookup(self, message: DnsLookup) -> None:
        assert self.tunnel is not None
        try:
            answer = await self.manager.dns_lookup(message.qname, message.qtype)
            reply = DnsAnswer(message.request_id, 0, answer)
        except Exception as e:
            log.info("DNS lookup %s/%s failed: %s", message.qname, message.qtype, e)
            reply = DnsAnswer(message.request_id, 2)  # SERVFAIL
        self.tunnel.send_control(reply)

    # --- streams ---------------------------------------------------------------------

    def _on_open(self, stream: TunnelStream, dial: Dial) -> None:
        if self.session is None:
            stream.reject(DialError.FAILED, "no session: send Arrive or Remain first")
            return
        task = dialer.open_stream(
            stream, dial, session=self.session.id, protocol=self.session.protocol,
            policy=self.manager.dial_policy,
        )  # fmt: skip
        if task is not None:
            self._spawn(task, f"dial:{dial.address}:{dial.port}")


class Manager:
    def __init__(
        self,
        *,
        dns_lookup: DnsLookupFn,
        dial_policy: DialPolicy | None = None,
        session_ttl: float = SESSION_TTL,
        version: str | None = None,
        protocol: versions.ProtocolRange | None = None,
        direct: DirectListener | None = None,
        direct_port: int = 0,
    ) -> None:
        self.dns_lookup = dns_lookup
        #: The direct transport's listener and its pod port; None: port-forward only.
        self.direct = direct
        self.direct_port = direct_port
        # What this manager reports and speaks; tests fake both through the environment.
        self.version = version or versions.package_version()
        self.protocol = protocol or versions.protocol_range()
        # Without an explicit policy, the defaults: a manager is never an open relay.
        self.dial_policy = dial_policy if dial_policy is not None else DialPolicy()
        self.session_ttl = session_ttl
        self.sessions: dict[str, Session] = {}
        self.cluster_info: ClusterInfo | None = None
        self.connections: set[TunnelConnection] = set()
        #: Set by :meth:`drain`: not ready any more, and every laptop told to move.
        self.draining: Draining | None = None
        self._connections_changed = asyncio.Event()

    def connection_opened(self, conn: TunnelConnection) -> None:
        self.connections.add(conn)
        self._connections_changed.set()

    def connection_closed(self, conn: TunnelConnection) -> None:
        self.connections.discard(conn)
        self._connections_changed.set()

    def drain(self, seconds: float) -> None:
        """The pod is stopping: tell every laptop that can understand it, and keep serving
        (open flows finish here, new ones too until the laptop has a replacement)."""
        if self.draining is not None:
            return
        self.draining = Draining(seconds)
        log.info(
            "stopping: %d sessions, %d connections told to move within %.0f s",
            len(self.sessions),
            len(self.connections),
            seconds,
        )
        for session in self.sessions.values():
            self._tell_draining(session)

    def _tell_draining(self, session: Session) -> None:
        if self.draining is None or session.protocol < DRAINING_PROTOCOL:
            return
        for conn in session.tunnels:
            if conn.tunnel is not None and not conn.tunnel.closed:
                conn.tunnel.send_control(self.draining)

    async def drained(self, *, deadline: float) -> bool:
        """Waits until no laptop connection is left (True) or ``deadline`` (monotonic)."""
        while self.connections:
            self._connections_changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._connections_changed.wait(), remaining)
            except TimeoutError:
                return False
        return True

    def arrive(self, message: Arrive, conn: TunnelConnection) -> Session:
        """A new session, at the highest protocol version both sides speak. Raises
        IncompatibleVersions (worded for the laptop's user) when they share none."""
        try:
            client = versions.ProtocolRange(message.protocol_min, message.protocol_max)
        except ValueError as e:
            raise versions.IncompatibleVersions(f"the client sent {e}") from None
        protocol = versions.negotiate(
            client=client,
            manager=self.protocol,
            client_version=message.version,
            manager_version=self.version,
        )
        session = Session(
            id=uuid.uuid4().hex,
            name=message.name,
            install_id=message.install_id,
            last_seen=time.monotonic(),
            tunnels={conn},
            client_version=message.version,
            protocol=protocol,
        )
        self.sessions[session.id] = session
        log.info(
            "session %s arrived from %s (client %s, protocol %d)",
            session.id,
            message.name,
            message.version,
            protocol,
        )
        return session

    def depart(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if self.direct is not None:
            self.direct.forget(session_id)
        if session is not None:
            log.info("session %s departed", session_id)
            for conn in list(session.tunnels):
                conn.close("session ended")

    def set_cluster_info(self, info: ClusterInfo) -> None:
        if info == self.cluster_info:
            return
        self.cluster_info = info
        log.info("cluster info: %s", info)
        for session in self.sessions.values():
            for conn in session.tunnels:
                if conn.tunnel is not None:
                    conn.tunnel.send_control(info)

    async def expire_sessions(self, *, interval: float = 5.0, rounds: int | None = None) -> None:
        """Drops sessions whose laptop stopped sending Remain (it crashed or vanished)."""
        done = 0
        while rounds is None or done < rounds:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for sid, session in list(self.sessions.items()):
                if now - session.last_seen > self.session_ttl:
                    log.info("session %s expired", sid)
                    self.depart(sid)
            done += 1
