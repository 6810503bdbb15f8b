"""The helper's systemd-resolved client: the D-Bus messages it builds (pure: jeepney
makes and parses them without a bus), and how it reads answers and errors, against a
scripted connection."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address
from typing import Any

import pytest
from jeepney import DBusErrorResponse, HeaderFields, Message, MessageFlag, new_error

from telepresence.netfilter import resolved
from telepresence.netfilter.resolved import (
    LINK_FEATURES_OFF,
    LinkDomain,
    Resolved,
    ResolvedError,
)

MANAGER = ("/org/freedesktop/resolve1", "org.freedesktop.resolve1.Manager")


def fields(message: Message) -> dict[str, Any]:
    f = message.header.fields
    return {
        "destination": f.get(HeaderFields.destination),
        "path": f.get(HeaderFields.path),
        "interface": f.get(HeaderFields.interface),
        "member": f.get(HeaderFields.member),
        "signature": f.get(HeaderFields.signature),
    }


def round_trip(message: Message) -> tuple[Any, ...]:
    """The body as the bus would read it: serialising checks it against the signature."""
    body: tuple[Any, ...] = Message.from_buffer(message.serialise(serial=1)).body
    return body


def manager_call(message: Message, member: str, signature: str) -> None:
    assert fields(message) == {
        "destination": "org.freedesktop.resolve1",
        "path": MANAGER[0],
        "interface": MANAGER[1],
        "member": member,
        "signature": signature,
    }
    # A stopped resolved is never started by the bus for us.
    assert message.header.flags & MessageFlag.no_auto_start


def test_one_ipv4_server_for_the_link() -> None:
    message = resolved.set_link_dns(7, IPv4Address("198.18.255.253"))
    manager_call(message, "SetLinkDNS", "ia(iay)")
    assert round_trip(message) == (7, [(2, b"\xc6\x12\xff\xfd")])  # AF_INET, 4 bytes


def test_domains_with_their_routing_flag() -> None:
    domains = [LinkDomain("cluster.local", True), LinkDomain("ns1.svc.cluster.local", False)]
    message = resolved.set_link_domains(7, domains)
    manager_call(message, "SetLinkDomains", "ia(sb)")
    assert round_trip(message) == (7, [("cluster.local", True), ("ns1.svc.cluster.local", False)])
    assert round_trip(resolved.set_link_domains(7, [])) == (7, [])


def test_no_default_route_and_every_other_feature_off() -> None:
    message = resolved.set_link_default_route(7, False)
    manager_call(message, "SetLinkDefaultRoute", "ib")
    assert round_trip(message) == (7, False)
    assert LINK_FEATURES_OFF == (
        "SetLinkLLMNR",
        "SetLinkMulticastDNS",
        "SetLinkDNSSEC",
        "SetLinkDNSOverTLS",
    )
    for method in LINK_FEATURES_OFF:
        message = resolved.set_link_feature(method, 7, "no")
        manager_call(message, method, "is")
        assert round_trip(message) == (7, "no")
    with pytest.raises(ValueError, match="not a per-link feature"):
        resolved.set_link_feature("SetDNS", 7, "no")


def test_revert_and_read_back() -> None:
    manager_call(resolved.revert_link(7), "RevertLink", "i")
    assert round_trip(resolved.revert_link(7)) == (7,)
    manager_call(resolved.get_link(7), "GetLink", "i")
    message = resolved.get_link_domains("/org/freedesktop/resolve1/link/_37")
    assert fields(message) == {
        "destination": "org.freedesktop.resolve1",
        "path": "/org/freedesktop/resolve1/link/_37",
        "interface": "org.freedesktop.DBus.Properties",
        "member": "Get",
        "signature": "ss",
    }
    assert round_trip(message) == ("org.freedesktop.resolve1.Link", "Domains")


def test_is_resolved_on_the_bus() -> None:
    message = resolved.name_has_owner()
    assert fields(message) == {
        "destination": "org.freedesktop.DBus",
        "path": "/org/freedesktop/DBus",
        "interface": "org.freedesktop.DBus",
        "member": "NameHasOwner",
        "signature": "s",
    }
    assert round_trip(message) == ("org.freedesktop.resolve1",)


def test_the_domains_property_is_read_as_resolvectl_shows_it() -> None:
    value = ("a(sb)", [("cluster.local", True), ("svc.cluster.local", False)])
    domains = resolved.parse_domains(value)
    assert resolved.render_domains(domains) == ["~cluster.local", "svc.cluster.local"]
    with pytest.raises(ResolvedError, match="expected a"):
        resolved.parse_domains(("as", ["cluster.local"]))


# --- against a scripted connection --------------------------------------------------

Answer = tuple[Any, ...] | Exception | Callable[[Message], tuple[Any, ...]]


def dbus_error(name: str, text: str) -> Callable[[Message], tuple[Any, ...]]:
    def answer(message: Message) -> tuple[Any, ...]:
        raise DBusErrorResponse(new_error(message, name, "s", (text,)))

    return answer


class ScriptedBus:
    def __init__(self, answers: dict[str, Answer]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def call(self, message: Message, *, timeout: float) -> tuple[Any, ...]:
        assert timeout == resolved.CALL_TIMEOUT
        member = str(message.header.fields[HeaderFields.member])
        self.calls.append((member, round_trip(message)))
        answer = self.answers.get(member, ())
        if isinstance(answer, Exception):
            raise answer
        return answer(message) if callable(answer) else answer


class ScriptedResolved(Resolved):
    """:class:`Resolved` with its connection replaced by the script (or a failure)."""

    def __init__(self, bus: ScriptedBus | ResolvedError, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.script = bus

    @contextmanager
    def _bus(self) -> Iterator[Any]:
        if isinstance(self.script, ResolvedError):
            raise self.script
        yield self.script


NO_SUCH_LINK = dbus_error("org.freedesktop.resolve1.NoSuchLink", "Link 7 not known")


def test_running_is_false_without_a_bus_or_an_owner() -> None:
    assert ScriptedResolved(ScriptedBus({"NameHasOwner": (True,)})).running()
    assert not ScriptedResolved(ScriptedBus({"NameHasOwner": (False,)})).running()
    assert not ScriptedResolved(ResolvedError("cannot connect to the system D-Bus")).running()
    assert not ScriptedResolved(ScriptedBus({"NameHasOwner": TimeoutError()})).running()


def test_configure_sets_the_server_last() -> None:
    bus = ScriptedBus({})
    ScriptedResolved(bus).configure_link(7, dns=IPv4Address("198.18.255.253"))
    assert bus.calls == [
        ("SetLinkDefaultRoute", (7, False)),
        ("SetLinkLLMNR", (7, "no")),
        ("SetLinkMulticastDNS", (7, "no")),
        ("SetLinkDNSSEC", (7, "no")),
        ("SetLinkDNSOverTLS", (7, "no")),
        ("SetLinkDomains", (7, [])),
        ("SetLinkDNS", (7, [(2, b"\xc6\x12\xff\xfd")])),
    ]


def test_a_link_resolved_does_not_know_fails_once_the_wait_is_over() -> None:
    bus = ScriptedBus({"SetLinkDefaultRoute": NO_SUCH_LINK})
    with pytest.raises(ResolvedError, match="refused SetLinkDefaultRoute: Link 7 not known"):
        ScriptedResolved(bus, link_wait=0).configure_link(7, dns=IPv4Address("198.18.255.253"))
    assert [member for member, _ in bus.calls] == ["SetLinkDefaultRoute"]


def test_revert_tolerates_a_link_or_a_resolved_that_is_gone() -> None:
    assert ScriptedResolved(ScriptedBus({})).revert_link(7)
    assert not ScriptedResolved(ScriptedBus({"RevertLink": NO_SUCH_LINK})).revert_link(7)
    no_owner = dbus_error("org.freedesktop.DBus.Error.NameHasNoOwner", "no such name")
    assert not ScriptedResolved(ScriptedBus({"RevertLink": no_owner})).revert_link(7)
    denied = dbus_error("org.freedesktop.DBus.Error.AccessDenied", "Access\ndenied")
    with pytest.raises(ResolvedError) as info:
        ScriptedResolved(ScriptedBus({"RevertLink": denied})).revert_link(7)
    assert str(info.value) == "systemd-resolved refused RevertLink: Access denied"
    assert info.value.name == "org.freedesktop.DBus.Error.AccessDenied"


def test_a_silent_resolved_is_one_line_naming_the_call() -> None:
    bus = ScriptedBus({"SetLinkDomains": TimeoutError()})
    with pytest.raises(ResolvedError, match=r"did not answer SetLinkDomains within 3s"):
        ScriptedResolved(bus).set_domains(7, [LinkDomain("cluster.local", True)])


def test_domains_are_read_from_the_link_object() -> None:
    path = "/org/freedesktop/resolve1/link/_37"
    bus = ScriptedBus({"GetLink": (path,), "Get": (("a(sb)", [("cluster.local", True)]),)})
    assert ScriptedResolved(bus).link_domains(7) == [LinkDomain("cluster.local", True)]
    assert bus.calls == [("GetLink", (7,)), ("Get", ("org.freedesktop.resolve1.Link", "Domains"))]
