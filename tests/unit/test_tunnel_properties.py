"""Property tests for the tunnel protocol: chunking independence and a two-peer model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from telepresence.tunnel.frames import MIN_INITIAL_WINDOW
from telepresence.tunnel.messages import DnsLookup, Remain
from telepresence.tunnel.protocol import (
    Connection,
    ControlReceived,
    DataReceived,
    Dial,
    DialSucceeded,
    ErrorCode,
    Event,
    IPProtocol,
    LocalProtocolError,
    Role,
    StreamClosedError,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)

WINDOW = MIN_INITIAL_WINDOW
PERIOD = 251  # prime, so offsets into a flow are visible in its bytes
PATTERN = bytes(range(PERIOD)) * 1200


def pattern(offset: int, size: int) -> bytes:
    start = offset % PERIOD
    return PATTERN[start : start + size]


# --- chunking ---------------------------------------------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("open"), st.sampled_from(IPProtocol)),
        st.tuples(st.just("send"), st.integers(0, 7), st.integers(0, 150_000)),
        st.tuples(st.just("close"), st.integers(0, 7)),
        st.tuples(st.just("reset"), st.integers(0, 7)),
        st.tuples(st.just("control"), st.integers(0, 2**32)),
    ),
    max_size=25,
)


def client_wire(ops: list[tuple[object, ...]]) -> bytes:
    """Everything a client writes for ``ops``, starting with its preface, against a
    peer whose preface it has seen (so it has credit)."""
    client = Connection(Role.CLIENT)
    client.receive_data(Connection(Role.SERVER).data_to_send())
    streams: list[tuple[int, IPProtocol]] = []
    for op in ops:
        try:
            match op:
                case ("open", IPProtocol() as protocol):
                    streams.append((client.open_stream(Dial(protocol, "10.1.2.3", 443)), protocol))
                case ("send", int(index), int(size)) if streams:
                    stream_id, protocol = streams[index % len(streams)]
                    if protocol is IPProtocol.UDP:
                        client.send_datagram(stream_id, pattern(size, size % 65536))
                    else:
                        client.send_data(stream_id, pattern(size, size))
                case ("close", int(index)) if streams:
                    client.close_stream(streams[index % len(streams)][0])
                case ("reset", int(index)) if streams:
                    client.reset_stream(streams[index % len(streams)][0])
                case ("control", int(request_id)):
                    client.send_control(DnsLookup(request_id, "db.default", 1))
        except LocalProtocolError:
            pass  # e.g. sending on a stream this script already closed
    return client.data_to_send()


@settings(max_examples=150, deadline=None)
@given(ops=operations, data=st.data())
def test_any_chunking_yields_the_same_events(
    ops: list[tuple[object, ...]], data: st.DataObject
) -> None:
    wire = client_wire(ops)
    expected = Connection(Role.SERVER).receive_data(wire)

    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=40)))
    kind = data.draw(st.sampled_from([bytes, bytearray, memoryview]))
    server = Connection(Role.SERVER)
    events: list[Event] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        chunk = bytearray(wire[start:end])
        events += server.receive_data(kind(chunk))
        chunk[:] = b"\0" * len(chunk)  # a reused receive buffer must not corrupt events
    assert events == expected


# --- two connected peers ----------------------------------------------------------------


@dataclass
class Flow:
    """One direction of one stream, as the applications on both ends see it."""

    stalled: bool  # the receiving application never consumes
    written: int = 0
    accepted: int = 0
    received: int = 0
    consumed: int = 0
    fin_wanted: bool = False
    fin_sent: bool = False
    fin_received: bool = False


@dataclass
class StreamModel:
    stream_id: int
    flows: dict[Role, Flow]  # keyed by the sending side
    known_to_server: bool = False
    dial_succeeded: bool = False
    reset: bool = False


@dataclass
class Side:
    conn: Connection
    wire: bytearray = field(default_factory=bytearray)  # written, not yet delivered


def other(role: Role) -> Role:
    return Role.SERVER if role is Role.CLIENT else Role.CLIENT


sides = st.sampled_from(Role)
picks = st.integers(0, 2**16)


class TwoPeers(RuleBasedStateMachine):
    """A client and a server joined by two byte pipes that the rules drain in arbitrary
    pieces, with applications writing, closing, resetting and (unless stalled) consuming.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sides = {
            role: Side(Connection(role, initial_window=WINDOW))
            for role in (Role.CLIENT, Role.SERVER)
        }
        self.streams: list[StreamModel] = []
        self.by_id: dict[int, StreamModel] = {}
        self.controls_sent = 0
        self.controls_received = 0
        self.flush()

    # plumbing

    def flush(self) -> None:
        for side in self.sides.values():
            side.wire += side.conn.data_to_send()

    def deliver(self, sender: Role, size: int, as_bytes: bool = True) -> None:
        wire = self.sides[sender].wire
        chunk = bytes(wire[:size])
        del wire[:size]
        receiver = other(sender)
        for event in self.sides[receiver].conn.receive_data(
            chunk if as_bytes else bytearray(chunk)
        ):
            self.handle(receiver, event)
        self.flush()

    def handle(self, role: Role, event: Event) -> None:
        conn = self.sides[role].conn
        match event:
            case StreamOpened(stream_id=stream_id):
                assert role is Role.SERVER
                self.by_id[stream_id].known_to_server = True
                # A reset later in the same batch has already closed it; a real shell
                # hits the same race when its dial completes after the reset.
                with contextlib.suppress(StreamClosedError):
                    conn.accept_stream(stream_id)
            case DialSucceeded(stream_id=stream_id):
                self.by_id[stream_id].dial_succeeded = True
                self.pump(role, self.by_id[stream_id])
            case DataReceived(stream_id=stream_id, data=data):
                flow = self.by_id[stream_id].flows[other(role)]
                assert data == pattern(flow.received, len(data)), "data out of order"
                flow.received += len(data)
            case StreamEnded(stream_id=stream_id):
                flow = self.by_id[stream_id].flows[other(role)]
                assert flow.fin_sent
                assert flow.received == flow.accepted
                flow.fin_received = True
            case StreamReset(stream_id=stream_id, code=code):
                assert code is ErrorCode.CANCEL
                self.by_id[stream_id].reset = True
            case WindowUpdated(stream_id=stream_id):
                self.pump(role, self.by_id[stream_id])
            case ControlReceived(message=message):
                assert message == Remain(str(self.controls_received))
                self.controls_received += 1
            case _:
                raise AssertionError(f"unexpected {event}")

    def pump(self, role: Role, stream: StreamModel) -> None:
        """What a shell's writer does: push what the application wrote, as far as the
        credit goes, then FIN once everything is out."""
        flow = stream.flows[role]
        if stream.reset or flow.fin_sent:
            return
        conn = self.sides[role].conn
        if flow.accepted < flow.written:
            chunk = pattern(flow.accepted, flow.written - flow.accepted)
            flow.accepted += conn.send_data(stream.stream_id, chunk)
        if flow.fin_wanted and flow.accepted == flow.written:
            conn.close_stream(stream.stream_id)
            flow.fin_sent = True

    def can_act(self, role: Role, stream: StreamModel) -> bool:
        return not stream.reset and (role is Role.CLIENT or stream.known_to_server)

    # rules

    @rule(c2s_stalled=st.booleans(), s2c_stalled=st.booleans())
    def open_stream(self, c2s_stalled: bool, s2c_stalled: bool) -> None:
        stream_id = self.sides[Role.CLIENT].conn.open_stream(Dial(IPProtocol.TCP, "10.0.0.1", 80))
        stream = StreamModel(
            stream_id, {Role.CLIENT: Flow(c2s_stalled), Role.SERVER: Flow(s2c_stalled)}
        )
        self.streams.append(stream)
        self.by_id[stream_id] = stream
        self.flush()

    @precondition(lambda self: self.streams)
    @rule(role=sides, pick=picks, size=st.integers(1, 4096) | st.integers(WINDOW, 3 * WINDOW))
    def write(self, role: Role, pick: int, size: int) -> None:
        stream = self.streams[pick % len(self.streams)]
        flow = stream.flows[role]
        if self.can_act(role, stream) and not flow.fin_wanted:
            flow.written += size
            self.pump(role, stream)
            self.flush()

    @precondition(lambda self: self.streams)
    @rule(role=sides, pick=picks)
    def close(self, role: Role, pick: int) -> None:
        stream = self.streams[pick % len(self.streams)]
        if self.can_act(role, stream):
            stream.flows[role].fin_wanted = True
            self.pump(role, stream)
            self.flush()

    @precondition(lambda self: self.streams)
    @rule(role=sides, pick=picks)
    def reset(self, role: Role, pick: int) -> None:
        stream = self.streams[pick % len(self.streams)]
        if self.can_act(role, stream):
            self.sides[role].conn.reset_stream(stream.stream_id)
            stream.reset = True
            self.flush()

    @precondition(lambda self: self.streams)
    @rule(role=sides, pick=picks, fraction=st.floats(0, 1))
    def consume(self, role: Role, pick: int, fraction: float) -> None:
        stream = self.streams[pick % len(self.streams)]
        flow = stream.flows[other(role)]
        if not flow.stalled and (role is Role.CLIENT or stream.known_to_server):
            size = int((flow.received - flow.consumed) * fraction)
            self.sides[role].conn.consume(stream.stream_id, size)
            flow.consumed += size
            self.flush()

    @rule(role=sides)
    def control(self, role: Role) -> None:
        if role is Role.CLIENT:
            self.sides[role].conn.send_control(Remain(str(self.controls_sent)))
            self.controls_sent += 1
            self.flush()

    @rule(role=sides, size=st.integers(1, 300_000), as_bytes=st.booleans())
    def transfer(self, role: Role, size: int, as_bytes: bool) -> None:
        self.deliver(role, size, as_bytes)

    @rule()
    def settle(self) -> None:
        """Run both shells until nothing moves; every flow whose reader is not stalled
        must then be complete, whatever the stalled ones are holding."""
        while True:
            moved = False
            for role, side in self.sides.items():
                if side.wire:
                    self.deliver(role, len(side.wire))
                    moved = True
            for stream in self.streams:
                for sender, flow in stream.flows.items():
                    if not flow.stalled and flow.received > flow.consumed:
                        self.sides[other(sender)].conn.consume(
                            stream.stream_id, flow.received - flow.consumed
                        )
                        flow.consumed = flow.received
                        moved = True
            self.flush()
            if not moved:
                break
        assert self.controls_received == self.controls_sent
        for stream in self.streams:
            if stream.reset:
                continue
            assert stream.dial_succeeded
            for flow in stream.flows.values():
                if not flow.stalled:
                    assert flow.received == flow.written
                    assert flow.fin_received == flow.fin_wanted

    def teardown(self) -> None:
        self.settle()

    # invariants

    @invariant()
    def credit_bounds_unconsumed_data(self) -> None:
        """Bytes a sender has handed over but the receiving application has not taken
        (in flight plus buffered) never exceed the window: memory stays bounded."""
        for stream in self.streams:
            for flow in stream.flows.values():
                assert flow.received <= flow.accepted <= flow.written
                assert flow.accepted - flow.consumed <= WINDOW


TwoPeers.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
test_two_peers = TwoPeers.TestCase
