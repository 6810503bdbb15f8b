"""The control socket between the CLI and the user daemon: newline-delimited JSON.

The CLI writes one request, a JSON object on one line whose ``cmd`` names the command
(:func:`telepresence.daemon.control.parse_request` reads it).  The daemon answers with
lines of ``{"progress": text}``, then one ``{"result": object}`` or ``{"error": text}``
(:func:`parse_reply` reads them for the CLI).  The socket is the user's own (mode 0600),
but both ends still check a line before they act on it: a malformed one is refused
with one line that says so, and neither end buffers more than one bounded line.

Pure, and light: ``telepresence status`` imports it, so nothing here pulls in asyncio.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_REPLY",
    "MAX_REQUEST",
    "Failure",
    "LineReader",
    "MalformedMessage",
    "Progress",
    "Reply",
    "Result",
    "decode",
    "encode",
    "optional_text",
    "parse_reply",
    "text",
    "text_list",
    "text_map",
]

MAX_REQUEST = 64 * 1024
"""The longest request line: asyncio's default StreamReader limit, which the daemon reads
with.  The largest request, `connect`, carries the CLI's environment: a few KiB."""
MAX_REPLY = 16 * 1024 * 1024
"""The longest reply line the CLI reads; a status with thousands of host routes is far
below it."""
_SHOWN = 60


class MalformedMessage(ValueError):
    """A line that is not a valid message; the text is one line that says why."""


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "…"


def encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def decode(line: bytes, *, what: str) -> dict[str, Any]:
    """One line as a JSON object; ``what`` names the line in the refusal."""
    try:
        value = json.loads(line)
    except RecursionError:
        raise MalformedMessage(f"malformed {what}: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise MalformedMessage(f"malformed {what}: {e}") from None
    if not isinstance(value, dict):
        raise MalformedMessage(f"malformed {what}: a JSON object expected, got {_shown(value)}")
    return value


# --- fields --------------------------------------------------------------------------


def text(message: Mapping[str, Any], key: str) -> str:
    """A required string field."""
    value = message.get(key)
    if not isinstance(value, str):
        raise MalformedMessage(f"{key!r} must be a string, not {_shown(value)}")
    return value


def optional_text(message: Mapping[str, Any], key: str) -> str | None:
    """A string field that may be null or left out."""
    value = message.get(key)
    if value is not None and not isinstance(value, str):
        raise MalformedMessage(f"{key!r} must be a string or null, not {_shown(value)}")
    return value


def text_list(message: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    """A list of strings; None when null or left out."""
    value = message.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise MalformedMessage(f"{key!r} must be a list of strings or null, not {_shown(value)}")
    return tuple(value)


def text_map(message: Mapping[str, Any], key: str) -> dict[str, str]:
    """An object of strings; empty when null or left out."""
    value = message.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(item, str) for item in value.values()):
        raise MalformedMessage(f"{key!r} must be an object of strings or null, not {_shown(value)}")
    return dict(value)


# --- replies -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    text: str


@dataclass(frozen=True, slots=True)
class Result:
    value: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Failure:
    """The daemon's one line for the user."""

    message: str


Reply = Progress | Result | Failure


def parse_reply(line: bytes) -> Reply:
    message = decode(line, what="reply from the daemon")
    if "error" in message:
        return Failure(text(message, "error"))
    if "result" in message:
        value = message["result"]
        if not isinstance(value, dict):
            raise MalformedMessage(
                f"malformed reply from the daemon: a result object expected, got {_shown(value)}"
            )
        return Result(value)
    if "progress" in message:
        return Progress(text(message, "progress"))
    raise MalformedMessage(f"malformed reply from the daemon: {_shown(message)}")


class LineReader:
    """Splits a byte stream into lines, holding at most ``limit`` bytes of a line not yet
    ended; a longer line is refused rather than buffered."""

    def __init__(self, *, limit: int) -> None:
        self._buffer = bytearray()
        self._scanned = 0
        self._limit = limit

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """The lines ``data`` completes, without their newlines."""
        buffer = self._buffer
        buffer += data
        lines = []
        start = 0
        scan = self._scanned  # what was buffered before holds no newline
        while (end := buffer.find(b"\n", scan)) >= 0:
            self._check(end - start)
            lines.append(bytes(buffer[start:end]))
            start = scan = end + 1
        del buffer[:start]
        self._scanned = len(buffer)
        self._check(len(buffer))
        return lines

    def end(self) -> bytes:
        """What is left at the end of the stream: a last line without a newline."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        self._scanned = 0
        return rest

    def _check(self, size: int) -> None:
        if size > self._limit:
            raise MalformedMessage(f"a line of more than {self._limit} bytes refused")
