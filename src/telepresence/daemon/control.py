"""What the CLI asks the daemon over the control socket, checked before it is acted on.

:func:`parse_request` turns one request line (:mod:`telepresence.ipc`) into one of the
commands below, or raises :class:`~telepresence.ipc.MalformedMessage` with the line the
daemon answers as the error.  Pure: :mod:`.main` does the socket.
"""

from __future__ import annotations

from dataclasses import dataclass

from telepresence import ipc
from telepresence.daemon.request import ConnectRequest

__all__ = [
    "Command",
    "Connect",
    "HelperListen",
    "Intercept",
    "Leave",
    "ListIntercepts",
    "Quit",
    "Status",
    "parse_request",
]


@dataclass(frozen=True, slots=True)
class Status:
    """``flows``: also the open flows and the recent errors (`status --flows`)."""

    flows: bool = False


@dataclass(frozen=True, slots=True)
class HelperListen:
    """Open the socket for a helper the CLI starts on its terminal."""


@dataclass(frozen=True, slots=True)
class Connect:
    request: ConnectRequest


@dataclass(frozen=True, slots=True)
class Intercept:
    name: str
    namespace: str


@dataclass(frozen=True, slots=True)
class Leave:
    name: str


@dataclass(frozen=True, slots=True)
class ListIntercepts:
    pass


@dataclass(frozen=True, slots=True)
class Quit:
    pass


@dataclass(frozen=True, slots=True)
class Bench:
    """`telepresence bench`: measure the tunnel against the manager for ``seconds``."""

    seconds: float


Command = Status | HelperListen | Connect | Intercept | Leave | ListIntercepts | Quit | Bench

_PLAIN: dict[str, Command] = {
    "status": Status(),
    "helper-listen": HelperListen(),
    "list": ListIntercepts(),
    "quit": Quit(),
}


def parse_request(line: bytes) -> Command:
    message = ipc.decode(line, what="request")
    cmd = message.get("cmd")
    if cmd == "status" and "flows" in message:
        flows = message["flows"]
        if not isinstance(flows, bool):
            raise ipc.MalformedMessage(f"flows: expected true or false, got {flows!r:.60}")
        return Status(flows=flows)
    if isinstance(cmd, str) and cmd in _PLAIN:
        return _PLAIN[cmd]
    if cmd == "connect":
        return Connect(ConnectRequest.from_json(message))
    if cmd == "intercept":
        return Intercept(ipc.text(message, "name"), ipc.text(message, "namespace"))
    if cmd == "leave":
        return Leave(ipc.text(message, "name"))
    if cmd == "bench":
        seconds = message.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise ipc.MalformedMessage(f"seconds: expected a number, got {seconds!r:.60}")
        return Bench(float(seconds))
    shown = repr(cmd) if len(repr(cmd)) <= 60 else repr(cmd)[:60] + "…"
    raise ipc.MalformedMessage(f"unknown command {shown}")
