"""UDP to the cluster: datagrams read from the TUN, one tunnel stream per flow.

A flow is (source, source port, destination, destination port). Replies from the cluster
are written back to the TUN as packets from the destination, so the program's socket sees
an ordinary answer. Flows without traffic expire, as NAT mappings do.

One address may be the daemon's own (:class:`LocalDns`, "resolved" DNS mode):
systemd-resolved sends its queries for the TUN link's domains to port 53 of an address
routed to the TUN, and accepts answers only from that link, so they are answered here,
in-process, and written back to the TUN as datagrams from that address.  Nothing sent to
that address ever opens a tunnel flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address

from telepresence.daemon import packets
from telepresence.daemon.dialfailures import DialFailureLog
from telepresence.daemon.flowbook import FlowBook, FlowRecord
from telepresence.daemon.pool import ManagerPool, PoolUnavailable
from telepresence.tunnel.endpoint import TunnelStream
from telepresence.tunnel.frames import Dial, DialError, IPProtocol

log = logging.getLogger("telepresence.udp")

FlowKey = tuple[IPv4Address, int, IPv4Address, int]
# Like a NAT's UDP mapping: a flow with no datagram either way for this long is gone.
IDLE_TIMEOUT = 30.0
MAX_FLOWS = 4096
DNS_PORT = 53

#: Answers one DNS query's wire bytes (None: no answer), e.g.
#: ``lambda wire: resolver.answer(wire, tcp=False)``.
DnsAnswerer = Callable[[bytes], Awaitable[bytes | None]]


@dataclass(frozen=True)
class LocalDns:
    """A DNS server of our own on the TUN: queries to ``address``:``port`` are answered
    by ``answer``.  ``max_pending`` bounds the queries in progress (as the DNS server's
    ``DnsSettings.max_pending`` does): beyond it, a query is dropped and resolved asks
    again."""

    address: IPv4Address
    answer: DnsAnswerer
    port: int = DNS_PORT
    max_pending: int = 1024


class Dispatch(enum.Enum):
    """What happens to one datagram read from the TUN."""

    TUNNEL = "tunnel"  # a flow to the cluster
    LOCAL_DNS = "local-dns"  # answered in-process
    DROP = "drop"  # to our DNS address, but not its DNS port


def dispatch(d: packets.Datagram, local_dns: LocalDns | None) -> Dispatch:
    """Only the DNS port of our own address is answered; the rest of that address is
    dropped (it is ours, nothing in the cluster has it); every other address is the
    cluster's."""
    if local_dns is None or d.dst != local_dns.address:
        return Dispatch.TUNNEL
    return Dispatch.LOCAL_DNS if d.dport == local_dns.port else Dispatch.DROP


class UdpFlow:
    """The tunnel side of one flow (a StreamHandler), with its record in the flow book."""

    def __init__(self, relay: UdpRelay, key: FlowKey, record: FlowRecord) -> None:
        self.relay = relay
        self.key = key
        self.record = record
        self.stream: TunnelStream | None = None
        self.last_used = time.monotonic()

    def send(self, payload: bytes) -> None:
        self.last_used = time.monotonic()
        if self.stream is None or self.stream.closed:
            return
        self.record.sent += len(payload)
        self.stream.send_datagram(payload)

    def stream_data(self, data: bytes) -> None:
        self.last_used = time.monotonic()
        self.record.received += len(data)
        src, sport, dst, dport = self.key
        self.relay.write(packets.Datagram(dst, dport, src, sport, data))
        if self.stream is not None:
            self.stream.consumed(len(data))

    def stream_eof(self) -> None:
        self.relay.drop(self.key)

    def stream_reset(self) -> None:
        stream = self.stream
        # A lost link resets all its flows at once: the pool records that once.
        if stream is not None and not stream.tunnel.closed:
            self.relay.book.reset(self.record, "reset by the traffic manager")
        self.relay.drop(self.key)

    def stream_writable(self) -> None:
        pass

    def dial_result(self, error: DialError | None, message: str) -> None:
        self.record.dialing = False
        if error is not None:
            _, _, dst, dport = self.key
            dial = Dial(IPProtocol.UDP, str(dst), dport)
            self.relay.dial_log.failed(dial, error, message, now=time.monotonic())
            self.relay.drop(self.key)


class UdpRelay:
    def __init__(
        self,
        pool: ManagerPool,
        tun_fd: int,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        dial_log: DialFailureLog | None = None,
        local_dns: LocalDns | None = None,
        book: FlowBook | None = None,
    ):
        self.pool = pool
        self.book = book if book is not None else FlowBook()
        self.dial_log = dial_log if dial_log is not None else DialFailureLog(book=self.book)
        self.fd = tun_fd
        self.idle_timeout = idle_timeout
        self.local_dns = local_dns
        self.flows: dict[FlowKey, UdpFlow] = {}
        #: Local DNS queries in progress (each a named task, at most ``max_pending``).
        self.dns_queries: set[asyncio.Task[None]] = set()
        self._dns_ids = itertools.count(1)
        self._ident = 0
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        asyncio.get_running_loop().add_reader(self.fd, self._readable)
        self._task = asyncio.create_task(self._expire(), name="udp-expire")

    def _readable(self) -> None:
        for _ in range(64):  # bounded, so one busy flow cannot starve the loop
            try:
                packet = os.read(self.fd, 65535)
            except BlockingIOError:
                return
            except OSError as e:
                log.warning("reading the TUN failed: %s", e)
                asyncio.get_running_loop().remove_reader(self.fd)
                return
            d = packets.parse(packet)
            if d is None:
                continue
            action = dispatch(d, self.local_dns)
            if action is Dispatch.TUNNEL:
                self._forward(d)
            elif action is Dispatch.LOCAL_DNS:
                self._answer_locally(d)
            else:
                log.debug("dropped a datagram to %s:%d (not DNS)", d.dst, d.dport)

    def _answer_locally(self, d: packets.Datagram) -> None:
        local = self.local_dns
        assert local is not None
        if self._closed:
            return
        if len(self.dns_queries) >= local.max_pending:
            log.warning("DNS on the TUN busy: dropping a query from %s:%d", d.src, d.sport)
            return
        task = asyncio.create_task(
            self._reply_locally(local, d), name=f"tun-dns-query-{next(self._dns_ids)}"
        )
        self.dns_queries.add(task)
        task.add_done_callback(self._dns_query_done)

    async def _reply_locally(self, local: LocalDns, d: packets.Datagram) -> None:
        reply = await local.answer(d.payload)
        if reply is not None and not self._closed:
            self.write(packets.Datagram(local.address, local.port, d.src, d.sport, reply))

    def _dns_query_done(self, task: asyncio.Task[None]) -> None:
        self.dns_queries.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("DNS query from the TUN failed", exc_info=exc)

    def _forward(self, d: packets.Datagram) -> None:
        key = (d.src, d.sport, d.dst, d.dport)
        flow = self.flows.get(key)
        if flow is None:
            if len(self.flows) >= MAX_FLOWS:
                oldest = min(self.flows.values(), key=lambda f: f.last_used)
                self.drop(oldest.key)
            dial = Dial(IPProtocol.UDP, str(d.dst), d.dport)
            record = self.book.open(
                IPProtocol.UDP, source=f"{d.src}:{d.sport}", address=dial.address, port=d.dport
            )
            flow = UdpFlow(self, key, record)
            try:
                flow.stream = stream = self.pool.open_stream(dial, flow)
            except PoolUnavailable as e:
                self.book.close(record)
                self.book.dial_failed(dial, DialError.FAILED, str(e))
                return
            record.link = self.pool.link_name(stream)
            record.stream = stream.id
            self.flows[key] = flow
        flow.send(d.payload)

    def write(self, d: packets.Datagram) -> None:
        self._ident = (self._ident + 1) & 0xFFFF
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.fd, packets.build(d, ident=self._ident))

    def drop(self, key: FlowKey) -> None:
        flow = self.flows.pop(key, None)
        if flow is None:
            return
        self.book.close(flow.record)
        if flow.stream is not None and not flow.stream.closed:
            flow.stream.reset()

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.idle_timeout / 2))
            now = time.monotonic()
            for key, flow in list(self.flows.items()):
                if now - flow.last_used > self.idle_timeout:
                    self.drop(key)

    def close(self) -> None:
        """Stops reading; cancels the expiry and the local DNS queries in progress (none
        of them writes to the TUN after this) and resets every flow."""
        self._closed = True
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.fd)
        if self._task is not None:
            self._task.cancel()
        for task in list(self.dns_queries):
            task.cancel()
        for key in list(self.flows):
            self.drop(key)
