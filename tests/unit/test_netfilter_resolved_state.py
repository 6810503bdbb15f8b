"""NetworkState in DNS mode "resolved": what Setup, SetLinkDomains, Status and teardown do,
and in which order, with every edge faked (kernel links and routes, nft, resolved)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from telepresence.netfilter import conntrack, policy, routes, tun
from telepresence.netfilter.journal import (
    Journal,
    NftTableEntry,
    ResolvedLinkEntry,
    current_identity,
)
from telepresence.netfilter.protocol import (
    AddHostRoutes,
    Error,
    HostRoutesDone,
    LinkDomainsDone,
    NameserversDone,
    Ok,
    RefreshNameservers,
    SetLinkDomains,
    Setup,
    SetupDone,
    Status,
    StatusReply,
    SubnetsDone,
    Teardown,
    UpdateSubnets,
)
from telepresence.netfilter.resolved import LinkDomain, ResolvedError
from telepresence.netfilter.state import NetworkState, undo_entry

IFINDEX = 7
DNS_ROUTE = IPv4Network("198.18.255.253/32")


class Laptop:
    """The kernel, nft and resolved as the helper sees them, with one log of what it did."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, journal: Journal) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.link: routes.Link | None = None
        self.routes: set[IPv4Network] = set()
        self.journal = journal
        self.resolved_running = True
        self.fail: dict[str, Exception] = {}
        self.domains: list[LinkDomain] = []
        self.states: list[NetworkState] = []
        for name in ("laptop_network", "get_link", "configure_tun", "add_routes"):
            monkeypatch.setattr(routes, name, getattr(self, name))
        for name in ("delete_routes", "delete_link", "routes_on"):
            monkeypatch.setattr(routes, name, getattr(self, name))
        monkeypatch.setattr(tun, "open_tun", self.open_tun)
        monkeypatch.setattr(conntrack, "forget_marked", self.forget_marked)
        self.table_present = True

    def _maybe_fail(self, what: str) -> None:
        if what in self.fail:
            raise self.fail[what]

    # routes and tun
    def laptop_network(self) -> routes.LaptopNetwork:
        return routes.LaptopNetwork(routes=[], gateways=[], rule_marks=[])

    def get_link(self, name: str) -> routes.Link | None:
        return self.link if self.link is not None and self.link.name == name else None

    def open_tun(self, name: str) -> tun.Tun:
        self.link = routes.Link(name=name, ifindex=IFINDEX, kind="tun")
        read_end, write_end = os.pipe()
        os.close(write_end)
        self.events.append(("tun", name))
        return tun.Tun(name=name, fd=read_end)

    def configure_tun(self, *, device: str, address: IPv4Address) -> None:
        self.events.append(("address", device, str(address)))

    def add_routes(
        self, *, device: str, networks: Sequence[IPv4Network], source: IPv4Address
    ) -> None:
        self.events.append(("add routes", *map(str, networks)))
        self.routes |= set(networks)

    def delete_routes(self, *, device: str, ifindex: int, networks: Sequence[IPv4Network]) -> bool:
        self.events.append(("delete routes", *map(str, networks)))
        self.routes -= set(networks)
        return True

    def delete_link(self, *, name: str, ifindex: int | None, kind: str = "tun") -> bool:
        self._maybe_fail("delete_link")
        self.events.append(("delete link", name))
        self.link = None
        return True

    def routes_on(self, device: str) -> list[IPv4Network]:
        return sorted(self.routes)

    # nft
    def run(self, commands: str) -> str:
        self.events.append(("nft", commands))
        return ""

    def table_exists(self, name: str) -> bool:
        return self.table_present

    # conntrack
    def forget_marked(self, mark: int) -> None:
        self.events.append(("forget", mark))

    # resolved
    def running(self) -> bool:
        return self.resolved_running

    def configure_link(self, ifindex: int, *, dns: IPv4Address) -> None:
        # The journal says what to revert before resolved hears of the link.
        journaled = ResolvedLinkEntry(name="tel0", ifindex=ifindex) in self.journal.entries
        self.events.append(("configure", ifindex, str(dns), journaled))
        self._maybe_fail("configure_link")

    def set_domains(self, ifindex: int, domains: Sequence[LinkDomain]) -> None:
        self.events.append(("domains", ifindex, *domains))
        self.domains = list(domains)

    def revert_link(self, ifindex: int) -> bool:
        self.events.append(("revert", ifindex))
        self._maybe_fail("revert_link")
        self.domains = []
        return True

    def link_domains(self, ifindex: int) -> list[LinkDomain]:
        return list(self.domains)


@pytest.fixture
def laptop(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Laptop]:
    journal = Journal(tmp_path / "journal", owner=current_identity())
    laptop = Laptop(monkeypatch, journal)
    yield laptop
    laptop.fail.clear()
    for state in laptop.states:
        state.teardown()  # closes the TUN descriptor; a no-op after a test's own teardown


def network_state(laptop: Laptop, tmp_path: Path, *, nameserver: str) -> NetworkState:
    (tmp_path / "resolv.conf").write_text(f"nameserver {nameserver}\n")
    (tmp_path / "nsswitch.conf").write_text("hosts: files dns\n")
    state = NetworkState(
        nft=laptop,  # type: ignore[arg-type]
        journal=laptop.journal,
        resolv_conf=tmp_path / "resolv.conf",
        nsswitch_conf=tmp_path / "nsswitch.conf",
        resolved=laptop,
    )
    laptop.states.append(state)
    return state


def setup(state: NetworkState) -> SetupDone:
    response, fds = state.handle(
        Setup(subnets=["10.96.0.0/16"], dns_redirect_port=1053, proxy_port=1234)
    )
    for fd in fds:
        os.close(fd)
    assert isinstance(response, SetupDone), response
    return response


def test_setup_hands_the_tun_link_to_resolved(laptop: Laptop, tmp_path: Path) -> None:
    state = network_state(laptop, tmp_path, nameserver="127.0.0.53")
    done = setup(state)
    assert (done.dns_mode, done.dns_address, done.nameservers) == ("resolved", "198.18.255.253", [])
    kinds = [event[0] for event in laptop.events]
    assert kinds == ["tun", "address", "add routes", "nft", "configure"]
    assert laptop.events[2] == ("add routes", "10.96.0.0/16", "198.18.255.253/32")
    table = laptop.events[3][1]
    assert (
        "ip daddr 198.18.255.253 tcp dport 53 ct mark set ct mark or 0x00001074 redirect to :1053"
        in table
    )
    assert "dns_servers {\n\t\ttype ipv4_addr\n\t}" in table  # no nameserver redirected
    assert laptop.events[4] == ("configure", IFINDEX, "198.18.255.253", True)
    assert ResolvedLinkEntry(name="tel0", ifindex=IFINDEX) in laptop.journal.entries


def test_domains_status_and_refresh_in_resolved_mode(laptop: Laptop, tmp_path: Path) -> None:
    state = network_state(laptop, tmp_path, nameserver="127.0.0.53")
    setup(state)
    response, _ = state.handle(SetLinkDomains(routing=["Cluster.Local."], search=["ns1.svc"]))
    assert response == LinkDomainsDone(domains=["~cluster.local", "ns1.svc"])
    assert laptop.events[-1] == (
        "domains",
        IFINDEX,
        LinkDomain("cluster.local", True),
        LinkDomain("ns1.svc", False),
    )
    count = len(laptop.events)
    response, _ = state.handle(SetLinkDomains(routing=["~."]))
    assert isinstance(response, Error) and "no '~'" in response.message
    # resolv.conf changing does not matter: nothing is redirected in this mode.
    (tmp_path / "resolv.conf").write_text("nameserver 192.0.2.1\n")
    response, _ = state.handle(RefreshNameservers())
    assert response == NameserversDone(nameservers=[])
    assert len(laptop.events) == count  # neither refused request nor refresh changed anything

    status, _ = state.handle(Status())
    assert isinstance(status, StatusReply)
    assert (status.dns_mode, status.dns_address) == ("resolved", "198.18.255.253")
    assert status.link_domains == ["~cluster.local", "ns1.svc"]  # read back from resolved
    assert status.dns_redirects == ["198.18.255.253:53 -> 127.0.0.1:1053 (tcp)"]


def test_the_dns_route_stays_whatever_subnets_and_hosts_do(laptop: Laptop, tmp_path: Path) -> None:
    state = network_state(laptop, tmp_path, nameserver="127.0.0.53")
    setup(state)
    response, _ = state.handle(UpdateSubnets(subnets=["10.100.0.0/16"]))
    assert response == SubnetsDone(routed=["10.100.0.0/16"])
    response, _ = state.handle(AddHostRoutes(ips=["198.18.255.253", "203.0.113.9"]))
    assert isinstance(response, HostRoutesDone) and response.hosts == ["203.0.113.9"]
    assert "198.18.255.253: the network helper's own address" in response.skipped
    assert laptop.routes == {
        IPv4Network("10.100.0.0/16"),
        DNS_ROUTE,
        IPv4Network("203.0.113.9/32"),
    }


def test_teardown_reverts_resolved_first(laptop: Laptop, tmp_path: Path) -> None:
    state = network_state(laptop, tmp_path, nameserver="127.0.0.53")
    setup(state)
    laptop.events.clear()
    assert state.handle(Teardown()) == (Ok(), [])
    kinds = [event[0] for event in laptop.events]
    assert kinds == ["revert", "nft", "forget", "delete routes", "delete link"]
    assert laptop.events[1] == ("nft", "delete table ip telepresence\n")
    # Once no rule redirects any more: the NAT decisions already made go too.
    assert laptop.events[2] == ("forget", policy.MARK)
    assert laptop.journal.entries == [] and not laptop.journal.path.exists()


def test_a_failed_revert_is_moot_once_the_link_is_gone(laptop: Laptop, tmp_path: Path) -> None:
    state = network_state(laptop, tmp_path, nameserver="127.0.0.53")
    setup(state)
    laptop.fail["revert_link"] = ResolvedError("systemd-resolved did not answer RevertLink")
    assert state.teardown() == []
    assert laptop.journal.entries == []


def test_a_failed_revert_is_reported_while_the_link_stays(laptop: Laptop, tmp_path: Path) -> None:
    state = network_state(laptop, tmp_path, nameserver="127.0.0.53")
    setup(state)
    laptop.fail["revert_link"] = ResolvedError("systemd-resolved did not answer RevertLink")
    laptop.fail["delete_link"] = routes.IpError("ip link del dev tel0: busy")
    failures = state.teardown()
    assert failures[0] == (
        "systemd-resolved DNS settings of tel0: systemd-resolved did not answer RevertLink"
    )
    assert ResolvedLinkEntry(name="tel0", ifindex=IFINDEX) in laptop.journal.entries


def test_a_setup_that_resolved_refuses_is_rolled_back(laptop: Laptop, tmp_path: Path) -> None:
    state = network_state(laptop, tmp_path, nameserver="127.0.0.53")
    laptop.fail["configure_link"] = ResolvedError("systemd-resolved refused SetLinkDNS: denied")
    response, fds = state.handle(
        Setup(subnets=["10.96.0.0/16"], dns_redirect_port=1053, proxy_port=1234)
    )
    assert response == Error(message="systemd-resolved refused SetLinkDNS: denied") and fds == []
    kinds = [event[0] for event in laptop.events]
    assert kinds[-5:] == ["revert", "nft", "forget", "delete routes", "delete link"]
    assert laptop.journal.entries == [] and laptop.routes == set()


def test_without_resolved_running_the_stub_is_redirected(laptop: Laptop, tmp_path: Path) -> None:
    laptop.resolved_running = False
    state = network_state(laptop, tmp_path, nameserver="127.0.0.53")
    done = setup(state)
    assert (done.dns_mode, done.dns_address, done.nameservers) == ("redirect", "", ["127.0.0.53"])
    assert "configure" not in [event[0] for event in laptop.events]
    assert DNS_ROUTE not in laptop.routes
    response, _ = state.handle(SetLinkDomains(routing=["cluster.local"]))
    assert isinstance(response, Error) and "DNS mode is redirect" in response.message
    status, _ = state.handle(Status())
    assert isinstance(status, StatusReply)
    assert (status.dns_mode, status.dns_address, status.link_domains) == ("redirect", "", [])


def test_a_dead_helper_s_settings_are_reverted_only_on_its_own_link(laptop: Laptop) -> None:
    entry = ResolvedLinkEntry(name="tel0", ifindex=IFINDEX)
    nft: Any = laptop
    assert not undo_entry(nft, entry, resolved=laptop)  # no link: nothing to revert
    laptop.link = routes.Link(name="tel0", ifindex=IFINDEX + 1, kind="tun")
    assert not undo_entry(nft, entry, resolved=laptop)  # another session's tel0
    assert laptop.events == []
    laptop.link = routes.Link(name="tel0", ifindex=IFINDEX, kind="tun")
    assert undo_entry(nft, entry, resolved=laptop)
    assert laptop.events == [("revert", IFINDEX)]


def test_a_dead_helper_s_redirects_are_forgotten_unless_a_live_one_owns_the_table(
    laptop: Laptop,
) -> None:
    nft: Any = laptop
    entry = NftTableEntry(name="telepresence")
    laptop.table_present = True  # the kernel refused the delete: another live helper's
    undo_entry(nft, entry, resolved=laptop)
    assert [e[0] for e in laptop.events] == ["nft"]
    laptop.events.clear()
    laptop.table_present = False  # gone with its helper (kill -9), or deleted now
    undo_entry(nft, entry, resolved=laptop)
    assert laptop.events == [("nft", "delete table ip telepresence\n"), ("forget", policy.MARK)]
