"""The user daemon's side of the network helper: start it through sudo, then drive it.

Runs unprivileged.  The daemon listens on a Unix socket in its own 0700
runtime directory and starts ``sudo -n telepresence-helper --connect PATH``
(:meth:`HelperClient.start`), or waits for the one `telepresence connect` started on
the user's terminal (:class:`HelperListener`); sudo closes inherited
descriptors, so the helper connects back by path.
After that, one request at a time; each method below is one request.

If the connection drops (the helper died), every call raises
:class:`HelperGone`; the daemon should then close its TUN descriptor (the
routes on it go with the last descriptor) and run ``--cleanup`` later.
Closing the client (or the daemon dying) makes the helper undo everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from types import TracebackType
from typing import Literal, TypeVar

from telepresence.netfilter import fdpass, protocol
from telepresence.netfilter.protocol import (
    AddHostRoutes,
    Error,
    Hello,
    HostRoutesDone,
    LinkDomainsDone,
    NameserversDone,
    Ok,
    RefreshNameservers,
    RemoveHostRoutes,
    Request,
    Response,
    SetLinkDomains,
    Setup,
    SetupDone,
    SocketReady,
    Status,
    StatusReply,
    SubnetsDone,
    Teardown,
    UpdateSubnets,
    UpstreamSocket,
)
from telepresence.netfilter.subnets import IPAddress, IPNetwork

__all__ = [
    "HELPER_SOCKET",
    "HelperClient",
    "HelperError",
    "HelperGone",
    "HelperListener",
    "HostRoutes",
    "Nameservers",
    "SetupResult",
    "StatusReply",
]

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")
_R = TypeVar("_R", bound=Response)
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


@dataclass(frozen=True)
class SetupResult:
    """``tun_fd`` belongs to the caller (close it when done); ``routed`` is what
    is routed after the never-proxy holes; ``nameservers`` are the addresses whose
    DNS the helper redirects (its choice, from /etc/resolv.conf); ``mark`` is the
    mark on upstream sockets; ``dns_mode`` and ``dns_address``: see
    :class:`.protocol.SetupDone`."""

    tun_fd: int
    tun_name: str
    routed: list[IPv4Network]
    nameservers: list[IPv4Address]
    mark: int
    dns_mode: Literal["redirect", "resolved"] = "redirect"
    dns_address: IPv4Address | None = None


@dataclass(frozen=True)
class HostRoutes:
    """``hosts``: every host routed now; ``skipped``: one reason per refused address."""

    hosts: list[IPv4Address]
    skipped: list[str]


@dataclass(frozen=True)
class Nameservers:
    """The nameservers whose DNS the helper redirects now (the daemon's upstreams);
    ``changed``: the redirect moved; ``kept``: why an unusable file left it as it was."""

    nameservers: list[IPv4Address]
    changed: bool
    kept: str


def _strs(items: Iterable[object]) -> list[str]:
    return [str(i) for i in items]


class HelperClient:
    """One connection to one helper.  Use :meth:`start`, then ``async with`` or :meth:`close`.

    Requests are serialised: concurrent calls queue.  A call cancelled while
    waiting for its answer still consumes that answer (and closes any
    descriptor in it), so a later call never receives an earlier answer.
    """

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

    # --- starting ------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        *,
        command: Sequence[str],
        runtime_dir: Path,
        debug: bool = False,
        timeout: float = 30.0,
    ) -> HelperClient:
        """Starts ``command --connect SOCKET`` and waits for the helper to connect.

        ``command`` is e.g. ``["sudo", "-n", "/usr/bin/telepresence-helper"]``
        (or the helper itself when the daemon already runs as root).
        ``runtime_dir`` must be private to the user (0700): anyone who could
        connect first would be talking to root's helper.  Raises
        :class:`HelperError` with the helper's (or sudo's) last error line
        when it exits before connecting, and on ``timeout``.
        """
        path = runtime_dir / HELPER_SOCKET
        listener = _listen(path)
        stderr_lines: deque[str] = deque(maxlen=_STDERR_LINES)
        loop = asyncio.get_running_loop()
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
            conn = await _accept_or_exit(loop, listener, process, timeout=timeout)
            if conn is None:
                await asyncio.wait({stderr_task}, timeout=1.0)
                last = stderr_lines[-1] if stderr_lines else "no error output"
                raise HelperGone(
                    f"the network helper exited with status {process.returncode} before "
                    f"connecting: {last}"
                )
            _check_peer_is_root(conn)
            try:
                return await asyncio.wait_for(
                    cls.from_socket(conn, process=process, stderr_task=stderr_task), timeout
                )
            except HelperGone as e:
                # It connected, then gave up (it logs why on stderr before exiting).
                await asyncio.wait({stderr_task}, timeout=5.0)
                last = stderr_lines[-1] if stderr_lines else "no error output"
                raise HelperGone(f"{e}: {last}") from None
        except BaseException:
            if conn is not None:
                conn.close()
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
            if stderr_task is not None:
                stderr_task.cancel()
            raise
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    @classmethod
    async def from_socket(
        cls,
        sock: socket.socket,
        *,
        process: asyncio.subprocess.Process | None = None,
        stderr_task: asyncio.Task[None] | None = None,
    ) -> HelperClient:
        """A client on an already connected socket, once the helper's Hello is checked.

        :meth:`start` uses it; so can a caller that started the helper another way.
        The socket is closed if the Hello is missing or of another version.
        """
        client = cls(sock, hello=Hello(version=0, pid=0), process=process, stderr_task=stderr_task)
        try:
            client._hello = await client._receive_hello()
        except BaseException:
            sock.close()
            raise
        return client

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

    # --- requests --------------------------------------------------------------

    async def setup(
        self,
        *,
        subnets: Iterable[IPNetwork | str],
        dns_redirect_port: int,
        proxy_port: int,
        never_proxy: Iterable[IPNetwork | str] = (),
        api_server_ips: Iterable[IPAddress | str] = (),
        allow_conflicting_subnets: Iterable[IPNetwork | str] = (),
    ) -> SetupResult:
        """Creates the TUN, its routes and the nftables redirects; see :class:`.protocol.Setup`.

        ``subnets`` must already leave out the API server's addresses (the helper
        refuses a subnet that covers one); ``allow_conflicting_subnets`` are the
        user's, as given.  All or nothing: on :class:`HelperError` nothing is
        left behind.
        """
        request = Setup(
            subnets=_strs(subnets),
            never_proxy=_strs(never_proxy),
            api_server_ips=_strs(api_server_ips),
            allow_conflicting_subnets=_strs(allow_conflicting_subnets),
            dns_redirect_port=dns_redirect_port,
            proxy_port=proxy_port,
        )
        done, fds = await self._request(request, SetupDone, fds=1)
        return SetupResult(
            tun_fd=fds[0],
            tun_name=done.tun_name,
            routed=[IPv4Network(n) for n in done.routed],
            nameservers=[IPv4Address(n) for n in done.nameservers],
            mark=done.mark,
            dns_mode=done.dns_mode,
            dns_address=IPv4Address(done.dns_address) if done.dns_address else None,
        )

    async def update_subnets(self, subnets: Iterable[IPNetwork | str]) -> list[IPv4Network]:
        """Routes exactly ``subnets`` (minus the holes) from now on; returns them.

        New subnets are checked for conflicts as in Setup; on error nothing changed.
        """
        done, _ = await self._request(UpdateSubnets(subnets=_strs(subnets)), SubnetsDone)
        return [IPv4Network(n) for n in done.routed]

    async def add_host_routes(self, ips: Iterable[IPAddress | str]) -> HostRoutes:
        """Routes single addresses too (TCP redirected, UDP to the TUN).  Idempotent."""
        done, _ = await self._request(AddHostRoutes(ips=_strs(ips)), HostRoutesDone)
        return HostRoutes(hosts=[IPv4Address(h) for h in done.hosts], skipped=done.skipped)

    async def remove_host_routes(self, ips: Iterable[IPAddress | str]) -> list[IPv4Address]:
        """Stops routing these addresses (unknown ones are ignored); returns the hosts left."""
        done, _ = await self._request(RemoveHostRoutes(ips=_strs(ips)), HostRoutesDone)
        return [IPv4Address(h) for h in done.hosts]

    async def refresh_nameservers(self) -> Nameservers:
        """Asks the helper to re-read /etc/resolv.conf and move the DNS redirect to its
        nameservers (its choice, never ours); returns what is redirected now."""
        done, _ = await self._request(RefreshNameservers(), NameserversDone)
        return Nameservers(
            nameservers=[IPv4Address(n) for n in done.nameservers],
            changed=done.changed,
            kept=done.kept,
        )

    async def set_link_domains(
        self, *, routing: Iterable[str], search: Iterable[str] = ()
    ) -> list[str]:
        """In "resolved" DNS mode: the names systemd-resolved sends to us (see
        :class:`.protocol.SetLinkDomains`); returns the link's domains as applied."""
        request = SetLinkDomains(routing=list(routing), search=list(search))
        done, _ = await self._request(request, LinkDomainsDone)
        return list(done.domains)

    async def upstream_socket(
        self, kind: Literal["udp", "tcp"], *, family: Literal[4, 6] = 4
    ) -> socket.socket:
        """A new, unbound, blocking socket carrying the helper's mark.

        Queries sent through it to the laptop's nameserver are not redirected
        to the daemon's DNS server.  The caller owns it.
        """
        request = UpstreamSocket(kind=kind, family=family)
        _, fds = await self._request(request, SocketReady, fds=1)
        return socket.socket(fileno=fds[0])

    async def status(self) -> StatusReply:
        """What is applied, as the kernel reports it now."""
        reply, _ = await self._request(Status(), StatusReply)
        return reply

    async def teardown(self, *, timeout: float = 30.0) -> None:
        """Undoes everything (DNS redirect first) and waits for the helper to exit.

        Raises :class:`HelperError` if something could not be undone (the
        helper's journal keeps it for ``--cleanup``).  The client is closed
        afterwards in every case.
        """
        try:
            await self._request(Teardown(), Ok)
        finally:
            await self.close(timeout=timeout)

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
            await _readable(asyncio.get_running_loop(), pidfd)
        finally:
            os.close(pidfd)
        return None

    async def __aenter__(self) -> HelperClient:
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
                await _readable(loop, self._sock)
                continue
            except OSError as e:
                raise HelperGone(f"the network helper is gone ({e})") from None
            if truncated:
                _close_fds(fds)
                raise HelperError("too many descriptors from the network helper")
            return data, fds


async def _readable(loop: asyncio.AbstractEventLoop, source: socket.socket | int) -> None:
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


_close_fds = fdpass.close_fds


def _close_orphaned_fds(task: asyncio.Task[tuple[Response, list[int]]]) -> None:
    """The caller was cancelled: nobody will take these descriptors."""
    if not task.cancelled() and task.exception() is None:
        _close_fds(task.result()[1])


class HelperListener:
    """Where a helper that someone else started connects: `telepresence connect` runs
    ``sudo telepresence-helper --connect PATH --detach`` on the user's terminal, so that
    sudo can ask for the password there, before the daemon connects anything."""

    def __init__(self, runtime_dir: Path) -> None:
        self.path = runtime_dir / HELPER_SOCKET
        self._listener = _listen(self.path)

    async def accept(self, *, timeout: float = 30.0) -> HelperClient:
        """The helper's client once it has connected and said Hello; raises
        :class:`HelperGone` when none came within ``timeout``."""
        loop = asyncio.get_running_loop()
        try:
            conn, _addr = await asyncio.wait_for(loop.sock_accept(self._listener), timeout)
        except TimeoutError:
            raise HelperGone(f"the network helper did not connect within {timeout}s") from None
        try:
            _check_peer_is_root(conn)
            return await asyncio.wait_for(HelperClient.from_socket(conn), timeout)
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _listen(path: Path) -> socket.socket:
    """A listening socket at ``path``, in a directory only the user may enter: anyone who
    could connect first would be talking to root's helper."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.setblocking(False)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener.bind(str(path))
    listener.listen(1)
    return listener


def _check_peer_is_root(conn: socket.socket) -> None:
    pid, uid, _gid = _UCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    if uid != 0:
        raise HelperError(f"the process that connected (pid {pid}, uid {uid}) is not root")


async def _accept_or_exit(
    loop: asyncio.AbstractEventLoop,
    listener: socket.socket,
    process: asyncio.subprocess.Process,
    *,
    timeout: float,
) -> socket.socket | None:
    """The helper's connection, or None when the process exits first."""
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
