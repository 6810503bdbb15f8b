"""What `telepresence status --flows` shows: the open flows and the last errors.

A program that cannot reach the cluster sees only a reset, silence or SERVFAIL; this book
is where the daemon keeps why, and what is flowing meanwhile. The transparent proxy and
the UDP relay open a :class:`FlowRecord` per flow and count bytes into it from the data
callbacks they already have (an integer add per chunk, nothing allocated); failed dials
(through :class:`~.dialfailures.DialFailureLog`), resets, lost tunnel links and failed
DNS queries go into a ring of recent errors, where a repeat of the same error counts up
instead of pushing older ones out. The DNS server tells the book which name a program
looked up for the addresses of a cluster answer, so a flow can show it.

Pure: no sockets, no asyncio; both clocks are arguments, so tests set the time. Every
list is bounded: flows live as long as their sockets (the relay caps UDP flows itself) and
a snapshot lists at most ``max_listed`` of them; errors and names are capped here.
"""

from __future__ import annotations

import enum
import heapq
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from ipaddress import IPv4Address
from operator import attrgetter
from typing import Any

from telepresence.tunnel.frames import Dial, DialError, IPProtocol

__all__ = [
    "MAX_ERRORS",
    "MAX_LISTED",
    "MAX_NAMES",
    "ErrorKind",
    "FlowBook",
    "FlowRecord",
]

#: Flows a snapshot lists, the newest first: a laptop may hold thousands (UDP alone up to
#: 4096), and the newest are those a user asking "why does this not connect" looks for.
MAX_LISTED = 256
#: Recent errors kept: enough to see a pattern, few enough to read.
MAX_ERRORS = 50
#: Addresses whose looked-up name is remembered; the least recently answered goes first.
MAX_NAMES = 4096


class ErrorKind(enum.Enum):
    REFUSED = "refused"  # the destination's port is closed (a TCP RST in the cluster)
    DIAL_FAILED = "dial-failed"  # unreachable, the manager's dial policy, no manager
    TIMEOUT = "timeout"  # the manager's dial got no answer
    RESET = "reset"  # an open flow reset from the cluster side, or a lost tunnel link
    DNS = "dns"  # a query the daemon answered with SERVFAIL, or had to send elsewhere


_DIAL_KINDS = {
    DialError.REFUSED: ErrorKind.REFUSED,
    DialError.TIMEOUT: ErrorKind.TIMEOUT,
    DialError.UNREACHABLE: ErrorKind.DIAL_FAILED,
    DialError.FAILED: ErrorKind.DIAL_FAILED,
}


class FlowRecord:
    """One open flow. The proxy and the relay write the counters and flags directly."""

    __slots__ = (
        "address",
        "cluster_eof",
        "dialing",
        "laptop_eof",
        "link",
        "name",
        "port",
        "protocol",
        "received",
        "sent",
        "source",
        "started",
        "stream",
    )

    def __init__(
        self,
        *,
        protocol: IPProtocol,
        source: str,
        address: str,
        port: int,
        name: str,
        link: str,
        stream: int,
        started: float,
    ) -> None:
        self.protocol = protocol
        self.source = source
        self.address = address
        self.port = port
        self.name = name
        #: The tunnel link to the manager (the pool's name for it) and the stream in it.
        self.link = link
        self.stream = stream
        self.started = started
        #: Bytes from the program toward the cluster, and from the cluster to the program.
        self.sent = 0
        self.received = 0
        #: Until the manager's dial result; then the half-closes (TCP only).
        self.dialing = True
        self.laptop_eof = False
        self.cluster_eof = False

    @property
    def state(self) -> str:
        """``dialing``, ``open``, ``half-closed-by-laptop`` (the program shut its sending
        side, the cluster may still send), ``half-closed-by-cluster``; ``closing`` when both
        are done, which lasts only until the flow's end in the same callback."""
        if self.dialing:
            return "dialing"
        if self.laptop_eof and self.cluster_eof:
            return "closing"
        if self.laptop_eof:
            return "half-closed-by-laptop"
        if self.cluster_eof:
            return "half-closed-by-cluster"
        return "open"

    @property
    def destination(self) -> str:
        return f"{self.address}:{self.port}"


class _Error:
    __slots__ = ("count", "destination", "kind", "message", "mono", "name", "protocol", "wall")

    def __init__(
        self, kind: ErrorKind, protocol: str, destination: str, name: str, message: str
    ) -> None:
        self.kind = kind
        self.protocol = protocol
        self.destination = destination
        self.name = name
        self.message = message
        self.count = 0
        self.mono = 0.0
        self.wall = 0.0


_ErrorKey = tuple[ErrorKind, str, str, str]


class FlowBook:
    """The open flows, the recent errors and the names of cluster addresses of a session."""

    def __init__(
        self,
        *,
        max_listed: int = MAX_LISTED,
        max_errors: int = MAX_ERRORS,
        max_names: int = MAX_NAMES,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_listed = max_listed
        self.max_errors = max_errors
        self.max_names = max_names
        self._clock = clock
        self._wall_clock = wall_clock
        self._flows: set[FlowRecord] = set()
        #: By (kind, protocol, destination, message); the dict's order is by recency.
        self._errors: dict[_ErrorKey, _Error] = {}
        #: Address -> the name looked up for it; the dict's order is by recency.
        self._names: dict[str, str] = {}

    # --- flows -----------------------------------------------------------------------

    def open(
        self,
        protocol: IPProtocol,
        *,
        source: str,
        address: str,
        port: int,
        link: str = "",
        stream: int = 0,
    ) -> FlowRecord:
        record = FlowRecord(
            protocol=protocol,
            source=source,
            address=address,
            port=port,
            name=self._names.get(address, ""),
            link=link,
            stream=stream,
            started=self._clock(),
        )
        self._flows.add(record)
        return record

    def close(self, record: FlowRecord) -> None:
        self._flows.discard(record)

    def __len__(self) -> int:
        return len(self._flows)

    # --- errors ----------------------------------------------------------------------

    def error(
        self, kind: ErrorKind, *, protocol: str, destination: str, message: str, name: str = ""
    ) -> None:
        """Records one error; the same error again counts up and becomes the newest."""
        key = (kind, protocol, destination, message)
        entry = self._errors.pop(key, None)
        if entry is None:
            entry = _Error(kind, protocol, destination, name, message)
        self._errors[key] = entry
        entry.count += 1
        entry.mono = self._clock()
        entry.wall = self._wall_clock()
        while len(self._errors) > self.max_errors:
            del self._errors[next(iter(self._errors))]

    def dial_failed(self, dial: Dial, error: DialError, message: str) -> None:
        """The manager could not dial (or no manager could be asked: ``FAILED``)."""
        self.error(
            _DIAL_KINDS[error],
            protocol=dial.protocol.name.lower(),
            destination=f"{dial.address}:{dial.port}",
            message=message or error.name.lower(),
            name=self._names.get(dial.address, ""),
        )

    def reset(self, record: FlowRecord, message: str) -> None:
        """An open flow was reset from the cluster side."""
        self.error(
            ErrorKind.RESET,
            protocol=record.protocol.name.lower(),
            destination=record.destination,
            message=message,
            name=record.name,
        )

    def link_lost(self, link: str, reason: str) -> None:
        """A tunnel link to the manager closed: every flow on it was reset at once, so it
        is one error, not one per flow."""
        self.error(
            ErrorKind.RESET,
            protocol="tunnel",
            destination=link,
            message=f"the link to the traffic manager closed ({reason}); its flows were reset",
        )

    # --- DNS (a ~.dns.DnsObserver) ---------------------------------------------------

    def dns_answered(self, name: str, addresses: Iterable[IPv4Address]) -> None:
        for address in addresses:
            key = str(address)
            self._names.pop(key, None)
            self._names[key] = name
        while len(self._names) > self.max_names:
            del self._names[next(iter(self._names))]

    def dns_failed(self, question: str, message: str) -> None:
        self.error(ErrorKind.DNS, protocol="dns", destination=question, message=message)

    # --- status ----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """JSON for `status --flows`: the newest ``max_listed`` flows, how many are open,
        and the recent errors, the newest first."""
        now = self._clock()
        listed = heapq.nlargest(self.max_listed, self._flows, key=attrgetter("started"))
        return {
            "flows": [_flow_json(r, now) for r in listed],
            "flows_open": len(self._flows),
            "errors": [_error_json(e, now) for e in reversed(self._errors.values())],
        }


def _flow_json(record: FlowRecord, now: float) -> dict[str, Any]:
    return {
        "protocol": record.protocol.name.lower(),
        "source": record.source,
        "destination": record.destination,
        "name": record.name,
        "sent": record.sent,
        "received": record.received,
        "age": round(max(0.0, now - record.started), 3),
        "state": record.state,
        "link": record.link,
        "stream": record.stream,
    }


def _error_json(entry: _Error, now: float) -> dict[str, Any]:
    return {
        "time": datetime.fromtimestamp(entry.wall, UTC).isoformat(timespec="milliseconds"),
        "age": round(max(0.0, now - entry.mono), 3),
        "kind": entry.kind.value,
        "protocol": entry.protocol,
        "destination": entry.destination,
        "name": entry.name,
        "message": entry.message,
        "count": entry.count,
    }
