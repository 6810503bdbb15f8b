"""The user daemon's side of the network helper: start it through sudo, then drive it.

Runs unprivileged.  The daemon listens on a Unix socket in its own 0700
runtime directory and starts ``sudo -n telepresence-helper --connect PATH``
(:meth:`HelperClient.start`), or waits for the one `telepresence connect` started on
the user's terminal (:class:`HelperListener`); sudo closes inherited
descriptors, so the helper connects back by path (the socket, the peer check and
the start are :mod:`.launch`).
After that, one request at a time; each method below is one request.

If the connection drops (the helper died), every call raises
:class:`HelperGone`; the daemon should then close its TUN descriptor (the
routes on it go with the last descriptor) and run ``--cleanup`` later.
Closing the client (or the daemon dying) makes the helper undo everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Literal

from telepresence.netfilter.exchange import HelperConnection
from telepresence.netfilter.launch import (
    HELPER_SOCKET,
    HelperError,
    HelperGone,
    accept_root,
    listen,
    spawn,
)
from telepresence.netfilter.protocol import (
    AddHostRoutes,
    Hello,
    HostRoutesDone,
    LinkDomainsDone,
    NameserversDone,
    Ok,
    RefreshNameservers,
    RemoveHostRoutes,
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


class HelperClient(HelperConnection):
    """One connection to one helper.  Use :meth:`start`, then ``async with`` or :meth:`close`.

    Each method below is one request; the exchange is :class:`.exchange.HelperConnection`.
    """

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
        spawned = await spawn(
            command=command, path=runtime_dir / HELPER_SOCKET, debug=debug, timeout=timeout
        )
        try:
            return await asyncio.wait_for(
                cls.from_socket(
                    spawned.conn, process=spawned.process, stderr_task=spawned.stderr_task
                ),
                timeout,
            )
        except HelperGone as e:
            # It connected, then gave up (it logs why on stderr before exiting).
            last = await spawned.last_stderr_line(wait=5.0)
            spawned.abort()
            raise HelperGone(f"{e}: {last}") from None
        except BaseException:
            spawned.abort()
            raise

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


class HelperListener:
    """Where a helper that someone else started connects: `telepresence connect` runs
    ``sudo telepresence-helper --connect PATH --detach`` on the user's terminal, so that
    sudo can ask for the password there, before the daemon connects anything."""

    def __init__(self, runtime_dir: Path) -> None:
        self.path = runtime_dir / HELPER_SOCKET
        self._listener = listen(self.path)

    async def accept(self, *, timeout: float = 30.0) -> HelperClient:
        """The helper's client once it has connected and said Hello; raises
        :class:`HelperGone` when none came within ``timeout``."""
        conn = await accept_root(self._listener, timeout=timeout)
        try:
            return await asyncio.wait_for(HelperClient.from_socket(conn), timeout)
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
