"""A TCP stream's DATA frames that arrive in one read reach its handler together, so the
socket behind it takes them in one write; UDP datagrams never merge. Two tunnels wired
in memory, no sockets."""

from __future__ import annotations

from telepresence.tunnel.endpoint import Tunnel, TunnelStream
from telepresence.tunnel.frames import MAX_FRAME_PAYLOAD, Dial, DialError, IPProtocol
from telepresence.tunnel.protocol import Role


class Recorder:
    """A StreamHandler that notes each delivery as it came."""

    def __init__(self) -> None:
        self.deliveries: list[list[bytes]] = []

    def stream_data(self, data: bytes) -> None:
        self.deliveries.append([data])

    def stream_data_parts(self, parts: list[bytes]) -> None:
        self.deliveries.append(list(parts))

    def stream_eof(self) -> None:
        pass

    def stream_reset(self) -> None:
        pass

    def stream_writable(self) -> None:
        pass

    def dial_result(self, error: DialError | None, message: str) -> None:
        pass


class Pair:
    """A laptop-side and a manager-side tunnel; each side's output waits until `deliver`."""

    def __init__(self) -> None:
        self.to_server: list[bytes] = []
        self.to_client: list[bytes] = []
        self.accepted: dict[int, Recorder] = {}
        self.client = Tunnel(Role.CLIENT, write=lambda b: self.to_server.extend(map(bytes, b)))
        self.server = Tunnel(
            Role.SERVER, write=lambda b: self.to_client.extend(map(bytes, b)), on_open=self._open
        )
        self.deliver()

    def _open(self, stream: TunnelStream, dial: Dial) -> None:
        stream.handler = self.accepted[stream.id] = Recorder()
        stream.accept()

    def deliver(self) -> None:
        """Everything each side wrote reaches the other in a single read."""
        while self.to_server or self.to_client:
            data, self.to_server[:] = b"".join(self.to_server), []
            if data:
                self.server.data_received(data)
            data, self.to_client[:] = b"".join(self.to_client), []
            if data:
                self.client.data_received(data)

    def open(self, protocol: IPProtocol = IPProtocol.TCP) -> tuple[TunnelStream, Recorder]:
        stream = self.client.open_stream(Dial(protocol, "10.0.0.1", 80), Recorder())
        self.deliver()
        return stream, self.accepted[stream.id]


def chunk(tag: int) -> bytes:
    return bytes([tag]) * MAX_FRAME_PAYLOAD


def test_frames_of_one_stream_in_one_read_arrive_as_one_delivery_in_order() -> None:
    pair = Pair()
    stream, far = pair.open()
    stream.write(chunk(1) + chunk(2) + chunk(3))  # three frames
    pair.deliver()
    assert far.deliveries == [[chunk(1), chunk(2), chunk(3)]]


def test_a_lone_frame_arrives_as_plain_data() -> None:
    pair = Pair()
    stream, far = pair.open()
    stream.write(b"GET / HTTP/1.1\r\n\r\n")
    pair.deliver()
    assert far.deliveries == [[b"GET / HTTP/1.1\r\n\r\n"]]


def test_runs_split_where_another_stream_s_frame_comes_between() -> None:
    pair = Pair()
    first, first_far = pair.open()
    second, second_far = pair.open()
    first.write(chunk(1) + chunk(2))
    second.write(b"b")
    first.write(chunk(3))
    pair.deliver()
    assert first_far.deliveries == [[chunk(1), chunk(2)], [chunk(3)]]
    assert second_far.deliveries == [[b"b"]]


def test_udp_datagrams_that_arrive_together_are_delivered_one_by_one() -> None:
    pair = Pair()
    stream, far = pair.open(IPProtocol.UDP)
    for datagram in (b"one", b"two", b"three"):
        stream.send_datagram(datagram)
    pair.deliver()
    assert far.deliveries == [[b"one"], [b"two"], [b"three"]]


def test_data_for_a_stream_without_handler_is_still_credited_back() -> None:
    pair = Pair()
    stream, _ = pair.open()
    pair.server.streams[stream.id].handler = None  # its flow is gone, the stream not yet
    window = pair.client.conn.send_window(stream.id)
    stream.write(chunk(1) + chunk(2))
    pair.deliver()
    assert pair.client.conn.send_window(stream.id) == window
