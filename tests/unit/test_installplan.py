"""What connect and `telepresence manager upgrade` do with the manager they find: never a
downgrade, an upgrade only when asked, a refusal (with the fix) when no protocol is shared."""

from __future__ import annotations

import pytest

from telepresence.k8s import manifests
from telepresence.k8s.install import installed_of
from telepresence.k8s.installplan import Action, Installed, Relation, Wanted, plan
from telepresence.versions import LEGACY_PROTOCOL, ProtocolRange

R = ProtocolRange.parse
OURS = "ghcr.io/telepresence-py/traffic-manager:0.2.0"
DIAL = ("", "")


def installed(
    version: str = "0.2.0",
    protocol: str | None = "1-2",
    image: str = OURS,
    dial: tuple[str, str] = DIAL,
) -> Installed:
    return Installed(
        version=version, protocol=None if protocol is None else R(protocol), image=image, dial=dial
    )


def wanted(
    *,
    upgrade: bool = False,
    image: str | None = None,
    dial: tuple[str, str] | None = None,
    protocol: str = "1-2",
) -> Wanted:
    return Wanted(
        version="0.2.0",
        protocol=R(protocol),
        image=image or OURS,
        image_explicit=image is not None,
        dial=dial,
        upgrade=upgrade,
    )


@pytest.mark.parametrize(
    ("found", "want", "action", "relation"),
    [
        # Nothing there: install ours, connect or upgrade alike.
        (None, wanted(), Action.INSTALL, Relation.NONE),
        (None, wanted(upgrade=True), Action.INSTALL, Relation.NONE),
        # Ours: keep; re-apply only what the user explicitly configured.
        (installed(), wanted(), Action.KEEP, Relation.SAME),
        (installed(), wanted(upgrade=True), Action.KEEP, Relation.SAME),
        (installed(image="mirror/tm:0.2.0"), wanted(), Action.KEEP, Relation.SAME),
        (installed(), wanted(image="mirror/tm:0.2.0"), Action.REAPPLY, Relation.SAME),
        (installed(), wanted(dial=("", "10.0.0.0/8")), Action.REAPPLY, Relation.SAME),
        (installed(), wanted(dial=DIAL), Action.KEEP, Relation.SAME),
        # Newer and compatible: used as it is, never re-applied, whatever is asked.
        (installed("0.3.0", "2-3"), wanted(), Action.KEEP, Relation.NEWER),
        (installed("0.3.0", "2-3"), wanted(upgrade=True), Action.KEEP, Relation.NEWER),
        (installed("0.3.0"), wanted(image="mirror/tm:0.2.0"), Action.KEEP, Relation.NEWER),
        (installed("0.3.0"), wanted(dial=("", "10.0.0.0/8")), Action.KEEP, Relation.NEWER),
        # Older and compatible: kept by connect, upgraded when asked.
        (installed("0.1.0", "1"), wanted(), Action.KEEP, Relation.OLDER),
        (installed("0.1.0", "1"), wanted(dial=("", "10.0.0.0/8")), Action.KEEP, Relation.OLDER),
        (installed("0.1.0", "1"), wanted(upgrade=True), Action.UPGRADE, Relation.OLDER),
        # No common protocol.
        (installed("0.1.0", "1"), wanted(protocol="2"), Action.REFUSE, Relation.OLDER),
        (
            installed("0.1.0", "1"),
            wanted(protocol="2", upgrade=True),
            Action.UPGRADE,
            Relation.OLDER,
        ),
        (installed("0.3.0", "3"), wanted(), Action.REFUSE, Relation.NEWER),
        (installed("0.3.0", "3"), wanted(upgrade=True), Action.REFUSE, Relation.NEWER),
        # A version nobody can order: never replaced unless asked.
        (installed(""), wanted(), Action.REFUSE, Relation.UNKNOWN),
        (installed("latest"), wanted(upgrade=True), Action.UPGRADE, Relation.UNKNOWN),
        (installed(protocol=None), wanted(), Action.REFUSE, Relation.UNKNOWN),
    ],
)
def test_the_install_decision(
    found: Installed | None, want: Wanted, action: Action, relation: Relation
) -> None:
    decided = plan(found, want)
    assert (decided.action, decided.relation) == (action, relation)
    assert "\n" not in decided.message


def test_the_lines_the_user_sees() -> None:
    assert plan(installed("0.3.0"), wanted()).message == (
        "Using Traffic Manager 0.3.0 (newer than this client 0.2.0)"
    )
    assert plan(installed("0.3.0"), wanted(upgrade=True)).message == (
        "the Traffic Manager 0.3.0 is newer than this client 0.2.0: leaving it as it is"
    )
    assert plan(installed("0.1.0", "1"), wanted()).message == (
        "Using Traffic Manager 0.1.0 (older than this client 0.2.0; "
        "`telepresence manager upgrade` upgrades it)"
    )
    assert plan(installed("0.1.0", "1"), wanted(upgrade=True)).message == (
        "Upgrading Traffic Manager from 0.1.0 to 0.2.0"
    )
    assert plan(installed("0.1.0", "1"), wanted(dial=("", "10.0.0.0/8"))).message.endswith(
        "; the configured image and dial policy apply only to a manager of 0.2.0"
    )
    assert plan(installed(), wanted()).message == ""
    assert plan(installed(), wanted(upgrade=True)).message == (
        "the Traffic Manager is already at 0.2.0"
    )
    assert plan(installed("0.1.0", "1"), wanted(protocol="2")).message == (
        "the Traffic Manager 0.1.0 is too old for this client 0.2.0 "
        "(tunnel protocol 1, this client 2): run `telepresence manager upgrade`"
    )
    assert plan(installed("0.3.0", "3"), wanted()).message == (
        "the Traffic Manager 0.3.0 is too new for this client 0.2.0 "
        "(tunnel protocol 3, this client 1-2): upgrade this client to 0.3.0"
    )
    assert plan(installed(""), wanted()).message == (
        "the installed Traffic Manager has no version this client can read (none, protocol "
        "1-2): run `telepresence manager upgrade` to replace it with 0.2.0"
    )


def test_the_installer_reads_what_the_manifests_write() -> None:
    deployment = manifests.deployment(
        "ambassador", image="img:1", version="0.3.0", protocol=R("2-3"), dial_deny=["10.0.0.0/8"]
    )
    assert installed_of(deployment) == Installed(
        version="0.3.0", protocol=R("2-3"), image="img:1", dial=("", "10.0.0.0/8")
    )


def test_a_deployment_without_the_protocol_annotation_spoke_version_one() -> None:
    deployment = manifests.deployment("ambassador", image="img:1", version="0.1.0")
    del deployment["metadata"]["annotations"][manifests.PROTOCOL_ANNOTATION]
    assert installed_of(deployment).protocol == LEGACY_PROTOCOL
    deployment["metadata"]["annotations"][manifests.PROTOCOL_ANNOTATION] = "two"
    assert installed_of(deployment).protocol is None
