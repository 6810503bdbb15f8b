"""One TCP connection to one pod port through the API server (`pods/portforward`).

The WebSocket subprotocol `v4.channel.k8s.io` carries, per forwarded port, a data channel
and an error channel; every message starts with its channel byte, and the first message on
each channel carries the port (2 bytes, little-endian). There is no half-close: closing the
socket ends both directions.
"""

from __future__ import annotations

import ssl
import struct

import aiohttp

from telepresence.k8s.api import Forbidden
from telepresence.k8s.kubeconfig import ClusterAccess

PROTOCOL = "v4.channel.k8s.io"
DATA = 0
ERROR = 1


class PortForwardError(Exception):
    """The API server or the kubelet refused or broke the forward."""


def portforward_hint(namespace: str) -> str:
    """How a user gets the right to use the manager: RBAC on its pod, nothing else."""
    return (
        f"ask a cluster admin to bind you a Role in namespace {namespace} that allows "
        "create on pods/portforward and get, list on pods (see 'Who can use the manager' "
        "in docs/architecture.md)"
    )


def handshake_error(
    status: int, message: str, *, namespace: str, pod: str, port: int
) -> Forbidden | PortForwardError:
    """The one error for a refused port-forward upgrade. A 403 is RBAC: the user may not
    port-forward to the manager's pod, which is exactly who may use the manager."""
    if status == 403:
        return Forbidden(
            detail=message,
            verb="create",
            resource="pods/portforward",
            namespace=namespace,
            hint=portforward_hint(namespace),
        )
    return PortForwardError(
        f"port-forward to {namespace}/{pod}:{port} refused: HTTP {status} {message}"
    )


class PortForward:
    """A byte stream to a pod port. Not thread-safe; one reader task at a time."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, port: int) -> None:
        self._ws = ws
        self.port = port
        self._seen_port = {DATA: False, ERROR: False}
        self._error = bytearray()

    @classmethod
    async def open(
        cls,
        session: aiohttp.ClientSession,
        access: ClusterAccess,
        *,
        namespace: str,
        pod: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> PortForward:
        url = f"{access.server}/api/v1/namespaces/{namespace}/pods/{pod}/portforward"
        try:
            ws = await session.ws_connect(
                url,
                params={"ports": str(port)},
                protocols=(PROTOCOL,),
                headers=access.headers(),
                ssl=ssl_context if ssl_context is not None else access.ssl_context(),
                max_msg_size=0,
                autoping=True,
                compress=0,
            )
        except aiohttp.WSServerHandshakeError as e:
            raise handshake_error(
                e.status, e.message, namespace=namespace, pod=pod, port=port
            ) from e
        return cls(ws, port)

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        await self._ws.send_bytes(b"\x00" + bytes(data))

    async def send_buffers(self, buffers: list[bytes | memoryview]) -> None:
        """Sends buffers as one message: one join, with the channel byte in front."""
        await self._ws.send_bytes(b"".join([b"\x00", *buffers]))

    async def receive(self) -> bytes:
        """The next bytes from the pod; b"" at the end of the stream."""
        while True:
            msg = await self._ws.receive()
            if msg.type != aiohttp.WSMsgType.BINARY:
                if self._error:
                    raise PortForwardError(self._error.decode(errors="replace"))
                return b""
            payload: bytes = msg.data
            if not payload:
                continue
            channel, body = payload[0], payload[1:]
            if channel not in self._seen_port:
                continue
            if not self._seen_port[channel]:
                # The first frame of each channel only echoes the port number.
                if len(body) >= 2 and struct.unpack_from("<H", body)[0] == self.port:
                    self._seen_port[channel] = True
                    body = body[2:]
                if not body:
                    continue
            if channel == ERROR:
                self._error += body
                raise PortForwardError(body.decode(errors="replace").strip())
            return body

    async def close(self) -> None:
        await self._ws.close()
