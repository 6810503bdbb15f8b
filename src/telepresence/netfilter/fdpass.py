"""Passing file descriptors over the helper's Unix socket (SCM_RIGHTS), for both ends.

Kept in one place because both the helper and the client must get the same
details right: descriptors travel in the same ``sendmsg`` as the frame that
announces them, and every descriptor received is either handed to its owner
or closed, never leaked.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections.abc import Iterable, Sequence

__all__ = ["close_fds", "fds_from_ancillary", "recv_with_fds", "send_with_fds"]

#: Bytes per ``recvmsg``: a whole request fits in one read.
RECV_SIZE = 65536


def send_with_fds(sock: socket.socket, frame: bytes, fds: Sequence[int]) -> None:
    """Sends ``frame`` (blocking) with ``fds`` attached to its first byte."""
    if not fds:
        sock.sendall(frame)
        return
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sent = sock.sendmsg([frame], ancillary)
    if sent < len(frame):
        sock.sendall(frame[sent:])


def fds_from_ancillary(ancillary: Iterable[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return fds


def recv_with_fds(sock: socket.socket, *, max_fds: int) -> tuple[bytes, list[int], bool]:
    """``(data, fds, truncated)``; ``truncated``: more descriptors were sent than
    ``max_fds`` and the kernel dropped the rest (the caller decides if that is an error)."""
    data, ancillary, flags, _addr = sock.recvmsg(
        RECV_SIZE, socket.CMSG_SPACE(max_fds * 4), socket.MSG_CMSG_CLOEXEC
    )
    return data, fds_from_ancillary(ancillary), bool(flags & socket.MSG_CTRUNC)


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
