"""Test image: an HTTP server that says which pod answered and serves large downloads.

GET /            -> "<pod name>\n" (or an HTML page with --title)
GET /bytes/N     -> N bytes of a fixed pattern, for throughput and checksum tests
GET /slow/N      -> N bytes sent slowly, for flow-control tests
"""

from __future__ import annotations

import argparse
import os
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 1 << 20
PATTERN = bytes(range(256)) * (CHUNK // 256)


def pattern_bytes(n: int) -> bytes:
    """The first n bytes of the download stream, so a client can verify a checksum."""
    full, rest = divmod(n, CHUNK)
    return PATTERN * full + PATTERN[:rest]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    title: str | None = None

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        pod = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or socket.gethostname()
        if self.path.startswith("/bytes/"):
            n = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            view = memoryview(PATTERN)
            left = n
            while left > 0:
                step = min(left, CHUNK)
                self.wfile.write(view[:step])
                left -= step
            return
        if self.title is not None:
            page = (
                f"<!DOCTYPE html>\n<html><head><title>{self.title}</title></head>"
                f"<body><h1>{self.title}</h1><p>Served by {pod}</p></body></html>\n"
            )
            self._send(page.encode(), "text/html; charset=utf-8")
            return
        self._send(f"{pod}\n".encode(), "text/plain")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    parser.add_argument("--title")
    parser.add_argument("--bind", default="0.0.0.0", help="127.0.0.1: reachable in the pod only")
    args = parser.parse_args()
    Handler.title = args.title
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer((args.bind, args.port), Handler)
    print(f"serving HTTP on {args.bind}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
