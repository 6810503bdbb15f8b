"""Receive windows that grow as a stream is read, inside one budget per connection."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telepresence.tunnel.credit import ReceiveBudget
from telepresence.tunnel.frames import HEADER, MIN_INITIAL_WINDOW, FrameType
from telepresence.tunnel.protocol import (
    Connection,
    DataReceived,
    Dial,
    IPProtocol,
    ProtocolError,
    Role,
    StreamOpened,
)

W0 = MIN_INITIAL_WINDOW
TCP = Dial(IPProtocol.TCP, "10.0.0.1", 80)
UDP = Dial(IPProtocol.UDP, "10.0.0.1", 53)


def test_resize_waits_for_evidence_then_doubles_up_to_the_stream_cap() -> None:
    budget = ReceiveBudget(limit=100 * W0, max_window=6 * W0, evidence=4)
    assert budget.resize(W0, consumed=4 * W0 - 1) == W0
    assert budget.resize(W0, consumed=4 * W0) == 2 * W0
    assert budget.resize(2 * W0, consumed=8 * W0) == 4 * W0
    assert budget.resize(4 * W0, consumed=16 * W0) == 6 * W0  # capped, not doubled past it
    assert budget.resize(6 * W0, consumed=10**9) == 6 * W0
    assert budget.grown == 5 * W0


def test_resize_stops_at_the_connection_limit_and_release_frees_it() -> None:
    budget = ReceiveBudget(limit=3 * W0, max_window=16 * W0, evidence=1)
    assert budget.resize(W0, W0) == 2 * W0
    assert budget.resize(2 * W0, 2 * W0) == 4 * W0  # only 2 W0 of room left: grows by that
    assert budget.resize(W0, W0) == W0  # nothing left for another stream
    budget.release(4 * W0, W0)
    assert budget.grown == 0
    assert budget.resize(W0, W0) == 2 * W0


def test_releasing_more_than_granted_is_a_bug_not_a_silent_negative() -> None:
    budget = ReceiveBudget(limit=4 * W0, max_window=4 * W0)
    with pytest.raises(AssertionError):
        budget.release(2 * W0, W0)


def pair(budget: ReceiveBudget) -> tuple[Connection, Connection]:
    """A client whose receive side has `budget`, and a plain server."""
    client = Connection(Role.CLIENT, initial_window=W0, budget=budget)
    server = Connection(Role.SERVER, initial_window=W0)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    return client, server


def open_stream(client: Connection, server: Connection, dial: Dial = TCP) -> int:
    stream_id = client.open_stream(dial)
    events = server.receive_data(client.data_to_send())
    assert events == [StreamOpened(stream_id, dial)]
    server.accept_stream(stream_id)
    client.receive_data(server.data_to_send())
    return stream_id


def move(server: Connection, client: Connection, stream_id: int, size: int) -> int:
    """The server sends up to `size` bytes as its credit allows, the client consumes each
    chunk as it arrives; returns what moved (less than `size` only if credit ran out)."""
    moved = 0
    while moved < size and (window := server.send_window(stream_id)) > 0:
        server.send_data(stream_id, bytes(min(window, 65536, size - moved)))
        for event in client.receive_data(server.data_to_send()):
            assert isinstance(event, DataReceived)
            moved += len(event.data)
            client.consume(stream_id, len(event.data))
        server.receive_data(client.data_to_send())
    return moved


def window_of(client: Connection, stream_id: int) -> int:
    return client._streams[stream_id].window


def test_a_stream_that_keeps_being_read_earns_a_larger_window() -> None:
    budget = ReceiveBudget(limit=64 * W0, max_window=8 * W0, evidence=4)
    client, server = pair(budget)
    stream_id = open_stream(client, server)
    assert move(server, client, stream_id, 4 * W0 - W0 // 4) == 4 * W0 - W0 // 4
    assert window_of(client, stream_id) == W0  # not yet: four windows are the evidence
    move(server, client, stream_id, W0 // 4)
    assert window_of(client, stream_id) == 2 * W0
    # The peer learns the larger window through a WINDOW_UPDATE and may fill it all.
    assert server.send_window(stream_id) == 2 * W0
    move(server, client, stream_id, 8 * W0 + 16 * W0)
    assert window_of(client, stream_id) == 8 * W0
    move(server, client, stream_id, 64 * W0)
    assert window_of(client, stream_id) == 8 * W0  # the cap
    assert budget.grown == 7 * W0


def test_a_stream_that_is_never_read_keeps_its_initial_window() -> None:
    budget = ReceiveBudget(limit=64 * W0, max_window=8 * W0)
    client, server = pair(budget)
    stream_id = open_stream(client, server)
    server.send_data(stream_id, bytes(server.send_window(stream_id)))
    client.receive_data(server.data_to_send())
    assert server.send_window(stream_id) == 0
    assert budget.grown == 0


def test_a_burst_then_a_stall_does_not_grow_the_window() -> None:
    """What a reader that stops after the first few hundred KiB looks like: the kernel
    took them, and then nothing. It must not take budget a busy stream could use."""
    budget = ReceiveBudget(limit=64 * W0, max_window=8 * W0, evidence=4)
    client, server = pair(budget)
    stream_id = open_stream(client, server)
    move(server, client, stream_id, 3 * W0)
    server.send_data(stream_id, bytes(server.send_window(stream_id)))
    client.receive_data(server.data_to_send())  # the reader stalls: never consumed
    assert window_of(client, stream_id) == W0
    assert budget.grown == 0


def test_growth_of_all_streams_stays_within_the_limit_and_stalled_ones_block_no_other() -> None:
    budget = ReceiveBudget(limit=6 * W0, max_window=4 * W0, evidence=1)
    client, server = pair(budget)
    first, second, third = (open_stream(client, server) for _ in range(3))
    # The first grows to its cap while read, then its reader stalls with a full window.
    move(server, client, first, 8 * W0)
    assert window_of(client, first) == 4 * W0
    server.send_data(first, bytes(server.send_window(first)))
    client.receive_data(server.data_to_send())
    # The second takes what is left of the budget; the third keeps its initial window,
    # and both still move data.
    assert move(server, client, second, 16 * W0) == 16 * W0
    assert move(server, client, third, 16 * W0) == 16 * W0
    assert budget.grown == 6 * W0
    assert window_of(client, second) == 4 * W0
    assert window_of(client, third) == W0


def test_a_finished_stream_gives_its_growth_back() -> None:
    budget = ReceiveBudget(limit=2 * W0, max_window=4 * W0, evidence=1)
    client, server = pair(budget)
    stream_id = open_stream(client, server)
    move(server, client, stream_id, 8 * W0)
    assert budget.grown == 2 * W0
    server.close_stream(stream_id)  # FIN: the client needs no more credit
    client.receive_data(server.data_to_send())
    assert budget.grown == 0
    other = open_stream(client, server)
    move(server, client, other, 4 * W0)
    assert budget.grown == 2 * W0
    client.reset_stream(other)
    assert budget.grown == 0


def test_reset_and_goaway_give_growth_back() -> None:
    budget = ReceiveBudget(limit=8 * W0, max_window=4 * W0, evidence=1)
    client, server = pair(budget)
    streams = [open_stream(client, server) for _ in range(2)]
    for stream_id in streams:
        move(server, client, stream_id, 2 * W0)
    assert budget.grown == 2 * W0
    server.reset_stream(streams[0])
    client.receive_data(server.data_to_send())
    assert budget.grown == W0
    server.close()
    client.receive_data(server.data_to_send())
    assert budget.grown == 0


def test_datagram_streams_never_grow() -> None:
    budget = ReceiveBudget(limit=8 * W0, max_window=4 * W0, evidence=1)
    client, server = pair(budget)
    stream_id = open_stream(client, server, UDP)
    for _ in range(32):
        assert server.send_datagram(stream_id, bytes(W0 // 4))
        for event in client.receive_data(server.data_to_send()):
            client.consume(stream_id, len(event.data))  # type: ignore[union-attr]
        server.receive_data(client.data_to_send())
    assert budget.grown == 0
    assert server.send_window(stream_id) == W0


def test_the_peer_may_use_grown_credit_but_not_a_byte_more() -> None:
    budget = ReceiveBudget(limit=8 * W0, max_window=2 * W0, evidence=1)
    client, server = pair(budget)
    stream_id = open_stream(client, server)
    move(server, client, stream_id, 2 * W0)
    credit = server.send_window(stream_id)
    assert credit == 2 * W0
    # A peer that ignores its credit is caught, grown window or not.
    server.send_data(stream_id, bytes(credit))
    client.receive_data(server.data_to_send())
    with pytest.raises(ProtocolError, match="credit"):
        client.receive_data(HEADER.pack(FrameType.DATA, 0, stream_id, 1) + b"x")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from(["send", "read", "fin", "reset"])),
        max_size=60,
    )
)
def test_the_budget_always_equals_the_growth_of_live_streams(
    steps: list[tuple[int, str]],
) -> None:
    budget = ReceiveBudget(limit=5 * W0, max_window=4 * W0, evidence=1)
    client, server = pair(budget)
    streams = [open_stream(client, server) for _ in range(4)]
    unread = dict.fromkeys(streams, 0)
    live = set(streams)
    for index, action in steps:
        stream_id = streams[index]
        if stream_id not in live:
            continue
        if action == "send":
            server.send_data(stream_id, bytes(server.send_window(stream_id)))
        elif action == "read" and unread[stream_id]:
            client.consume(stream_id, unread[stream_id])
            unread[stream_id] = 0
        elif action == "fin":
            server.close_stream(stream_id)
            live.discard(stream_id)
        elif action == "reset":
            client.reset_stream(stream_id)
            live.discard(stream_id)
        for event in client.receive_data(server.data_to_send()):
            if isinstance(event, DataReceived):
                unread[event.stream_id] += len(event.data)
        server.receive_data(client.data_to_send())
        assert 0 <= budget.grown <= budget.limit
        assert budget.grown == sum(
            client._streams[s].window - W0 for s in live if s in client._streams
        )
