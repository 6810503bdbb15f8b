"""The manager's health listener: the kubelet's probes, and nothing else.

The tunnel listens on the pod's loopback, out of the probes' reach, so readiness needs a
listener on the pod network. Anyone in the cluster can reach it, so it answers exactly one
question (`GET /readyz`: is the tunnel listener up?) with a status code and a fixed body,
reads a bounded request within a deadline, and serves a bounded number of clients at once.
`respond` is the whole protocol, pure; `HealthServer` is the asyncio shell around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from telepresence.manager.config import READY_PATH

log = logging.getLogger("telepresence.manager.health")

#: A probe's request head is ~100 bytes (request line, Host, User-Agent, Accept,
#: Connection); anything much larger is not a probe.
MAX_REQUEST = 2048
#: The kubelet's default probe timeout is 1 s; a client slower than this is not a probe.
READ_TIMEOUT = 5.0
#: Clients served at once; more are closed at once, so the pod network cannot pile up
#: tasks in the manager through this port.
MAX_CLIENTS = 16

_REASONS = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}
_BODIES = {200: b"ok\n", 404: b"not found\n", 503: b"not ready\n"}


def status_for(head: bytes, *, ready: bool) -> int:
    """200 or 503 for ``GET /readyz`` over HTTP/1.x, by readiness; 404 for anything else."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if (
        len(parts) == 3
        and parts[0] == b"GET"
        and parts[1] == READY_PATH.encode()
        and parts[2] in (b"HTTP/1.0", b"HTTP/1.1")
    ):
        return 200 if ready else 503
    return 404


def respond(head: bytes, *, ready: bool) -> bytes:
    """The complete response to a request head (everything before the blank line)."""
    status = status_for(head, ready=ready)
    body = _BODIES[status]
    return (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


class HealthServer:
    """Answers probes; ``ready`` is asked afresh for every request."""

    def __init__(
        self,
        *,
        ready: Callable[[], bool],
        read_timeout: float = READ_TIMEOUT,
        max_request: int = MAX_REQUEST,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.ready = ready
        self.read_timeout = read_timeout
        self.max_request = max_request
        self.max_clients = max_clients
        self.clients = 0

    async def start(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._client, host, port, limit=self.max_request)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.clients >= self.max_clients:
            writer.transport.abort()
            return
        self.clients += 1
        try:
            with contextlib.suppress(ConnectionError, TimeoutError, asyncio.IncompleteReadError):
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout)
                except asyncio.LimitOverrunError:
                    log.debug("health: request over %d bytes, closed", self.max_request)
                    return
                writer.write(respond(head, ready=self.ready()))
                await asyncio.wait_for(writer.drain(), self.read_timeout)
        finally:
            self.clients -= 1
            writer.close()
