"""The traffic manager's process. For now it only answers its health port; the session,
DNS and dial service arrive with the outbound-sessions work."""

from __future__ import annotations

import argparse
import asyncio
import os

HEALTH_PORT = 8081


async def _health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
    await writer.drain()
    writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_health, "0.0.0.0", port)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="traffic-manager")
    parser.add_argument(
        "--health-port", type=int, default=int(os.environ.get("HEALTH_PORT", HEALTH_PORT))
    )
    args = parser.parse_args()
    asyncio.run(serve(args.health_port))
