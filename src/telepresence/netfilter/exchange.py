"""One connection to the helper: serialised exchanges, descriptors, cancellation, closing.

The wire under :class:`.client.HelperClient`, whose methods are the requests.  One
request at a time: concurrent calls queue.  A call cancelled while waiting for its
answer still consumes that answer (and closes any descriptor in it), so a later call
never receives an earlier answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from types import TracebackType
from typing import Self, TypeVar

from telepresence.netfilter import fdpass, protocol
from telepresence.netfilter.launch import HelperError, HelperGone, readable
from telepresence.netfilter.protocol import Error, Hello, Request, Response

__all__ = ["HelperConnection"]

log = logging.getLogger("telepresence.netfilter.client")

_R = TypeVar("_R", bound=Response)


class HelperConnection:
    """A connection to one helper, from its Hello to :meth:`close`."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        hello: Hello,
        process: asyncio.subprocess.Process | None = None,
        stderr_task: asyncio.Task[None] | None = None,
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._hello = hello
        self._process = process
        self._stderr_task = stderr_task
        self._decoder = protocol.FrameDecoder()
        self._lock = asyncio.Lock()
        self._exchanges: set[asyncio.Task[tuple[Response, list[int]]]] = set()
        self._closed = False

    async def _receive_hello(self) -> Hello:
        message, fds = await self._receive()
        _close_fds(fds)
        if not isinstance(message, Hello):
            raise HelperError(f"the network helper said {type(message).__name__} instead of Hello")
        if message.version != protocol.VERSION:
            raise HelperError(
                f"the network helper speaks protocol {message.version}, this daemon "
                f"{protocol.VERSION}: run `sudo telepresence helper install` again, or "
                "uninstall the old helper"
            )
        return message

    @property
    def helper_pid(self) -> int:
        """The helper's own pid (not sudo's), as it reported it."""
        return self._hello.pid

    # --- lifecycle ---------------------------------------------------------------

    async def close(self, *, timeout: float = 30.0) -> None:
        """Closes the connection, which makes the helper undo everything and exit,
        and waits up to ``timeout`` for it to exit.  Idempotent."""
        if not self._closed:
            self._closed = True
            for task in self._exchanges:
                task.cancel()  # a closed socket would never wake them
            self._sock.close()
            self._decoder.close()
        process = self._process
        if process is not None and process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                log.warning("network helper did not exit after %ss: terminating it", timeout)
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
                await process.wait()
        if self._stderr_task is not None:
            await asyncio.wait({self._stderr_task}, timeout=1.0)

    async def wait_exited(self) -> int | None:
        """Returns once the helper has exited: with its (sudo's) exit status when started
        here, None for one the CLI started (watched through a pidfd on the pid it
        reported, as it is not our child)."""
        if self._process is not None:
            return await self._process.wait()
        try:
            pidfd = os.pidfd_open(self.helper_pid)
        except ProcessLookupError:
            return None
        try:
            await readable(asyncio.get_running_loop(), pidfd)
        finally:
            os.close(pidfd)
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- the exchange ------------------------------------------------------------

    async def _request(
        self, request: Request, expected: type[_R], *, fds: int = 0
    ) -> tuple[_R, list[int]]:
        task = asyncio.create_task(self._exchange(request), name=f"helper-{type(request).__name__}")
        self._exchanges.add(task)
        task.add_done_callback(self._exchange_done)
        try:
            response, received = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_close_orphaned_fds)
            raise
        if isinstance(response, Error):
            _close_fds(received)
            raise HelperError(response.message)
        if not isinstance(response, expected) or len(received) != fds:
            _close_fds(received)
            raise HelperError(
                f"the network helper answered {type(response).__name__} with {len(received)} "
                f"descriptors to {type(request).__name__}"
            )
        return response, received

    def _exchange_done(self, task: asyncio.Task[tuple[Response, list[int]]]) -> None:
        self._exchanges.discard(task)

    async def _exchange(self, request: Request) -> tuple[Response, list[int]]:
        async with self._lock:
            if self._closed:
                raise HelperGone("the connection to the network helper is closed")
            loop = asyncio.get_running_loop()
            try:
                frame = protocol.encode(request)
            except ValueError as e:
                raise HelperError(f"request not sent: {e}") from None
            try:
                await loop.sock_sendall(self._sock, frame)
            except OSError as e:
                raise HelperGone(f"the network helper is gone ({e})") from None
            return await self._receive()

    async def _receive(self) -> tuple[Response, list[int]]:
        while True:
            try:
                item = self._decoder.next()
            except protocol.ProtocolError as e:
                raise HelperError(f"garbled answer from the network helper: {e}") from None
            if item is not None:
                message, fds = item
                if isinstance(message, Request):
                    _close_fds(fds)
                    raise HelperError(
                        f"the network helper sent a request ({type(message).__name__})"
                    )
                return message, fds
            data, fds = await self._recvmsg()
            if not data:
                _close_fds(fds)
                raise HelperGone(
                    "the network helper closed the connection (it exited or was killed)"
                )
            self._decoder.feed(data, fds)

    async def _recvmsg(self) -> tuple[bytes, list[int]]:
        """``recvmsg`` on the non-blocking socket; asyncio has no awaitable form of it."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, fds, truncated = fdpass.recv_with_fds(self._sock, max_fds=protocol.MAX_FDS)
            except BlockingIOError:
                await readable(loop, self._sock)
                continue
            except OSError as e:
                raise HelperGone(f"the network helper is gone ({e})") from None
            if truncated:
                _close_fds(fds)
                raise HelperError("too many descriptors from the network helper")
            return data, fds


_close_fds = fdpass.close_fds


def _close_orphaned_fds(task: asyncio.Task[tuple[Response, list[int]]]) -> None:
    """The caller was cancelled: nobody will take these descriptors."""
    if not task.cancelled() and task.exception() is None:
        _close_fds(task.result()[1])
