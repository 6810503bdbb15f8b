"""The helper following resolv.conf: its choice of nameservers (pure) and the one nft
transaction that moves the redirect (a recording stand-in for libnftables; no root)."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

from telepresence.netfilter import dnspolicy, policy
from telepresence.netfilter.dnspolicy import choose_nameservers
from telepresence.netfilter.dnsstate import DnsApplied
from telepresence.netfilter.journal import Journal, NftTableEntry, current_identity
from telepresence.netfilter.protocol import (
    Error,
    NameserversDone,
    RefreshNameservers,
    Setup,
)
from telepresence.netfilter.routes import LaptopNetwork
from telepresence.netfilter.routestate import Applied
from telepresence.netfilter.state import NetworkState

OLD = [IPv4Address("198.51.100.53"), IPv4Address("198.51.100.54")]
NEW = [IPv4Address("192.0.2.1")]


def test_the_file_s_list_is_taken_as_it_is() -> None:
    choice = choose_nameservers(current=OLD, read=NEW)
    assert choice.nameservers == NEW and not choice.kept
    assert choice.changed_from(OLD) and not choice.changed_from(NEW)
    assert not choose_nameservers(current=OLD, read=OLD).changed_from(OLD)


def test_a_file_without_usable_nameservers_keeps_the_last_good_list() -> None:
    choice = choose_nameservers(current=OLD, read=[])
    assert choice.nameservers == OLD
    assert "no IPv4 nameserver" in choice.kept and "198.51.100.53" in choice.kept
    # With no list yet, there is nothing to keep, and nothing to say.
    assert choose_nameservers(current=[], read=[]) == dnspolicy.NameserverChoice(nameservers=[])


class RecordingNft:
    def __init__(self) -> None:
        self.commands: list[str] = []

    def run(self, commands: str) -> str:
        self.commands.append(commands)
        return ""

    def table_exists(self, name: str) -> bool:
        return True


def connected_state(tmp_path: Path, resolv: Path) -> tuple[NetworkState, RecordingNft]:
    """A NetworkState as it is after a Setup that redirected OLD."""
    nft = RecordingNft()
    state = NetworkState(
        nft=nft,  # type: ignore[arg-type]
        journal=Journal(tmp_path / "journal", owner=current_identity()),
        resolv_conf=resolv,
    )
    plan = policy.plan_setup(
        Setup(subnets=["10.96.0.0/16"], dns_redirect_port=1053, proxy_port=1234),
        network=LaptopNetwork(routes=[], gateways=[], rule_marks=[]),
        nameservers=OLD,
    )
    state._applied = Applied(
        plan=plan,
        dns=DnsApplied(mode="redirect", nameservers=list(OLD)),
        table=NftTableEntry(name="telepresence"),
    )
    return state, nft


def refresh(state: NetworkState) -> NameserversDone:
    response, fds = state.handle(RefreshNameservers())
    assert fds == [] and isinstance(response, NameserversDone), response
    return response


def test_refresh_moves_the_redirect_in_one_transaction(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 198.51.100.53\nnameserver 198.51.100.54\n")
    state, nft = connected_state(tmp_path, resolv)
    assert refresh(state) == NameserversDone(nameservers=[str(a) for a in OLD])
    assert nft.commands == []  # unchanged: nothing to do

    resolv.write_text("nameserver 192.0.2.1\nnameserver 2001:db8::1\n")
    assert refresh(state) == NameserversDone(nameservers=["192.0.2.1"], changed=True)
    assert nft.commands == [
        "flush set ip telepresence dns_servers\n"
        "add element ip telepresence dns_servers { 192.0.2.1 }\n"
    ]
    assert state._applied is not None and state._applied.dns.nameservers == NEW  # for Status


def test_refresh_keeps_the_last_good_list_through_an_empty_file(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    state, nft = connected_state(tmp_path, resolv)
    resolv.write_text("# network changing\nnameserver fe80::1%wlan0\n")
    done = refresh(state)
    assert done.nameservers == [str(a) for a in OLD] and not done.changed
    assert "no IPv4 nameserver" in done.kept
    resolv.unlink()  # renamed away mid-change: the same
    assert refresh(state).nameservers == [str(a) for a in OLD]
    assert nft.commands == []


def test_refresh_before_setup_is_refused(tmp_path: Path) -> None:
    state = NetworkState(
        nft=RecordingNft(),  # type: ignore[arg-type]
        journal=Journal(tmp_path, owner=current_identity()),
        resolv_conf=tmp_path / "resolv.conf",
    )
    response, _ = state.handle(RefreshNameservers())
    assert isinstance(response, Error) and "before Setup" in response.message
