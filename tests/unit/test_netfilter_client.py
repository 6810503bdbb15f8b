"""HelperClient against a scripted helper on a socketpair: framing, descriptor passing,
errors and cancellation.  No root, no sudo: the real helper is in tests/e2e."""

from __future__ import annotations

import array
import asyncio
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from telepresence.netfilter import protocol
from telepresence.netfilter.client import HelperClient, HelperError, HelperGone
from telepresence.netfilter.protocol import (
    Error,
    FrameDecoder,
    Hello,
    Request,
    SetupDone,
    SocketReady,
    StatusReply,
)

Answer = Callable[[Request], tuple[protocol.Response, list[int]] | None]


class ScriptedHelper:
    """The helper's end of the socket, in a thread: answers each request with ``answer``
    (None closes the connection), and records what it was asked."""

    def __init__(self, sock: socket.socket, answer: Answer) -> None:
        self.sock = sock
        self.answer = answer
        self.requests: list[Request] = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def send(self, message: protocol.Response, fds: list[int]) -> None:
        frame = protocol.encode(message, fds=len(fds))
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        self.sock.sendmsg([frame], anc if fds else [])

    def run(self) -> None:
        decoder = FrameDecoder()
        self.send(Hello(version=protocol.VERSION, pid=4242), [])
        while data := self.sock.recv(65536):
            decoder.feed(data)
            while (item := decoder.next()) is not None:
                request = item[0]
                assert isinstance(request, Request)
                self.requests.append(request)
                answer = self.answer(request)
                if answer is None:
                    self.sock.close()
                    return
                self.send(*answer)
        self.sock.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


async def connect(client_sock: socket.socket) -> HelperClient:
    return await HelperClient.from_socket(client_sock)


async def test_setup_hands_over_the_tun_descriptor(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    read_end, write_end = os.pipe()

    def answer(request: Request) -> tuple[protocol.Response, list[int]]:
        return SetupDone(tun_name="tel0", routed=["10.96.0.0/16"]), [read_end]

    helper = ScriptedHelper(pair[1], answer)
    client = await connect(pair[0])
    assert client.helper_pid == 4242
    result = await client.setup(subnets=["10.96.0.0/16"], dns_redirect_port=1053, proxy_port=1234)
    assert result.tun_name == "tel0" and [str(n) for n in result.routed] == ["10.96.0.0/16"]
    os.write(write_end, b"packet")
    assert os.read(result.tun_fd, 6) == b"packet"  # a copy of the helper's descriptor
    setup = helper.requests[0]
    assert isinstance(setup, protocol.Setup) and setup.subnets == ["10.96.0.0/16"]
    for fd in (result.tun_fd, read_end, write_end):
        os.close(fd)
    await client.close()


async def test_upstream_socket_is_a_socket_object(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ScriptedHelper(pair[1], lambda r: (SocketReady(kind="udp"), [udp.fileno()]))
    client = await connect(pair[0])
    with await client.upstream_socket("udp") as sock:
        assert (sock.family, sock.type) == (socket.AF_INET, socket.SOCK_DGRAM)
    udp.close()
    await client.close()


async def test_an_error_answer_raises_its_one_line(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ScriptedHelper(pair[1], lambda r: (Error(message="cluster subnet overlaps; use X"), []))
    client = await connect(pair[0])
    with pytest.raises(HelperError, match=r"^cluster subnet overlaps; use X$"):
        await client.update_subnets(["10.96.0.0/16"])
    await client.close()


async def test_a_closed_connection_is_helper_gone_for_this_and_later_calls(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ScriptedHelper(pair[1], lambda r: None)
    client = await connect(pair[0])
    with pytest.raises(HelperGone):
        await client.status()
    with pytest.raises(HelperGone):
        await client.status()
    await client.close()


async def test_an_unexpected_answer_type_is_an_error(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ScriptedHelper(pair[1], lambda r: (SocketReady(kind="tcp"), []))
    client = await connect(pair[0])
    with pytest.raises(HelperError, match="answered SocketReady"):
        await client.status()
    await client.close()


async def test_a_cancelled_call_does_not_shift_answers_to_the_next_call(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    asked, release = threading.Event(), threading.Event()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    answers: Iterator[tuple[protocol.Response, list[int]]] = iter(
        [
            (SocketReady(kind="udp"), [udp.fileno()]),
            (StatusReply(configured=False, helper_pid=4242), []),
        ]
    )

    def answer(request: Request) -> tuple[protocol.Response, list[int]]:
        if isinstance(request, protocol.UpstreamSocket):
            asked.set()
            release.wait(5)
        return next(answers)

    ScriptedHelper(pair[1], answer)
    client = await connect(pair[0])
    slow = asyncio.create_task(client.upstream_socket("udp"))
    assert await asyncio.to_thread(asked.wait, 5)  # the request is out, its answer pending
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    release.set()
    status = await client.status()
    assert status == StatusReply(configured=False, helper_pid=4242)
    udp.close()
    await client.close()


async def test_a_helper_of_another_protocol_version_is_refused(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    pair[1].sendall(protocol.encode(Hello(version=protocol.VERSION + 1, pid=1)))
    with pytest.raises(HelperError, match=r"helper install` again"):
        await HelperClient.from_socket(pair[0])


async def test_start_reports_why_the_helper_did_not_connect(tmp_path: Path) -> None:
    script = "import sys; print('sudo: a password is required', file=sys.stderr); sys.exit(1)"
    with pytest.raises(HelperGone, match=r"exited with status 1 .*a password is required"):
        await HelperClient.start(command=[sys.executable, "-c", script], runtime_dir=tmp_path)
    assert not (tmp_path / "helper.sock").exists()
