"""Forwarding a query to the laptop's own nameservers, one after another until one answers.

The asyncio shell around :mod:`.upstreams`: the selector says in what order,
:func:`~.upstreams.attempt_timeouts` how long each; this module does the
exchanges.  Every exchange uses a fresh socket from ``upstream_socket``,
which the network helper made with its mark so that the DNS redirect lets it
pass (the daemon cannot set SO_MARK itself); a fresh socket per query also
keeps source ports random.  The query's bytes go out untouched and the
answer's come back untouched, over UDP or, when the client asked over TCP
(glibc does after a truncated answer), over TCP.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence

from telepresence.daemon.upstreams import Server, UpstreamSelector, attempt_timeouts, try_next
from telepresence.netfilter.resolvconf import DEFAULT_TIMEOUT

__all__ = ["NoUpstreamAnswer", "UpstreamForwarder", "UpstreamSocket"]

log = logging.getLogger("telepresence.daemon.dns")

#: Returns a fresh socket of kind "udp" or "tcp" whose traffic is exempt from
#: the DNS redirect (marked by the network helper).
UpstreamSocket = Callable[[str], Awaitable[socket.socket]]

_LENGTH = struct.Struct("!H")


class NoUpstreamAnswer(OSError):
    """None of the laptop's nameservers answered within the budget."""


class UpstreamForwarder:
    """Sends one query to the laptop's nameservers in the selector's order.

    ``total`` bounds one query (the client gets SERVFAIL after it); each server
    waits at most ``per_server`` of it.  :meth:`set_servers` follows a changed
    resolv.conf: queries already under way finish with the list they started
    with, new ones use the new list.
    """

    def __init__(
        self,
        *,
        servers: Sequence[Server],
        upstream_socket: UpstreamSocket,
        total: float,
        per_server: float,
        hold_down: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._selector = UpstreamSelector(hold_down=hold_down)
        self._selector.update(servers)
        self._upstream_socket = upstream_socket
        self._total = total
        self._per_server = per_server
        self._client_timeout: float = DEFAULT_TIMEOUT
        self._clock = clock

    @property
    def servers(self) -> tuple[Server, ...]:
        return self._selector.servers

    def set_servers(
        self, servers: Sequence[Server], *, client_timeout: float | None = None
    ) -> bool:
        """Forward to ``servers`` from now on; True if the list changed.

        ``client_timeout`` is resolv.conf's ``options timeout:``: how long a
        client waits for one answer.  The budget of a query stays within it,
        so the answer arrives while the client still listens (it resends after
        that, and the resend is steered by what this query learnt).
        """
        if client_timeout is not None:
            self._client_timeout = client_timeout
        changed = self._selector.update(servers)
        if changed:
            log.info(
                "forwarding to the laptop's nameservers %s",
                ", ".join(f"{h}:{p}" for h, p in servers) or "(none)",
            )
        return changed

    def budget(self) -> float:
        return min(self._total, self._client_timeout)

    async def forward(self, wire: bytes, tcp: bool) -> bytes:
        """The first real answer, or the last SERVFAIL/REFUSED/NOTIMP if every server
        gave one; :class:`NoUpstreamAnswer` if none answered at all."""
        order = self._selector.order(self._clock())
        if not order:
            raise NoUpstreamAnswer("the laptop has no nameserver to forward to")
        timeouts = attempt_timeouts(len(order), total=self.budget(), per_server=self._per_server)
        fallback: bytes | None = None
        failures: list[str] = []
        for server, timeout in zip(order, timeouts, strict=True):
            try:
                async with asyncio.timeout(timeout):
                    reply = await self._exchange(server, wire, tcp=tcp)
            except (OSError, TimeoutError, EOFError) as exc:
                self._failed(server, exc)
                failures.append(f"{server[0]}: {type(exc).__name__}")
                continue
            self._selector.answered(server)
            if not try_next(reply):
                return reply
            fallback = reply
        if fallback is not None:
            return fallback
        raise NoUpstreamAnswer("no nameserver answered (" + ", ".join(failures) + ")")

    def _failed(self, server: Server, exc: BaseException) -> None:
        now = self._clock()
        if not self._selector.is_down(server, now) and server in self._selector.servers:
            log.warning(
                "nameserver %s did not answer (%s); asking the others first for %.0f s",
                server[0],
                type(exc).__name__,
                self._selector.hold_down,
            )
        self._selector.failed(server, now)

    async def _exchange(self, server: Server, wire: bytes, *, tcp: bool) -> bytes:
        """One exchange with one server on a marked socket; the caller's timeout ends it."""
        loop = asyncio.get_running_loop()
        with await self._upstream_socket("tcp" if tcp else "udp") as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, server)
            if tcp:
                await loop.sock_sendall(sock, _LENGTH.pack(len(wire)) + wire)
                (size,) = _LENGTH.unpack(await _recv_exactly(loop, sock, 2))
                return await _recv_exactly(loop, sock, size)
            await loop.sock_sendall(sock, wire)
            while True:  # a stray datagram with another id is not our answer
                reply = await loop.sock_recv(sock, 65535)
                if reply[:2] == wire[:2]:
                    return reply


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            raise EOFError("upstream closed the connection")
        data += chunk
    return bytes(data)
