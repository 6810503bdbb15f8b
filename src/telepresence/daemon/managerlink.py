"""One connection to a traffic manager pod, carrying one multiplexed Tunnel.

The connection is a port-forward through the API server, or a direct TLS connection
(`direct.py`); the link does not care which. The pool (:mod:`.pool`) holds several; each
knows the pod it reaches and the session it belongs to, so that links to a stopping
manager can drain while new ones serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Protocol, cast

from telepresence import versions
from telepresence.tunnel.endpoint import Buffers, Tunnel
from telepresence.tunnel.messages import ControlMessage
from telepresence.tunnel.protocol import Role

# Messages on a WebSocket are bounded so one large write never monopolises the socket.
MAX_MESSAGE = 256 * 1024


#: The two ways to reach a manager pod, as `status` names them.
PORT_FORWARD = "port-forward"
DIRECT = "direct"


class LinkConnection(Protocol):
    """A byte stream to the manager's tunnel: `k8s.portforward.PortForward` or
    `direct.DirectConnection`."""

    async def send_buffers(self, buffers: list[bytes | memoryview]) -> None: ...

    async def receive(self) -> bytes:
        """The next bytes; b"" at the end of the stream."""
        ...

    async def close(self) -> None: ...


class ImmediateWrite(Protocol):
    """A LinkConnection that can take bytes without waiting (direct.DirectConnection): the
    link writes through it at once instead of waking its writer task, one event-loop
    pass less on every frame."""

    def write_now(self, buffers: list[bytes | memoryview]) -> bool:
        """Written (True), or not at all because the connection pushes back (False)."""
        ...


class ManagerLink:
    """A Tunnel over one LinkConnection: a reader and a writer task."""

    def __init__(
        self,
        conn: LinkConnection,
        *,
        pod: str,
        on_control: Callable[[ManagerLink, ControlMessage], None],
        on_closed: Callable[[ManagerLink, str], None],
        protocol: versions.ProtocolRange,
        transport: str = PORT_FORWARD,
    ) -> None:
        self.conn = conn
        #: PORT_FORWARD or DIRECT.
        self.transport = transport
        #: The manager pod at the other end, and the session this link belongs to.
        self.pod = pod
        self.session_id = ""
        #: The manager said it is stopping (or its pod is): no new flows here if avoidable.
        self.draining = False
        #: Set by :meth:`start`; names the link's task and, in `status --flows`, the link.
        self.name = ""
        self._out: Buffers = []
        self._wake = asyncio.Event()
        #: The writer task holds bytes it has not written yet: nothing may overtake them.
        self._sending = False
        self._write_now = (
            cast(ImmediateWrite, conn).write_now if hasattr(conn, "write_now") else None
        )
        self._on_closed = on_closed
        self.tunnel = Tunnel(
            Role.CLIENT,
            versions=protocol.as_tuple(),
            write=self._write,
            on_control=lambda message: on_control(self, message),
            on_closed=lambda reason: on_closed(self, reason),
        )
        self.task: asyncio.Task[None] | None = None
        self.last_heard = time.monotonic()

    def _write(self, buffers: Buffers) -> None:
        if (
            self._write_now is not None
            and not self._out
            and not self._sending
            and self._write_now(buffers)
        ):
            return
        self._out.extend(buffers)
        self._wake.set()

    def start(self, name: str) -> None:
        self.name = name
        self.task = asyncio.create_task(self._run(), name=name)

    async def _run(self) -> None:
        writer = asyncio.create_task(self._writer(), name="tunnel-writer")
        reason = f"{self.transport} closed"
        try:
            while True:
                data = await self.conn.receive()
                if not data:
                    break
                self.last_heard = time.monotonic()
                self.tunnel.data_received(data)
                if self.tunnel.closed:
                    break
        except Exception as e:  # the connection, or the API server, failed us
            reason = f"{self.transport} failed: {e or type(e).__name__}"
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            self.tunnel.connection_lost(reason)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.conn.close(), 2)

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._sending = True
            out, self._out = self._out, []
            # Send in bounded messages; the list is usually small frames plus payloads.
            batch: Buffers = []
            size = 0
            for buf in out:
                batch.append(buf)
                size += len(buf)
                if size >= MAX_MESSAGE:
                    await self.conn.send_buffers(batch)
                    batch, size = [], 0
            if batch:
                await self.conn.send_buffers(batch)
            self._sending = False

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
                await asyncio.wait_for(self.conn.send_buffers(self._out), 1)
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
