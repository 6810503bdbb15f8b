"""What `connect` and `telepresence manager upgrade` do with the traffic manager they find.
Pure: the installed Deployment's version, protocol range, image and dial lists, and what
this client wants, in; one action and its one line out.

The manager is shared by every teammate who connects to the cluster, and re-applying it
restarts its pod, which breaks every session at once. So a client never replaces a manager
on its own judgement that the manager differs: it never downgrades, and it upgrades only
when asked (`telepresence manager upgrade`). `connect` re-applies a manager of its own
version only for what the user explicitly configured (``--manager-image``, the config
file's dial lists), since applying the same version cannot take anything from anyone.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from telepresence.versions import (
    UPGRADE_COMMAND,
    IncompatibleVersions,
    ProtocolRange,
    compare,
    negotiate,
)

INSTALLING = "Installing Traffic Manager"


class Action(Enum):
    INSTALL = "install"
    """No manager: apply ours."""
    KEEP = "keep"
    """Use the installed manager as it is; nothing is applied."""
    UPGRADE = "upgrade"
    """Apply ours over an older (or unreadable) manager, as the user asked."""
    REAPPLY = "reapply"
    """Apply ours over a manager of our own version whose image or dial policy the user
    explicitly configured otherwise."""
    REFUSE = "refuse"
    """Stop: no protocol in common, or no readable version; the message names the fix."""


class Relation(Enum):
    """The installed manager's package version against ours."""

    NONE = "none"
    SAME = "same"
    NEWER = "newer"
    OLDER = "older"
    UNKNOWN = "unknown"


@dataclass(frozen=True, kw_only=True)
class Installed:
    version: str
    """The ``telepresence-py/version`` annotation; empty when missing."""
    protocol: ProtocolRange | None
    """From ``telepresence-py/protocol``; LEGACY_PROTOCOL when missing, None when it
    does not parse."""
    image: str
    dial: tuple[str, str]
    """The container's allow and deny lists, as their env values."""


@dataclass(frozen=True, kw_only=True)
class Wanted:
    version: str
    protocol: ProtocolRange
    image: str
    image_explicit: bool
    """``--manager-image`` or the config file named it; otherwise ``image`` is our default
    and a manager of our version running another image (an admin's mirror) is kept."""
    dial: tuple[str, str] | None
    """The configured dial lists; None when the config does not set them."""
    upgrade: bool
    """`telepresence manager upgrade`, rather than `connect`."""


@dataclass(frozen=True)
class Plan:
    action: Action
    relation: Relation
    message: str
    """A progress line for INSTALL/UPGRADE/REAPPLY and for a KEEP worth mentioning
    (empty otherwise); for REFUSE, the user's one line naming the fix."""


def plan(installed: Installed | None, wanted: Wanted) -> Plan:
    if installed is None:
        return Plan(Action.INSTALL, Relation.NONE, INSTALLING)
    order = compare(installed.version, wanted.version)
    if order is None or installed.protocol is None:
        if wanted.upgrade:
            return Plan(
                Action.UPGRADE,
                Relation.UNKNOWN,
                f"Replacing Traffic Manager {installed.version or '(no version)'} "
                f"with {wanted.version}",
            )
        return Plan(
            Action.REFUSE,
            Relation.UNKNOWN,
            f"the installed Traffic Manager has no version this client can read "
            f"({installed.version or 'none'}, protocol "
            f"{installed.protocol or 'unreadable'}): run `{UPGRADE_COMMAND}` to replace it "
            f"with {wanted.version}",
        )
    relation = Relation.SAME if order == 0 else Relation.NEWER if order > 0 else Relation.OLDER
    try:
        negotiate(
            client=wanted.protocol,
            manager=installed.protocol,
            client_version=wanted.version,
            manager_version=installed.version,
        )
    except IncompatibleVersions as e:
        if wanted.upgrade and order <= 0:
            return Plan(Action.UPGRADE, relation, _upgrading(installed, wanted))
        return Plan(Action.REFUSE, relation, str(e))
    if relation is Relation.SAME:
        if wanted.image_explicit and installed.image != wanted.image:
            return Plan(
                Action.REAPPLY, relation, f"Updating Traffic Manager image to {wanted.image}"
            )
        if wanted.dial is not None and installed.dial != wanted.dial:
            return Plan(Action.REAPPLY, relation, "Updating Traffic Manager dial policy")
        said = f"the Traffic Manager is already at {installed.version}"
        return Plan(Action.KEEP, relation, said if wanted.upgrade else "")
    if relation is Relation.OLDER and wanted.upgrade:
        return Plan(Action.UPGRADE, relation, _upgrading(installed, wanted))
    # Newer, or older without being asked: used as it is. Never a downgrade, and never our
    # manifests over a newer manager's.
    if wanted.upgrade:
        return Plan(
            Action.KEEP,
            relation,
            f"the Traffic Manager {installed.version} is newer than this client "
            f"{wanted.version}: leaving it as it is",
        )
    hint = "" if relation is Relation.NEWER else f"; `{UPGRADE_COMMAND}` upgrades it"
    ignored = (wanted.image_explicit and installed.image != wanted.image) or (
        wanted.dial is not None and installed.dial != wanted.dial
    )
    note = (
        f"; the configured image and dial policy apply only to a manager of {wanted.version}"
        if ignored
        else ""
    )
    return Plan(
        Action.KEEP,
        relation,
        f"Using Traffic Manager {installed.version} ({relation.value} than this client "
        f"{wanted.version}{hint}){note}",
    )


def _upgrading(installed: Installed, wanted: Wanted) -> str:
    return f"Upgrading Traffic Manager from {installed.version} to {wanted.version}"
