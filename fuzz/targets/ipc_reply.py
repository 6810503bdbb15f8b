"""The CLI's side of the control socket: the reply lines the daemon writes (ipc.py).

The input is one option byte (it seeds how the bytes are split into reads), then what
arrives on the socket.  Lines are split by ``ipc.LineReader``, with a small limit here so
that the refusal of a longer line is reachable, and each is read by ``parse_reply``.

The contract:

- ``feed`` and ``parse_reply`` raise ``ipc.MalformedMessage`` (one line) and nothing else;
- the lines, newlines put back, are exactly the bytes consumed: nothing lost, nothing
  made up, whatever the split;
- a line is refused exactly when it is longer than the limit, and nothing longer is ever
  buffered;
- a reply is a progress text, an error text or a result object.
"""

from __future__ import annotations

import random
from typing import Any

from telepresence import ipc

__all__ = ["TestOneInput", "seeds"]

LIMIT = 512


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    rng = random.Random(data[0])
    stream = data[1:]
    reader = ipc.LineReader(limit=LIMIT)
    lines: list[bytes] = []
    pos = 0
    refused = False
    while pos < len(stream):
        size = rng.choice((1, 2, 7, 100, 600, 65536))
        try:
            lines += reader.feed(stream[pos : pos + size])
        except ipc.MalformedMessage as exc:
            assert "\n" not in str(exc)
            refused = True
            break
        pos += size
        assert reader.buffered <= LIMIT
    too_long = any(len(line) > LIMIT for line in stream.split(b"\n"))
    if refused:
        assert too_long
        return
    lines.append(reader.end())
    assert not too_long
    assert b"\n".join(lines) == stream
    for line in lines:
        try:
            reply = ipc.parse_reply(line)
        except ipc.MalformedMessage as exc:
            assert "\n" not in str(exc), str(exc)
            continue
        if isinstance(reply, ipc.Result):
            assert isinstance(reply.value, dict)
        elif isinstance(reply, ipc.Failure):
            assert isinstance(reply.message, str)
        else:
            assert isinstance(reply, ipc.Progress) and isinstance(reply.text, str)


def seeds() -> dict[str, bytes]:
    status = {
        "user_daemon": {"running": True, "version": "0.1.0", "status": "Not connected"},
        "root_daemon": {"running": False},
    }
    replies: list[dict[str, Any]] = [
        {"progress": "Connecting to the traffic manager"},
        {"progress": "Routing 2 subnets"},
        {"result": {"context": "devcluster", "server": "https://192.0.2.1:6443"}},
    ]
    return {
        "status": b"\x00" + ipc.encode({"result": status}),
        "connect-progress": b"\x05" + b"".join(map(ipc.encode, replies)),
        "error": b"\x09" + ipc.encode({"error": "not connected; run `telepresence connect`"}),
        "no-newline-at-end": b"\x00" + ipc.encode({"result": {}})[:-1],
        "bad-line-too-long": b"\x02" + ipc.encode({"progress": "x" * (LIMIT + 1)}),
        "bad-result-not-object": b"\x00" + ipc.encode({"result": [1]}),
        "bad-error-not-string": b"\x00" + ipc.encode({"error": {"x": 1}}),
        "bad-garbage": b"\x03" + b"\xff\xfe{}\n\n[[[\n",
    }
