"""systemd-resolved over the system D-Bus: the helper's DNS settings of its own TUN link.

Where the laptop's lookups go through systemd-resolved, a port-53 redirect sees nothing
(glibc's nss-resolve asks it over varlink) or every name at once (the 127.0.0.53 stub);
resolved itself must be told which names to send to the daemon.  The helper does that
per link, on its TUN only: a DNS server, the domains routed to it, and nothing else (no
default route, no LLMNR, mDNS, DNSSEC or DNS-over-TLS), so the laptop's other lookups
never notice.

A small blocking client with jeepney: one connection per operation (the helper is
single-threaded and these calls are rare), to the fixed socket
:data:`SYSTEM_BUS`, never an address from the environment, which belongs to the user who
ran sudo.  Every call has a deadline.  The message builders are pure (unit-tested);
:class:`Resolved` is the only I/O, and every failure becomes a :class:`ResolvedError`.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from ipaddress import IPv4Address
from typing import Any, NamedTuple, Protocol

from jeepney import (  # type: ignore[import-untyped]
    DBusAddress,
    DBusErrorResponse,
    HeaderFields,
    Message,
    MessageFlag,
    new_method_call,
)
from jeepney.bus_messages import message_bus  # type: ignore[import-untyped]
from jeepney.io.blocking import (  # type: ignore[import-untyped]
    DBusConnection,
    DBusConnectionBase,
    prep_socket,
)
from jeepney.io.common import MessageFilters  # type: ignore[import-untyped]
from jeepney.wrappers import unwrap_msg  # type: ignore[import-untyped]

__all__ = [
    "CALL_TIMEOUT",
    "LINK_FEATURES_OFF",
    "LINK_WAIT",
    "NO_SUCH_LINK",
    "SYSTEM_BUS",
    "LinkDomain",
    "Resolved",
    "ResolvedError",
    "ResolvedLinks",
    "get_link",
    "get_link_domains",
    "name_has_owner",
    "parse_domains",
    "render_domains",
    "revert_link",
    "set_link_default_route",
    "set_link_dns",
    "set_link_domains",
    "set_link_feature",
]

#: The system bus's socket (``unix:path=/run/dbus/system_bus_socket``), where every
#: distribution has it.  Never $DBUS_SYSTEM_BUS_ADDRESS: sudo may keep the caller's
#: environment, and root must not talk to a bus the caller chose.
SYSTEM_BUS = "/run/dbus/system_bus_socket"
#: Seconds for one call (and for connecting): resolved answers in milliseconds, and a
#: wedged bus must not hold the helper's one thread, nor the daemon's request, for long.
CALL_TIMEOUT = 3.0
#: How long a link just created may be unknown to resolved, which learns of links from
#: rtnetlink asynchronously.
LINK_WAIT = 2.0
_LINK_POLL = 0.05

RESOLVE1 = "org.freedesktop.resolve1"
NO_SUCH_LINK = "org.freedesktop.resolve1.NoSuchLink"
#: resolved is not on the bus (not running): nothing of it to configure or undo.
_NOT_RUNNING = (
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
)
_MANAGER = DBusAddress(
    "/org/freedesktop/resolve1", bus_name=RESOLVE1, interface=f"{RESOLVE1}.Manager"
)
_LINK_INTERFACE = f"{RESOLVE1}.Link"
_AF_INET = socket.AF_INET.value


class ResolvedError(Exception):
    """A call to systemd-resolved failed; the message is one line.  ``name``: the D-Bus
    error's name when resolved (or the bus) answered with one, else empty."""

    def __init__(self, message: str, *, name: str = "") -> None:
        super().__init__(message)
        self.name = name


class LinkDomain(NamedTuple):
    """One of a link's domains, as resolved's ``a(sb)`` has it: ``routing_only`` means
    ``~name`` (names under it go to the link; not appended to single labels)."""

    name: str
    routing_only: bool


def render_domains(domains: Sequence[LinkDomain]) -> list[str]:
    """``~name`` for routing-only domains, ``name`` for search domains, as resolvectl shows."""
    return [f"~{d.name}" if d.routing_only else d.name for d in domains]


# --- the messages (pure) ---------------------------------------------------------


def _resolved_call(
    address: DBusAddress, method: str, signature: str, body: tuple[Any, ...]
) -> Message:
    """A call to resolved that never starts it: the bus would otherwise activate a
    stopped resolved for a RevertLink, and the mode was chosen only while it ran."""
    message = new_method_call(address, method, signature, body)
    message.header.flags |= MessageFlag.no_auto_start
    return message


def name_has_owner() -> Message:
    return message_bus.NameHasOwner(RESOLVE1)


def set_link_dns(ifindex: int, server: IPv4Address) -> Message:
    body = (ifindex, [(_AF_INET, server.packed)])
    return _resolved_call(_MANAGER, "SetLinkDNS", "ia(iay)", body)


def set_link_domains(ifindex: int, domains: Sequence[LinkDomain]) -> Message:
    body = (ifindex, [(d.name, d.routing_only) for d in domains])
    return _resolved_call(_MANAGER, "SetLinkDomains", "ia(sb)", body)


def set_link_default_route(ifindex: int, enabled: bool) -> Message:
    return _resolved_call(_MANAGER, "SetLinkDefaultRoute", "ib", (ifindex, enabled))


#: Per-link features that would send the laptop's other lookups (or multicast) to our
#: link, or expect what the daemon's server does not do; each set to "no".
LINK_FEATURES_OFF = ("SetLinkLLMNR", "SetLinkMulticastDNS", "SetLinkDNSSEC", "SetLinkDNSOverTLS")


def set_link_feature(method: str, ifindex: int, value: str) -> Message:
    if method not in LINK_FEATURES_OFF:
        raise ValueError(f"not a per-link feature: {method}")
    return _resolved_call(_MANAGER, method, "is", (ifindex, value))


def revert_link(ifindex: int) -> Message:
    return _resolved_call(_MANAGER, "RevertLink", "i", (ifindex,))


def get_link(ifindex: int) -> Message:
    return _resolved_call(_MANAGER, "GetLink", "i", (ifindex,))


def get_link_domains(path: str) -> Message:
    link = DBusAddress(path, bus_name=RESOLVE1, interface="org.freedesktop.DBus.Properties")
    return _resolved_call(link, "Get", "ss", (_LINK_INTERFACE, "Domains"))


def parse_domains(value: Any) -> list[LinkDomain]:
    """The ``Domains`` property: a variant ``("a(sb)", [(name, routing_only), ...])``."""
    signature, items = value
    if signature != "a(sb)":
        raise ResolvedError(f"systemd-resolved: Domains has type {signature}, expected a(sb)")
    return [LinkDomain(str(name), bool(routing)) for name, routing in items]


# --- the connection --------------------------------------------------------------


class _Connection(DBusConnection):  # type: ignore[misc]
    """jeepney's blocking connection, with a deadline on its ``Hello`` too (jeepney's own
    waits for that first reply without one)."""

    def __init__(self, sock: socket.socket, *, timeout: float) -> None:
        DBusConnectionBase.__init__(self, sock, enable_fds=False)
        self._filters = MessageFilters()
        try:
            self.unique_name = self.call(message_bus.Hello(), timeout=timeout)[0]
        except BaseException:
            self.close()  # the selector too, not only the socket
            raise

    def call(self, message: Message, *, timeout: float) -> tuple[Any, ...]:
        return tuple(unwrap_msg(self.send_and_get_reply(message, timeout=timeout)))


def _member(message: Message) -> str:
    return str(message.header.fields.get(HeaderFields.member, "?"))


class ResolvedLinks(Protocol):
    """What the helper needs of resolved; :class:`Resolved`, or a fake in tests."""

    def running(self) -> bool: ...
    def configure_link(self, ifindex: int, *, dns: IPv4Address) -> None: ...
    def set_domains(self, ifindex: int, domains: Sequence[LinkDomain]) -> None: ...
    def revert_link(self, ifindex: int) -> bool: ...
    def link_domains(self, ifindex: int) -> list[LinkDomain]: ...


class Resolved:
    """systemd-resolved on the system bus.  Each method opens its own connection."""

    def __init__(
        self,
        *,
        address: str = SYSTEM_BUS,
        timeout: float = CALL_TIMEOUT,
        link_wait: float = LINK_WAIT,
    ) -> None:
        self._path = address
        self._timeout = timeout
        self._link_wait = link_wait

    @contextmanager
    def _bus(self) -> Iterator[_Connection]:
        try:
            sock = prep_socket(self._path, timeout=self._timeout)
        except TimeoutError:
            raise ResolvedError(
                f"the system D-Bus at {self._path} did not answer within {self._timeout:g}s"
            ) from None
        except Exception as e:
            raise ResolvedError(
                f"cannot connect to the system D-Bus at {self._path}: {e}"
            ) from None
        try:
            conn = self._hello(sock)
        except BaseException:
            sock.close()
            raise
        with conn:
            yield conn

    def _hello(self, sock: socket.socket) -> _Connection:
        try:
            return _Connection(sock, timeout=self._timeout)
        except TimeoutError:
            raise ResolvedError(
                f"the system D-Bus did not answer Hello within {self._timeout:g}s"
            ) from None
        except (OSError, DBusErrorResponse, ValueError) as e:
            raise ResolvedError(f"the system D-Bus refused the connection: {e}") from None

    def _call(self, bus: _Connection, message: Message) -> tuple[Any, ...]:
        what = _member(message)
        try:
            return bus.call(message, timeout=self._timeout)
        except DBusErrorResponse as e:
            detail = " ".join(str(e.data[0] if e.data else "").split())
            raise ResolvedError(
                f"systemd-resolved refused {what}: {detail or e.name}", name=str(e.name)
            ) from None
        except TimeoutError:
            raise ResolvedError(
                f"systemd-resolved did not answer {what} within {self._timeout:g}s"
            ) from None
        except (OSError, ValueError) as e:
            raise ResolvedError(f"systemd-resolved: {what} failed: {e}") from None

    def running(self) -> bool:
        """Whether resolved is on the bus now; False without a bus or on any failure."""
        try:
            with self._bus() as bus:
                return bool(self._call(bus, name_has_owner())[0])
        except ResolvedError:
            return False

    def configure_link(self, ifindex: int, *, dns: IPv4Address) -> None:
        """``dns`` as the link's one server, with no domains, no default route and the
        other features off.  The server comes last: a link with a server and no routing
        domain would be a default route until ``SetLinkDefaultRoute`` says otherwise."""
        with self._bus() as bus:
            self._wait_for_link(bus, set_link_default_route(ifindex, False))
            for method in LINK_FEATURES_OFF:
                self._call(bus, set_link_feature(method, ifindex, "no"))
            self._call(bus, set_link_domains(ifindex, []))
            self._call(bus, set_link_dns(ifindex, dns))

    def _wait_for_link(self, bus: _Connection, message: Message) -> None:
        """``message`` (the first call on a new link), again while resolved does not
        know the link yet."""
        deadline = time.monotonic() + self._link_wait
        while True:
            try:
                self._call(bus, message)
                return
            except ResolvedError as e:
                if e.name != NO_SUCH_LINK or time.monotonic() >= deadline:
                    raise
            time.sleep(_LINK_POLL)

    def set_domains(self, ifindex: int, domains: Sequence[LinkDomain]) -> None:
        with self._bus() as bus:
            self._call(bus, set_link_domains(ifindex, domains))

    def revert_link(self, ifindex: int) -> bool:
        """Drops every setting of the link; False when there was nothing to drop (resolved
        does not know the link, which vanishes with the TUN, or does not run)."""
        try:
            with self._bus() as bus:
                self._call(bus, revert_link(ifindex))
        except ResolvedError as e:
            if e.name == NO_SUCH_LINK or e.name in _NOT_RUNNING:
                return False
            raise
        return True

    def link_domains(self, ifindex: int) -> list[LinkDomain]:
        """The link's domains as resolved has them now."""
        with self._bus() as bus:
            path = str(self._call(bus, get_link(ifindex))[0])
            return parse_domains(self._call(bus, get_link_domains(path))[0])
