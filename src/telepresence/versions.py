"""Versions: which package and protocol versions this side has, how two sides agree on a
protocol, and how a client describes the manager it found. Pure, no I/O.

Two numbers, for two questions. The *package* version (``0.1.0``, on the Deployment's
``telepresence-py/version`` annotation) orders releases: it decides "newer" and "older",
so that a client never downgrades a manager. The *protocol* range (min..max tunnel
protocol versions, ``telepresence-py/protocol``) decides whether two sides can talk at
all. A release that keeps an old protocol version in its range stays usable by old clients
and managers; dropping one is what makes a pair incompatible.

Tests make an "older" or "newer" side from this same code base through two environment
variables, read by the CLI, the daemon and the manager alike (and handed on to a manager
that a faked client installs): :data:`VERSION_ENV` and :data:`PROTOCOL_ENV`. They change
only what this side *reports* and accepts, never the code it runs or the image it pulls.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from telepresence import __version__
from telepresence.tunnel.frames import MIN_VERSION, VERSION

#: Overrides the package version this side reports (tests only; not in --help).
VERSION_ENV = "TELEPRESENCE_TEST_VERSION"
#: Overrides the protocol range this side speaks, "MIN-MAX" or "N" (tests only).
PROTOCOL_ENV = "TELEPRESENCE_TEST_PROTOCOL"

UPGRADE_COMMAND = "telepresence manager upgrade"


class IncompatibleVersions(Exception):
    """No protocol version in common; the message is one line naming the fix."""


@dataclass(frozen=True, order=True)
class ProtocolRange:
    min: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.max <= 0xFFFF:
            raise ValueError(f"invalid protocol range {self.min}-{self.max}")

    def __str__(self) -> str:
        return str(self.min) if self.min == self.max else f"{self.min}-{self.max}"

    @classmethod
    def parse(cls, text: str) -> ProtocolRange:
        """``"1"`` or ``"1-3"``; ValueError on anything else."""
        low, sep, high = text.strip().partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"invalid protocol range {text!r}: expected N or MIN-MAX")
        return cls(int(low), int(high) if sep else int(low))

    def as_tuple(self) -> tuple[int, int]:
        return (self.min, self.max)


#: What every manager spoke before ranges existed: a Deployment without the protocol
#: annotation was installed by a release that knew version 1 only.
LEGACY_PROTOCOL = ProtocolRange(1, 1)


def package_version(env: Mapping[str, str] = os.environ) -> str:
    return env.get(VERSION_ENV) or __version__


def protocol_range(env: Mapping[str, str] = os.environ) -> ProtocolRange:
    text = env.get(PROTOCOL_ENV)
    return ProtocolRange.parse(text) if text else ProtocolRange(MIN_VERSION, VERSION)


def overrides_in_effect(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The overrides in effect, to hand on to a manager this client installs, so that a
    faked client installs a manager that is faked the same way."""
    return {k: env[k] for k in (VERSION_ENV, PROTOCOL_ENV) if env.get(k)}


# --- package versions -------------------------------------------------------------------

_RELEASE = re.compile(r"^v?(\d+(?:\.\d+)*)(?:[.-]?(a|b|rc|dev)\.?(\d*))?(?:\+.*)?$")
_PRE_ORDER = {"dev": 0, "a": 1, "b": 2, "rc": 3}


def version_key(version: str) -> tuple[tuple[int, ...], int, int] | None:
    """A sort key for ``1.2.3``, ``1.2.3rc1``, ``1.2.3.dev4``, ``1.2.3+local``; None when
    ``version`` is none of these. A pre-release sorts before its release; a local label
    (after ``+``) does not order. Trailing zeros do not count: 1.2 == 1.2.0."""
    m = _RELEASE.match(version.strip())
    if m is None:
        return None
    release = tuple(int(p) for p in m.group(1).split("."))
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]
    if m.group(2) is None:
        return (release, 4, 0)
    return (release, _PRE_ORDER[m.group(2)], int(m.group(3) or 0))


def compare(a: str, b: str) -> int | None:
    """-1, 0 or 1 as ``a`` is older than, as old as, or newer than ``b``; None when either
    does not parse (then nobody can say which is newer)."""
    ka, kb = version_key(a), version_key(b)
    if ka is None or kb is None:
        return None
    return (ka > kb) - (ka < kb)


# --- negotiation ------------------------------------------------------------------------


def negotiate(
    *,
    client: ProtocolRange,
    manager: ProtocolRange,
    client_version: str,
    manager_version: str,
) -> int:
    """The protocol version a client and a manager use: the highest both speak. Raises
    :class:`IncompatibleVersions` with the fix when they share none: when the manager's
    range lies above the client's, the client is too old (upgrade it to the manager's
    version, which speaks the manager's range); otherwise the manager is too old."""
    common = min(client.max, manager.max)
    if common >= max(client.min, manager.min):
        return common
    detail = f"tunnel protocol {manager}, this client {client}"
    if manager.min > client.max:
        raise IncompatibleVersions(
            f"the Traffic Manager {manager_version} is too new for this client "
            f"{client_version} ({detail}): upgrade this client to {manager_version}"
        )
    raise IncompatibleVersions(
        f"the Traffic Manager {manager_version} is too old for this client {client_version} "
        f"({detail}): run `{UPGRADE_COMMAND}`"
    )


def describe_manager(*, manager_version: str, client_version: str) -> str:
    """How `status` names a manager the client talks to (so the two are compatible)."""
    order = compare(manager_version, client_version)
    if order == 0 or not manager_version:
        return manager_version
    if order is None:
        return f"{manager_version} (compatible; cannot order it against {client_version})"
    if order > 0:
        return f"{manager_version} (newer than this client {client_version}; compatible)"
    return (
        f"{manager_version} (older than this client {client_version}; compatible; "
        f"`{UPGRADE_COMMAND}` upgrades it)"
    )
