"""The daemon following a rewritten resolv.conf: the watch notices, the helper (a
stand-in that reads the file as the real one does) says what it now redirects, and
the DNS server forwards there.  Fake nameservers on loopback; no root, no nft."""

from __future__ import annotations

import asyncio
import contextlib
import os
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from telepresence.daemon import sessiondns
from telepresence.daemon.dnsrules import NameRules
from telepresence.daemon.sessiondns import SessionDns
from telepresence.netfilter.client import Nameservers, SetupResult
from telepresence.netfilter.dnspolicy import choose_nameservers
from telepresence.netfilter.resolvconf import read_resolv_conf
from tests.unit.fakedns import SETTINGS, FakeNameserver, ask, no_cluster, plain_socket
from tests.unit.waiting import until


class FileReadingHelper:
    """RefreshNameservers as the helper answers it: from the file, never from us."""

    def __init__(self, path: Path, current: list[IPv4Address]) -> None:
        self.path = path
        self.current = current
        self.refreshes = 0

    async def refresh_nameservers(self) -> Nameservers:
        self.refreshes += 1
        read = read_resolv_conf(self.path).ipv4_nameservers()
        choice = choose_nameservers(current=self.current, read=read)
        changed = choice.changed_from(self.current)
        self.current = choice.nameservers
        return Nameservers(nameservers=self.current, changed=changed, kept=choice.kept)


def rewrite(path: Path, text: str) -> None:
    """As NetworkManager does: a new file renamed over the old one."""
    fresh = path.with_name(".resolv.conf.new")
    fresh.write_text(text)
    os.replace(fresh, path)


async def test_a_rewritten_resolv_conf_is_followed_within_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = await FakeNameserver("127.0.0.2").start()
    new = await FakeNameserver("127.0.0.6", mode="answer").start(port=old.port)
    monkeypatch.setattr(sessiondns, "DNS_PORT", old.port)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.2\nsearch home.example\n")
    monkeypatch.setattr(sessiondns, "RESOLV_CONF", resolv)

    s = SessionDns(
        rules=NameRules,
        cluster_subnets=list,
        cluster_lookup=no_cluster,
        upstream_socket=plain_socket,
        settings=SETTINGS,
    )
    helper = FileReadingHelper(resolv, [IPv4Address("127.0.0.2")])
    loop = asyncio.get_running_loop()
    watch: asyncio.Task[None] | None = None
    try:
        assert await s.start() == s.server.port != 0
        setup = SetupResult(
            tun_fd=-1, tun_name="tel0", routed=[], nameservers=helper.current, mark=1
        )
        assert s.adopt(setup, helper) is None  # "redirect" mode: no DNS on the TUN
        ((name, watching),) = s.background()  # the session's own watch of /etc/resolv.conf
        watch = asyncio.create_task(watching, name=name)
        assert name == "resolv-conf"
        assert (await ask(s.server))[0] == "127.0.0.2"
        assert s.local_search_domains == ("home.example",)

        rewrite(resolv, "nameserver 127.0.0.6\nsearch office.example\noptions timeout:2\n")
        changed_at = loop.time()

        async def answered_by_the_new_server() -> bool:
            return (await ask(s.server))[0] == "127.0.0.6"

        await until(answered_by_the_new_server, "lookups to reach 127.0.0.6", timeout=2)
        assert loop.time() - changed_at < 1.0
        assert s.nameservers == ["127.0.0.6"] and s.resolv.search == ("office.example",)
        assert s.server.upstreams.budget() == pytest.approx(min(SETTINGS.upstream_timeout, 2))
        asked_old = len(old.queries)

        # A moment without any usable nameserver: the last good list stays.
        rewrite(resolv, "# network changing\nnameserver 2001:db8::1\n")
        await until(lambda: helper.refreshes >= 2, "the second refresh", timeout=2)
        assert s.nameservers == ["127.0.0.6"]
        assert (await ask(s.server))[0] == "127.0.0.6"
        assert len(old.queries) == asked_old  # nothing went to the old server again
    finally:
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        await s.close()
        old.stop()
        new.stop()
