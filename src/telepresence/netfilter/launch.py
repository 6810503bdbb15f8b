"""How the daemon gets a connected helper: its socket, the peer check, starting it.

The daemon listens on a Unix socket in its own 0700 runtime directory and the helper,
running as root, connects to it (sudo closes inherited descriptors, hence a path):
either one the daemon starts itself (:func:`spawn`, ``sudo -n``), or one that
`telepresence connect` started on the user's terminal and that connects to a
:class:`.client.HelperListener`.  Either way the peer must be root.  What happens on
the connection once it is made is :mod:`.client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "HELPER_SOCKET",
    "HelperError",
    "HelperGone",
    "Spawned",
    "accept_root",
    "check_peer_is_root",
    "listen",
    "readable",
    "spawn",
]

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")
#: The last lines the helper wrote to stderr, quoted when it fails to start.
_STDERR_LINES = 20

#: The socket's name in the daemon's runtime directory.
HELPER_SOCKET = "helper.sock"


class HelperError(Exception):
    """The helper refused or failed a request; the message is one actionable line.

    Whatever the failed request had changed was undone before the answer.
    """


class HelperGone(HelperError):
    """The connection to the helper is closed: it exited, was killed, or never started."""


def listen(path: Path) -> socket.socket:
    """A listening socket at ``path``, in a directory only the user may enter: anyone who
    could connect first would be talking to root's helper."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.setblocking(False)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener.bind(str(path))
    listener.listen(1)
    return listener


def check_peer_is_root(conn: socket.socket) -> None:
    pid, uid, _gid = _UCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    if uid != 0:
        raise HelperError(f"the process that connected (pid {pid}, uid {uid}) is not root")


async def accept_root(listener: socket.socket, *, timeout: float) -> socket.socket:
    """The next connection, once its peer is checked to be root; :class:`HelperGone`
    when none came within ``timeout``."""
    loop = asyncio.get_running_loop()
    try:
        conn, _addr = await asyncio.wait_for(loop.sock_accept(listener), timeout)
    except TimeoutError:
        raise HelperGone(f"the network helper did not connect within {timeout}s") from None
    try:
        check_peer_is_root(conn)
    except BaseException:
        conn.close()
        raise
    return conn


async def readable(loop: asyncio.AbstractEventLoop, source: socket.socket | int) -> None:
    """Returns once ``source`` (a socket, or a descriptor such as a pidfd) is readable."""
    ready: asyncio.Future[None] = loop.create_future()
    fd = source if isinstance(source, int) else source.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


@dataclass
class Spawned:
    """A helper this daemon started, connected and checked; ``conn`` is not yet greeted."""

    conn: socket.socket
    process: asyncio.subprocess.Process
    stderr_task: asyncio.Task[None]
    stderr_lines: deque[str]

    async def last_stderr_line(self, *, wait: float) -> str:
        """What the helper said last, once it stopped writing (at most ``wait`` seconds)."""
        await asyncio.wait({self.stderr_task}, timeout=wait)
        return self.stderr_lines[-1] if self.stderr_lines else "no error output"

    def abort(self) -> None:
        _abort(self.conn, self.process, self.stderr_task)


def _abort(
    conn: socket.socket | None,
    process: asyncio.subprocess.Process | None,
    stderr_task: asyncio.Task[None] | None,
) -> None:
    if conn is not None:
        conn.close()
    if process is not None and process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
    if stderr_task is not None:
        stderr_task.cancel()


async def spawn(*, command: Sequence[str], path: Path, debug: bool, timeout: float) -> Spawned:
    """Starts ``command --connect path`` and waits for it to connect to ``path``.

    Raises :class:`HelperGone` with the helper's (or sudo's) last error line when it
    exits before connecting, and on ``timeout``; :class:`HelperError` when the peer is
    not root.  The socket at ``path`` is gone when this returns, whatever the outcome.
    """
    listener = listen(path)
    stderr_lines: deque[str] = deque(maxlen=_STDERR_LINES)
    process: asyncio.subprocess.Process | None = None
    stderr_task: asyncio.Task[None] | None = None
    conn: socket.socket | None = None
    try:
        argv = [*command, "--connect", str(path), *(["--debug"] if debug else [])]
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stderr is not None
        stderr_task = asyncio.create_task(
            _relay_stderr(process.stderr, stderr_lines), name="helper-stderr"
        )
        conn = await _accept_or_exit(listener, process, timeout=timeout)
        if conn is None:
            await asyncio.wait({stderr_task}, timeout=1.0)
            last = stderr_lines[-1] if stderr_lines else "no error output"
            raise HelperGone(
                f"the network helper exited with status {process.returncode} before "
                f"connecting: {last}"
            )
        check_peer_is_root(conn)
        return Spawned(conn, process, stderr_task, stderr_lines)
    except BaseException:
        _abort(conn, process, stderr_task)
        raise
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def _accept_or_exit(
    listener: socket.socket,
    process: asyncio.subprocess.Process,
    *,
    timeout: float,
) -> socket.socket | None:
    """The helper's connection, or None when the process exits first."""
    loop = asyncio.get_running_loop()
    accept = asyncio.ensure_future(loop.sock_accept(listener))
    exited = asyncio.ensure_future(process.wait())
    try:
        done, _ = await asyncio.wait(
            {accept, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if accept in done:
            conn, _addr = accept.result()
            return conn
        if exited in done:
            return None
        raise HelperGone(f"the network helper did not connect within {timeout}s")
    finally:
        for task in (accept, exited):
            task.cancel()
        await asyncio.gather(accept, exited, return_exceptions=True)


async def _relay_stderr(stream: asyncio.StreamReader, last: deque[str]) -> None:
    """The helper logs to its own file; what it writes on stderr is worth the daemon's log."""
    while line := await stream.readline():
        text = line.decode(errors="replace").rstrip()
        if text:
            last.append(text)
            log.warning("%s", text)
