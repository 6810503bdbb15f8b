"""The helper's connection loop against hostile bytes: every bad message gets an Error,
and nothing reaches the state that applies changes.  A socketpair, no root."""

from __future__ import annotations

import socket
import threading
from typing import Any

import msgspec

from telepresence.netfilter import protocol
from telepresence.netfilter.helper import serve
from telepresence.netfilter.protocol import Error, FrameDecoder, Hello, Ok, Status, StatusReply


class RecordingState:
    """Stands in for NetworkState: records what would have been applied."""

    def __init__(self) -> None:
        self.handled: list[Any] = []
        self.teardowns = 0

    def handle(self, request: Any) -> tuple[protocol.Response, list[int]]:
        self.handled.append(request)
        if isinstance(request, protocol.Teardown):
            return Ok(), []
        return StatusReply(configured=False, helper_pid=1), []

    def teardown(self) -> list[str]:
        self.teardowns += 1
        return []


def exchange(payload: bytes) -> tuple[list[protocol.Message], RecordingState, int]:
    ours, theirs = socket.socketpair()
    wake_r, wake_w = socket.socketpair()
    state = RecordingState()
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(serve(theirs, state, wakeup=wake_r)),  # type: ignore[arg-type]
        daemon=True,
    )
    thread.start()
    ours.sendall(payload)
    ours.shutdown(socket.SHUT_WR)  # end of requests: serve() returns
    thread.join(5)
    theirs.close()
    decoder = FrameDecoder()
    ours.settimeout(5)
    while data := ours.recv(65536):
        decoder.feed(data)
    messages = []
    while (item := decoder.next()) is not None:
        messages.append(item[0])
    for s in (ours, theirs, wake_r, wake_w):
        s.close()
    return messages, state, result[0]


def frame(body: dict[str, Any]) -> bytes:
    data = msgspec.msgpack.encode(body)
    return len(data).to_bytes(4, "big") + b"\x00" + data


def test_malformed_requests_are_answered_and_the_connection_goes_on() -> None:
    payload = (
        frame({"type": "Setup", "subnets": ["0.0.0.0/0"], "dns_redirect_port": 1,
               "proxy_port": 2, "mark": 0xCA6C})
        + frame({"type": "Status", "nameservers": ["192.0.2.1"]})
        + b"\x00\x00\x00\x03\x00\xc1\xc1\xc1"
        + protocol.encode(Status())
    )  # fmt: skip
    messages, state, _ = exchange(payload)
    assert isinstance(messages[0], Hello)
    errors = messages[1:4]
    assert all(isinstance(e, Error) and "\n" not in e.message for e in errors), errors
    assert "unknown field `mark`" in errors[0].message  # type: ignore[union-attr]
    assert "unknown field `nameservers`" in errors[1].message  # type: ignore[union-attr]
    assert isinstance(messages[4], StatusReply)
    assert state.handled == [Status()]


def test_an_oversized_message_is_refused_before_it_is_read() -> None:
    size = protocol.MAX_REQUEST + 1
    messages, state, status = exchange(size.to_bytes(4, "big") + b"\x00" + b"x" * 1000)
    assert isinstance(messages[1], Error)
    assert "65537 bytes refused" in messages[1].message
    assert state.handled == [] and state.teardowns == 1 and status == 0


def test_garbage_bytes_are_refused() -> None:
    messages, state, _ = exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [type(m) for m in messages] == [Hello, Error]
    assert state.handled == []
