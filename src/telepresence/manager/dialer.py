"""What the manager does with a stream a laptop opens: dial its destination (TCP or UDP)
under the dial policy, or serve it itself (`telepresence bench`).

Apart from the link's control handling (`server.py`): this is the one place where the
manager acts on the cluster network for a laptop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Coroutine
from typing import Any

from telepresence.manager.benchservice import (
    BENCH_ADDRESS,
    BENCH_PORT,
    BENCH_PROTOCOL,
    StreamBench,
)
from telepresence.manager.dialpolicy import DialPolicy
from telepresence.manager.udpdial import UdpDial
from telepresence.tunnel.endpoint import TunnelStream
from telepresence.tunnel.flows import SocketFlow
from telepresence.tunnel.frames import Dial, DialError, IPProtocol

log = logging.getLogger("telepresence.manager")

DIAL_TIMEOUT = 10.0
#: Starts the DIAL_RESULT message of a dial the policy refused.
POLICY_REFUSAL = "refused by the manager's dial policy"


def open_stream(
    stream: TunnelStream, dial: Dial, *, session: str, protocol: int, policy: DialPolicy
) -> Coroutine[Any, Any, None] | None:
    """Answers the stream at once (refused, or the bench service), or returns the dial
    to run as a task."""
    if (
        (dial.address, dial.port) == (BENCH_ADDRESS, BENCH_PORT)
        and dial.protocol is IPProtocol.TCP
        and protocol >= BENCH_PROTOCOL
    ):
        # `telepresence bench`: the manager itself is the far end, nothing is dialled.
        stream.handler = StreamBench(stream)
        stream.accept()
        return None
    verdict = policy.check(dial.address)
    if not verdict.allowed:
        # FAILED with the reason, not a new result code: the laptop resets the local
        # connection on any failed dial and logs the message, and no version bump.
        log.info(
            "session %s: %s dial to %s:%d refused: %s",
            session,
            dial.protocol.name,
            dial.address,
            dial.port,
            verdict.reason,
        )
        stream.reject(DialError.FAILED, f"{POLICY_REFUSAL}: {verdict.reason}")
        return None
    # The handler is attached now, not in the dial task: data sent right behind the
    # OPEN arrives in the same batch and must be kept until the dial completes.
    if dial.protocol is IPProtocol.TCP:
        flow = SocketFlow()
        flow.attach(stream)
        return _dial_tcp(stream, flow, dial)
    return _dial_udp(stream, UdpDial(stream), dial)


async def _dial_udp(stream: TunnelStream, flow: UdpDial, dial: Dial) -> None:
    loop = asyncio.get_running_loop()
    try:
        await loop.create_datagram_endpoint(lambda: flow, remote_addr=(dial.address, dial.port))
    except OSError as e:
        stream.reject(DialError.UNREACHABLE, e.strerror or str(e))
        return
    if stream.closed:
        flow.stream_reset()
    else:
        stream.accept()
        flow.accepted()


async def _dial_tcp(stream: TunnelStream, flow: SocketFlow, dial: Dial) -> None:
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(
            loop.create_connection(lambda: flow, dial.address, dial.port), DIAL_TIMEOUT
        )
    except ConnectionRefusedError:
        stream.reject(DialError.REFUSED, "connection refused")
    except TimeoutError:
        stream.reject(DialError.TIMEOUT, f"no answer in {DIAL_TIMEOUT:.0f}s")
    except OSError as e:
        code = (
            DialError.UNREACHABLE
            if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH)
            else DialError.FAILED
        )
        stream.reject(code, e.strerror or str(e))
    else:
        if stream.closed:
            flow.stream_reset()
        else:
            stream.accept()
