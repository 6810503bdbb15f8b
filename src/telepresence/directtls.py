"""What the direct transport's parts share: SNI names, addresses, keys from memory.

Standard library only, as the manager's image has nothing else.
"""

from __future__ import annotations

import os
import ssl

#: SNI names the laptop draws (`daemon/directcreds.py`) end here: a reserved top-level
#: domain (RFC 2606), never resolved. The manager serves no other name on its listener.
SERVER_NAME_SUFFIX = ".direct.telepresence.invalid"


def load_chain(ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """`load_cert_chain` reads only files; an anonymous memory file keeps the key off every
    disk (the laptop's cache, the manager's read-only root filesystem). Raises
    ssl.SSLError when the key does not match the certificate or either is bad."""
    fd = os.memfd_create("telepresence-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, (cert_pem + key_pem).encode())
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``); raises ValueError naming what is wrong."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port (like 203.0.113.7:30443)")
    return host, int(port)
