"""Opening the TUN device that routed traffic lands on.

Non-persistent (no TUNSETPERSIST): the kernel deletes the link, and every
route on it, once the last descriptor is closed.  The helper keeps one
descriptor and hands a copy to the user daemon, so a crash of both leaves
nothing behind without anyone cleaning.  IFF_NO_PI: each read is exactly one
IP packet, with no 4-byte packet-info header for the daemon to strip.
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
from dataclasses import dataclass

__all__ = ["Tun", "TunError", "open_tun", "validate_tun_name"]

_TUN_DEVICE = "/dev/net/tun"
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
#: struct ifreq: a 16-byte name, then a union of which we use the short flags.
_IFREQ = struct.Struct("16sH22x")
#: IFNAMSIZ is 16 including the NUL; ``ip`` refuses "/", ":" and whitespace.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")


class TunError(Exception):
    """The TUN device could not be created."""


def validate_tun_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"invalid TUN device name {name!r}: use 1 to 15 letters, digits, '_', '.' or '-'"
        )
    return name


@dataclass(frozen=True)
class Tun:
    """An open TUN device; ``fd`` is owned by whoever holds this."""

    name: str
    fd: int


def open_tun(name: str) -> Tun:
    """Creates the TUN device ``name`` in this network namespace.

    The caller must make sure no link of that name exists: TUNSETIFF on an
    existing, detached *persistent* TUN would attach to it instead of failing.
    """
    validate_tun_name(name)
    try:
        fd = os.open(_TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise TunError(
            f"cannot open {_TUN_DEVICE}: {e.strerror} (is the tun module loaded?)"
        ) from None
    try:
        request = _IFREQ.pack(name.encode(), _IFF_TUN | _IFF_NO_PI)
        answer = fcntl.ioctl(fd, _TUNSETIFF, request)
    except OSError as e:
        os.close(fd)
        raise TunError(f"cannot create TUN device {name}: {e.strerror}") from None
    actual = _IFREQ.unpack(answer)[0].rstrip(b"\0").decode()
    return Tun(name=actual, fd=fd)
