"""The helper's journal: what is recorded, and what a sweep undoes (no kernel needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from telepresence.netfilter.journal import (
    Entry,
    Identity,
    Journal,
    LinkEntry,
    NftTableEntry,
    ResolvedLinkEntry,
    RouteEntry,
    current_identity,
    describe,
    is_alive,
    sweep,
    undo_order,
)

LINK = LinkEntry(name="tel0", ifindex=7)
ROUTE_A = RouteEntry(network="10.96.0.0/16", device="tel0", ifindex=7)
ROUTE_B = RouteEntry(network="10.244.0.0/16", device="tel0", ifindex=7)
TABLE = NftTableEntry(name="telepresence")
RESOLVED = ResolvedLinkEntry(name="tel0", ifindex=7)


def dead_owner(me: Identity, **changes: object) -> Identity:
    """An identity like ours whose process is gone (pids never exceed 2**22 on Linux)."""
    fields = {"pid": 2**22 + 1, "start_time": 1, "boot_id": me.boot_id, "netns": me.netns}
    fields.update(changes)
    return Identity(**fields)  # type: ignore[arg-type]


def write_journal(directory: Path, owner: Identity, *entries: Entry) -> Journal:
    journal = Journal(directory, owner=owner)
    journal.record(*entries)
    return journal


def test_current_identity_is_alive_and_a_stranger_is_not() -> None:
    me = current_identity()
    assert is_alive(me)
    assert not is_alive(dead_owner(me))
    assert not is_alive(
        Identity(pid=me.pid, start_time=me.start_time + 1, boot_id="", netns=me.netns)
    )


def test_entries_are_described_for_people() -> None:
    assert [describe(e) for e in (LINK, ROUTE_A, TABLE, RESOLVED)] == [
        "TUN device tel0",
        "route 10.96.0.0/16 dev tel0",
        "nftables table ip telepresence",
        "systemd-resolved DNS settings of tel0",
    ]


def test_undo_order_is_dns_first_then_routes_then_link_newest_first() -> None:
    """resolved's settings before the table (both are DNS: the laptop's lookups work
    again at once), and before the link they belong to."""
    assert undo_order([LINK, ROUTE_A, ROUTE_B, TABLE]) == [TABLE, ROUTE_B, ROUTE_A, LINK]
    assert undo_order([LINK, ROUTE_A, TABLE, RESOLVED]) == [RESOLVED, TABLE, ROUTE_A, LINK]


def test_a_resolved_entry_survives_the_journal_file(tmp_path: Path) -> None:
    me = current_identity()
    write_journal(tmp_path, dead_owner(me), LINK, ROUTE_A, TABLE, RESOLVED)
    undone: list[Entry] = []

    def undo(entry: Entry) -> bool:
        undone.append(entry)
        return True

    report = sweep(tmp_path, current=me, undo=undo)
    assert undone == [RESOLVED, TABLE, ROUTE_A, LINK]
    assert report.undone[0] == "systemd-resolved DNS settings of tel0"


def test_record_writes_before_and_forget_removes_the_file_when_empty(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", owner=current_identity())
    journal.record(LINK)
    journal.record(ROUTE_A, ROUTE_B)
    saved = json.loads(journal.path.read_text())
    assert [e["type"] for e in saved["entries"]] == ["link", "route", "route"]
    assert (journal.path.parent.stat().st_mode & 0o777) == 0o700
    journal.forget(ROUTE_A, ROUTE_B, ROUTE_A)
    assert journal.entries == [LINK]
    journal.forget(LINK)
    assert not journal.path.exists()
    assert not list(journal.path.parent.iterdir())  # no temporary file left either


def test_sweep_undoes_a_dead_helpers_journal_in_order_and_deletes_it(tmp_path: Path) -> None:
    me = current_identity()
    journal = write_journal(tmp_path, dead_owner(me), LINK, ROUTE_A, TABLE)
    undone: list[Entry] = []

    def undo(entry: Entry) -> bool:
        undone.append(entry)
        return entry != TABLE  # the kernel dropped the owned table already

    report = sweep(tmp_path, current=me, undo=undo)
    assert undone == [TABLE, ROUTE_A, LINK]
    assert report.undone == ["route 10.96.0.0/16 dev tel0", "TUN device tel0"]
    assert report.gone == ["nftables table ip telepresence"]
    assert not report.failed and not journal.path.exists()
    assert sweep(tmp_path, current=me, undo=undo).undone == []  # idempotent


def test_failed_undos_stay_for_the_next_sweep_and_do_not_stop_the_rest(tmp_path: Path) -> None:
    me = current_identity()
    journal = write_journal(tmp_path, dead_owner(me), LINK, ROUTE_A, ROUTE_B, TABLE)
    attempted: list[Entry] = []

    def undo(entry: Entry) -> bool:
        attempted.append(entry)
        if entry in (ROUTE_A, TABLE):
            raise OSError("busy")
        return True

    report = sweep(tmp_path, current=me, undo=undo)
    assert attempted == [TABLE, ROUTE_B, ROUTE_A, LINK]
    assert len(report.failed) == 2
    left = json.loads(journal.path.read_text())["entries"]
    assert [e["type"] for e in left] == ["route", "nft-table"]
    report = sweep(tmp_path, current=me, undo=lambda e: True)
    assert not report.failed and not journal.path.exists()


def test_sweep_leaves_live_helpers_and_other_namespaces_alone(tmp_path: Path) -> None:
    me = current_identity()
    other_ns = tmp_path / "other"
    live = write_journal(tmp_path, me, LINK)
    elsewhere = write_journal(other_ns, dead_owner(me, netns=(0, 1)), LINK)
    elsewhere.path.rename(tmp_path / elsewhere.path.name)

    def undo(entry: Entry) -> bool:
        raise AssertionError(f"must not undo {entry}")

    report = sweep(tmp_path, current=me, undo=undo)
    assert len(report.skipped) == 2
    assert live.path.exists() and (tmp_path / elsewhere.path.name).exists()


def test_a_journal_from_an_earlier_boot_is_dropped_unread(tmp_path: Path) -> None:
    me = current_identity()
    journal = write_journal(tmp_path, dead_owner(me, boot_id="earlier"), LINK)
    report = sweep(tmp_path, current=me, undo=lambda e: pytest.fail("nothing survives a reboot"))
    assert not journal.path.exists() and not report.undone


def test_an_unreadable_journal_is_reported_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "helper-journal-1-2.json").write_text("{not json")
    report = sweep(tmp_path, current=current_identity(), undo=lambda e: True)
    assert len(report.failed) == 1 and "remove it by hand" in report.failed[0]
