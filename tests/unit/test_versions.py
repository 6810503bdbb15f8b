"""Protocol ranges and package versions: who talks to whom, and which side is newer."""

from __future__ import annotations

import msgspec
import pytest

from telepresence import __version__, versions
from telepresence.manager.server import Manager
from telepresence.tunnel.messages import Arrive, ArriveOk, decode_control, encode_control
from telepresence.tunnel.protocol import Connection, ConnectionState, ProtocolError, Role
from telepresence.versions import IncompatibleVersions, ProtocolRange, negotiate

R = ProtocolRange.parse

TOO_NEW = "is too new for this client 0.1.0"
TOO_OLD = "is too old for this client 0.1.0"


@pytest.mark.parametrize(
    ("client", "manager", "expected"),
    [
        ("1", "1", 1),
        ("1-2", "1", 1),  # a newer client, an old manager: the old manager's version
        ("1", "1-2", 1),  # an old client, a newer manager
        ("1-3", "2-4", 3),  # the highest in both
        ("2-4", "1-3", 3),
        ("3", "1-5", 3),
        ("2", "1", TOO_OLD),  # the client dropped 1: the manager must be upgraded
        ("1", "2-3", TOO_NEW),  # the manager dropped 1: the client must be upgraded
        ("3-4", "1-2", TOO_OLD),
        ("1-2", "3-4", TOO_NEW),
    ],
)
def test_negotiation_picks_the_highest_common_version(
    client: str, manager: str, expected: int | str
) -> None:
    def run() -> int:
        return negotiate(
            client=R(client), manager=R(manager), client_version="0.1.0", manager_version="0.9.0"
        )

    if isinstance(expected, int):
        assert run() == expected
    else:
        with pytest.raises(IncompatibleVersions, match=expected) as info:
            run()
        assert "\n" not in str(info.value)


def test_incompatible_messages_name_the_fix() -> None:
    with pytest.raises(IncompatibleVersions) as info:
        negotiate(client=R("1"), manager=R("2"), client_version="0.1.0", manager_version="0.3.0")
    assert str(info.value) == (
        "the Traffic Manager 0.3.0 is too new for this client 0.1.0 "
        "(tunnel protocol 2, this client 1): upgrade this client to 0.3.0"
    )
    with pytest.raises(IncompatibleVersions) as info:
        negotiate(client=R("2-3"), manager=R("1"), client_version="0.3.0", manager_version="0.1.0")
    assert str(info.value) == (
        "the Traffic Manager 0.1.0 is too old for this client 0.3.0 "
        "(tunnel protocol 1, this client 2-3): run `telepresence manager upgrade`"
    )


def test_protocol_ranges_parse_and_print() -> None:
    assert R("1") == ProtocolRange(1, 1) and str(R("1")) == "1"
    assert R(" 1-3 ") == ProtocolRange(1, 3) and str(R("1-3")) == "1-3"
    for bad in ("", "x", "1-", "-2", "3-1", "0", "1-2-3"):
        with pytest.raises(ValueError):
            R(bad)


@pytest.mark.parametrize(
    ("a", "b", "order"),
    [
        ("0.1.0", "0.1.0", 0),
        ("0.2.0", "0.1.0", 1),
        ("0.1.0", "0.10.0", -1),
        ("1.0", "1.0.0", 0),
        ("1.0.0rc1", "1.0.0", -1),
        ("1.0.0.dev3", "1.0.0a1", -1),
        ("1.0.0+dev", "1.0.0", 0),
        ("v2.0.0", "1.9.9", 1),
        ("", "0.1.0", None),
        ("latest", "0.1.0", None),
    ],
)
def test_package_versions_compare(a: str, b: str, order: int | None) -> None:
    assert versions.compare(a, b) == order


def test_status_describes_the_manager_against_this_client() -> None:
    def describe(manager: str) -> str:
        return versions.describe_manager(manager_version=manager, client_version="0.1.0")

    assert describe("0.1.0") == "0.1.0"
    assert describe("0.2.0") == "0.2.0 (newer than this client 0.1.0; compatible)"
    assert describe("0.0.9") == (
        "0.0.9 (older than this client 0.1.0; compatible; "
        "`telepresence manager upgrade` upgrades it)"
    )
    assert describe("") == ""


def test_the_test_overrides_come_from_the_environment() -> None:
    assert versions.package_version({}) == __version__
    assert versions.protocol_range({}) == ProtocolRange(1, 3)
    env = {versions.VERSION_ENV: "0.9.0", versions.PROTOCOL_ENV: "2-3", "OTHER": "x"}
    assert versions.package_version(env) == "0.9.0"
    assert versions.protocol_range(env) == ProtocolRange(2, 3)
    assert versions.overrides_in_effect(env) == {
        versions.VERSION_ENV: "0.9.0",
        versions.PROTOCOL_ENV: "2-3",
    }


# --- on the wire ----------------------------------------------------------------------


def test_the_preface_announces_the_lowest_version() -> None:
    conn = Connection(Role.CLIENT, versions=(1, 3))
    assert conn.data_to_send()[4:6] == b"\x00\x01"  # what a version-1-only peer accepts


def test_a_peer_whose_lowest_version_we_speak_passes_the_preface() -> None:
    conn = Connection(Role.SERVER, versions=(1, 3))
    conn.receive_data(b"\xfeTPX\x00\x02\x00\x04\x00\x00")
    assert conn.state is ConnectionState.OPEN


def test_a_peer_above_our_range_fails_at_the_preface() -> None:
    conn = Connection(Role.CLIENT, versions=(1, 2))
    with pytest.raises(ProtocolError, match="peer speaks version 3, this side speaks versions 1-2"):
        conn.receive_data(b"\xfeTPX\x00\x03")


def test_old_peers_messages_decode_with_version_one() -> None:
    """What a peer that predates ranges sends: no protocol fields."""

    class OldArrive(msgspec.Struct, tag="arrive"):
        name: str
        install_id: str
        version: str

    class OldArriveOk(msgspec.Struct, tag="arrive-ok"):
        session_id: str
        manager_version: str

    old = msgspec.msgpack.encode(OldArrive("me", "id", "0.0.9"))
    assert decode_control(old) == Arrive("me", "id", "0.0.9", protocol_min=1, protocol_max=1)
    ok = msgspec.msgpack.encode(OldArriveOk("s", "0.0.9"))
    assert decode_control(ok) == ArriveOk("s", "0.0.9", protocol=1)
    # ...and an old peer decodes ours, ignoring the fields it does not know.
    new = encode_control(Arrive("me", "id", "0.2.0", protocol_min=1, protocol_max=2))
    assert msgspec.msgpack.decode(new, type=OldArrive) == OldArrive("me", "id", "0.2.0")


async def _no_dns(name: str, qtype: int) -> bytes:
    return b""


def test_the_manager_agrees_at_arrival_or_refuses_with_the_fix() -> None:
    manager = Manager(dns_lookup=_no_dns, version="0.3.0", protocol=ProtocolRange(2, 3))
    conn = object()
    session = manager.arrive(Arrive("a", "i", "0.2.0", protocol_min=1, protocol_max=2), conn)  # type: ignore[arg-type]
    assert session.protocol == 2 and session.client_version == "0.2.0"
    with pytest.raises(IncompatibleVersions, match=r"upgrade this client to 0\.3\.0"):
        manager.arrive(Arrive("b", "i", "0.1.0"), conn)  # type: ignore[arg-type]
    assert len(manager.sessions) == 1
