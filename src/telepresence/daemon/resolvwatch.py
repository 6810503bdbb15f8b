"""Noticing that /etc/resolv.conf changed during a session.

NetworkManager, resolvconf and dhclient rewrite resolv.conf when the network
changes (a new Wi-Fi, a VPN coming up), usually by writing a new file and
renaming it over the old one, often behind a symlink into /run.  The session
must then follow: the helper moves the DNS redirect and the daemon its
upstreams (session.py does both; the helper reads the file itself).

Polled, not inotify: ``stat()`` twice a second is one cheap syscall, follows
the symlink to wherever the real file lives (an inotify watch would have to
cover /etc and the target's directory, and move when the link does), and
needs neither ctypes nor a dependency.  A change is seen within
:data:`INTERVAL`.  The stamp is (device, inode, size, mtime, ctime): a rename
changes the inode, an in-place write the times.

:class:`ChangeDetector` is the pure part; :func:`watch` the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["INTERVAL", "ChangeDetector", "Stamp", "read_stamp", "stamp_of", "watch"]

log = logging.getLogger("telepresence.daemon.resolvwatch")

#: Seconds between looks: with the helper's update (milliseconds), a change is
#: followed well within a second.
INTERVAL = 0.5


@dataclass(frozen=True)
class Stamp:
    """What identifies one version of the file without reading it."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int


def stamp_of(st: os.stat_result | None) -> Stamp | None:
    if st is None:
        return None
    return Stamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_stamp(path: Path) -> Stamp | None:
    """The stamp of the file ``path`` points to (symlinks followed); None if absent."""
    try:
        return stamp_of(os.stat(path))
    except OSError:
        return None


class ChangeDetector:
    """Says when the file must be read again.

    A change counts as handled only once :meth:`handled` is called, so a change
    whose handling failed (the helper was busy or refused) is tried again on
    the next look instead of being lost.
    """

    def __init__(self, initial: Stamp | None) -> None:
        self._handled = initial

    def changed(self, stamp: Stamp | None) -> bool:
        return stamp != self._handled

    def handled(self, stamp: Stamp | None) -> None:
        self._handled = stamp


async def watch(
    path: Path,
    *,
    on_change: Callable[[], Awaitable[None]],
    initial: Stamp | None,
    interval: float = INTERVAL,
    iterations: int | None = None,
) -> None:
    """Calls ``on_change`` after each change of ``path`` since ``initial``, until
    cancelled (or after ``iterations`` looks, for tests).  An exception from
    ``on_change`` is logged and the change retried at the next look: the watch
    itself never dies of it."""
    detector = ChangeDetector(initial)
    count = 0
    while iterations is None or count < iterations:
        count += 1
        await asyncio.sleep(interval)
        stamp = read_stamp(path)
        if not detector.changed(stamp):
            continue
        try:
            await on_change()
        except Exception:
            log.exception("following the change of %s failed; trying again", path)
            continue
        detector.handled(stamp)
