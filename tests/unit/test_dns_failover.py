"""The DNS server forwarding to several upstreams: order, failover, bounded time, and
following a new list.  Tiny fake nameservers on loopback addresses (127.0.0.2,
127.0.0.3, ...), queried through a real DnsServer by dnspython."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from ipaddress import IPv4Network

import dns.asyncquery
import dns.flags
import dns.message
import dns.rdatatype

from telepresence.daemon.dnsrules import NameRules
from telepresence.daemon.dnsserver import DnsServer
from tests.unit.fakedns import NAME, SETTINGS, FakeNameserver, ask, no_cluster, plain_socket


@contextlib.asynccontextmanager
async def serving(*upstreams: FakeNameserver) -> AsyncIterator[DnsServer]:
    server = DnsServer(
        rules=NameRules,
        cluster_subnets=lambda: [IPv4Network("10.96.0.0/12")],
        cluster_lookup=no_cluster,
        upstreams=[u.address for u in upstreams],
        upstream_socket=plain_socket,
        settings=SETTINGS,
    )
    async with server:
        yield server
    for upstream in upstreams:
        upstream.stop()


async def test_the_first_nameserver_answers_while_it_lives() -> None:
    first = await FakeNameserver("127.0.0.2").start()
    second = await FakeNameserver("127.0.0.3").start()
    async with serving(first, second) as server:
        assert (await ask(server))[0] == "127.0.0.2"
        assert (await ask(server, tcp=True))[0] == "127.0.0.2"
    assert second.queries == []


async def test_a_silent_first_nameserver_costs_one_short_wait_then_nothing() -> None:
    first = await FakeNameserver("127.0.0.2", mode="silent").start()
    second = await FakeNameserver("127.0.0.3").start()
    async with serving(first, second) as server:
        who, elapsed = await ask(server)
        assert who == "127.0.0.3"
        assert 0.25 < elapsed < 0.3 + 0.2  # one per-server wait, not glibc's 5 s
        for _ in range(3):  # remembered: the next lookups go straight to the live one
            who, elapsed = await ask(server)
            assert who == "127.0.0.3" and elapsed < 0.15
        assert first.queries == ["udp"]


async def test_a_stopped_nameserver_is_skipped_at_once() -> None:
    first = await FakeNameserver("127.0.0.2").start()
    second = await FakeNameserver("127.0.0.3").start()
    async with serving(first, second) as server:
        assert (await ask(server))[0] == "127.0.0.2"
        first.stop()  # port unreachable: no need to wait for a timeout
        who, elapsed = await ask(server)
        assert who == "127.0.0.3" and elapsed < 0.2
        who, elapsed = await ask(server, tcp=True)  # connection refused: the same over TCP
        assert who == "127.0.0.3" and elapsed < 0.2


async def test_truncated_answers_complete_over_tcp_past_a_dead_server() -> None:
    first = await FakeNameserver("127.0.0.2", mode="silent").start()
    second = await FakeNameserver("127.0.0.3", mode="truncate").start()
    async with serving(first, second) as server:
        query = dns.message.make_query(NAME, dns.rdatatype.A)
        answer = await dns.asyncquery.udp(query, "127.0.0.1", port=server.port, timeout=5)
        assert answer.flags & dns.flags.TC  # passed through untouched
        who, elapsed = await ask(server, tcp=True)
        assert who == "127.0.0.3" and elapsed < 0.15  # the silent one is already known
    assert second.queries == ["udp", "tcp"]


async def test_servfail_asks_the_next_and_is_returned_only_when_all_fail() -> None:
    first = await FakeNameserver("127.0.0.2", mode="servfail").start()
    second = await FakeNameserver("127.0.0.3").start()
    async with serving(first, second) as server:
        assert (await ask(server))[0] == "127.0.0.3"
        assert (await ask(server))[0] == "127.0.0.3"
        assert first.queries == ["udp", "udp"]  # it answered: not held down
        second.mode = "servfail"
        assert (await ask(server))[0] == "SERVFAIL"


async def test_all_silent_is_servfail_within_the_budget() -> None:
    servers = [await FakeNameserver(f"127.0.0.{i}", mode="silent").start() for i in (2, 3, 4)]
    async with serving(*servers) as server:
        who, elapsed = await ask(server)
        assert who == "SERVFAIL"
        assert elapsed < SETTINGS.upstream_timeout + 0.2
        assert [len(s.queries) for s in servers] == [1, 1, 1]


async def test_the_server_follows_a_new_list() -> None:
    old = await FakeNameserver("127.0.0.2").start()
    new = await FakeNameserver("127.0.0.5").start()
    async with serving(old) as server:
        assert (await ask(server))[0] == "127.0.0.2"
        assert server.upstreams.set_servers([new.address], client_timeout=5) is True
        assert server.upstreams.servers == (new.address,)
        for tcp in (False, True):
            assert (await ask(server, tcp=tcp))[0] == "127.0.0.5"
        assert old.queries == ["udp"]
        new.stop()


async def test_a_short_client_timeout_shrinks_the_budget() -> None:
    first = await FakeNameserver("127.0.0.2", mode="silent").start()
    second = await FakeNameserver("127.0.0.3", mode="silent").start()
    async with serving(first, second) as server:
        server.upstreams.set_servers([first.address, second.address], client_timeout=0.4)
        who, elapsed = await ask(server)
        assert who == "SERVFAIL" and elapsed < 0.4 + 0.2
