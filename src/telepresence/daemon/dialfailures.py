"""What the daemon's log says when the manager could not dial for a program.

The program only sees a reset (TCP) or silence (UDP); the log is where the user learns
why, e.g. that the manager's dial policy refused a link-local address. A closed port is an
ordinary answer and is logged at info; every other failure (unreachable, timeout, the
policy) at warning. A program that retries in a loop would flood the log, so one
destination's failure is logged once per `REPEAT_AFTER` seconds and at debug in between.
Every failure, logged or not, also goes to the session's :class:`~.flowbook.FlowBook`,
whose recent errors `telepresence status --flows` shows.
"""

from __future__ import annotations

import logging

from telepresence.daemon.flowbook import FlowBook
from telepresence.tunnel.frames import Dial, DialError

log = logging.getLogger("telepresence.dial")

REPEAT_AFTER = 30.0
#: Destinations remembered; the oldest is forgotten first, so memory stays bounded.
MAX_REMEMBERED = 1024


def describe(dial: Dial, error: DialError, message: str) -> tuple[int, str]:
    """The log level and line for one failed dial."""
    level = logging.INFO if error is DialError.REFUSED else logging.WARNING
    what = message or error.name.lower()
    return (
        level,
        f"{dial.protocol.name} {dial.address}:{dial.port}: the cluster dial failed: {what}",
    )


class DialFailureLog:
    """Logs failed dials, each destination's at most once per ``repeat_after`` seconds."""

    def __init__(
        self,
        *,
        repeat_after: float = REPEAT_AFTER,
        max_remembered: int = MAX_REMEMBERED,
        book: FlowBook | None = None,
    ) -> None:
        self.repeat_after = repeat_after
        self.max_remembered = max_remembered
        self.book = book
        self._last: dict[tuple[Dial, DialError], float] = {}

    def due(self, dial: Dial, error: DialError, *, now: float) -> bool:
        """Whether this failure goes to the log at its level (else at debug)."""
        key = (dial, error)
        last = self._last.get(key)
        if last is not None and now - last < self.repeat_after:
            return False
        self._last.pop(key, None)  # re-inserted last: the dict's order is by recency
        self._last[key] = now
        while len(self._last) > self.max_remembered:
            del self._last[next(iter(self._last))]
        return True

    def failed(self, dial: Dial, error: DialError, message: str, *, now: float) -> None:
        level, line = describe(dial, error, message)
        log.log(level if self.due(dial, error, now=now) else logging.DEBUG, "%s", line)
        if self.book is not None:
            self.book.dial_failed(dial, error, message)
