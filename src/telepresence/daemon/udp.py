"""UDP to the cluster: datagrams read from the TUN, one tunnel stream per flow.

A flow is (source, source port, destination, destination port). Replies from the cluster
are written back to the TUN as packets from the destination, so the program's socket sees
an ordinary answer. Flows without traffic expire, as NAT mappings do.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from ipaddress import IPv4Address

from telepresence.daemon import packets
from telepresence.daemon.dialfailures import DialFailureLog
from telepresence.daemon.pool import ManagerPool, PoolUnavailable
from telepresence.tunnel.endpoint import TunnelStream
from telepresence.tunnel.frames import Dial, DialError, IPProtocol

log = logging.getLogger("telepresence.udp")

FlowKey = tuple[IPv4Address, int, IPv4Address, int]
# Like a NAT's UDP mapping: a flow with no datagram either way for this long is gone.
IDLE_TIMEOUT = 30.0
MAX_FLOWS = 4096


class UdpFlow:
    """The tunnel side of one flow (a StreamHandler)."""

    def __init__(self, relay: UdpRelay, key: FlowKey) -> None:
        self.relay = relay
        self.key = key
        self.stream: TunnelStream | None = None
        self.last_used = time.monotonic()
        self.pending: list[bytes] = []
        self.open = False

    def send(self, payload: bytes) -> None:
        self.last_used = time.monotonic()
        if self.stream is None or self.stream.closed:
            return
        self.stream.send_datagram(payload)

    def stream_data(self, data: bytes) -> None:
        self.last_used = time.monotonic()
        src, sport, dst, dport = self.key
        self.relay.write(packets.Datagram(dst, dport, src, sport, data))
        if self.stream is not None:
            self.stream.consumed(len(data))

    def stream_eof(self) -> None:
        self.relay.drop(self.key)

    def stream_reset(self) -> None:
        self.relay.drop(self.key)

    def stream_writable(self) -> None:
        pass

    def dial_result(self, error: DialError | None, message: str) -> None:
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
    ):
        self.pool = pool
        self.dial_log = dial_log if dial_log is not None else DialFailureLog()
        self.fd = tun_fd
        self.idle_timeout = idle_timeout
        self.flows: dict[FlowKey, UdpFlow] = {}
        self._ident = 0
        self._task: asyncio.Task[None] | None = None

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
            if d is not None:
                self._forward(d)

    def _forward(self, d: packets.Datagram) -> None:
        key = (d.src, d.sport, d.dst, d.dport)
        flow = self.flows.get(key)
        if flow is None:
            if len(self.flows) >= MAX_FLOWS:
                oldest = min(self.flows.values(), key=lambda f: f.last_used)
                self.drop(oldest.key)
            flow = UdpFlow(self, key)
            try:
                flow.stream = self.pool.open_stream(Dial(IPProtocol.UDP, str(d.dst), d.dport), flow)
            except PoolUnavailable:
                return
            self.flows[key] = flow
        flow.send(d.payload)

    def write(self, d: packets.Datagram) -> None:
        self._ident = (self._ident + 1) & 0xFFFF
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.fd, packets.build(d, ident=self._ident))

    def drop(self, key: FlowKey) -> None:
        flow = self.flows.pop(key, None)
        if flow is not None and flow.stream is not None and not flow.stream.closed:
            flow.stream.reset()

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.idle_timeout / 2))
            now = time.monotonic()
            for key, flow in list(self.flows.items()):
                if now - flow.last_used > self.idle_timeout:
                    self.drop(key)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.fd)
        if self._task is not None:
            self._task.cancel()
        for key in list(self.flows):
            self.drop(key)
