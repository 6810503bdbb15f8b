"""The direct transport: links to the manager's pod over mutual TLS, past the API server.

Through port-forward every byte crosses the API server, the kubelet and the container
runtime, which share the cluster's CPUs with everything else; that path, not our tunnel,
bounds throughput. When the laptop can reach the manager's pod itself (a NodePort on the
pod's node, a load balancer, or an address set in the config file), `DirectRoute` adds
links that go there instead, and new flows prefer them. It never replaces port-forward:
the session's port-forward links stay open, so when the direct path is missing, refused
or breaks, new flows go through port-forward at once and the route tries again later.

The credentials are minted for the session (`directcreds.py`) and registered with the
manager over a port-forward link, which RBAC authenticated: being able to reach the port
is not enough to use it.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import cast

from telepresence.daemon.directcreds import DirectCredentials, mint
from telepresence.daemon.managerlink import DIRECT, PORT_FORWARD
from telepresence.daemon.pool import ManagerPool, PoolUnavailable
from telepresence.directtls import parse_address

log = logging.getLogger("telepresence.direct")

#: The first protocol version whose managers understand DirectRequest.
DIRECT_PROTOCOL = 3
#: Direct links per session: more than one, so a bulk transfer on one does not queue an
#: interactive flow behind its bytes in the same TCP connection.
DIRECT_LINKS = 2
#: A reachable node answers a TCP handshake in milliseconds; a firewall that drops
#: packets would otherwise hold each attempt for the kernel's connect timeout.
CONNECT_TIMEOUT = 2.0
#: How often the route checks that its links are up.
CHECK_EVERY = 1.0
#: Waits between attempts after a failure: 2 s, doubling, at most 60 s.
FIRST_RETRY = 2.0
MAX_RETRY = 60.0
#: Decrypted bytes waiting for the link's reader before the socket stops being read.
READ_CHUNK = 256 * 1024

#: How the direct path is configured: tried when found (the default), or never.
AUTO = "auto"
OFF = "off"


class DirectUnavailable(Exception):
    """No direct path now; the message says why, for `status`."""


@dataclass(frozen=True)
class Endpoint:
    """Where the manager's direct listener may be reached from the laptop, and how that
    was found (for `status` and the log)."""

    host: str
    port: int
    found: str

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def endpoints(
    *,
    configured: str | None,
    node_port: int | None,
    host_ip: str | None,
    ingress: Sequence[str] = (),
    service_port: int = 0,
    routed: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
) -> list[Endpoint]:
    """Where to try, best first: the configured address alone when there is one; else a
    load balancer's ingress, then the NodePort on the node running the session's pod.
    Addresses the laptop routes into the tunnel are left out: a connection to them would
    ride the port-forward it is meant to bypass. Raises DirectUnavailable saying why
    nothing is left."""
    if configured:
        host, port = parse_address(configured)
        return [Endpoint(host, port, "set in the config file")]
    found: list[Endpoint] = []
    found += [Endpoint(h, service_port, "load balancer") for h in ingress if service_port]
    if node_port and host_ip:
        found.append(Endpoint(host_ip, node_port, "NodePort on the manager's node"))
    if not found:
        raise DirectUnavailable("the traffic manager has no NodePort or load balancer")
    usable = [e for e in found if not _routed(e.host, routed)]
    if not usable:
        raise DirectUnavailable(
            f"{found[0]} is inside a subnet routed to the cluster through the tunnel"
        )
    return usable


def _routed(host: str, routed: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a load balancer's name; it resolves outside the cluster subnets
    return any(ip in net for net in routed)


class DirectConnection(asyncio.Protocol):
    """A TLS connection to the manager's direct listener, as a LinkConnection.

    A Protocol rather than asyncio's streams: the decrypted chunks go to the tunnel as the
    TLS layer hands them over, where a StreamReader would copy each into its buffer and
    out again."""

    def __init__(self) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._readable = asyncio.Event()
        self._ended: Exception | None = None
        self._at_eof = False
        self._reading_paused = False
        self._writable: asyncio.Future[None] | None = None
        self._transport: asyncio.Transport | None = None

    @classmethod
    async def open(cls, endpoint: Endpoint, creds: DirectCredentials) -> DirectConnection:
        """Raises DirectUnavailable naming the endpoint and what failed."""
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    cls,
                    endpoint.host,
                    endpoint.port,
                    ssl=creds.client_context(),
                    server_hostname=creds.server_name,
                ),
                CONNECT_TIMEOUT,
            )
        except TimeoutError:
            raise DirectUnavailable(f"no answer from {endpoint} in {CONNECT_TIMEOUT:g}s") from None
        except OSError as e:  # ssl.SSLError included: the wrong pod, or not our listener
            raise DirectUnavailable(f"{endpoint}: {e.strerror or e}") from None
        return conn

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._queued += len(data)
        self._readable.set()
        if self._queued > READ_CHUNK and not self._reading_paused and self._transport:
            # The link's reader is behind: let TCP push back on the manager.
            self._reading_paused = True
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self._at_eof = True
        self._readable.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._at_eof = True
        self._ended = exc
        self._readable.set()
        self.resume_writing()

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # --- LinkConnection ------------------------------------------------------------------

    async def receive(self) -> bytes:
        while not self._chunks:
            if self._at_eof:
                if self._ended is not None:
                    raise self._ended
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = self._chunks.popleft()
        self._queued -= len(data)
        if self._reading_paused and self._queued <= READ_CHUNK // 2 and self._transport:
            self._reading_paused = False
            self._transport.resume_reading()
        return data

    def write_now(self, buffers: list[bytes | memoryview]) -> bool:
        if self._writable is not None or self._transport is None:
            return False
        if self._transport.is_closing():
            return False  # the writer task will say so
        self._transport.writelines(buffers)
        return True

    async def send_buffers(self, buffers: list[bytes | memoryview]) -> None:
        if self._transport is None or self._transport.is_closing():
            raise ConnectionResetError("the direct connection is closed")
        self._transport.writelines(buffers)
        if self._writable is not None:
            await self._writable

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


#: Finds the endpoints of the direct listener on ``pod`` (whose container port is
#: ``port``); raises DirectUnavailable.
Locate = Callable[[str, int], Awaitable[list[Endpoint]]]


class DirectRoute:
    """Keeps `DIRECT_LINKS` direct links in the pool while the manager can be reached
    directly, for whatever session the pool is in (a re-join is a new session with new
    credentials)."""

    def __init__(
        self,
        pool: ManagerPool,
        locate: Locate,
        *,
        mode: str = AUTO,
        mint_credentials: Callable[[], DirectCredentials] = mint,
        check_every: float = CHECK_EVERY,
    ) -> None:
        self.pool = pool
        self._locate = locate
        self.mode = mode
        self._mint = mint_credentials
        self._check_every = check_every
        #: The credentials of the session they were registered in.
        self._granted: tuple[str, DirectCredentials, int] | None = None
        #: What `status` shows: the endpoint in use, or why port-forward carries all.
        self.endpoint: Endpoint | None = None
        self.why_not = "not tried yet" if mode == AUTO else "turned off in the config file"
        self._said = ""

    def describe(self) -> str:
        """One line for `status`: "direct (192.0.2.1:31443, NodePort on …)" or
        "port-forward (direct: why not)"."""
        if self.live_links() and self.endpoint is not None:
            return f"{DIRECT} ({self.endpoint}, {self.endpoint.found})"
        return f"{PORT_FORWARD} (direct: {self.why_not})"

    def live_links(self) -> int:
        sid = self.pool.session_id
        return sum(1 for t in self.pool.healthy() if t.transport == DIRECT and t.session_id == sid)

    async def run(self) -> None:
        if self.mode == OFF:
            return
        retry = FIRST_RETRY
        while True:
            wait = self._check_every
            try:
                if self.live_links() < DIRECT_LINKS:
                    await self._fill()
                retry = FIRST_RETRY
            except (DirectUnavailable, PoolUnavailable) as e:
                self._unavailable(str(e))
                wait, retry = retry, min(retry * 2, MAX_RETRY)
            await asyncio.sleep(wait)

    def _unavailable(self, why: str) -> None:
        self.why_not = why
        if self.live_links():
            return
        self.endpoint = None
        if why != self._said:
            self._said = why
            log.info("direct transport unavailable, using port-forward: %s", why)

    async def _fill(self) -> None:
        pool = self.pool
        session_id = pool.session_id
        if not session_id:
            raise PoolUnavailable("not connected")
        if pool.agreed_protocol < DIRECT_PROTOCOL:
            raise DirectUnavailable(
                f"the traffic manager {pool.manager_version} does not offer it "
                "(`telepresence manager upgrade` does)"
            )
        pod = pool.control_pod()
        if self._granted is None or self._granted[0] != session_id:
            creds = await asyncio.to_thread(self._mint)
            grant = await pool.request_direct(creds.request())
            if grant.error:
                raise DirectUnavailable(f"the traffic manager refused: {grant.error}")
            self._granted = (session_id, creds, grant.port)
        _, creds, port = self._granted
        found = await self._locate(pod, port)
        failures = []
        while self.live_links() < DIRECT_LINKS:
            for endpoint in found:
                try:
                    conn = await DirectConnection.open(endpoint, creds)
                except DirectUnavailable as e:
                    failures.append(str(e))
                    continue
                if pool.session_id != session_id:
                    await conn.close()
                    raise PoolUnavailable("the session changed")
                pool.add_direct_link(pod, conn)
                if self.endpoint != endpoint:
                    log.info("direct transport to %s (%s)", endpoint, endpoint.found)
                self.endpoint = endpoint
                self._said = ""
                break
            else:
                raise DirectUnavailable("; ".join(failures) or "nowhere to connect")
