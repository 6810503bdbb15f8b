"""One TCP connection to one pod port through the API server (`pods/portforward`).

The WebSocket subprotocol `v4.channel.k8s.io` carries, per forwarded port, a data channel
and an error channel; every message starts with its channel byte, and the first message on
each channel carries the port (2 bytes, little-endian). There is no half-close: closing the
socket ends both directions.

The WebSocket goes the way the REST calls go (the access's :class:`~telepresence.k8s.api.Route`:
TLS server name, proxy) with the same cached credentials, renewed once on a 401.
"""

from __future__ import annotations

import struct

import aiohttp

from telepresence.k8s.api import Access, ApiError, ApiUnreachable, Forbidden, Unauthorized

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
) -> ApiError | PortForwardError:
    """The one error for a refused port-forward upgrade. A 403 is RBAC: the user may not
    port-forward to the manager's pod, which is exactly who may use the manager. A 401
    (after the credentials were renewed once) is the credentials themselves."""
    if status == 401:
        return Unauthorized(status=401, detail=message)
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
        access: Access,
        *,
        namespace: str,
        pod: str,
        port: int,
    ) -> PortForward:
        """``session`` only pools connections: credentials, TLS and the proxy come from
        ``access``, so any plain ClientSession will do."""
        server = access.server.rstrip("/")
        url = f"{server}/api/v1/namespaces/{namespace}/pods/{pod}/portforward"
        route = access.route
        creds = await access.credentials()
        for attempt in (1, 2):
            try:
                ws = await session.ws_connect(
                    url,
                    params={"ports": str(port)},
                    protocols=(PROTOCOL,),
                    headers=dict(creds.headers),
                    ssl=creds.tls,
                    max_msg_size=0,
                    autoping=True,
                    compress=0,
                    **route.aiohttp_options(),
                )
            except aiohttp.WSServerHandshakeError as e:
                if e.status == 401 and attempt == 1:
                    creds = await access.credentials(rejected=creds)
                    continue
                raise handshake_error(
                    e.status, e.message, namespace=namespace, pod=pod, port=port
                ) from e
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                raise ApiUnreachable(server, e, proxy=route.proxy) from e
            return cls(ws, port)
        raise AssertionError("unreachable")

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
