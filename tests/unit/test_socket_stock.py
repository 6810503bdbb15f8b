"""The stock of marked sockets: taken at once when there is one, refilled behind the query."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast

import pytest

from telepresence.daemon.socketstock import SocketStock


class FakeSocket:
    def __init__(self, kind: str, number: int) -> None:
        self.kind, self.number, self.closed = kind, number, False

    def close(self) -> None:
        self.closed = True


class Helper:
    """The helper's factory: counts requests; `gate` holds them until released."""

    def __init__(self) -> None:
        self.made: list[FakeSocket] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = False

    async def make(self, kind: str) -> socket.socket:
        await self.gate.wait()
        if self.fail:
            raise ConnectionResetError("the network helper is gone")
        sock = FakeSocket(kind, len(self.made))
        self.made.append(sock)
        return cast(socket.socket, sock)


def _refills() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "dns-socket-stock"]


async def _settle() -> None:
    """Until the background refill, if one runs, has finished (with a deadline)."""
    for task in _refills():
        await asyncio.wait_for(asyncio.shield(task), timeout=5)


async def test_the_first_query_asks_the_helper_and_the_next_take_from_the_stock() -> None:
    helper = Helper()
    stock = SocketStock(helper.make, size=3)
    first: Any = await stock.take("udp")
    assert helper.made == [first]
    await _settle()
    assert len(stock) == 3  # refilled in the background
    helper.gate.clear()  # from now on the helper would make the query wait
    second: Any = await stock.take("udp")
    assert second in helper.made and second is not first
    assert len(stock) == 2 and _refills()  # the refill waits for the helper
    helper.gate.set()
    await _settle()
    assert len(stock) == 3
    await stock.close()


async def test_tcp_is_made_on_demand_and_not_stocked() -> None:
    helper = Helper()
    stock = SocketStock(helper.make, size=2)
    sock: Any = await stock.take("tcp")
    assert sock.kind == "tcp" and len(stock) == 0
    assert not _refills()
    assert [s.kind for s in helper.made] == ["tcp"]
    await stock.close()


async def test_a_failing_helper_stops_the_refill_and_close_closes_what_is_left() -> None:
    helper = Helper()
    stock = SocketStock(helper.make, size=2)
    await stock.take("udp")
    await _settle()
    kept = list(helper.made[1:])
    assert len(kept) == 2
    helper.fail = True
    await stock.take("udp")  # from the stock, though the helper is gone
    await _settle()
    assert len(stock) == 1
    with pytest.raises(ConnectionResetError):
        await stock.take("tcp")
    await stock.close()
    assert all(s.closed for s in kept[1:])
    helper.fail = False
    made = len(helper.made)
    await stock.take("udp")  # closed: made on demand, nothing stocked any more
    assert not _refills()
    assert len(stock) == 0 and len(helper.made) == made + 1
