"""Marked UDP sockets made ahead, so a forwarded DNS query does not wait for the helper.

The daemon cannot set SO_MARK itself: every upstream socket comes from the network helper,
one request and answer over its Unix socket, another process to wake. On the query's own
path that round trip was a good part of what a connected laptop added to each of its
lookups. The stock holds a few sockets made before they are needed and refills itself in
the background after each one taken. The sockets are unbound and unconnected until used,
so every query still gets a source port of its own, picked by the kernel when it connects.
TCP sockets, rare (glibc's retry after a truncated answer), are still made on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable

__all__ = ["SocketStock"]

log = logging.getLogger("telepresence.dns")

#: Sockets kept ready: more than a page's burst of lookups needs while the refill runs.
STOCK = 8


class SocketStock:
    """``make(kind)`` is the helper's socket factory; :meth:`take` has its signature."""

    def __init__(
        self, make: Callable[[str], Awaitable[socket.socket]], *, size: int = STOCK
    ) -> None:
        self._make = make
        self._size = size
        self._ready: deque[socket.socket] = deque()
        self._refill: asyncio.Task[None] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._ready)

    async def take(self, kind: str) -> socket.socket:
        """A fresh socket of ``kind`` ("udp" or "tcp"), the caller's to close."""
        if kind != "udp" or self._closed:
            return await self._make(kind)
        self._refill_soon()
        if self._ready:
            return self._ready.popleft()
        return await self._make(kind)

    def _refill_soon(self) -> None:
        if self._refill is None or self._refill.done():
            self._refill = asyncio.create_task(self._fill(), name="dns-socket-stock")

    async def _fill(self) -> None:
        while len(self._ready) < self._size and not self._closed:
            try:
                sock = await self._make("udp")
            except Exception as e:  # the helper is gone or refused: queries ask it themselves
                log.debug("no socket for the stock: %s", e)
                return
            if self._closed:
                sock.close()
                return
            self._ready.append(sock)

    async def close(self) -> None:
        self._closed = True
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refill
        while self._ready:
            self._ready.popleft().close()
