"""The control socket between the CLI and the daemon: request and reply lines (ipc.py,
daemon/control.py), the daemon's answer to a malformed request, the CLI's reading."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any, cast

import pytest

from telepresence import ipc
from telepresence.cli import client
from telepresence.daemon import control
from telepresence.daemon.main import Daemon
from telepresence.daemon.request import ConnectRequest


def test_every_command_parses() -> None:
    assert control.parse_request(b'{"cmd": "status"}\n') == control.Status()
    assert control.parse_request(b'{"cmd": "status", "flows": true}\n') == control.Status(True)
    with pytest.raises(ipc.MalformedMessage, match="flows: expected true or false"):
        control.parse_request(b'{"cmd": "status", "flows": "yes"}\n')
    assert control.parse_request(ipc.encode({"cmd": "quit"})) == control.Quit()
    assert control.parse_request(ipc.encode({"cmd": "list"})) == control.ListIntercepts()
    assert control.parse_request(ipc.encode({"cmd": "helper-listen"})) == control.HelperListen()
    assert control.parse_request(
        ipc.encode({"cmd": "intercept", "name": "web", "namespace": "ns"})
    ) == control.Intercept("web", "ns")
    assert control.parse_request(ipc.encode({"cmd": "leave", "name": "web"})) == control.Leave(
        "web"
    )
    connect = control.parse_request(
        ipc.encode(
            {
                "cmd": "connect",
                "context": "dev",
                "mapped_namespaces": ["a", "b"],
                "also_proxy": None,
                "env": {"HOME": "/home/dev"},
            }
        )
    )
    assert connect == control.Connect(
        ConnectRequest(context="dev", mapped_namespaces=("a", "b"), env={"HOME": "/home/dev"})
    )


# What the daemon did with these before they were checked, found while extracting the
# parser for the IPC fuzzer (fuzz/targets/ipc_request.py): an AttributeError, a
# RecursionError or a KeyError in the client's task, and no answer; a string where a
# list belongs was split into characters and connected with them.
@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'["status"]\n', "a JSON object expected, got ['status']"),
        (b"[" * 100_000 + b"\n", "nested too deeply"),
        (b"status\n", "malformed request: Expecting value"),
        (b'{"cmd": "st\xffatus"}\n', "malformed request: 'utf-8' codec"),
        (b'{"cmd": "reboot"}\n', "unknown command 'reboot'"),
        (b'{"cmd": ["status"]}\n', "unknown command ['status']"),
        (b'{"cmd": "intercept", "name": "web"}\n', "'namespace' must be a string, not None"),
        (b'{"cmd": "leave", "name": 7}\n', "'name' must be a string, not 7"),
        (
            b'{"cmd": "connect", "also_proxy": "10.0.0.0/8"}\n',
            "'also_proxy' must be a list of strings or null, not '10.0.0.0/8'",
        ),
        (b'{"cmd": "connect", "env": [["A", "1"]]}\n', "'env' must be an object of strings"),
        (b'{"cmd": "connect", "context": 1}\n', "'context' must be a string or null, not 1"),
    ],
)
def test_malformed_requests_are_refused_with_one_line(line: bytes, message: str) -> None:
    with pytest.raises(ipc.MalformedMessage) as info:
        control.parse_request(line)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


class _Writer:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


async def _exchange(daemon: Daemon, sent: bytes) -> list[ipc.Reply]:
    reader = asyncio.StreamReader(limit=ipc.MAX_REQUEST)
    reader.feed_data(sent)
    reader.feed_eof()
    writer = _Writer()
    await daemon._handle(reader, cast(Any, writer))
    assert writer.closed
    return [ipc.parse_reply(line) for line in bytes(writer.data).splitlines()]


async def test_the_daemon_answers_a_malformed_request_and_keeps_serving() -> None:
    daemon = Daemon(debug=False)
    assert await _exchange(daemon, b'["status"]\n') == [
        ipc.Failure("malformed request: a JSON object expected, got ['status']")
    ]
    assert await _exchange(daemon, b"{" * (ipc.MAX_REQUEST + 1)) == [
        ipc.Failure(f"a request of more than {ipc.MAX_REQUEST} bytes refused")
    ]
    (status,) = await _exchange(daemon, b'{"cmd": "status"}\n')
    assert isinstance(status, ipc.Result)
    assert status.value["user_daemon"]["status"] == "Not connected"
    assert not daemon.stopping.is_set()


def test_reply_lines() -> None:
    assert ipc.parse_reply(b'{"progress": "Routing"}') == ipc.Progress("Routing")
    assert ipc.parse_reply(b'{"error": "no"}') == ipc.Failure("no")
    assert ipc.parse_reply(b'{"result": {"a": 1}}') == ipc.Result({"a": 1})
    for bad in (b'{"result": [1]}', b'{"error": {}}', b"{}", b"[]", b"\xff"):
        with pytest.raises(ipc.MalformedMessage):
            ipc.parse_reply(bad)


def test_line_reader_splits_anywhere_and_bounds_what_it_holds() -> None:
    reader = ipc.LineReader(limit=8)
    assert reader.feed(b"ab") == []
    assert reader.feed(b"c\n\nde") == [b"abc", b""]
    assert reader.feed(b"f\n12345678") == [b"def"]
    assert reader.buffered == 8
    assert reader.end() == b"12345678"
    with pytest.raises(ipc.MalformedMessage, match="more than 8 bytes"):
        reader.feed(b"123456789")
    with pytest.raises(ipc.MalformedMessage, match="more than 8 bytes"):
        ipc.LineReader(limit=8).feed(b"123456789\n")


def test_the_cli_reports_a_malformed_reply_as_a_daemon_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the error names the log directory
    ours, daemon = socket.socketpair()
    with ours, daemon:
        daemon.sendall(b'{"progress": "Connecting"}\n["not", "a", "reply"]\n')
        daemon.close()
        replies = client._replies(ours)
        assert next(replies) == ipc.Progress("Connecting")
        with pytest.raises(client.DaemonError, match="malformed reply from the daemon"):
            next(replies)
