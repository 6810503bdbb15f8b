"""Noticing resolv.conf changes: the pure detector, and the loop on a temporary file."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from telepresence.daemon import resolvwatch
from telepresence.daemon.resolvwatch import ChangeDetector, Stamp, read_stamp


def test_a_change_stays_pending_until_handled() -> None:
    first = Stamp(1, 10, 100, 1, 1)
    renamed = Stamp(1, 11, 100, 1, 1)
    detector = ChangeDetector(first)
    assert not detector.changed(first)
    assert detector.changed(renamed)
    assert detector.changed(renamed)  # not handled yet (the helper was busy): still pending
    detector.handled(renamed)
    assert not detector.changed(renamed)
    assert detector.changed(None)  # the file vanished: look again (the helper keeps the list)
    assert ChangeDetector(None).changed(first)


def test_stamps_see_a_rename_an_in_place_write_and_a_retargeted_symlink(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    assert read_stamp(path) is None
    path.write_text("nameserver 192.0.2.1\n")
    before = read_stamp(path)
    fresh = tmp_path / ".resolv.conf.tmp"
    fresh.write_text("nameserver 192.0.2.2\n")  # same size
    os.replace(fresh, path)  # as NetworkManager does
    after_rename = read_stamp(path)
    assert after_rename is not None and before is not None
    assert after_rename.inode != before.inode
    with path.open("a") as f:
        f.write("search example\n")
    assert read_stamp(path) != after_rename
    target = tmp_path / "run-resolv.conf"
    target.write_text("nameserver 192.0.2.3\n")
    link = tmp_path / "link"
    link.symlink_to(path)
    via_link = read_stamp(link)
    link.unlink()
    link.symlink_to(target)
    assert read_stamp(link) != via_link


async def test_the_watch_calls_back_once_per_change_and_retries_a_failed_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 192.0.2.1\n")
    calls: list[str] = []
    fail_once = [True]

    async def on_change() -> None:
        calls.append(path.read_text())
        if fail_once[0]:
            fail_once[0] = False
            raise ConnectionError("helper busy")

    initial = read_stamp(path)
    # Bounded watches (iteration limits, no timing): unchanged, it never calls back.
    await resolvwatch.watch(path, on_change=on_change, initial=initial, interval=0, iterations=3)
    assert calls == []
    fresh = tmp_path / "new"
    fresh.write_text("nameserver 192.0.2.9\n")
    os.replace(fresh, path)
    # Changed: the first call fails and is retried at the next look; once handled, the
    # remaining looks call nothing more.
    await resolvwatch.watch(path, on_change=on_change, initial=initial, interval=0, iterations=5)
    assert calls == ["nameserver 192.0.2.9\n"] * 2


async def test_the_watch_stops_after_its_iterations(tmp_path: Path) -> None:
    async def never() -> None:
        raise AssertionError("no change")

    path = tmp_path / "resolv.conf"
    async with asyncio.timeout(1):
        await resolvwatch.watch(path, on_change=never, initial=None, iterations=3, interval=0)
