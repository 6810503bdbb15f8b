"""A small, fixed pool of port-forward connections to the traffic manager, one session.

Every flow of the laptop rides one of these connections; a flow picks the least busy one.
Port-forward connections are expensive (a TLS WebSocket through the API server and the
kubelet), so their number stays fixed however many flows there are. When the manager goes
away (its pod was deleted, the API server dropped us) the pool finds the manager again and
re-joins, without the user doing anything.

A manager that is stopping (it says ``Draining``, or the pod watch sees its pod
terminating) keeps serving: its links are marked draining, the pool joins a ready
replacement at once, and from then on new flows go there while the open ones finish on the
old links, which close when they carry nothing. Until a replacement is ready, new flows
still go to the stopping manager, so a single-replica manager's restart costs no failed
connection either.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from telepresence import versions
from telepresence.daemon.managerlink import DIRECT, PORT_FORWARD, LinkConnection, ManagerLink
from telepresence.daemon.poolkeeper import (
    HEARTBEAT,
    IncompatibleManager,
    PoolKeeper,
    PoolUnavailable,
)
from telepresence.daemon.poolrequests import PendingRequests
from telepresence.k8s.portforward import PortForward
from telepresence.tunnel.endpoint import StreamHandler, TunnelStream
from telepresence.tunnel.frames import Dial
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

__all__ = ["IncompatibleManager", "ManagerPool", "OpenForward", "PoolStatus", "PoolUnavailable"]

log = logging.getLogger("telepresence.pool")

#: One attempt to open a port-forward; a network that drops packets would otherwise hold
#: the attempt for the TCP connect timeout while the API server may be back already.
OPEN_TIMEOUT = 3.0

#: Opens a port-forward to the manager: to ``pod`` when given (the links of one session
#: must reach the same pod), else to the newest ready pod not in ``avoid``; returns the
#: pod's name with it. Raises PoolUnavailable when there is no such pod.
OpenForward = Callable[[str | None, frozenset[str]], Awaitable[tuple[str, PortForward]]]


@dataclass
class PoolStatus:
    #: ``reason``: why the pool last lost a link or failed to reconnect, for a
    #: "Reconnecting" status.
    connected: bool
    connections: int
    session_id: str
    manager_version: str
    protocol: int
    reconnects: int
    reason: str = ""


class ManagerPool(PoolKeeper):
    def __init__(
        self,
        *,
        open_forward: OpenForward,
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
        self.tunnels: list[ManagerLink] = []
        # Links are numbered for the whole session, so a name is never reused.
        self._link_ids = itertools.count(1)
        self.session_id = ""
        self.manager_version = ""
        # The protocol version agreed with the manager at the last Arrive.
        self.agreed_protocol = 0
        self.reconnects = 0
        self._arrived: asyncio.Future[ArriveOk] | None = None
        self._first_info: asyncio.Future[ClusterInfo] | None = None
        self._requests = PendingRequests()
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self._closing = False
        self._session_lost = False
        #: Why the pool last lost a link or failed to reopen one (for `status`).
        self.last_problem = ""
        #: What the reconnect loop has logged since it last succeeded (`_log_once`).
        self._said: set[str] = set()
        #: Pods not to join: stopping (Draining, or terminating in the pod watch).
        self._avoid: set[str] = set()

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
        first = await self._connect(None)
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
        first.session_id = ok.session_id
        info = await self._first_info
        while len(self._forwards()) < self.size and not first.draining:
            await self._add_link(first.pod)
        return info

    async def _add_link(self, pod: str) -> None:
        extra = await self._connect(pod)
        extra.session_id = self.session_id
        extra.tunnel.send_control(Remain(self.session_id))

    async def _connect(self, pod: str | None) -> ManagerLink:
        name, pf = await asyncio.wait_for(
            self._open_forward(pod, frozenset(self._avoid)), OPEN_TIMEOUT
        )
        return self._start_link(pf, name, PORT_FORWARD)

    def _start_link(self, conn: LinkConnection, pod: str, transport: str) -> ManagerLink:
        """A new link in the pool, running; named for `status --flows` (tunnel-N or
        direct-N, numbered across the session)."""
        t = ManagerLink(
            conn,
            pod=pod,
            on_control=self._on_control,
            on_closed=self._tunnel_closed,
            protocol=self.protocol,
            transport=transport,
        )
        self.tunnels.append(t)
        prefix = "direct" if transport == DIRECT else "tunnel"
        t.start(name=f"{prefix}-{next(self._link_ids)}")
        return t

    def healthy(self) -> list[ManagerLink]:
        """The links new flows go to: open, in a session (a link still arriving would have
        its streams refused), and not to a stopping manager."""
        return [t for t in self.tunnels if t.session_id and not t.draining and not t.tunnel.closed]

    def _forwards(self) -> list[ManagerLink]:
        """The healthy port-forward links: the pool keeps `size` of them whatever else it
        has, so losing the direct path never leaves new flows without a link."""
        return [t for t in self.healthy() if t.transport == PORT_FORWARD]

    def _preferred(self) -> list[ManagerLink]:
        """Where new flows go: the direct links when there are any, else every serving one."""
        live = self._serving()
        return [t for t in live if t.transport == DIRECT] or live

    def _serving(self) -> list[ManagerLink]:
        """Where new flows go: the healthy links, else those to a stopping manager that
        still serves until a replacement has arrived."""
        return self.healthy() or [t for t in self.tunnels if t.session_id and not t.tunnel.closed]

    @property
    def manager_pod(self) -> str:
        """The pod new flows go to (a stopping one when no replacement is ready yet)."""
        links = self.healthy() or self.tunnels
        return links[0].pod if links else ""

    def mark_draining(self, pod: str, why: str) -> None:
        """The manager in ``pod`` is stopping: move new flows to a replacement when ready."""
        if not pod or pod in self._avoid:
            return
        self._avoid.add(pod)
        links = [t for t in self.tunnels if t.pod == pod]
        for t in links:
            t.draining = True
        if links:
            log.info("traffic manager %s is stopping (%s): moving to a replacement", pod, why)
        self._changed.set()

    def manager_pods(self, *, stopping: set[str], ready: set[str]) -> None:
        """From the pod watch: pods being deleted drain; a pod that became ready may be the
        replacement the keeper is waiting for."""
        for pod in stopping:
            self.mark_draining(pod, "its pod is terminating")
        self._avoid &= stopping | {t.pod for t in self.tunnels if t.draining}
        if ready - self._avoid and not self.healthy():
            self._changed.set()

    async def _reap_draining(self) -> None:
        """Close drained links once a replacement serves: the stopping manager exits
        when its last link closes, well before its grace period ends."""
        if not self.healthy():
            return
        for t in [t for t in self.tunnels if t.draining and not t.tunnel.streams]:
            self.tunnels.remove(t)
            await t.close()

    def _tunnel_closed(self, t: ManagerLink, reason: str) -> None:
        if t in self.tunnels:
            self.tunnels.remove(t)
            if not self._closing:
                log.info("tunnel %s to %s closed: %s", t.name, t.pod or "the manager", reason)
                if not t.draining:
                    self.last_problem = reason
                if self._on_link_lost is not None:
                    self._on_link_lost(t.name, reason)
        if UNKNOWN_SESSION in reason and not t.draining:
            # A new manager that never saw our session: every tunnel must arrive again.
            self._session_lost = True
        if self._arrived is not None and not self._arrived.done():
            # Closed before ArriveOk: fail the join now rather than at its timeout.
            _, sep, why = reason.partition(INCOMPATIBLE)
            self._arrived.set_exception(
                IncompatibleManager(why) if sep else PoolUnavailable(reason)
            )
        self._changed.set()

    def _lose_pending(self) -> None:
        """A re-join: nothing asked in the old session will be answered."""
        self._requests.fail_all(PoolUnavailable("reconnecting"))

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for session_id in {t.session_id for t in self.tunnels if t.session_id}:
            link = next(t for t in self.tunnels if t.session_id == session_id)
            link.tunnel.send_control(Depart(session_id))
        for t in list(self.tunnels):
            await t.close()
        self.tunnels.clear()

    # --- control messages ------------------------------------------------------------

    def _on_control(self, link: ManagerLink, message: ControlMessage) -> None:
        if isinstance(message, Draining):
            self.mark_draining(link.pod, f"it has {message.seconds:.0f} s left")
        elif isinstance(message, ArriveOk):
            if self._arrived is not None and not self._arrived.done():
                self._arrived.set_result(message)
        elif isinstance(message, ClusterInfo):
            if self._first_info is not None and not self._first_info.done():
                self._first_info.set_result(message)
            self._on_cluster_info(message)
        elif isinstance(message, DnsAnswer | DirectGrant):
            self._requests.answered(message)

    async def dns_lookup(self, qname: str, qtype: int, *, timeout: float = 4.0) -> DnsAnswer:
        links = self._preferred()
        if not links:
            raise PoolUnavailable("not connected to the traffic manager")
        request_id, fut = self._requests.new_lookup()
        links[request_id % len(links)].tunnel.send_control(DnsLookup(request_id, qname, qtype))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._requests.forget_lookup(request_id)

    # --- the direct transport (`direct.py`) --------------------------------------------

    def control_pod(self) -> str:
        """The pod of the session's port-forward links, which the direct links must reach.
        Raises PoolUnavailable when there is none."""
        for t in self._forwards():
            return t.pod
        raise PoolUnavailable("no port-forward link to the traffic manager")

    async def request_direct(self, request: DirectRequest, *, timeout: float = 5) -> DirectGrant:
        """Registers the direct transport's credentials over a port-forward link (the one
        RBAC authenticated), and returns the manager's answer."""
        links = self._forwards()
        if not links:
            raise PoolUnavailable("no port-forward link to the traffic manager")
        fut = self._requests.new_grant()
        links[0].tunnel.send_control(request)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise PoolUnavailable(f"the traffic manager did not answer in {timeout:g}s") from None

    def add_direct_link(self, pod: str, conn: LinkConnection) -> ManagerLink:
        """A link over the direct transport joins the session; new flows prefer it."""
        t = self._start_link(conn, pod, DIRECT)
        t.session_id = self.session_id
        t.tunnel.send_control(Remain(self.session_id))
        return t

    # --- streams ---------------------------------------------------------------------

    def open_stream(self, dial: Dial, handler: StreamHandler) -> TunnelStream:
        live = self._preferred()
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
            reason=self.last_problem,
        )
