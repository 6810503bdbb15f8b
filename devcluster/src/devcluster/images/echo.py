"""Test image: TCP or UDP echo."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import cast


class _TcpEcho(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


async def serve(protocol: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    if protocol == "tcp":
        server = await loop.create_server(_TcpEcho, "0.0.0.0", port, reuse_address=True)
        await server.serve_forever()
    else:
        await loop.create_datagram_endpoint(_UdpEcho, local_addr=("0.0.0.0", port))
        # A TCP listener on the same port lets the readiness probe see the pod is up.
        server = await loop.create_server(_TcpEcho, "0.0.0.0", port, reuse_address=True)
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol", choices=["tcp", "udp"], default="tcp")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "9000")))
    args = parser.parse_args()
    asyncio.run(serve(args.protocol, args.port))


if __name__ == "__main__":
    main()
