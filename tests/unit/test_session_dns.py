"""The session's DNS with systemd-resolved ("resolved" mode): the link's domains sent at
connect and after each change, the upstreams read from resolved's resolv.conf, the
status.  A fake helper records requests; a datagram socketpair stands in for the TUN.
No DNS server is bound."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, cast

import dns.message
import dns.rdatatype
import dns.rrset
import pytest

from telepresence.daemon import sessiondns
from telepresence.daemon.packets import Datagram, build, parse
from telepresence.daemon.pool import ManagerPool
from telepresence.daemon.request import ConnectError, ConnectRequest
from telepresence.daemon.session import Session
from telepresence.netfilter.client import HelperError, Nameservers, SetupResult

DNS_ADDRESS = IPv4Address("198.18.255.253")
TUN_ADDRESS = IPv4Address("198.18.255.254")


@dataclass
class FakeHelper:
    """SetLinkDomains as the helper answers it: ``~domain`` for routing-only ones."""

    calls: list[tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=list)
    refuse: str = ""
    torn_down: bool = False

    async def set_link_domains(
        self, *, routing: Iterable[str], search: Iterable[str] = ()
    ) -> list[str]:
        routing, search = tuple(routing), tuple(search)
        self.calls.append((routing, search))
        if self.refuse:
            raise HelperError(self.refuse)
        return [f"~{d}" for d in routing] + list(search)

    async def refresh_nameservers(self) -> Nameservers:
        raise AssertionError("nothing is redirected in resolved mode")

    async def teardown(self) -> None:
        self.torn_down = True


class FakePool:
    def open_stream(self, dial: Any, handler: Any) -> Any:
        raise AssertionError("DNS on the TUN never opens a tunnel flow")

    async def close(self) -> None:
        pass


def resolved_setup(tun_fd: int = -1) -> SetupResult:
    return SetupResult(
        tun_fd=tun_fd,
        tun_name="tel0",
        routed=[],
        nameservers=[],
        mark=1,
        dns_mode="resolved",
        dns_address=DNS_ADDRESS,
    )


@pytest.fixture
def resolved_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "resolved-resolv.conf"
    path.write_text(
        "# This is /run/systemd/resolve/resolv.conf managed by man:systemd-resolved(8).\n"
        "nameserver 192.168.1.1\n"
        "nameserver 127.0.0.53\n"
        "nameserver 10.0.0.2\n"
        "search home.example\n"
    )
    monkeypatch.setattr(sessiondns, "RESOLVED_CONF", path)
    monkeypatch.setattr(sessiondns, "RESOLV_CONF", tmp_path / "missing-resolv.conf")
    yield path


def session(**request: Any) -> Session:
    return Session(ConnectRequest(**request), debug=False, on_lost=lambda _: None)


async def test_connect_in_resolved_mode_answers_on_the_tun_and_sends_the_domains(
    resolved_conf: Path,
) -> None:
    s = session(namespace="dev", mapped_namespaces=("dev", "web"))
    helper = FakeHelper()
    local = s.dns.adopt(resolved_setup(), helper)
    assert local is not None and local.address == DNS_ADDRESS and local.port == 53
    assert local.max_pending == s.dns.settings.max_pending
    # resolved's upstreams, less its own stub (it would send our names back to us).
    assert s.dns.upstreams == ["192.168.1.1", "10.0.0.2"]
    assert s.dns.server.upstreams.servers == (("192.168.1.1", 53), ("10.0.0.2", 53))
    assert s.dns.nameservers == []  # nothing is redirected

    await s.dns.apply_link_domains()
    assert helper.calls == [(("cluster.local", "svc", "web"), ("dev",))]
    assert s.dns.local_search_domains == ("home.example",)
    background = s.dns.background()
    for _, coroutine in background:
        coroutine.close()  # the session runs them; here, only their names matter
    assert [name for name, _ in background] == ["resolved-conf", "link-domains"]


async def test_the_domains_follow_intercepts_and_namespaces(resolved_conf: Path) -> None:
    s = session(namespace="dev")  # every namespace mapped: the live ones
    s.namespaces = frozenset({"dev", "web"})
    helper = FakeHelper()
    s.dns.adopt(resolved_setup(), helper)
    await s.dns.apply_link_domains()
    assert helper.calls[-1] == (("cluster.local", "svc", "web"), ("dev",))

    s.intercept("api-local", "api")
    await s.dns.follow_link_domains(iterations=1)
    assert helper.calls[-1] == (("cluster.local", "svc", "web"), ("dev", "api"))

    s.leave("api-local")
    await s.dns.follow_link_domains(iterations=1)
    assert helper.calls[-1] == (("cluster.local", "svc", "web"), ("dev",))

    s.namespaces = frozenset({"dev", "web", "batch"})  # as the namespace watch does
    s.dns.domains_changed()
    s.dns.domains_changed()  # a burst of changes is one update
    await s.dns.follow_link_domains(iterations=1)
    assert helper.calls[-1] == (("cluster.local", "svc", "batch", "web"), ("dev",))
    assert len(helper.calls) == 4

    s.dns.domains_changed()  # nothing new: nothing sent
    await s.dns.follow_link_domains(iterations=1)
    assert len(helper.calls) == 4


async def test_a_later_failure_is_logged_and_retried_at_the_next_change(
    resolved_conf: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = session(mapped_namespaces=("dev",))
    helper = FakeHelper()
    s.dns.adopt(resolved_setup(), helper)
    await s.dns.apply_link_domains()

    helper.refuse = "systemd-resolved is not running; start it or reconnect"
    s.intercept("x", "web")
    with caplog.at_level(logging.WARNING, logger="telepresence.session"):
        await s.dns.follow_link_domains(iterations=1)
    assert [r.getMessage() for r in caplog.records] == [
        "telling systemd-resolved the cluster's domains failed: "
        "systemd-resolved is not running; start it or reconnect"
    ]
    status = s.status()["root_daemon"]["dns"]
    assert status["link_error"] == helper.refuse
    assert status["search_domains"] == []  # still what was applied before

    helper.refuse = ""
    s.intercept("y", "web")  # the same search path as the failed update: sent again
    await s.dns.follow_link_domains(iterations=1)
    assert helper.calls[-1] == (("cluster.local", "svc", "dev"), ("web",))
    status = s.status()["root_daemon"]["dns"]
    assert (status["link_error"], status["search_domains"]) == ("", ["web"])


async def test_a_refusal_at_connect_fails_it_in_one_line_and_unwinds(
    resolved_conf: Path,
) -> None:
    s = session(mapped_namespaces=("dev",))
    helper = FakeHelper(refuse="too many domains for systemd-resolved (300, at most 256)")
    tun, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.pool = cast(ManagerPool, FakePool())
    s.helper = helper  # type: ignore[assignment]
    s.tun_fd = tun.detach()
    try:
        with pytest.raises(ConnectError) as failed:
            await s._start_tun_side(resolved_setup(s.tun_fd))
        assert str(failed.value) == (
            "systemd-resolved could not be told the cluster's DNS domains: "
            "too many domains for systemd-resolved (300, at most 256)"
        )
        assert "\n" not in str(failed.value)
        assert s.udp is not None
        relay = s.udp
        await s.close()  # what the daemon does after a failed connect
        assert helper.torn_down and s.tun_fd is None and relay._closed
    finally:
        kernel.close()


async def test_a_query_from_resolved_on_the_tun_is_answered_by_the_resolver(
    resolved_conf: Path,
) -> None:
    """Through the real resolver: `web.dev` is asked of the cluster and the answer goes
    back on the TUN from the DNS address."""
    asked: list[str] = []

    async def cluster_lookup(name: str, qtype: int) -> dns.message.Message | None:
        asked.append(name)
        query = dns.message.make_query(name, qtype)
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(name, 30, "IN", "A", "10.96.0.10"))
        return response

    s = session(mapped_namespaces=("dev",))
    s.dns = sessiondns.SessionDns(
        rules=s.name_rules,
        cluster_subnets=lambda: s.routed,
        cluster_lookup=cluster_lookup,
        upstream_socket=s._upstream_socket,
    )
    tun, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    kernel.setblocking(False)
    s.pool = cast(ManagerPool, FakePool())
    s.helper = FakeHelper()  # type: ignore[assignment]
    s.tun_fd = tun.detach()
    try:
        await s._start_tun_side(resolved_setup(s.tun_fd))
        query = dns.message.make_query("web.dev.", dns.rdatatype.A)
        packet = Datagram(TUN_ADDRESS, 45000, DNS_ADDRESS, 53, query.to_wire())
        kernel.send(build(packet))
        loop = asyncio.get_running_loop()
        reply = parse(await asyncio.wait_for(loop.sock_recv(kernel, 65535), 5))
        assert reply is not None
        assert (reply.src, reply.sport, reply.dst, reply.dport) == (
            DNS_ADDRESS,
            53,
            TUN_ADDRESS,
            45000,
        )
        answer = dns.message.from_wire(reply.payload)
        assert answer.id == query.id
        assert [str(r.name) for r in answer.answer] == ["web.dev."]
        assert answer.answer[0][0].address == "10.96.0.10"
        assert asked == ["web.dev.svc.cluster.local."]
    finally:
        await s.close()
        kernel.close()


async def test_resolveds_file_is_followed_without_the_helper(resolved_conf: Path) -> None:
    s = session(namespace="dev")
    helper = FakeHelper()
    s.dns.adopt(resolved_setup(), helper)
    await s.dns.apply_link_domains()
    # Once the link is configured, resolved lists our address and search domain too.
    resolved_conf.write_text(
        f"nameserver 10.0.0.3\nnameserver {DNS_ADDRESS}\nsearch office.example dev\n"
    )
    await s.dns.follow_resolved_conf()
    assert s.dns.upstreams == ["10.0.0.3"]
    assert s.dns.server.upstreams.servers == (("10.0.0.3", 53),)
    assert s.dns.local_search_domains == ("office.example",)
    assert s.name_rules().local_search_domains == ("office.example",)
    # Only the stub left: no upstream at all rather than a loop back to us.
    resolved_conf.write_text("nameserver 127.0.0.53\n")
    await s.dns.follow_resolved_conf()
    assert s.dns.upstreams == [] and s.dns.server.upstreams.servers == ()


async def test_status_in_both_modes(resolved_conf: Path) -> None:
    s = session(namespace="dev", mapped_namespaces=("dev", "web"))
    redirect = s.status()["root_daemon"]["dns"]
    assert redirect == {
        "hook": "nftables redirect of the laptop's nameservers (no file edited)",
        "mode": "redirect",
        "local_address": "127.0.0.1:0",
        "nameservers": [],
        "upstreams": [],
        "cluster_domain": "cluster.local",
        "cluster_names": "*.cluster.local, <svc>.<namespace> for mapped namespaces",
    }
    s.dns.adopt(resolved_setup(), FakeHelper())
    await s.dns.apply_link_domains()
    status = s.status()
    resolved = status["root_daemon"]["dns"]
    assert resolved == {
        "hook": "systemd-resolved, per-link DNS on tel0",
        "mode": "resolved",
        "local_address": "127.0.0.1:0",
        "nameservers": [],
        "upstreams": ["192.168.1.1", "10.0.0.2"],
        "cluster_domain": "cluster.local",
        "cluster_names": "*.cluster.local, <svc>.<namespace> for mapped namespaces",
        "dns_address": str(DNS_ADDRESS),
        "routing_domains": ["cluster.local", "svc", "web"],
        "search_domains": ["dev"],
        "domains_left_out": [],
        "link_error": "",
    }
    assert json.loads(json.dumps(status)) == status  # `status -o json` prints it as is
