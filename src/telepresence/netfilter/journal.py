"""The helper's journal: every change it makes, written down before it is made.

The kernel undoes most of the helper's work on its own (the owned nftables
table dies with the helper, the TUN and its routes with the last descriptor),
but not all of it in every case: a helper killed with -9 while the daemon
still holds the TUN leaves the link and its routes up.  The journal lets
``telepresence-helper --cleanup`` remove whatever is left, later, from
another process.

One file per helper, named after its network namespace and pid, so helpers
in different namespaces (or a second one in the same) never share a file.
Each file says who wrote it (pid and start time, boot id, namespace), so
the sweep only touches journals of helpers that are gone, in the namespace
it runs in.  Writes are atomic (temporary file, fsync, rename): a crash
mid-write leaves the previous version, never a torn one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

__all__ = [
    "DEFAULT_DIR",
    "Entry",
    "Identity",
    "Journal",
    "JournalFile",
    "LinkEntry",
    "NftTableEntry",
    "ResolvedLinkEntry",
    "RouteEntry",
    "SweepReport",
    "current_identity",
    "describe",
    "is_alive",
    "sweep",
    "undo_order",
]

log = logging.getLogger(__name__)

#: Root-owned and outside any user's reach; the same path from every
#: network namespace, so a sweep finds journals of helpers in any of them.
DEFAULT_DIR = Path("/var/lib/telepresence")
_PREFIX = "helper-journal-"


class LinkEntry(msgspec.Struct, frozen=True, tag="link"):
    """A TUN link, identified by name and index (a later link may reuse the name).

    The one entry recorded just *after* its change: the index is not known
    before, and until the daemon holds a copy of the descriptor the kernel
    deletes a non-persistent TUN with the helper anyway.
    """

    name: str
    ifindex: int


class RouteEntry(msgspec.Struct, frozen=True, tag="route"):
    """A route on our TUN; only removed while the link with that index exists."""

    network: str
    device: str
    ifindex: int


class NftTableEntry(msgspec.Struct, frozen=True, tag="nft-table"):
    name: str
    family: str = "ip"


class ResolvedLinkEntry(msgspec.Struct, frozen=True, tag="resolved-link"):
    """systemd-resolved's DNS settings of our TUN (DNS mode "resolved"), recorded before
    the first is made.  Undone with ``RevertLink``, and only while the link with that
    name and index exists: resolved forgets a link's settings when the link goes."""

    name: str
    ifindex: int


Entry = LinkEntry | RouteEntry | NftTableEntry | ResolvedLinkEntry


def describe(entry: Entry) -> str:
    """The entry as a user reads it in ``--cleanup`` output and logs."""
    if isinstance(entry, LinkEntry):
        return f"TUN device {entry.name}"
    if isinstance(entry, RouteEntry):
        return f"route {entry.network} dev {entry.device}"
    if isinstance(entry, ResolvedLinkEntry):
        return f"systemd-resolved DNS settings of {entry.name}"
    return f"nftables table {entry.family} {entry.name}"


class Identity(msgspec.Struct, frozen=True):
    """Who wrote a journal, precisely enough to tell whether it is still running.

    A pid alone could be reused; pid plus start time (clock ticks since boot)
    plus boot id cannot, in practice.  ``netns`` is the (device, inode) pair
    of ``/proc/self/ns/net``: a route recorded in one namespace means nothing
    in another.
    """

    pid: int
    start_time: int
    boot_id: str
    netns: tuple[int, int]


class JournalFile(msgspec.Struct):
    owner: Identity
    entries: list[Entry] = []


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(JournalFile)


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat, or None if there is no such live process.

    A zombie counts as gone: it holds no descriptors, so the kernel has
    already undone what depended on them.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def current_identity() -> Identity:
    ns = os.stat("/proc/self/ns/net")
    pid = os.getpid()
    start = _start_time(pid)
    assert start is not None
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return Identity(pid=pid, start_time=start, boot_id=boot_id, netns=(ns.st_dev, ns.st_ino))


def is_alive(owner: Identity) -> bool:
    return _start_time(owner.pid) == owner.start_time


def undo_order(entries: Iterable[Entry]) -> list[Entry]:
    """The order to undo in: DNS first, so the laptop's lookups work again at once:
    resolved's settings of the link, then nftables (it holds the DNS redirect); then
    routes, then links; newest first within each kind."""
    ranks = {ResolvedLinkEntry: 0, NftTableEntry: 1, RouteEntry: 2, LinkEntry: 3}

    def rank(entry: Entry) -> int:
        return ranks[type(entry)]

    return sorted(reversed(list(entries)), key=rank)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _ensure_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)


class Journal:
    """This helper's journal.  :meth:`record` before a change, :meth:`forget` after its undo."""

    def __init__(self, directory: Path, *, owner: Identity) -> None:
        self.owner = owner
        self.path = directory / f"{_PREFIX}{owner.netns[1]}-{owner.pid}.json"
        self._directory = directory
        self._entries: list[Entry] = []

    @property
    def entries(self) -> list[Entry]:
        return list(self._entries)

    def record(self, *entries: Entry) -> None:
        self._entries.extend(entries)
        self._save()

    def replace(self, old: Entry, new: Entry) -> None:
        """Updates an entry in place (a link's ifindex, once known)."""
        self._entries[self._entries.index(old)] = new
        self._save()

    def forget(self, *entries: Entry) -> None:
        for entry in entries:
            with contextlib.suppress(ValueError):
                self._entries.remove(entry)
        self._save()

    def _save(self) -> None:
        if not self._entries:
            self.path.unlink(missing_ok=True)
            return
        _ensure_dir(self._directory)
        data = _encoder.encode(JournalFile(owner=self.owner, entries=self._entries))
        _write_atomically(self.path, data)


@dataclass
class SweepReport:
    """What a sweep did, for the log and for ``--cleanup``'s exit status.

    ``undone``: removed now; ``gone``: the kernel had removed it already (an
    owned table, routes of a vanished TUN); ``skipped``: journals not ours to
    sweep; ``failed``: left in the journal for a later run.
    """

    undone: list[str]
    failed: list[str]
    skipped: list[str]
    gone: list[str] = field(default_factory=list)


def sweep(
    directory: Path,
    *,
    current: Identity,
    undo: Callable[[Entry], bool],
) -> SweepReport:
    """Undoes every journal in ``directory`` left by a helper that is gone.

    Skipped: journals of live helpers (their owner cleans up), and of other
    network namespaces (a route there cannot be removed from here).  A
    journal from an earlier boot is deleted unread: nothing it recorded
    survives a reboot.  Each entry is undone in its own try, so one failure
    does not stop the rest; failed entries stay in the file for a later run.
    ``undo`` returns False when the kernel had undone the entry already.
    """
    report = SweepReport(undone=[], failed=[], skipped=[])
    for path in sorted(directory.glob(f"{_PREFIX}*.json")):
        try:
            journal = _decoder.decode(path.read_bytes())
        except (OSError, msgspec.DecodeError) as e:
            report.failed.append(f"{path}: unreadable ({e}); remove it by hand")
            continue
        owner = journal.owner
        if owner.boot_id != current.boot_id:
            path.unlink(missing_ok=True)
            continue
        if owner.netns != current.netns:
            report.skipped.append(f"{path}: another network namespace")
            continue
        if owner.pid == current.pid or is_alive(owner):
            report.skipped.append(f"{path}: helper {owner.pid} is still running")
            continue
        failed: set[Entry] = set()
        for entry in undo_order(journal.entries):
            try:
                removed = undo(entry)
            except Exception as e:
                log.warning("cleanup of %s failed: %s", describe(entry), e)
                report.failed.append(f"{describe(entry)}: {e}")
                failed.add(entry)
            else:
                (report.undone if removed else report.gone).append(describe(entry))
        left = [entry for entry in journal.entries if entry in failed]
        if left:
            _write_atomically(path, _encoder.encode(JournalFile(owner=owner, entries=left)))
        else:
            path.unlink(missing_ok=True)
    return report
