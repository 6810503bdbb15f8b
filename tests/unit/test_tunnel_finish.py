"""A stream whose owner is done both ways still sends what waits for the peer's credit, and
its FIN, before the tunnel drops it: a server that answers a half-closed request with more
than a window and closes at once keeps the end of its answer. Two tunnels wired in
memory, no sockets."""

from __future__ import annotations

from telepresence.tunnel.endpoint import STREAM_INITIAL_WINDOW, Tunnel, TunnelStream
from telepresence.tunnel.frames import Dial, DialError, IPProtocol
from telepresence.tunnel.protocol import Role


class Receiver:
    """A StreamHandler that takes everything at once and gives the credit back."""

    def __init__(self) -> None:
        self.stream: TunnelStream | None = None
        self.data = bytearray()
        self.eof = False
        self.reset = False

    def stream_data(self, data: bytes) -> None:
        self.data += data
        assert self.stream is not None
        self.stream.consumed(len(data))

    def stream_eof(self) -> None:
        self.eof = True

    def stream_reset(self) -> None:
        self.reset = True

    def stream_writable(self) -> None:
        pass

    def dial_result(self, error: DialError | None, message: str) -> None:
        pass


class Pair:
    """A laptop-side and a manager-side tunnel; bytes move only in `deliver`."""

    def __init__(self) -> None:
        self.to_server: list[bytes] = []
        self.to_client: list[bytes] = []
        self.accepted: list[TunnelStream] = []
        self.client = Tunnel(Role.CLIENT, write=lambda b: self.to_server.extend(map(bytes, b)))
        self.server = Tunnel(
            Role.SERVER, write=lambda b: self.to_client.extend(map(bytes, b)), on_open=self._open
        )
        self.deliver()

    def _open(self, stream: TunnelStream, dial: Dial) -> None:
        stream.handler = Receiver()
        stream.accept()
        self.accepted.append(stream)

    def deliver(self) -> None:
        while self.to_server or self.to_client:
            data, self.to_server[:] = b"".join(self.to_server), []
            if data:
                self.server.data_received(data)
            data, self.to_client[:] = b"".join(self.to_client), []
            if data:
                self.client.data_received(data)


def opened() -> tuple[Pair, Receiver, TunnelStream]:
    """A stream from the laptop, accepted: the pair, the laptop's handler, the far end."""
    pair = Pair()
    laptop = Receiver()
    laptop.stream = pair.client.open_stream(Dial(IPProtocol.TCP, "10.0.0.1", 80), laptop)
    pair.deliver()
    (far,) = pair.accepted
    return pair, laptop, far


def test_an_answer_beyond_the_window_is_sent_whole_after_its_owner_finished() -> None:
    pair, laptop, far = opened()
    assert laptop.stream is not None
    laptop.stream.close()  # the program half-closed after its request
    pair.deliver()
    answer = bytes(range(256)) * (3 * STREAM_INITIAL_WINDOW // 256)
    # The cluster side answers with three windows' worth and closes: its flow is done both
    # ways while two windows still wait for the laptop's credit.
    far.write(answer)
    far.close()
    far.finish()
    assert far.buffered > 0
    pair.deliver()
    assert laptop.data == answer
    assert laptop.eof and not laptop.reset
    assert far.closed and far.id not in pair.server.streams


def test_a_finished_stream_with_nothing_left_to_send_is_dropped_at_once() -> None:
    pair, laptop, far = opened()
    far.write(b"short")
    far.close()
    far.finish()
    assert far.closed and far.id not in pair.server.streams
    pair.deliver()
    assert laptop.data == b"short" and laptop.eof
